"""Compute devices. Everything above this interface (stores, scheduler, model) is device-neutral.

    class Device(Protocol):
        name: str                       # "cpu", "cuda:0"
        torch_device: torch.device      # where activations, the rope table, norms and KV live
        act_dtype: torch.dtype          # what the matrix kernels read activations as
        kv_dtype: torch.dtype           # the KV cache's element type
        staging                         # engine.tiers.staging hooks (None: HostStaging)
        def linear(x (..., K), w: QWeight, out=None) -> (..., N) fp32 on torch_device
        def linear_many(x (..., K), ws: Sequence[QWeight]) -> [(..., N_i)]   # q/k/v, gate/up
        def attention(q (T, H, hd), keys, vals (Hkv, L, hd), mask: AttnMask) -> (T, H, hd) fp32
        def attention_rows(q (N, H, hd), rows: Sequence[AttnRow], ends (R,) | None) -> (N, H, hd) fp32
                                        # a ragged batch's rows in one call; ends: start + 1 of each row
                                        # on the device when every row is a decode row (else None)
        def prepare(formats: Iterable[str])  # at load: make the kernels of the model's matrix formats ready
        def row_interleave(info: TensorInfo) -> int  # rows per group in which the resident store lays out
                                        # a matrix this device computes (QWeight.interleave; 1: the file's rows)

`select_device` imports engine.cuda only when CUDA is requested or `auto` may find it: the CPU path
never loads the CUDA package.
"""
from __future__ import annotations

import ctypes
import logging
import math
from typing import Iterable, Protocol, Sequence

import torch

from . import cpu as cpu_kernels
from .attention import AttnMask, AttnRow, attend, attend_each, matmul_kernel
from .cpu import DecodeLayer
from .errors import ConfigError, KernelError
from .gguf_file import TensorInfo
from .weights import LayerWeights, QWeight

log = logging.getLogger("engine.device")

KV_DTYPES = {"f32": torch.float32, "f16": torch.float16}


class Device(Protocol):
    name: str
    torch_device: torch.device
    act_dtype: torch.dtype
    kv_dtype: torch.dtype
    staging: object | None

    def linear(self, x: torch.Tensor, w: QWeight, out: torch.Tensor | None = None) -> torch.Tensor: ...
    def linear_many(self, x: torch.Tensor, ws: Sequence[QWeight]) -> list[torch.Tensor]: ...
    def attention(self, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: AttnMask) -> torch.Tensor: ...
    def attention_rows(self, q: torch.Tensor, rows: Sequence[AttnRow], ends: torch.Tensor | None) -> torch.Tensor: ...
    def prepare(self, formats: Iterable[str]) -> None: ...
    def row_interleave(self, info: TensorInfo) -> int: ...


def kv_dtype_of(name: str, default: torch.dtype) -> torch.dtype:
    """A config's kv_cache.dtype ("auto", "f32", "f16") as a torch dtype."""
    if name == "auto":
        return default
    if name not in KV_DTYPES:
        raise ConfigError(f"unknown KV cache dtype {name!r}: expected auto, f32 or f16", field="kv_cache.dtype")
    return KV_DTYPES[name]


