"""config.json of a Hugging Face checkpoint -> the GGUF architecture and hyper-parameters.

One table (`MODEL_TYPES`) maps each supported `model_type` to its GGUF architecture and says
whether llama.cpp's converter permutes Q/K rows for adjacent-pair rope (llama does, the NeoX-rope
Qwen models do not). Every refusal names config.json and the field.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ..errors import ModelFormatError, UnsupportedModelError
from ..spec import ARCHITECTURES, ModelSpec

# model_type -> (GGUF architecture, Q/K rows permuted for adjacent-pair rope)
MODEL_TYPES = MappingProxyType({
    "llama": ("llama", True),
    "mistral": ("llama", True),  # dense Mistral runs as llama; its sliding window is ignored (as llama.cpp)
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
})
assert all(arch in ARCHITECTURES for arch, _ in MODEL_TYPES.values())


@dataclass(frozen=True, slots=True)
class HFConfig:
    path: str  # config.json
    model_type: str
    permute_qk: bool  # llama.cpp's converter permutes Q/K rows for adjacent-pair rope
    spec: ModelSpec
    llama3_rope: tuple[float, float, float, int] | None  # (factor, low_freq_factor, high_freq_factor, original ctx)
    sliding_window: int | None

    def gguf_metadata(self) -> dict[str, int | float | str]:
        """The `{arch}.*` keys llama.cpp's converter writes for this model."""
        s = self.spec
        a = s.architecture
        meta = {
            f"{a}.block_count": s.n_layers, f"{a}.context_length": s.context_length,
            f"{a}.embedding_length": s.dim, f"{a}.feed_forward_length": s.ffn_dim,
            f"{a}.attention.head_count": s.n_heads, f"{a}.attention.head_count_kv": s.n_kv_heads,
            f"{a}.attention.layer_norm_rms_epsilon": s.rms_eps, f"{a}.rope.freq_base": s.rope_base,
            f"{a}.rope.dimension_count": s.rope_dim, f"{a}.vocab_size": s.vocab_size,
        }
        if s.head_dim != s.dim // s.n_heads:
            meta |= {f"{a}.attention.key_length": s.head_dim, f"{a}.attention.value_length": s.head_dim}
        if self.sliding_window:
            meta[f"{a}.attention.sliding_window"] = self.sliding_window  # declared; the loader ignores it
        if s.rope_scale != 1.0:
            meta |= {f"{a}.rope.scaling.type": "linear", f"{a}.rope.scaling.factor": s.rope_scale}
        return meta


def read_config(directory: str | os.PathLike) -> HFConfig:
    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ModelFormatError("missing: a Hugging Face checkpoint directory needs its config.json",
                               path=path, field="config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"unreadable: {e}", path=path, field="config.json") from None
    if not isinstance(raw, dict):
        raise ModelFormatError("expected a JSON object", path=path, field="config.json")

    def get(key: str, kind: type | tuple[type, ...], default=None, required: bool = True):
        value = raw.get(key, default)
        if value is None and not required:
            return None
        if value is None:
            raise ModelFormatError("required field is missing", path=path, field=key)
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise ModelFormatError(f"expected {getattr(kind, '__name__', kind)}, got {value!r}", path=path, field=key)
        return value

    model_type = get("model_type", str)
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported (supported: "
                                    f"{', '.join(MODEL_TYPES)})", path=path, field="model_type")
    arch, permute = MODEL_TYPES[model_type]
    dim, n_heads = get("hidden_size", int), get("num_attention_heads", int)
    if n_heads <= 0 or dim <= 0:
        raise ModelFormatError("must be positive", path=path, field="num_attention_heads")
    scale, llama3 = 1.0, None
    rope_scaling = raw.get("rope_scaling")
    if rope_scaling is not None:
        kind = isinstance(rope_scaling, dict) and (rope_scaling.get("rope_type") or rope_scaling.get("type"))
        if kind not in ("linear", "llama3", "default"):
            raise UnsupportedModelError(f"rope scaling {kind or rope_scaling!r} is not supported (linear, llama3)",
                                        path=path, field="rope_scaling")
        if kind == "linear":
            scale = float(get_nested(rope_scaling, "factor", path))
        elif kind == "llama3":
            llama3 = (*(float(get_nested(rope_scaling, k, path)) for k in
                        ("factor", "low_freq_factor", "high_freq_factor")),
                      int(get_nested(rope_scaling, "original_max_position_embeddings", path)))
    window = raw.get("sliding_window") if raw.get("use_sliding_window", model_type == "mistral") else None
    head_dim = get("head_dim", int, dim // n_heads)
    spec = ModelSpec(
        architecture=arch, n_layers=get("num_hidden_layers", int), dim=dim, n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads", int, n_heads), head_dim=head_dim,
        ffn_dim=get("intermediate_size", int), vocab_size=get("vocab_size", int),
        context_length=get("max_position_embeddings", int), rms_eps=float(get("rms_norm_eps", (int, float))),
        rope_base=float(get("rope_theta", (int, float), 10000.0)), rope_dim=head_dim, rope_scale=scale,
        has_rope_freqs=llama3 is not None, tied_output=get("tie_word_embeddings", bool, False), source=str(path))
    return HFConfig(str(path), model_type, permute, spec, llama3, window)


def llama3_rope_factors(cfg: HFConfig) -> list[float]:
    """Llama 3.1's per-frequency divisors (GGUF rope_freqs.weight): long wavelengths slowed by `factor`,
    short ones kept, a smooth blend between the original context's low- and high-frequency bounds."""
    factor, low, high, ctx = cfg.llama3_rope
    hd = cfg.spec.rope_dim
    out = []
    for i in range(0, hd, 2):
        wavelen = 2 * math.pi * cfg.spec.rope_base ** (i / hd)
        if wavelen < ctx / high:
            out.append(1.0)
        elif wavelen > ctx / low:
            out.append(factor)
        else:
            smooth = (ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


def get_nested(d: dict, key: str, path: Path):
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ModelFormatError(f"expected a positive number, got {value!r}", path=path, field=f"rope_scaling.{key}")
    return value
