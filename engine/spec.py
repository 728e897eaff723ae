"""ModelSpec: the validated hyper-parameters of a model, read from GGUF metadata.

Architectures are data: `ARCHITECTURES` says how each one differs from the Llama block (rope
style, Q/K/V biases, per-head q/k RMSNorm, mixture-of-experts FFN); the one model code path reads
those fields. Mixtral has no architecture name of its own: llama.cpp's converter writes it as
`llama` with `llama.expert_count`, and so does this engine read it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from types import MappingProxyType

from .errors import ModelFormatError, UnsupportedModelError, brief

log = logging.getLogger("engine.spec")

ROPE_STYLES = ("norm", "neox")  # rotate adjacent pairs (2i, 2i+1) | halves (i, i + rope_dim/2)


@dataclass(frozen=True, slots=True)
class Arch:
    """How a GGUF architecture's block differs from Llama's, as llama.cpp runs it."""

    rope_style: str  # "norm": GGUF stores llama's Q/K permuted for adjacent pairs; "neox": not permuted
    attn_bias: bool = False  # attn_q/k/v carry a bias vector (qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before rope (qwen3)
    experts: str = "optional"  # "optional": MoE iff {arch}.expert_count > 0 (llama: Mixtral) | "required"
    # where an MoE block's expert FFN width comes from: {arch}.expert_feed_forward_length (falling back,
    # as llama.cpp does, to feed_forward_length / expert_used_count), or feed_forward_length itself
    expert_ffn_key: str | None = None

    def __post_init__(self):
        if self.rope_style not in ROPE_STYLES:
            raise ValueError(f"rope_style {self.rope_style!r} is not one of {ROPE_STYLES}")
        if self.experts not in ("optional", "required"):
            raise ValueError(f"experts {self.experts!r} is not optional or required")


ARCHITECTURES = MappingProxyType({
    "llama": Arch("norm"),  # also Mistral dense; a declared sliding window is ignored, as llama.cpp does
    "qwen2": Arch("neox", attn_bias=True),
    "qwen3": Arch("neox", qk_norm=True),
    "qwen3moe": Arch("neox", qk_norm=True, experts="required", expert_ffn_key="expert_feed_forward_length"),
})
# MoE routing as llama.cpp runs llama (Mixtral) and qwen3moe blocks: softmax over the E router logits,
# the k most probable experts, their probabilities renormalised to sum to 1 (norm_w), no extra scale.
GATING_SOFTMAX = 1  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX, the value of {arch}.expert_gating_func
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    architecture: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_base: float
    rope_dim: int
    rope_scale: float = 1.0  # linear position scaling (positions are divided by it)
    has_rope_freqs: bool = False  # per-dimension frequency divisors (llama3 scaling), tensor rope_freqs.weight
    tied_output: bool = False  # no output.weight: the embedding matrix is the output head
    n_experts: int = 0  # E ({arch}.expert_count); 0: a dense FFN
    n_experts_used: int = 0  # k ({arch}.expert_used_count): experts each token is routed to
    expert_ffn_dim: int = 0  # Fe: rows of one expert's gate/up matrices
    expert_weights_norm: bool = True  # the k routing weights are renormalised to sum to 1
    source: str | None = None  # file the spec was read from, for error messages

    @property
    def arch(self) -> Arch:
        return ARCHITECTURES[self.architecture]

    @property
    def rope_style(self) -> str:
        return self.arch.rope_style

    @property
    def attn_bias(self) -> bool:
        return self.arch.attn_bias

    @property
    def qk_norm(self) -> bool:
        return self.arch.qk_norm

    @property
    def moe(self) -> bool:
        return self.n_experts > 0

    def __post_init__(self):
        def bad(field: str, msg: str):
            raise ModelFormatError(msg, path=self.source, field=field)

        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {brief(self.architecture)} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
                path=self.source, field="general.architecture")
        a = self.architecture
        for name in ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size",
                     "context_length", "rope_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                bad(f"{a}.{_KEYS.get(name, name)}", f"must be a positive integer, got {brief(v)}")
        if self.n_heads % self.n_kv_heads:
            bad(f"{a}.attention.head_count_kv",
                f"{self.n_kv_heads} KV heads do not divide {self.n_heads} attention heads")
        if self.rope_dim > self.head_dim or self.rope_dim % 2:
            bad(f"{a}.rope.dimension_count", f"{self.rope_dim} must be even and <= head dim {self.head_dim}")
        if not (0 < self.rms_eps < 1):
            bad(f"{a}.attention.layer_norm_rms_epsilon", f"{self.rms_eps!r} is not in (0, 1)")
        if not self.rope_base > 0:
            bad(f"{a}.rope.freq_base", f"{self.rope_base!r} must be positive")
        if not self.rope_scale > 0:
            bad(f"{a}.rope.scaling.factor", f"{self.rope_scale!r} must be positive")
        self._check_experts(bad)

    def _check_experts(self, bad) -> None:
        a, E, k = self.architecture, self.n_experts, self.n_experts_used
        for name in ("n_experts", "n_experts_used", "expert_ffn_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(f"{a}.{_KEYS[name]}", f"must be a non-negative integer, got {brief(v)}")
        if E == 0:
            if self.arch.experts == "required":
                bad(f"{a}.expert_count", f"a {a} model needs experts, got {brief(E)}")
            if k:
                bad(f"{a}.expert_used_count", f"{k} experts per token, but the model declares no experts")
            return
        if k < 1:
            bad(f"{a}.expert_used_count", f"must be at least 1 for a model with {E} experts, got {k}")
        if k > E:
            bad(f"{a}.expert_used_count", f"{k} experts per token is more than the {E} experts (expert_count)")
        if self.expert_ffn_dim < 1:
            bad(f"{a}.{self.arch.expert_ffn_key or 'feed_forward_length'}",
                f"must be a positive integer, got {brief(self.expert_ffn_dim)}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_gguf(cls, f) -> "ModelSpec":
        """Build from an `engine.gguf_file.GGUFFile` (metadata plus a few tensor shapes)."""
        arch = f.require("general.architecture", str)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {brief(arch)} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
                path=f.path, field="general.architecture")

        def req(key, kind=int):
            return f.require(f"{arch}.{key}", kind)

        def opt(key, default):
            return f.get(f"{arch}.{key}", default)

        def num(key, default):  # an optional float: a string or array there is a typed error, not a crash
            v = opt(key, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ModelFormatError(f"has type {type(v).__name__}, expected a number", path=f.path,
                                       field=f"{arch}.{key}")
            return float(v)

        dim = req("embedding_length")
        n_heads = req("attention.head_count")
        if isinstance(n_heads, list):
            raise UnsupportedModelError("per-layer head counts are not supported", path=f.path,
                                        field=f"{arch}.attention.head_count")
        head_dim = opt("attention.key_length", dim // n_heads if n_heads else 0)
        value_dim = opt("attention.value_length", head_dim)
        if value_dim != head_dim:
            raise UnsupportedModelError(f"value head size {value_dim} differs from key head size {head_dim}",
                                        path=f.path, field=f"{arch}.attention.value_length")
        window = opt("attention.sliding_window", None)
        if window:
            log.warning("%s: %s.attention.sliding_window = %s is ignored (full attention, as llama.cpp runs "
                        "arch %s)", f.path, arch, window, arch)
        embd = f.tensor("token_embd.weight")
        vocab = opt("vocab_size", None)
        if vocab is None:
            vocab = len(f.get("tokenizer.ggml.tokens", ())) or embd.shape[0]
        scaling_type = opt("rope.scaling.type", "none")
        if scaling_type not in ("none", "linear"):
            raise UnsupportedModelError(f"rope scaling {brief(scaling_type)} is not supported (none, linear)",
                                        path=f.path, field=f"{arch}.rope.scaling.type")
        scale = num("rope.scaling.factor", 1.0) if scaling_type == "linear" else 1.0
        moe = _experts_from_gguf(f, arch)
        spec = cls(
            architecture=arch,
            n_layers=req("block_count"),
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=opt("attention.head_count_kv", n_heads),
            head_dim=head_dim,
            ffn_dim=moe.pop("ffn_dim"),
            vocab_size=vocab,
            context_length=req("context_length"),
            rms_eps=float(req("attention.layer_norm_rms_epsilon", (int, float))),
            rope_base=num("rope.freq_base", 10000.0),
            rope_dim=opt("rope.dimension_count", head_dim),
            rope_scale=scale or 1.0,
            has_rope_freqs="rope_freqs.weight" in f.tensors,
            tied_output="output.weight" not in f.tensors,
            source=f.path,
            **moe,
        )
        for t in (embd,) if spec.tied_output else (embd, f.tensor("output.weight")):
            if t.shape != (spec.vocab_size, spec.dim):
                raise ModelFormatError(f"shape {t.shape} does not match (vocab {spec.vocab_size}, dim {spec.dim})",
                                       path=f.path, field=t.name)
        return spec


def _experts_from_gguf(f, arch: str) -> dict:
    """ffn_dim and the MoE fields of a GGUF (as llama.cpp reads them); ModelSpec validates the values."""
    def opt_int(key: str, default):
        return f.require(f"{arch}.{key}", int) if f"{arch}.{key}" in f.metadata else default

    E, k = opt_int("expert_count", 0), opt_int("expert_used_count", 0)
    a = ARCHITECTURES[arch]
    # an MoE model may omit the dense FFN width (llama.cpp reads it as optional)
    ffn = f.require(f"{arch}.feed_forward_length", int) if not E or f"{arch}.feed_forward_length" in f.metadata \
        else None
    if a.expert_ffn_key is not None:
        fe = opt_int(a.expert_ffn_key, None)
        if fe is None:
            if ffn is None:
                raise ModelFormatError("required metadata key is missing", path=f.path, field=f"{arch}.{a.expert_ffn_key}")
            fe = ffn // k if isinstance(k, int) and k > 0 else 0  # llama.cpp: n_ff / n_expert_used
    else:
        fe = ffn if E else 0
        if E and ffn is None:
            raise ModelFormatError("required metadata key is missing", path=f.path, field=f"{arch}.feed_forward_length")
    if E:  # the routing llama.cpp hard-codes for these architectures; a file asking for another is refused
        gating = f.get(f"{arch}.expert_gating_func", GATING_SOFTMAX)
        if gating != GATING_SOFTMAX:
            raise UnsupportedModelError(f"expert gating {brief(gating)} is not supported (softmax = {GATING_SOFTMAX})",
                                        path=f.path, field=f"{arch}.expert_gating_func")
        if f.get(f"{arch}.expert_weights_norm", True) is not True:
            raise UnsupportedModelError("routing weights that are not renormalised are not supported for "
                                        f"{arch}", path=f.path, field=f"{arch}.expert_weights_norm")
        w_scale = f.get(f"{arch}.expert_weights_scale", 1.0)
        if w_scale not in (0.0, 1.0):
            raise UnsupportedModelError(f"a routing weight scale of {brief(w_scale)} is not supported",
                                        path=f.path, field=f"{arch}.expert_weights_scale")
        for key in ("expert_shared_count", "expert_shared_feed_forward_length"):
            if f.get(f"{arch}.{key}", 0):
                raise UnsupportedModelError("shared experts are not supported", path=f.path, field=f"{arch}.{key}")
    return {"ffn_dim": ffn if ffn is not None else fe, "n_experts": E, "n_experts_used": k, "expert_ffn_dim": fe}


_KEYS = {
    "n_layers": "block_count", "dim": "embedding_length", "n_heads": "attention.head_count",
    "n_kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
    "ffn_dim": "feed_forward_length", "vocab_size": "vocab_size", "context_length": "context_length",
    "rope_dim": "rope.dimension_count", "n_experts": "expert_count", "n_experts_used": "expert_used_count",
    "expert_ffn_dim": "expert_feed_forward_length",
}