class CpuDevice:
    """The CPU as the compute device: fused dequant-GEMV kernels on raw GGUF bytes (engine.cpu). If
    they cannot be built this raises KernelError, unless ENGINE_SLOW_FALLBACK=1 opts in (logged) to
    dequantize + torch matmul."""

    name = "cpu"
    torch_device = torch.device("cpu")
    act_dtype = torch.float32
    staging = None

    MAX_DECODE_ROWS = 256  # rows of one native decode_block call

    def __init__(self, threads: int | None = None, *, kv_dtype: torch.dtype = torch.float32,
                 native_step: bool = True, activations: str = "int16"):
        self.threads = threads or torch.get_num_threads()
        self.kv_dtype = kv_dtype
        # how the kernels round activations (engine.cpu.ACTIVATIONS: int16, or int8 for Q4_K/Q5_K/Q6_K)
        self._mode = cpu_kernels.activations_mode(activations)  # KernelError if unknown
        self.activations = activations
        # decode_block: passes of single decode tokens run each block in one native call (False: the
        # Python block, the definition, runs every pass -- the tests' reference)
        self.native_step = native_step
        self._decode_layers: dict[int, tuple[LayerWeights, DecodeLayer | None]] = {}
        # torch only runs the small per-token ops (norms, rope, attention over a few heads): one thread
        # avoids its OpenMP team fighting the kernel pool for the same cores.
        torch.set_num_threads(1)
        return_large_frees()
        self.kernels = cpu_kernels.available()
        if self.kernels:
            cpu_kernels.set_num_threads(self.threads)
        elif activations != "int16":
            log.warning("activations %s: ignored without the CPU kernels (the fallback computes in fp32)", activations)

    def prepare(self, formats: Iterable[str]) -> None:
        """Nothing to do: the native kernels were built (or refused) at construction, for every format."""

    def row_interleave(self, info: TensorInfo) -> int:
        """ROW_GROUP for the matrices whose rows the kernels read faster interleaved with this device's
        activations (ql_row_interleave: the 8-bit path's formats on AVX-512 builds), else 1."""
        if (not self.kernels or len(info.shape) not in (2, 3) or info.fmt.name not in cpu_kernels.INTERLEAVE_FORMATS
                or info.shape[-2] % cpu_kernels.ROW_GROUP):  # a matrix, or stacked experts: each expert's rows
            return 1
        return cpu_kernels.row_interleave(info.fmt.name, self.activations)

    def linear(self, x: torch.Tensor, w: QWeight, out: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) fp32 -> (..., N) = x @ W^T, W read from its GGUF bytes."""
        n, k = w.shape
        x2 = x.reshape(-1, k)  # (T, K)
        if self.kernels and w.fmt.name in cpu_kernels.SUPPORTED:
            y = cpu_kernels.linear(x2.contiguous(), w.data, w.fmt.name, n, k, out, activations=self.activations,
                                   interleave=w.interleave)
        else:
            y = torch.matmul(x2, w.dequantize().T, out=out)
        return y.view(*x.shape[:-1], n)

    def linear_many(self, x: torch.Tensor, ws: Sequence[QWeight]) -> list[torch.Tensor]:
        """[linear(x, w) for w in ws] (same K: q/k/v, gate/up) in one kernel call; each result is
        bit-identical to its own linear()."""
        k = ws[0].shape[1]
        x2 = x.reshape(-1, k)  # (T, K)
        if self.kernels and len(ws) <= cpu_kernels.MAX_MANY and all(
                w.shape[1] == k and w.fmt.name in cpu_kernels.SUPPORTED for w in ws):
            ys = cpu_kernels.linear_many(x2.contiguous(), [(w.data, w.fmt.name, w.shape[0], w.interleave) for w in ws],
                                         k, activations=self.activations)
            return [y.view(*x.shape[:-1], w.shape[0]) for y, w in zip(ys, ws)]
        return [self.linear(x, w) for w in ws]

    def attention(self, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: AttnMask) -> torch.Tensor:
        scale = 1.0 / math.sqrt(q.shape[-1])
        return attend(q, keys, vals, mask, lambda *a: matmul_kernel(*a, scale))

    def attention_rows(self, q: torch.Tensor, rows: Sequence[AttnRow], ends: torch.Tensor | None) -> torch.Tensor:
        """Row by row: each row's result is bit-identical to a pass of that row alone."""
        return attend_each(q, rows, self.attention)

    def decode_block(self, x: torch.Tensor, w: LayerWeights, spec, layer: int, batch, rot: torch.Tensor
                     ) -> torch.Tensor | None:
        """Llama.block (engine/models/llama.py, the definition) for a pass whose every row is one decode
        token, with the KV cache on this device: one native call (engine/cpu/decode_step.h) instead of
        ~40 Python and torch operations. x (R, dim) -> (R, dim), the rows' new keys/values written into
        their KV slots. Equal to the Python block within rounding (tests/test_cpu_decode_step.py). None
        when the pass or layer is not one it runs (prefill rows, MoE, unusual tensors): the caller then
        runs the Python block."""
        R = x.shape[0]
        if not (self.native_step and self.kernels and len(batch.rows) == R <= self.MAX_DECODE_ROWS):
            return None
        got = self._decode_layers.get(layer)
        if got is None or got[0] is not w:
            got = self._decode_layers[layer] = (w, _decode_layer(w, spec, self.kv_dtype, self._mode))
        lay = got[1]
        if lay is not None and lay.n_ctx == 0:  # every KV slot of a model has its n_ctx
            lay.n_ctx = batch.rows[0].seq.keys[layer].shape[1]
        if lay is None or not (x.dtype is torch.float32 and x.is_contiguous() and x.shape[1] == lay.dim
                               and rot.dtype is torch.complex64 and rot.is_contiguous()
                               and rot.numel() == R * (lay.rope_dim // 2)):
            return None
        keys, vals, starts = (ctypes.c_void_p * R)(), (ctypes.c_void_p * R)(), (ctypes.c_int64 * R)()
        for i, r in enumerate(batch.rows):
            k, v = r.seq.keys[layer], r.seq.vals[layer]  # (Hkv, n_ctx, hd)
            if not (k.dtype is v.dtype is self.kv_dtype and k.shape == v.shape == (lay.n_kv_heads, lay.n_ctx, lay.head_dim)
                    and k.is_contiguous() and v.is_contiguous() and k.is_cpu and v.is_cpu):
                return None
            keys[i], vals[i], starts[i] = k.data_ptr(), v.data_ptr(), r.start
        out = torch.empty_like(x)
        cpu_kernels.decode_block(lay, x, out, rot, keys, vals, starts)
        return out


def _decode_layer(w: LayerWeights, spec, kv_dtype: torch.dtype, mode: int) -> DecodeLayer | None:
    """The C description of a block's weights for decode_block, or None if the native step cannot run
    it (a MoE block, a format or tensor it does not take): every pointer it holds is checked here."""
    if w.ffn_gate is None or w.ffn_gate_inp is not None or kv_dtype not in (torch.float32, torch.float16):
        return None
    d, q, kv, f, hd = spec.dim, spec.q_dim, spec.kv_dim, spec.ffn_dim, spec.head_dim
    mats = [(w.attn_q, (q, d)), (w.attn_k, (kv, d)), (w.attn_v, (kv, d)), (w.attn_output, (d, q)),
            (w.ffn_gate, (f, d)), (w.ffn_up, (f, d)), (w.ffn_down, (d, f))]
    vecs = [(w.attn_norm, d), (w.ffn_norm, d), (w.attn_q_bias, q), (w.attn_k_bias, kv), (w.attn_v_bias, kv),
            (w.attn_q_norm, hd), (w.attn_k_norm, hd)]
    for m, shape in mats:
        if not (m.fmt.name in cpu_kernels.SUPPORTED and tuple(m.shape) == shape and m.data.dtype is torch.uint8
                and m.data.is_cpu and m.data.is_contiguous() and shape[1] % m.fmt.block_size == 0
                and m.data.numel() == shape[0] * m.fmt.row_nbytes(shape[1])):
            return None
    for t, n in vecs:
        if t is not None and not (t.dtype is torch.float32 and t.is_cpu and t.is_contiguous() and t.shape == (n,)):
            return None
    if (w.attn_q_bias is None) != (w.attn_k_bias is None) or (w.attn_q_norm is None) != (w.attn_k_norm is None) \
            or spec.n_heads % spec.n_kv_heads:
        return None
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    lay = DecodeLayer(dim=d, n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads, head_dim=hd, ffn=f,
                      rope_dim=spec.rope_dim, neox=spec.rope_style == "neox", kv_f16=kv_dtype is torch.float16,
                      eps=spec.rms_eps, mode=mode, attn_norm=ptr(w.attn_norm), ffn_norm=ptr(w.ffn_norm),
                      n_ctx=0)  # n_ctx: set from the first KV slot decode_block sees
    lay.bias[:] = [ptr(w.attn_q_bias), ptr(w.attn_k_bias), ptr(w.attn_v_bias)]
    lay.qk_norm[:] = [ptr(w.attn_q_norm), ptr(w.attn_k_norm)]
    lay.w[:] = [m.data.data_ptr() for m, _ in mats]
    lay.type[:] = [cpu_kernels.type_word(cpu_kernels.FORMATS[m.fmt.name], m.fmt.name, m.shape[0], m.interleave)
                   for m, _ in mats]
    return lay


HEAP_MMAP_THRESHOLD = 1 << 20  # blocks of at least this many bytes come from mmap and go back to the OS on free


def return_large_frees() -> bool:
    """Make glibc serve allocations of HEAP_MMAP_THRESHOLD bytes or more with mmap and unmap them on free.

    By default glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), so
    after the first prefill chunk the attention scores and activations of every later chunk come from
    the heap, which keeps their freed pages: peak RSS ran 10-27% above the plan on long prompts
    (scripts/bench_memory.py). A fixed threshold keeps the process's memory what the plan counts, for
    a page fault per 4 KiB of each large temporary. False where the C library is not glibc."""
    global _heap_set
    if _heap_set is None:
        try:
            libc = ctypes.CDLL(None)
            mallopt = libc.mallopt  # glibc only (musl and macOS have none)
        except (OSError, AttributeError):
            _heap_set = False
        else:
            M_MMAP_THRESHOLD = -3
            _heap_set = bool(mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD))
            if not _heap_set:
                log.debug("mallopt(M_MMAP_THRESHOLD) refused; large frees may stay in the heap")
    return _heap_set


_heap_set: bool | None = None


def _cuda_requested(req: str) -> bool:
    return req == "cuda" or req.startswith("cuda:")


def select_device(requested: str = "auto", *, threads: int | None = None, kv_dtype: str = "auto",
                  act_dtype: torch.dtype = torch.float16, reference: bool = False,
                  cpu_activations: str = "int16") -> Device:
    """The compute device for a config's `device`: "cpu", "cuda" / "cuda:N" (KernelError if unusable),
    or "auto": CUDA when torch sees a device and the kernels can load, else the CPU (one log line says
    why). `kv_dtype` is the config's kv_cache.dtype (auto: f32 on the CPU, f16 on CUDA);
    `cpu_activations` the config's (the CPU device's; a CUDA device's kernels do not take it)."""
    req = str(requested).strip().lower()
    if req == "cpu" or (req == "auto" and not torch.cuda.is_available()):
        if req == "auto":
            log.info("no CUDA device visible to torch; computing on the CPU")
        return CpuDevice(threads, kv_dtype=kv_dtype_of(kv_dtype, torch.float32), activations=cpu_activations)
    if req != "auto" and not _cuda_requested(req):
        raise KernelError(f"unknown device {requested!r}: expected auto, cpu, cuda or cuda:N", field="device")
    from .cuda.device import select_cuda  # only now: a CUDA device is requested or visible

    dev = select_cuda(req, act_dtype=act_dtype, reference=reference)
    if dev is None:  # auto, and CUDA is not usable after all
        return CpuDevice(threads, kv_dtype=kv_dtype_of(kv_dtype, torch.float32), activations=cpu_activations)
    dev.kv_dtype = kv_dtype_of(kv_dtype, torch.float16)
    return dev
