"""The CUDA compute device. Its staging hooks (engine.cuda.staging.CudaStaging) feed the tier scheduler."""
from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

import torch

from ..attention import AttnMask, AttnRow, attend, attend_each, sdpa_decode_rows, sdpa_kernel
from ..errors import KernelError
from ..weights import QWeight
from .kernels import FORMATS, GEMV_MAX_T, BoundWeight, KernelLibrary, _import_cupy
from .staging import CudaStaging, StreamOps, TorchCudaOps

log = logging.getLogger("engine.cuda")

WEIGHT_ALIGN = max(f.weight_align for f in FORMATS.values())  # widest weight load of any kernel (bytes)
ACT_DTYPES = (torch.float16, torch.bfloat16)
BIND_CACHE_MAX = 1 << 14  # bound QWeights kept (resident units, ring-slot bindings, head chunks)


def linear_path(t: int, fmt: str, reference: bool = False) -> str:
    """How CudaDevice.linear computes T activation rows against a `fmt` matrix: "gemv" (the fused
    dequant-GEMV, T <= 8), "dequant" (dequantize to fp16/bf16, then a torch matmul), or "reference"
    (engine.formats' dequantizer and an fp32 matmul: when asked for, or no kernel handles `fmt`)."""
    if reference or fmt not in FORMATS:
        return "reference"
    return "gemv" if t <= GEMV_MAX_T else "dequant"


class CudaDevice:
    """A CUDA GPU as the compute device (engine.device.Device): matrices on the fused dequant-GEMV
    kernels (dequantize + matmul beyond GEMV_MAX_T rows), attention with torch's SDPA over an fp16
    KV cache by default.

    Weights must already be in device memory (Staging.upload / to_resident); activations may be on
    the host or the device, and the result goes back where x came from. All work is issued to one
    compute stream (the device's current stream at construction, where the model's torch ops run);
    `staging` uploads on a second, copy stream.
    """

    def __init__(self, device: torch.device, ops: StreamOps, kernels, *, act_dtype: torch.dtype = torch.float16,
                 kv_dtype: torch.dtype = torch.float16, reference: bool = False):
        """kernels: a KernelLibrary (engine.cuda.cpu_shim.ShimLibrary runs its launches on the CPU)."""
        if act_dtype not in ACT_DTYPES:
            raise KernelError(f"must be torch.float16 or torch.bfloat16, got {act_dtype}", field="act_dtype")
        self.device, self.ops, self.kernels = device, ops, kernels
        self.torch_device = device
        self.kv_dtype = kv_dtype
        self.name = str(device)
        self.act_dtype, self.reference = act_dtype, reference
        self.weight_align = WEIGHT_ALIGN
        self.compute_stream = ops.current_stream()
        self.copy_stream = ops.new_stream()
        self.staging = CudaStaging(ops, self.compute_stream, self.copy_stream, self.name)
        self._bound: dict[int, tuple[QWeight, BoundWeight]] = {}  # id(QWeight) -> (it, its checked binding)

    def prepare(self, formats: Iterable[str]) -> None:
        """At load: build or load from the disk cache the kernels of exactly these tensor formats (the
        model's matrices), so no launch compiles. Formats without a kernel take the reference path."""
        fmts = [] if self.reference else [f for f in dict.fromkeys(formats) if f in FORMATS]
        if fmts:
            self.kernels.prepare(self.device.index or 0, fmts)

    def row_interleave(self, info) -> int:
        """1: the CUDA kernels read the file's rows (QWeight.interleave 1)."""
        return 1

    def _bind(self, w: QWeight) -> BoundWeight:
        """w's bytes checked once as a matrix for the kernels (device, shape, alignment): the provider
        hands the same QWeight for a resident unit or a ring slot every pass; launches then check only
        the activations and the output."""
        got = self._bound.get(id(w))
        if got is None or got[0] is not w:
            if w.data.device != self.device:
                raise KernelError(f"{w.name} is on {w.data.device}, not {self.name}: stage weights with "
                                  "Staging.upload or to_resident first", field="w")
            if w.interleave != 1:
                raise KernelError(f"{w.name}: rows interleaved by {w.interleave} (the CPU layout); the CUDA "
                                  "kernels read the file's rows", field="w")
            if len(self._bound) >= BIND_CACHE_MAX:
                self._bound.clear()
            n, k = w.shape
            got = self._bound[id(w)] = (w, self.kernels.bind(w.data, w.fmt.name, n, k))
        return got[1]

    def linear(self, x: torch.Tensor, w: QWeight, out: torch.Tensor | None = None, *,
               reference: bool | None = None) -> torch.Tensor:
        """x (..., K) -> (..., N) fp32 = x @ W^T from W's GGUF bytes. reference: override the device's
        choice of the engine.formats reference path for this call."""
        n, k = w.shape
        if x.shape[-1] != k:
            raise KernelError(f"{w.name}: activations have {x.shape[-1]} features, the matrix takes {k}", field="x")
        x2 = x.reshape(-1, k)  # (T, K)
        t = x2.shape[0]
        path = linear_path(t, w.fmt.name, self.reference if reference is None else reference)
        with self.ops.use(self.compute_stream):
            y = self._linear(path, x2, w, n, k)  # (T, N) fp32 on the device
            if out is not None:
                out.view(t, n).copy_(y)
                return out.view(*x.shape[:-1], n)
            y = y.view(*x.shape[:-1], n)
            return y if x.device == self.device else y.to(x.device)

    def linear_many(self, x: torch.Tensor, ws: Sequence[QWeight]) -> list[torch.Tensor]:
        """Several matrices of the same input width on one x (q/k/v, gate/up)."""
        return [self.linear(x, w) for w in ws]

    def attention(self, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: AttnMask) -> torch.Tensor:
        scale = 1.0 / math.sqrt(q.shape[-1])
        with self.ops.use(self.compute_stream):
            return attend(q, keys, vals, mask, lambda *a: sdpa_kernel(*a, scale))

    def attention_rows(self, q: torch.Tensor, rows: Sequence[AttnRow], ends: torch.Tensor | None) -> torch.Tensor:
        """A pass of decode rows (ends given) in one fused SDPA over padded keys; others row by row."""
        if ends is None or len(rows) == 1:
            return attend_each(q, rows, self.attention)
        with self.ops.use(self.compute_stream):
            return sdpa_decode_rows(q, rows, ends, 1.0 / math.sqrt(q.shape[-1]))

    def _linear(self, path: str, x2: torch.Tensor, w: QWeight, n: int, k: int) -> torch.Tensor:
        if path == "reference":
            if w.data.device != self.device:
                raise KernelError(f"{w.name} is on {w.data.device}, not {self.name}: stage weights with "
                                  "Staging.upload or to_resident first", field="w")
            wf = w.fmt.dequantize(w.data, (n, k))  # (N, K) fp32 on the device, as gguf-py dequantizes
            return x2.to(self.device, torch.float32) @ wf.T
        bw = self._bind(w)
        xd = x2.to(self.device, self.act_dtype).contiguous()  # (T, K)
        if xd.data_ptr() % 16:  # the kernels load x in 16-byte vectors
            xd = xd.clone()
        if path == "gemv":
            return self.kernels.gemv(xd, bw, stream=self.compute_stream)
        wd = self.kernels.dequantize(bw, dtype=self.act_dtype, stream=self.compute_stream)  # (N, K)
        return torch.matmul(xd, wd.T).float()


