"""Typed views of a model's weights: quantized matrices stay raw GGUF bytes until a kernel reads them.

`LayerLayout` says where each tensor of a block sits inside the layer's packed byte buffer (the
concatenation of the layer's coalesced file runs), so the same code binds weights from a memory map,
a resident copy or a streamed staging buffer.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .errors import ModelFormatError, UnsupportedModelError
from .formats import QuantFormat
from .gguf_file import GGUFFile, TensorInfo
from .spec import ModelSpec


View = Callable[[TensorInfo], torch.Tensor]  # a tensor's raw uint8 bytes, wherever they live
Layout = Callable[[TensorInfo], int]  # rows per interleaved group of a matrix's bytes (1: the file's rows)


def plain_rows(info: TensorInfo) -> int:
    """The Layout of bytes as the file has them."""
    return 1


def _grouped(data: torch.Tensor, fmt: QuantFormat, shape: tuple[int, ...], group: int) -> torch.Tensor:
    """data's bytes as (rows / group, blocks per row, group, bytes per block): the interleaved layout."""
    n, k = math.prod(shape[:-1]), shape[-1]
    return data.view(n // group, k // fmt.block_size, group, fmt.type_size)


def interleave_rows(data: torch.Tensor, fmt: QuantFormat, shape: tuple[int, ...], group: int,
                    chunk_bytes: int = 512 << 10) -> None:
    """Lay the raw bytes of an (N, K) matrix (or a stack of them, (E, N, K) as rows of (E N, K)) out in place
    in groups of `group` rows (N a multiple of it): group g's bytes are block 0 of its rows 0..group-1, then
    block 1 of them, and so on (the CPU kernels' row_at, engine/cpu/qlinear.cpp), so that a tile of a
    group's rows reads one stream. At most `chunk_bytes` (rounded up to a group) are copied aside at a
    time: 512 KiB stays in L2 (13-16 GB/s on the 70B-shaped matrices, one thread; 16 MiB chunks ran 3 GB/s)."""
    n, k = math.prod(shape[:-1]), shape[-1]
    plain = data.view(n // group, group, k // fmt.block_size, fmt.type_size)  # (groups, group, blocks, bytes)
    out = _grouped(data, fmt, shape, group)
    step = max(1, chunk_bytes // (group * fmt.row_nbytes(k)))
    for g in range(0, n // group, step):
        out[g:g + step] = plain[g:g + step].clone().transpose(1, 2)


@dataclass(frozen=True, slots=True)
class QWeight:
    """A (N, K) matrix in its file format: `data` holds N rows of fmt.row_nbytes(K) raw bytes, plain
    (interleave 1, as in the file) or interleaved in groups of `interleave` rows (interleave_rows: the
    resident store's layout for the CPU kernels)."""

    name: str
    fmt: QuantFormat
    shape: tuple[int, int]  # (N out features, K in features)
    data: torch.Tensor  # uint8, contiguous
    interleave: int = 1

    @classmethod
    def of(cls, info: TensorInfo, data: torch.Tensor, interleave: int = 1) -> QWeight:
        """The matrix `info` describes, bound over its raw bytes `data` wherever they live."""
        return cls(info.name, info.fmt, info.shape, data, interleave)

    def plain(self) -> torch.Tensor:
        """The raw bytes as (N, bytes per row) in the file's row order (a copy if interleaved)."""
        n, k = self.shape
        if self.interleave == 1:
            return self.data.view(n, self.fmt.row_nbytes(k))
        return _grouped(self.data, self.fmt, self.shape, self.interleave).transpose(1, 2).reshape(n, -1)

    def dequantize(self) -> torch.Tensor:
        return self.fmt.dequantize(self.plain(), self.shape)  # (N, K) float32

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantize only the given rows (embedding lookup)."""
        ids = ids.reshape(-1).to(self.data.device)
        if self.interleave == 1:
            raw = self.data.view(self.shape[0], self.fmt.row_nbytes(self.shape[1])).index_select(0, ids)
        else:
            g = self.interleave
            raw = _grouped(self.data, self.fmt, self.shape, g)[ids // g, :, ids % g].reshape(len(ids), -1)
        return self.fmt.dequantize(raw, (raw.shape[0], self.shape[1]))  # (len(ids), K)


@dataclass(frozen=True, slots=True)
class FileRows:
    """An (N, K) matrix left in the model file whose rows are read on demand with `read(offset, nbytes,
    label)` (FileReader.pread): the embedding when it is not resident. A file that shrinks or fails under
    a running model is then a WeightIOError; rows of a memory-mapped view would kill it with SIGBUS."""

    name: str
    fmt: QuantFormat
    shape: tuple[int, int]  # (N rows, K)
    offset: int  # absolute file offset of row 0
    read: Callable[[int, int, str], bytes]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantize only the given rows (embedding lookup)."""
        row_bytes = self.fmt.row_nbytes(self.shape[1])
        flat = ids.reshape(-1).tolist()
        raw = np.empty((len(flat), row_bytes), dtype=np.uint8)  # (T, row_bytes)
        seen: dict[int, int] = {}
        for j, i in enumerate(flat):
            if i in seen:
                raw[j] = raw[seen[i]]
                continue
            if not 0 <= i < self.shape[0]:
                raise ModelFormatError(f"row {i} is outside [0, {self.shape[0]})", field=self.name)
            raw[j] = np.frombuffer(self.read(self.offset + i * row_bytes, row_bytes, f"{self.name} row {i}"),
                                   dtype=np.uint8)
            seen[i] = j
        return self.fmt.dequantize(torch.from_numpy(raw), (len(flat), self.shape[1]))  # (len(ids), K)


EXPERT_ROLES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")  # stacked (E, Fe, dim), (E, Fe, dim), (E, dim, Fe)


def expert_slice(info: TensorInfo, e: int) -> TensorInfo:
    """Expert e of a stacked expert tensor (E, N, K) as a tensor of its own (N, K): rows [e*N, (e+1)*N) of
    the tensor viewed as (E*N, K), contiguous in GGUF. THE one place that locates an expert's bytes."""
    if len(info.shape) != 3:
        raise ModelFormatError(f"expected a stacked (experts, rows, cols) tensor, got shape {info.shape}",
                               field=info.name)
    E, n, k = info.shape
    if not 0 <= e < E:
        raise ModelFormatError(f"expert {e} is outside [0, {E})", field=info.name)
    nbytes = n * info.fmt.row_nbytes(k, field=info.name)
    return TensorInfo(f"{info.name}[{e}]", info.fmt, (n, k), info.offset + e * nbytes, nbytes)


@dataclass(frozen=True, slots=True)
class ExpertWeights:
    """One expert's SwiGLU FFN, bound wherever its bytes live."""

    gate: QWeight  # (Fe, dim)
    up: QWeight  # (Fe, dim)
    down: QWeight  # (dim, Fe)


@dataclass(frozen=True, slots=True)
class ExpertSource:
    """A block's three stacked expert tensors bound over one byte buffer each (the layer's bytes where they
    live): `expert(e)` slices expert e out of them with expert_slice, without copying."""

    infos: tuple[TensorInfo, TensorInfo, TensorInfo]  # ffn_gate_exps, ffn_up_exps, ffn_down_exps
    raw: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # their uint8 bytes
    interleave: tuple[int, int, int] = (1, 1, 1)  # rows per group of each (QWeight.interleave of every expert)
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_experts(self) -> int:
        return self.infos[0].shape[0]

    def expert(self, e: int) -> ExpertWeights:
        got = self._cache.get(e)
        if got is None:
            parts = []
            for info, raw, group in zip(self.infos, self.raw, self.interleave):
                t = expert_slice(info, e)
                at = t.offset - info.offset
                parts.append(QWeight.of(t, raw[at:at + t.nbytes], group))
            got = self._cache[e] = ExpertWeights(*parts)
        return got


@dataclass(frozen=True, slots=True)
class LayerWeights:
    attn_norm: torch.Tensor  # (dim,) float32
    attn_q: QWeight  # (q_dim, dim)
    attn_k: QWeight  # (kv_dim, dim)
    attn_v: QWeight  # (kv_dim, dim)
    attn_output: QWeight  # (dim, q_dim)
    ffn_norm: torch.Tensor  # (dim,) float32
    ffn_gate: QWeight | None = None  # (ffn, dim); None in an MoE block
    ffn_up: QWeight | None = None  # (ffn, dim)
    ffn_down: QWeight | None = None  # (dim, ffn)
    ffn_gate_inp: QWeight | None = None  # (E, dim) the router of an MoE block
    experts: ExpertSource | None = None  # its experts (the model asks the provider: weights.experts)
    attn_q_bias: torch.Tensor | None = None  # (q_dim,) float32 (arch attn_bias)
    attn_k_bias: torch.Tensor | None = None  # (kv_dim,)
    attn_v_bias: torch.Tensor | None = None  # (kv_dim,)
    attn_q_norm: torch.Tensor | None = None  # (head_dim,) float32 per-head RMSNorm weight (arch qk_norm)
    attn_k_norm: torch.Tensor | None = None  # (head_dim,)


@dataclass(frozen=True, slots=True)
class GlobalWeights:
    token_embd: QWeight | FileRows  # (vocab, dim): rows() is all the model uses
    output_norm: torch.Tensor  # (dim,) float32
    rope_freqs: torch.Tensor | None  # (rope_dim/2,) float32 frequency divisors, or None


def expected_layer_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Block role -> shape for the spec's architecture. Roles are GGUF names less "blk.N." and
    ".weight"; a ".bias" suffix becomes "_bias" (attn_q.bias -> attn_q_bias)."""
    d, q, kv, f = spec.dim, spec.q_dim, spec.kv_dim, spec.ffn_dim
    shapes = {
        "attn_norm": (d,), "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q),
        "ffn_norm": (d,),
    }
    if spec.moe:
        E, fe = spec.n_experts, spec.expert_ffn_dim
        shapes |= {"ffn_gate_inp": (E, d), "ffn_gate_exps": (E, fe, d), "ffn_up_exps": (E, fe, d),
                   "ffn_down_exps": (E, d, fe)}
    else:
        shapes |= {"ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
    if spec.attn_bias:
        shapes |= {"attn_q_bias": (q,), "attn_k_bias": (kv,), "attn_v_bias": (kv,)}
    if spec.qk_norm:
        shapes |= {"attn_q_norm": (spec.head_dim,), "attn_k_norm": (spec.head_dim,)}
    return shapes


def tensor_name(i: int, role: str) -> str:
    """Block i's GGUF tensor name for a role: tensor_name(3, "attn_q_bias") -> "blk.3.attn_q.bias"."""
    return f"blk.{i}.{role.removesuffix('_bias')}.bias" if role.endswith("_bias") else f"blk.{i}.{role}.weight"


def role_of(name: str) -> str:
    """"blk.3.attn_q.bias" -> "attn_q_bias", "blk.3.attn_q_norm.weight" -> "attn_q_norm"."""
    rest = name.split(".", 2)[2]
    return rest.removesuffix(".weight") if rest.endswith(".weight") else rest.removesuffix(".bias") + "_bias"


@dataclass(frozen=True, slots=True)
class LayerLayout:
    """A block's tensors (validated against the spec) and the coalesced file runs they occupy."""

    index: int
    runs: tuple[tuple[int, int], ...]  # (absolute file offset, length), sorted
    tensors: tuple[tuple[str, TensorInfo], ...]  # (role, info)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.runs)

    def bind(self, view: View, layout: Layout = plain_rows) -> LayerWeights:
        """Build LayerWeights; `view(info)` returns the tensor's raw uint8 bytes wherever they live,
        `layout(info)` the rows per group they are interleaved in (of each expert, for stacked experts)."""
        parts, stacked = {}, {}
        for role, info in self.tensors:
            raw = view(info)
            if role in EXPERT_ROLES:
                stacked[role] = (info, raw, layout(info))
            else:
                parts[role] = _vector(info, raw) if len(info.shape) == 1 else QWeight.of(info, raw, layout(info))
        if stacked:
            infos, raws, groups = zip(*(stacked[r] for r in EXPERT_ROLES))
            parts["experts"] = ExpertSource(infos, raws, groups)
        return LayerWeights(**parts)


def _vector(info: TensorInfo, raw: torch.Tensor) -> torch.Tensor:
    if info.fmt.name == "F32":
        if raw.data_ptr() % 4:  # general.alignment 1 or 2 puts F32 data at an odd offset: copy it aligned
            raw = raw.clone()
        return raw.view(torch.float32)
    return info.fmt.dequantize(raw, info.shape)


def layer_layout(f: GGUFFile, spec: ModelSpec, i: int) -> LayerLayout:
    """Validate block i's tensors against the spec and locate them in the packed run buffer."""
    expected = expected_layer_shapes(spec)
    found: dict[str, TensorInfo] = {}
    for t in f.layer_tensors(i):
        role = role_of(t.name)
        if role not in expected or not t.name.endswith((".weight", ".bias")):
            legacy = spec.moe and re.fullmatch(r"ffn_(gate|up|down)\.\d+", role)
            raise UnsupportedModelError("one tensor per expert (the legacy Mixtral layout) is not supported: the "
                                        "experts must be stacked (ffn_*_exps, as current llama.cpp converters write)"
                                        if legacy else f"unexpected tensor in a {spec.architecture} block",
                                        path=f.path, field=t.name)
        if t.shape != expected[role]:
            raise ModelFormatError(f"shape {t.shape} does not match the metadata, expected {expected[role]}"
                                   f"{_from_keys(spec, role)}", path=f.path, field=t.name)
        found[role] = t
    for role in expected:
        if role not in found:
            raise ModelFormatError("required tensor is missing", path=f.path, field=tensor_name(i, role))
    return LayerLayout(i, f.layer_runs(i), tuple((role, found[role]) for role in expected))


def _from_keys(spec: ModelSpec, role: str) -> str:
    """Which metadata an MoE tensor's expected shape comes from, for the error message."""
    if role != "ffn_gate_inp" and role not in EXPERT_ROLES:
        return ""
    a = spec.architecture
    keys = [f"{a}.expert_count = {spec.n_experts}", f"{a}.embedding_length = {spec.dim}"]
    if role != "ffn_gate_inp":
        keys.append(f"{a}.{spec.arch.expert_ffn_key or 'feed_forward_length'} = {spec.expert_ffn_dim}")
    return f" (from {', '.join(keys)})"


def global_weights(f: GGUFFile, spec: ModelSpec) -> GlobalWeights:
    def q(name: str) -> QWeight:
        t = f.tensor(name)
        if len(t.shape) != 2:
            raise ModelFormatError(f"expected a matrix, got shape {t.shape}", path=f.path, field=name)
        return QWeight.of(t, f.view(t))

    embd = q("token_embd.weight")
    out = embd if spec.tied_output else q("output.weight")
    if out.shape != (spec.vocab_size, spec.dim):
        raise ModelFormatError(f"shape {out.shape} does not match (vocab, dim)", path=f.path, field=out.name)
    norm = f.tensor("output_norm.weight")
    if norm.shape != (spec.dim,):
        raise ModelFormatError(f"shape {norm.shape} does not match dim {spec.dim}", path=f.path, field=norm.name)
    freqs = None
    if spec.has_rope_freqs:
        t = f.tensor("rope_freqs.weight")
        if t.shape != (spec.rope_dim // 2,):
            raise ModelFormatError(f"shape {t.shape}, expected ({spec.rope_dim // 2},)", path=f.path, field=t.name)
        freqs = _vector(t, f.view(t)).clone()
    return GlobalWeights(embd, _vector(norm, f.view(norm)).clone(), freqs)
