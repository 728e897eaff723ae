"""The CUDA compute device, and the staging hooks the tier scheduler drives to feed any device.

Staging protocol: how weight bytes get from the model file to the memory the kernels read. Two
flavours implement it: `HostStaging` (CPU: the host buffer *is* the compute buffer, so uploads are
no-ops) and `CudaStaging` (a pinned host ring copied into a device ring on a copy stream, ordered
against the compute stream with CUDA events). `staging_for(device)` returns the right one.

    class Staging(Protocol):
        name: str
        def alloc_host(self, nbytes: int, align: int = 4096) -> Tensor
            # uint8 (nbytes,) at an `align`-aligned address: what the file reader fills.
            # Page-locked on CUDA, so the copy engine can read it while the CPU works.
        def alloc_device(self, nbytes: int) -> Tensor
            # uint8 (nbytes,) in device memory (CPU: an empty tensor; compute reads the host buffer).
        def upload(self, host: Tensor, dev: Tensor, nbytes: int) -> Upload
            # host[:nbytes] -> dev[:nbytes], asynchronous on the copy stream; it starts only once the
            # compute work issued before dev's last `release` has finished. Bind weights on Upload.data.
        def wait(self, handle: Upload) -> None
            # the compute stream waits for that copy (a device-side event wait: the host does not block).
        def release(self, handle: Upload) -> None
            # compute is done with handle.data as far as issuing work goes: the next upload into the
            # same device buffer waits for the work issued so far. Blocks the host until the copy has
            # read the host buffer (one event, never a device-wide sync), so the reader may refill it.
        def to_resident(self, host_view: Tensor) -> Tensor
            # a device copy of resident bytes, complete on return (CPU: the view itself).

A ring step as the scheduler runs it for slot s (host[s], dev[s] allocated once, whole slots):

    ticket = reader.submit(plan, host[s], name)                 # file -> host[s]     (reader threads)
    ticket.wait(); h = st.upload(host[s], dev[s], plan.size)    # host[s] -> dev[s]   (copy stream)
    st.wait(h); weights = bind(views of h.data)                 # kernels read dev[s] (compute stream)
    ... issue the unit's compute ...
    st.release(h); reader.submit(next_plan, host[s], next_name)

Reads must be planned with an alignment of at least `WEIGHT_ALIGN` (16) so every tensor in a slot
meets the kernels' load alignment; the O_DIRECT / kvikio plans (4096) do.
"""
from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import KernelError
from ..tiers.io import DIRECT_ALIGN, aligned_empty
from ..weights import QWeight
from .kernels import FORMATS, GEMV_MAX_T, KernelLibrary, _import_cupy

log = logging.getLogger("engine.cuda")

WEIGHT_ALIGN = max(f.weight_align for f in FORMATS.values())  # widest weight load of any kernel (bytes)
ACT_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True, slots=True)
class Upload:
    """An issued upload: `data` (nbytes,) uint8 on the compute device; `copied` the copy-stream event
    after the copy (None when nothing was copied)."""

    data: torch.Tensor
    copied: Any = None


def _check_alloc(nbytes: int, align: int) -> None:
    if not isinstance(nbytes, int) or nbytes < 0:
        raise KernelError(f"must be a byte count >= 0, got {nbytes!r}", field="nbytes")
    if not isinstance(align, int) or align < 1 or align & (align - 1):
        raise KernelError(f"must be a power of two, got {align!r}", field="align")


def _check_bytes(t: torch.Tensor, field: str, nbytes: int, device: torch.device) -> None:
    if not isinstance(nbytes, int) or nbytes < 0:
        raise KernelError(f"must be a byte count >= 0, got {nbytes!r}", field="nbytes")
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1 or not t.is_contiguous():
        what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise KernelError(f"must be a contiguous 1-D uint8 tensor, got {what}", field=field)
    if t.device != device:
        raise KernelError(f"must be on {device}, got {t.device}", field=field)
    if t.numel() < nbytes:
        raise KernelError(f"holds {t.numel()} bytes, {nbytes} requested", field=field)