def cuda_unavailable_reason(index: int = 0) -> str | None:
    """None if cuda:`index` can run the kernels (torch sees it, cupy imports and sees a device),
    else why not, in a few words."""
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build"
        return "torch finds no CUDA device or driver"
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        return f"no device cuda:{index} ({count} CUDA device(s))"
    try:
        _import_cupy()
    except KernelError as e:
        return str(e)
    return None


def cuda_device(index: int = 0, *, act_dtype: torch.dtype = torch.float16, reference: bool = False) -> CudaDevice:
    """CudaDevice on cuda:`index` with torch streams and the cupy kernel library; KernelError if unusable."""
    reason = cuda_unavailable_reason(index)
    if reason is not None:
        raise KernelError(f"cannot compute on cuda:{index}: {reason}", field="device")
    dev = torch.device("cuda", index)
    return CudaDevice(dev, TorchCudaOps(dev), KernelLibrary(), act_dtype=act_dtype, reference=reference)


def _cuda_index(requested: str) -> int:
    if requested in ("auto", "cuda"):
        return 0
    head, _, tail = requested.partition(":")
    if head == "cuda" and tail.isdigit():
        return int(tail)
    raise KernelError(f"unknown device {requested!r}: expected auto, cpu, cuda or cuda:N", field="device")


def select_cuda(requested: str, *, act_dtype: torch.dtype = torch.float16, reference: bool = False) -> CudaDevice | None:
    """CUDA's side of engine.device.select_device: the CudaDevice for "cuda" / "cuda:N" (KernelError
    if unusable) or "auto" (None, after one log line saying why, when CUDA is not usable)."""
    req = str(requested).strip().lower()
    index = _cuda_index(req)
    reason = cuda_unavailable_reason(index)
    if reason is None:
        return cuda_device(index, act_dtype=act_dtype, reference=reference)
    if req != "auto":
        raise KernelError(f"device {requested!r} requested, but {reason}", field="device")
    log.info("no usable CUDA device (%s); computing on the CPU", reason)
    return None
