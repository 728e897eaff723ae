"""Model footprints: the bytes of every tensor, per layer and per role, without reading any weights.

A footprint comes from a GGUF's tensor index (`footprint_from_gguf`) or from a description of a
model nobody has downloaded (`footprint_from_description`, `describe("llama3-70b:Q4_K_M")`), so
plans for 70B-class models can be made and tested on a laptop.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..formats import FORMATS, tensor_nbytes
from ..gguf_file import GGUFFile
from ..spec import ModelSpec
from ..weights import EXPERT_ROLES, expected_layer_shapes, layer_layout

GROUPS = ("attn", "ffn")  # the parts a layer splits into for partial residency (roles attn_* / ffn_*)



@dataclass(frozen=True, slots=True)
class TensorFootprint:
    role: str  # block role (attn_q, ffn_down, ...) or global name (token_embd, output, output_norm, rope_freqs)
    fmt: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def group(self) -> str:
        return self.role.split("_", 1)[0]


@dataclass(frozen=True, slots=True)
class LayerFootprint:
    index: int
    tensors: tuple[TensorFootprint, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def group_tensors(self, group: str) -> tuple[TensorFootprint, ...]:
        return tuple(t for t in self.tensors if t.group == group)

    def group_bytes(self, group: str) -> int:
        return sum(t.nbytes for t in self.group_tensors(group))

    @property
    def attn_bytes(self) -> int:
        return self.group_bytes("attn")

    @property
    def expert_tensors(self) -> tuple[TensorFootprint, ...]:
        return tuple(t for t in self.tensors if t.role in EXPERT_ROLES)

    @property
    def dense_tensors(self) -> tuple[TensorFootprint, ...]:
        """Everything but the routed experts: attention, norms, the router (an MoE layer's own unit)."""
        return tuple(t for t in self.tensors if t.role not in EXPERT_ROLES)

    @property
    def n_experts(self) -> int:
        ex = self.expert_tensors
        return ex[0].shape[0] if ex else 0

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert: its rows of the three stacked tensors (every expert the same size)."""
        return sum(t.nbytes // t.shape[0] for t in self.expert_tensors)

    @property
    def dense_bytes(self) -> int:
        return sum(t.nbytes for t in self.dense_tensors)

    @property
    def ffn_bytes(self) -> int:
        return self.group_bytes("ffn")


@dataclass(frozen=True, slots=True)
class ModelFootprint:
    spec: ModelSpec
    layers: tuple[LayerFootprint, ...]
    embedding: TensorFootprint  # token_embd: only the looked-up rows are needed per token
    output: TensorFootprint | None  # the output head; None when tied to the embedding
    small: tuple[TensorFootprint, ...]  # output_norm, rope_freqs: tiny, always resident
    source: str  # the file path, or the description it was built from

    @property
    def head(self) -> TensorFootprint:
        """The matrix the output projection reads every token (the embedding when tied)."""
        return self.embedding if self.output is None else self.output

    @property
    def layer_bytes(self) -> int:
        return sum(l.nbytes for l in self.layers)

    @property
    def is_moe(self) -> bool:
        return any(l.n_experts for l in self.layers)

    @property
    def weight_bytes(self) -> int:
        """Every tensor of the model, counted once (a tied head is the embedding)."""
        out = self.output.nbytes if self.output is not None else 0
        return self.layer_bytes + self.embedding.nbytes + out + sum(t.nbytes for t in self.small)


def _tensor(role: str, fmt: str, shape: tuple[int, ...]) -> TensorFootprint:
    return TensorFootprint(role, fmt, shape, tensor_nbytes(fmt, shape))


def footprint_from_gguf(f: GGUFFile, spec: ModelSpec) -> ModelFootprint:
    """From the tensor index (validated against the spec, as the loader does); no weight bytes are read."""
    layers = []
    for i in range(spec.n_layers):
        lay = layer_layout(f, spec, i)
        layers.append(LayerFootprint(i, tuple(TensorFootprint(role, info.fmt.name, info.shape, info.nbytes)
                                              for role, info, *_ in lay.tensors)))

    def glob(name: str, role: str) -> TensorFootprint:
        t = f.tensor(name)
        return TensorFootprint(role, t.fmt.name, t.shape, t.nbytes)

    small = [glob("output_norm.weight", "output_norm")]
    if spec.has_rope_freqs:
        small.append(glob("rope_freqs.weight", "rope_freqs"))
    output = None if spec.tied_output else glob("output.weight", "output")
    return ModelFootprint(spec, tuple(layers), glob("token_embd.weight", "token_embd"), output, tuple(small), f.path)


def footprint_from_description(spec: ModelSpec, fmt_by_role: dict[str, str], source: str = "description"
                               ) -> ModelFootprint:
    """A footprint from shapes alone. `fmt_by_role` maps a block role (attn_q, ..., ffn_down), a global
    (token_embd, output) or one tensor ("blk.3.ffn_down", overriding the role) to a format name.
    Norms, biases and rope_freqs default to F32; every matrix must be given."""
    for key, fmt in fmt_by_role.items():
        if fmt not in FORMATS:
            raise ConfigError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})", path=source, field=key)

    def fmt_of(role: str, name: str | None = None) -> str:
        if name is not None and name in fmt_by_role:
            return fmt_by_role[name]
        if role in fmt_by_role:
            return fmt_by_role[role]
        if role.endswith(("norm", "bias")) or role == "rope_freqs":
            return "F32"
        raise ConfigError("no format given for this tensor", path=source, field=name or role)

    shapes = expected_layer_shapes(spec)
    layers = tuple(
        LayerFootprint(i, tuple(_tensor(role, fmt_of(role, f"blk.{i}.{role}"), shape) for role, shape in shapes.items()))
        for i in range(spec.n_layers))
    matrix = (spec.vocab_size, spec.dim)
    small = [_tensor("output_norm", fmt_of("output_norm"), (spec.dim,))]
    if spec.has_rope_freqs:
        small.append(_tensor("rope_freqs", fmt_of("rope_freqs"), (spec.rope_dim // 2,)))
    output = None if spec.tied_output else _tensor("output", fmt_of("output"), matrix)
    return ModelFootprint(spec, layers, _tensor("token_embd", fmt_of("token_embd"), matrix), output, tuple(small),
                          source)


# -- named descriptions -------------------------------------------------------------------------------
_MODELS: dict[str, dict] = {
    "llama3-70b": dict(n_layers=80, dim=8192, n_heads=64, n_kv_heads=8, head_dim=128, ffn_dim=28672,
                       vocab_size=128256, context_length=8192, rope_base=500000.0, has_rope_freqs=True),
    "llama3-8b": dict(n_layers=32, dim=4096, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                      vocab_size=128256, context_length=8192, rope_base=500000.0, has_rope_freqs=True),
    "smollm2-135m": dict(n_layers=30, dim=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                         vocab_size=49152, context_length=8192, rope_base=100000.0, tied_output=True),
    "qwen2.5-72b": dict(architecture="qwen2", n_layers=80, dim=8192, n_heads=64, n_kv_heads=8, head_dim=128,
                        ffn_dim=29568, vocab_size=152064, context_length=32768, rope_base=1000000.0, rms_eps=1e-6),
    "qwen3-32b": dict(architecture="qwen3", n_layers=64, dim=5120, n_heads=64, n_kv_heads=8, head_dim=128,
                      ffn_dim=25600, vocab_size=151936, context_length=40960, rope_base=1000000.0, rms_eps=1e-6),
    # mixture of experts (Qwen/Qwen3-30B-A3B and mistralai/Mixtral-8x7B-v0.1 config.json)
    "qwen3-30b-a3b": dict(architecture="qwen3moe", n_layers=48, dim=2048, n_heads=32, n_kv_heads=4, head_dim=128,
                          ffn_dim=6144, n_experts=128, n_experts_used=8, expert_ffn_dim=768, vocab_size=151936,
                          context_length=40960, rope_base=1000000.0, rms_eps=1e-6),
    "mixtral-8x7b": dict(n_layers=32, dim=4096, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                         n_experts=8, n_experts_used=2, expert_ffn_dim=14336, vocab_size=32000,
                         context_length=32768, rope_base=1000000.0),
}
# llama.cpp's named file types (mix -> its default matrix format) and the uniform mixes (every matrix in
# one format).
_LLAMA_CPP_MIXES = {"Q4_K_M": "Q4_K", "Q3_K_M": "Q3_K", "Q2_K": "Q2_K", "IQ4_XS": "IQ4_XS", "IQ4_NL": "IQ4_NL"}
_UNIFORM_MIXES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0")
MIXES = (*_LLAMA_CPP_MIXES, *_UNIFORM_MIXES)
# llama.cpp's replacement for a format whose block does not divide a tensor's row length
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}


MATRIX_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")  # a dense block's


def matrix_roles(spec: ModelSpec) -> tuple[str, ...]:
    """The block roles that are matrices (quantized in a mix): attention, FFN or routed experts. An MoE
    router (ffn_gate_inp) stays F32, as llama-quantize leaves it."""
    return tuple(role for role, shape in expected_layer_shapes(spec).items()
                 if len(shape) > 1 and role != "ffn_gate_inp")


def describe_spec(model: str) -> ModelSpec:
    if model not in _MODELS:
        raise ConfigError(f"unknown model description {model!r} (known: {', '.join(_MODELS)})", field="--describe")
    kw = {"architecture": "llama", "rms_eps": 1e-5, **_MODELS[model]}
    kw.setdefault("rope_dim", kw["head_dim"])
    return ModelSpec(source=model, **kw)


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's layers that get more bits in the *_M mixes: the first and last eighth, every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _llama_cpp_block_format(mix: str, spec: ModelSpec, role: str, i: int) -> str:
    """The format llama-quantize (no importance matrix) gives block matrix `role` of layer i of a dense
    llama in file type `mix`."""
    base, n, gqa = _LLAMA_CPP_MIXES[mix], spec.n_layers, spec.n_heads // spec.n_kv_heads
    fmt = base
    if role == "attn_v":
        if spec.n_experts == 8:  # llama.cpp: 8-expert models (Mixtral) get a Q8_0 attn_v in every mix
            return "Q8_0"
        if mix == "Q2_K":
            fmt = "Q4_K" if gqa >= 4 else "Q3_K"
        elif mix == "Q3_K_M":
            fmt = "Q5_K" if i < 2 else "Q4_K"
        elif mix == "Q4_K_M" and _more_bits(i, n):
            fmt = "Q6_K"
        elif mix in ("IQ4_XS", "IQ4_NL") and gqa >= 4:
            fmt = "Q5_K"
        if n == 80 and gqa > 1 and fmt in ("Q3_K", "Q4_K"):  # llama.cpp's 70B rule: small, shared attn_v
            fmt = "Q5_K"
    elif role in ("ffn_down", "ffn_down_exps"):
        if mix == "Q2_K":
            fmt = "Q3_K"
        elif mix == "Q3_K_M":
            fmt = "Q5_K" if i < n // 16 else "Q4_K"
        elif mix == "Q4_K_M" and _more_bits(i, n):
            fmt = "Q6_K"
        elif mix in ("IQ4_XS", "IQ4_NL") and i < n // 8:
            fmt = "Q5_K"
    elif role == "attn_output":
        fmt = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K"}.get(mix, base)
    return fmt


def quant_mix(spec: ModelSpec, mix: str) -> dict[str, str]:
    """Formats per role (and per "blk.i.role" where layers differ) for a named mix.

    Q4_K_M, Q3_K_M, Q2_K, IQ4_XS and IQ4_NL follow llama-quantize's choices for a dense llama without an
    importance matrix: a Q6_K output head (Q8_0 when its rows do not divide into 256-blocks; a tied head
    is the embedding), more bits for attn_v, ffn_down (and attn_output in Q2_K / Q3_K_M) by layer as
    llama.cpp's rules say, the embedding in the mix's default format. The other mixes put every matrix
    in the named format. A format whose block does not divide a row length falls back as in llama.cpp
    (Q2_K, Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL; then F16)."""
    if mix not in MIXES:
        raise ConfigError(f"unknown quantization mix {mix!r} (known: {', '.join(MIXES)})", field="--describe")
    base = _LLAMA_CPP_MIXES.get(mix, mix)
    roles = matrix_roles(spec)
    fmts: dict[str, str] = {role: base for role in (*roles, "token_embd")}
    if spec.n_experts:
        fmts["ffn_gate_inp"] = "F32"
    if not spec.tied_output:
        fmts["output"] = base
    if mix in _LLAMA_CPP_MIXES:
        fmts["token_embd" if spec.tied_output else "output"] = "Q6_K"
        for role in ("attn_v", "ffn_down_exps" if spec.n_experts else "ffn_down", "attn_output"):
            per_layer = [_llama_cpp_block_format(mix, spec, role, i) for i in range(spec.n_layers)]
            fmts[role] = max(set(per_layer), key=per_layer.count)  # the most common; the others per layer
            fmts.update((f"blk.{i}.{role}", fmt) for i, fmt in enumerate(per_layer) if fmt != fmts[role])
    row_len = {"ffn_down": spec.ffn_dim, "ffn_down_exps": spec.expert_ffn_dim, "attn_output": spec.q_dim}
    for key, fmt in fmts.items():
        n = row_len.get(key.rsplit(".", 1)[-1], spec.dim)
        if n % FORMATS[fmt].block_size:
            fmt = _FALLBACK.get(fmt, fmt)
            fmts[key] = fmt if n % FORMATS[fmt].block_size == 0 else "F16"
    return fmts


def describe(description: str) -> ModelFootprint:
    """"llama3-70b:Q4_K_M" -> its footprint (no file needed). Models: the keys of _MODELS."""
    model, _, mix = description.partition(":")
    spec = describe_spec(model)
    return footprint_from_description(spec, quant_mix(spec, mix or "Q4_K_M"), source=description)
