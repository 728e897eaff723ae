"""Random-weight GGUF files of the Llama family, for tests and benchmarks: the one writer behind
tests/tiny_llama.py (tiny files checked against float64 references and llama.cpp) and
scripts/make_synthetic_model.py (full-size shapes for the benchmarks). The engine itself never writes
model files.

`Layout` is what a file holds: its declared hyperparameters and its tensors (names, numpy shapes, formats)
in file order, for the architectures llama (Mixtral = llama with experts), qwen2 (Q/K/V biases), qwen3
(per-head q/k norms) and qwen3moe (q/k norms and experts). The names and metadata keys follow llama.cpp's
GGUF conventions and are written down here, not taken from engine.spec, so a test reading these files
through the engine checks the engine's reading. `write_gguf` streams the tensors one at a time, each from
the caller's `data` function, into a temporary file renamed into place when complete. `random_quantized`
makes a quantized matrix of random bytes whose fp16 block scales the caller sets, so the weights stay
small and finite; what the values are (the random streams) stays with each caller.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter

from .formats import FORMATS

ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe")
_QK_NORMS = ("qwen3", "qwen3moe")  # per-head RMSNorm of q and k
_QKV_BIAS = ("qwen2",)


def random_quantized(rng: np.random.Generator, shape: tuple[int, int], fmt: QT,
                     scales: Callable[[int, int], Sequence[np.ndarray]]) -> np.ndarray:
    """An (N, K) matrix in a block format -> uint8 (N, K / block * type_size): random bytes, then each block's
    fp16 fields (its scale d, then its min where the format has one) set to `scales(n_blocks, n_fields)`,
    one array of n_blocks values per field, so any random quants decode to weights of the caller's size."""
    n, k = shape
    f = FORMATS[fmt.name]
    blocks = rng.integers(0, 256, size=(n * (k // f.block_size), f.type_size), dtype=np.uint8)
    values = scales(len(blocks), len(f.scale_offsets))
    for off, v in zip(f.scale_offsets, values, strict=True):
        blocks[:, off:off + 2] = np.asarray(v).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n, -1)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order: (N, K) matrix, (E, N, K) stacked experts, (n,) vector
    fmt: QT
    kind: str  # "matrix", "norm", "bias", "router" (F32 (E, dim)) or "rope_freqs"

    @property
    def rows(self) -> tuple[int, int]:
        """(rows, row length): a stacked (E, N, K) tensor as one (E*N, K) matrix."""
        return int(np.prod(self.shape[:-1], dtype=np.int64)), self.shape[-1]

    @property
    def nbytes(self) -> int:
        return FORMATS[self.fmt.name].nbytes(self.shape)


@dataclass(frozen=True, slots=True)
class Layout:
    """A Llama-family GGUF's hyperparameters and tensor formats; `tensors()` lists its tensors in file order."""
    arch: str  # one of ARCHS
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    vocab: int  # token_embd rows (the tokenizer's size)
    ctx: int
    rope_base: float
    eps: float
    head_dim: int | None = None  # declared as attention.key_length/value_length when given; else dim / n_heads
    sliding_window: int | None = None  # declared when given
    rope_freqs: bool = False  # a rope_freqs.weight tensor (per-frequency divisors)
    tied: bool = True  # no output.weight: the head is token_embd
    n_experts: int = 0  # > 0: routed experts (stacked ffn_*_exps) with an F32 router
    n_experts_used: int = 0
    expert_ffn: int | None = None  # declared as expert_feed_forward_length when given; else experts use ffn
    embd_fmt: QT = QT.Q8_0
    block_fmts: tuple[QT, ...] = (QT.Q8_0,)  # cycled over the block matrices in file order
    output_fmt: QT = QT.Q8_0
    fmt_of: tuple[tuple[str, QT], ...] = ()  # (tensor name without ".weight", format) overrides

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        for name in ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn", "vocab", "ctx"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if (not self.head_dim and self.dim % self.n_heads) or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim} must split into {self.n_heads} heads, in groups of {self.n_kv_heads}")
        if self.n_experts and not 0 < self.n_experts_used <= self.n_experts:
            raise ValueError(f"n_experts_used must be in 1..{self.n_experts}, got {self.n_experts_used}")
        if self.arch == "qwen3moe" and not self.n_experts:
            raise ValueError("qwen3moe needs experts (n_experts > 0)")
        if not self.block_fmts:
            raise ValueError("block_fmts must name at least one format")
        for t in self.tensors():
            block = FORMATS[t.fmt.name].block_size
            if t.shape[-1] % block:
                raise ValueError(f"{t.name}: row length {t.shape[-1]} is not a multiple of the {t.fmt.name} "
                                 f"block size {block}")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    def tensors(self) -> list[TensorSpec]:
        """Every tensor in file order (the order the data function is called in)."""
        d, hd, E = self.dim, self.head_size, self.n_experts
        q, kv, fe = self.n_heads * hd, self.n_kv_heads * hd, self.expert_ffn or self.ffn
        overrides = {f"{name}.weight": fmt for name, fmt in self.fmt_of}
        out: list[TensorSpec] = []

        def mat(name: str, shape: tuple[int, ...], fmt: QT) -> None:
            out.append(TensorSpec(name, shape, overrides.get(name, fmt), "matrix"))

        def f32(name: str, shape: tuple[int, ...], kind: str) -> None:
            out.append(TensorSpec(name, shape, QT.F32, kind))

        mat("token_embd.weight", (self.vocab, d), self.embd_fmt)
        if self.rope_freqs:
            f32("rope_freqs.weight", (hd // 2,), "rope_freqs")
        matrices = {"attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q)}
        if E:
            matrices |= {"ffn_gate_exps": (E, fe, d), "ffn_up_exps": (E, fe, d), "ffn_down_exps": (E, d, fe)}
        else:
            matrices |= {"ffn_gate": (self.ffn, d), "ffn_up": (self.ffn, d), "ffn_down": (d, self.ffn)}
        k = 0
        for i in range(self.n_layers):
            p = f"blk.{i}."
            f32(p + "attn_norm.weight", (d,), "norm")
            for role, shape in matrices.items():
                mat(p + role + ".weight", shape, self.block_fmts[k % len(self.block_fmts)])
                k += 1
            if self.arch in _QKV_BIAS:
                for role, n in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
                    f32(p + role + ".bias", (n,), "bias")
            if E:  # the router stays F32, as llama.cpp's quantizer leaves it
                f32(p + "ffn_gate_inp.weight", (E, d), "router")
            if self.arch in _QK_NORMS:
                f32(p + "attn_q_norm.weight", (hd,), "norm")
                f32(p + "attn_k_norm.weight", (hd,), "norm")
            f32(p + "ffn_norm.weight", (d,), "norm")
        f32("output_norm.weight", (d,), "norm")
        if not self.tied:
            mat("output.weight", (self.vocab, d), self.output_fmt)
        return out

    def file_bytes(self) -> int:
        """Tensor data bytes (the header and alignment padding come on top)."""
        return sum(t.nbytes for t in self.tensors())


def write_gguf(path: str | os.PathLike, layout: Layout, vocab: dict,
               data: Callable[[int, TensorSpec], np.ndarray], *, name: str | None = None,
               quantization_version: int | None = None, chat_template: str | None = None,
               progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Write `layout` to `path` atomically (a temporary file beside it, renamed when complete).

    `vocab`: "model" (tokenizer.ggml.model), "tokens", "types", "bos", "eos", and where present "pre",
    "merges", "scores", "eot". `data(index, tensor)` returns each tensor's values (its raw bytes for block
    formats), called in file order, one tensor in memory at a time. `progress(done, total, name)` after
    each tensor."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    specs = layout.tensors()
    w = GGUFWriter(str(tmp), arch=layout.arch)
    try:
        _add_metadata(w, layout, vocab, name, quantization_version, chat_template)
        for t in specs:
            byte_shape = (*t.shape[:-1], FORMATS[t.fmt.name].row_nbytes(t.shape[-1]))
            w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.fmt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for index, t in enumerate(specs):
            w.write_tensor_data(data(index, t))
            if progress is not None:
                progress(index + 1, len(specs), t.name)
        w.flush()
        os.fsync(w.fout[0].fileno())
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _add_metadata(w: GGUFWriter, lay: Layout, vocab: dict, name: str | None, quantization_version: int | None,
                  chat_template: str | None) -> None:
    if name is not None:
        w.add_name(name)
    if quantization_version is not None:
        w.add_quantization_version(quantization_version)
    w.add_context_length(lay.ctx)
    w.add_embedding_length(lay.dim)
    w.add_block_count(lay.n_layers)
    w.add_feed_forward_length(lay.ffn)
    w.add_head_count(lay.n_heads)
    w.add_head_count_kv(lay.n_kv_heads)
    w.add_rope_freq_base(lay.rope_base)
    w.add_layer_norm_rms_eps(lay.eps)
    w.add_rope_dimension_count(lay.head_size)
    if lay.sliding_window:
        w.add_sliding_window(lay.sliding_window)
    if lay.head_dim:
        w.add_key_length(lay.head_dim)
        w.add_value_length(lay.head_dim)
    if lay.n_experts:
        w.add_expert_count(lay.n_experts)
        w.add_expert_used_count(lay.n_experts_used)
        if lay.expert_ffn:
            w.add_expert_feed_forward_length(lay.expert_ffn)
    w.add_vocab_size(lay.vocab)
    w.add_tokenizer_model(vocab["model"])
    if "pre" in vocab:
        w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    if "eot" in vocab:
        w.add_eot_token_id(vocab["eot"])
