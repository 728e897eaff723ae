"""The CUDA flavour of the staging protocol (engine.tiers.staging): exact-size page-locked host
memory, device buffers, and a copy stream ordered against the compute stream with one event per
upload and one per release. The stream primitives come from a `StreamOps` (torch.cuda in
`TorchCudaOps`; the tests substitute a simulator that runs streams in adversarial orders).
"""
from __future__ import annotations

import weakref
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import KernelError
from ..tiers.io import DIRECT_ALIGN, madvise_huge
from ..tiers.staging import Upload, check_alloc, check_bytes
from ..tiers.units import HUGE_PAGE, format_size

HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context


class StreamOps(Protocol):
    """The stream, event and memory primitives CudaStaging and CudaDevice use."""

    device: torch.device

    def current_stream(self) -> Any: ...
    def new_stream(self) -> Any: ...
    def use(self, stream) -> AbstractContextManager: ...  # torch work issued inside goes to `stream`
    def pin_host(self, nbytes: int, align: int) -> torch.Tensor: ...  # page-locked, exactly nbytes
    def empty_device(self, nbytes: int) -> torch.Tensor: ...
    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream) -> None: ...  # asynchronous on `stream`
    def record(self, stream) -> Any: ...  # an event after the work issued to `stream` so far
    def wait(self, stream, event) -> None: ...  # `stream` waits for `event` (device side)
    def query(self, event) -> bool: ...  # has `event` completed? (never blocks)
    def synchronize(self, event) -> None: ...  # the host waits for `event`


def aligned_host_array(nbytes: int, align: int) -> tuple[np.ndarray, torch.Tensor]:
    """(owner, view): `view` is exactly nbytes at an `align`-aligned address (2 MiB and huge-page
    advised from one huge page up), inside `owner`, which lives as long as any tensor over it."""
    if nbytes >= HUGE_PAGE:
        align = max(align, HUGE_PAGE)
    owner = np.empty(nbytes + align, dtype=np.uint8)
    shift = (-owner.ctypes.data) % align
    view = torch.from_numpy(owner[shift:shift + nbytes])
    if nbytes >= HUGE_PAGE:
        madvise_huge(view.data_ptr(), nbytes // HUGE_PAGE * HUGE_PAGE)
    return owner, view


class TorchCudaOps:
    """StreamOps on torch.cuda for one device. Host memory is pinned with cudaHostRegister over an
    exact-size aligned allocation: torch's pinned caching allocator would round every request up to
    a power of two (20 GiB pins 32 GiB)."""

    def __init__(self, device: torch.device):
        self.device = device

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def new_stream(self):
        return torch.cuda.Stream(self.device)

    def use(self, stream):
        return torch.cuda.stream(stream)

    def pin_host(self, nbytes: int, align: int) -> torch.Tensor:
        owner, view = aligned_host_array(nbytes, align)
        if nbytes:
            rt = torch.cuda.cudart()
            err = int(rt.cudaHostRegister(view.data_ptr(), nbytes, HOST_REGISTER_PORTABLE))
            if err:
                raise KernelError(f"cannot page-lock {format_size(nbytes)} of host memory for the host tier "
                                  f"(cudaHostRegister error {err}): lower host_budget", field="host_budget")
            weakref.finalize(owner, rt.cudaHostUnregister, view.data_ptr())
        return view

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

    def query(self, event) -> bool:
        return event.query()

    def synchronize(self, event) -> None:
        event.synchronize()


class CudaStaging:
    """Staging onto a CUDA device: pinned host buffers, device buffers, a copy stream ordered against
    the compute stream with one event per upload and one per release; no call blocks the host except
    wait_host_free / wait_device_free / to_resident."""

    separate = True

    def __init__(self, ops: StreamOps, compute, copy, name: str):
        self.ops, self.compute, self.copy_stream, self.name = ops, compute, copy, name
        self._released: dict[int, Any] = {}  # device buffer address -> compute event at its last release

    def alloc_host(self, nbytes: int, align: int = DIRECT_ALIGN) -> torch.Tensor:
        check_alloc(nbytes, align)
        return self.ops.pin_host(nbytes, align)

    def alloc_device(self, nbytes: int) -> torch.Tensor:
        check_alloc(nbytes, 1)
        return self.ops.empty_device(nbytes)

    def upload(self, host: torch.Tensor, dev: torch.Tensor, nbytes: int) -> Upload:
        check_bytes(host, "host", nbytes, torch.device("cpu"))
        check_bytes(dev, "dev", nbytes, self.ops.device)
        fence = self._released.pop(dev.data_ptr(), None)
        if fence is not None:  # the compute stream may still be reading dev's previous contents
            self.ops.wait(self.copy_stream, fence)
        self.ops.copy(dev[:nbytes], host[:nbytes], self.copy_stream)
        return Upload(dev[:nbytes], self.ops.record(self.copy_stream))

    def wait(self, handle: Upload) -> None:
        if handle.copied is not None:  # None: the bytes were written without a copy (GPUDirect read)
            self.ops.wait(self.compute, handle.copied)

    def release(self, handle: Upload) -> None:
        self._released[handle.data.data_ptr()] = self.ops.record(self.compute)

    def host_free(self, handle: Upload) -> bool:
        return handle.copied is None or self.ops.query(handle.copied)

    def wait_host_free(self, handle: Upload) -> None:
        if handle.copied is not None:
            self.ops.synchronize(handle.copied)

    def device_free(self, dev: torch.Tensor) -> bool:
        fence = self._released.get(dev.data_ptr())
        return fence is None or self.ops.query(fence)

    def wait_device_free(self, dev: torch.Tensor) -> None:
        fence = self._released.get(dev.data_ptr())
        if fence is not None:
            self.ops.synchronize(fence)

    def to_resident(self, host_view: torch.Tensor) -> torch.Tensor:
        check_bytes(host_view, "host_view", 0, torch.device("cpu"))
        dev = self.ops.empty_device(host_view.numel())
        self.ops.copy(dev, host_view, self.compute)
        self.ops.synchronize(self.ops.record(self.compute))
        return dev