class HostStaging:
    """The CPU flavour: file reads land where the kernels read, so nothing moves."""

    name = "cpu"

    def alloc_host(self, nbytes: int, align: int = DIRECT_ALIGN) -> torch.Tensor:
        _check_alloc(nbytes, align)
        return aligned_empty(nbytes, align)

    def alloc_device(self, nbytes: int) -> torch.Tensor:
        _check_alloc(nbytes, 1)
        return torch.empty(0, dtype=torch.uint8)

    def upload(self, host: torch.Tensor, dev: torch.Tensor, nbytes: int) -> Upload:
        _check_bytes(host, "host", nbytes, torch.device("cpu"))
        return Upload(host[:nbytes])

    def wait(self, handle: Upload) -> None:
        """Nothing to wait for: the bytes were read into the compute buffer itself."""

    def release(self, handle: Upload) -> None:
        """Nothing to order: the CPU finished computing before the caller got here."""

    def to_resident(self, host_view: torch.Tensor) -> torch.Tensor:
        return host_view


class StreamOps(Protocol):
    """The stream, event and memory primitives CudaStaging and CudaDevice use (torch.cuda in
    `TorchCudaOps`; the tests substitute a simulator that runs streams in adversarial orders)."""

    device: torch.device

    def current_stream(self) -> Any: ...
    def new_stream(self) -> Any: ...
    def use(self, stream) -> AbstractContextManager: ...  # torch work issued inside goes to `stream`
    def empty_host(self, nbytes: int) -> torch.Tensor: ...  # page-locked
    def empty_device(self, nbytes: int) -> torch.Tensor: ...
    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream) -> None: ...  # asynchronous on `stream`
    def record(self, stream) -> Any: ...  # an event after the work issued to `stream` so far
    def wait(self, stream, event) -> None: ...  # `stream` waits for `event` (device side)
    def synchronize(self, event) -> None: ...  # the host waits for `event`


class TorchCudaOps:
    """StreamOps on torch.cuda for one device."""

    def __init__(self, device: torch.device):
        self.device = device

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def new_stream(self):
        return torch.cuda.Stream(self.device)

    def use(self, stream):
        return torch.cuda.stream(stream)

    def empty_host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def empty_device(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def record(self, stream):
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream, event) -> None:
        stream.wait_event(event)

    def synchronize(self, event) -> None:
        event.synchronize()


class CudaStaging:
    """The CUDA flavour of the staging protocol: pinned host buffers, device buffers, a copy stream
    ordered against the compute stream with one event per upload and one per release."""

    def __init__(self, ops: StreamOps, compute, copy, name: str):
        self.ops, self.compute, self.copy_stream, self.name = ops, compute, copy, name
        self._released: dict[int, Any] = {}  # device buffer address -> compute event at its last release

    def alloc_host(self, nbytes: int, align: int = DIRECT_ALIGN) -> torch.Tensor:
        _check_alloc(nbytes, align)
        raw = self.ops.empty_host(nbytes + align)
        shift = (-raw.data_ptr()) % align
        return raw[shift:shift + nbytes]

    def alloc_device(self, nbytes: int) -> torch.Tensor:
        _check_alloc(nbytes, 1)
        return self.ops.empty_device(nbytes)

    def upload(self, host: torch.Tensor, dev: torch.Tensor, nbytes: int) -> Upload:
        _check_bytes(host, "host", nbytes, torch.device("cpu"))
        _check_bytes(dev, "dev", nbytes, self.ops.device)
        fence = self._released.pop(dev.data_ptr(), None)
        if fence is not None:  # the compute stream may still be reading dev's previous contents
            self.ops.wait(self.copy_stream, fence)
        self.ops.copy(dev[:nbytes], host[:nbytes], self.copy_stream)
        return Upload(dev[:nbytes], self.ops.record(self.copy_stream))

    def wait(self, handle: Upload) -> None:
        self.ops.wait(self.compute, handle.copied)

    def release(self, handle: Upload) -> None:
        self._released[handle.data.data_ptr()] = self.ops.record(self.compute)
        self.ops.synchronize(handle.copied)

    def to_resident(self, host_view: torch.Tensor) -> torch.Tensor:
        _check_bytes(host_view, "host_view", 0, torch.device("cpu"))
        dev = self.ops.empty_device(host_view.numel())
        self.ops.copy(dev, host_view, self.compute)
        self.ops.synchronize(self.ops.record(self.compute))
        return dev


def staging_for(device) -> HostStaging | CudaStaging:
    """The staging hooks of a compute device (CpuDevice has none of its own: HostStaging)."""
    return getattr(device, "staging", None) or HostStaging()


def linear_path(t: int, fmt: str, reference: bool = False) -> str:
    """How CudaDevice.linear computes T activation rows against a `fmt` matrix: "gemv" (the fused
    dequant-GEMV, T <= 8), "dequant" (dequantize to fp16/bf16, then a torch matmul), or "reference"
    (engine.formats' dequantizer and an fp32 matmul: when asked for, or no kernel handles `fmt`)."""
    if reference or fmt not in FORMATS:
        return "reference"
    return "gemv" if t <= GEMV_MAX_T else "dequant"


class CudaDevice:
    """A CUDA GPU as the compute device, duck-typed like engine.device.CpuDevice (`name`, `linear`).

    Weights must already be in device memory (Staging.upload / to_resident); activations may be on
    the host or the device, and the result goes back where x came from. All work is issued to one
    compute stream (the device's current stream at construction, where the model's torch ops run);
    `staging` uploads on a second, copy stream.
    """

    def __init__(self, device: torch.device, ops: StreamOps, kernels, *, act_dtype: torch.dtype = torch.float16,
                 reference: bool = False):
        """kernels: a KernelLibrary (or anything with its gemv/dequantize signatures)."""
        if act_dtype not in ACT_DTYPES:
            raise KernelError(f"must be torch.float16 or torch.bfloat16, got {act_dtype}", field="act_dtype")
        self.device, self.ops, self.kernels = device, ops, kernels
        self.name = str(device)
        self.act_dtype, self.reference = act_dtype, reference
        self.weight_align = WEIGHT_ALIGN
        self.compute_stream = ops.current_stream()
        self.copy_stream = ops.new_stream()
        self.staging = CudaStaging(ops, self.compute_stream, self.copy_stream, self.name)

    def linear(self, x: torch.Tensor, w: QWeight, out: torch.Tensor | None = None, *,
               reference: bool | None = None) -> torch.Tensor:
        """x (..., K) -> (..., N) fp32 = x @ W^T from W's GGUF bytes. reference: override the device's
        choice of the engine.formats reference path for this call."""
        n, k = w.shape
        if x.shape[-1] != k:
            raise KernelError(f"{w.name}: activations have {x.shape[-1]} features, the matrix takes {k}", field="x")
        if w.data.device != self.device:
            raise KernelError(f"{w.name} is on {w.data.device}, not {self.name}: stage weights with "
                              "Staging.upload or to_resident first", field="w")
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

    def _linear(self, path: str, x2: torch.Tensor, w: QWeight, n: int, k: int) -> torch.Tensor:
        if path == "reference":
            wf = w.fmt.dequantize(w.data.cpu(), (n, k)).to(self.device)  # (N, K) fp32, bit-exact with gguf-py
            return x2.to(self.device, torch.float32) @ wf.T
        xd = x2.to(self.device, self.act_dtype).contiguous()  # (T, K)
        if xd.data_ptr() % 16:  # the kernels load x in 16-byte vectors
            xd = xd.clone()
        fmt = w.fmt.name
        if path == "gemv":
            return self.kernels.gemv(xd, w.data, fmt, n, k, stream=self.compute_stream)
        wd = self.kernels.dequantize(w.data, fmt, n, k, dtype=self.act_dtype, stream=self.compute_stream)  # (N, K)
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


def select_device(requested: str = "auto", *, threads: int | None = None, act_dtype: torch.dtype = torch.float16,
                  reference: bool = False):
    """The compute device for a config's `device`: "cpu", "cuda" / "cuda:N" (KernelError if unusable),
    or "auto": CUDA when usable, else the CPU with one log line saying why."""
    from ..device import CpuDevice

    req = str(requested).strip().lower()
    if req == "cpu":
        return CpuDevice(threads)
    index = _cuda_index(req)
    reason = cuda_unavailable_reason(index)
    if reason is None:
        return cuda_device(index, act_dtype=act_dtype, reference=reference)
    if req != "auto":
        raise KernelError(f"device {requested!r} requested, but {reason}", field="device")
    log.info("no usable CUDA device (%s); computing on the CPU", reason)
    return CpuDevice(threads)
