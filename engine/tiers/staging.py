"""The staging protocol: how weight bytes get from the model file (or the pinned host tier) to the
memory the kernels read. Two flavours implement it: `HostStaging` here (CPU: the host buffer *is*
the compute buffer, so uploads are no-ops) and engine.cuda.staging.CudaStaging (exact-size
page-locked host memory copied into device buffers on a copy stream, ordered against the compute
stream with events). `staging_for(device)` returns a device's flavour; the CPU path never imports
engine.cuda.

    class Staging(Protocol):
        name: str
        separate: bool  # device buffers are other memory than host buffers (uploads copy)
        def alloc_host(self, nbytes: int, align: int = 4096) -> Tensor
            # uint8 (nbytes,) at an `align`-aligned address: what the file reader fills. On CUDA it is
            # page-locked at exactly its size (not torch's power-of-two pinned caching allocator), so
            # the copy engine reads it while the CPU works.
        def alloc_device(self, nbytes: int) -> Tensor
            # uint8 (nbytes,) in device memory (CPU: an empty tensor; compute reads the host buffer).
        def upload(self, host: Tensor, dev: Tensor, nbytes: int) -> Upload
            # host[:nbytes] -> dev[:nbytes], asynchronous on the copy stream; it starts only once the
            # compute work issued before dev's last `release` has finished. Bind weights on Upload.data.
        def wait(self, handle: Upload) -> None
            # the compute stream waits for that copy (device side: the host does not block).
        def release(self, handle: Upload) -> None
            # compute is done with handle.data as far as issuing work goes: the next upload into the
            # same device buffer waits (device side) for the work issued so far. Never blocks the host.
        def host_free(self, handle: Upload) -> bool
            # whether the copy has finished reading its host buffer (a non-blocking query): the reader
            # may refill that buffer once it has.
        def wait_host_free(self, handle: Upload) -> None
            # the host blocks until it has (one event, never a device-wide sync).
        def device_free(self, dev: Tensor) -> bool
        def wait_device_free(self, dev: Tensor) -> None
            # whether / block until the compute work issued before dev's last release has finished: a
            # writer outside the streams' order (kvikio GPUDirect reads) may then overwrite dev.
        def to_resident(self, host_view: Tensor) -> Tensor
            # a device copy of resident bytes, complete on return (CPU: the view itself).

A ring step as engine.tiers.scheduler runs it for slot s (host[s], dev[s] allocated once):

    ticket = reader.submit(plan, host[s], name)        # file -> host[s]  (reader threads; host tier: loaded once)
    (ticket done) h = st.upload(host[s], dev[s], n)    # host[s] -> dev[s] (copy stream, issued eagerly)
    st.wait(h); weights = bind(views of h.data)        # kernels read dev[s] (compute stream)
    ... issue the unit's compute ...
    st.release(h)                                      # fence; the next upload into dev[s] waits on it
    (st.host_free(h)) reader.submit(next, host[s], ..) # refill host[s] once the copy has read it

Reads must be planned with an alignment of at least the kernels' widest weight load (16 bytes) so
every tensor in a slot meets it; the O_DIRECT / kvikio plans (4096) do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import KernelError
from .io import DIRECT_ALIGN, aligned_empty


@dataclass(frozen=True, slots=True)
class Upload:
    """An issued upload: `data` (nbytes,) uint8 on the compute device; `copied` the copy-stream event
    after the copy (None when nothing was copied)."""

    data: torch.Tensor
    copied: Any = None


class Staging(Protocol):
    name: str
    separate: bool

    def alloc_host(self, nbytes: int, align: int = DIRECT_ALIGN) -> torch.Tensor: ...
    def alloc_device(self, nbytes: int) -> torch.Tensor: ...
    def upload(self, host: torch.Tensor, dev: torch.Tensor, nbytes: int) -> Upload: ...
    def wait(self, handle: Upload) -> None: ...
    def release(self, handle: Upload) -> None: ...
    def host_free(self, handle: Upload) -> bool: ...
    def wait_host_free(self, handle: Upload) -> None: ...
    def device_free(self, dev: torch.Tensor) -> bool: ...
    def wait_device_free(self, dev: torch.Tensor) -> None: ...
    def to_resident(self, host_view: torch.Tensor) -> torch.Tensor: ...


def check_alloc(nbytes: int, align: int) -> None:
    if not isinstance(nbytes, int) or nbytes < 0:
        raise KernelError(f"must be a byte count >= 0, got {nbytes!r}", field="nbytes")
    if not isinstance(align, int) or align < 1 or align & (align - 1):
        raise KernelError(f"must be a power of two, got {align!r}", field="align")


def check_bytes(t: torch.Tensor, field: str, nbytes: int, device: torch.device) -> None:
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
    separate = False

    def alloc_host(self, nbytes: int, align: int = DIRECT_ALIGN) -> torch.Tensor:
        check_alloc(nbytes, align)
        return aligned_empty(nbytes, align)

    def alloc_device(self, nbytes: int) -> torch.Tensor:
        check_alloc(nbytes, 1)
        return torch.empty(0, dtype=torch.uint8)

    def upload(self, host: torch.Tensor, dev: torch.Tensor, nbytes: int) -> Upload:
        check_bytes(host, "host", nbytes, torch.device("cpu"))
        return Upload(host[:nbytes])

    def wait(self, handle: Upload) -> None:
        """Nothing to wait for: the bytes were read into the compute buffer itself."""

    def release(self, handle: Upload) -> None:
        """Nothing to order: the CPU finished computing before the caller got here."""

    def host_free(self, handle: Upload) -> bool:
        return True

    def wait_host_free(self, handle: Upload) -> None:
        """Nothing copies from host buffers."""

    def device_free(self, dev: torch.Tensor) -> bool:
        return True

    def wait_device_free(self, dev: torch.Tensor) -> None:
        """The CPU computes synchronously: released means finished."""

    def to_resident(self, host_view: torch.Tensor) -> torch.Tensor:
        return host_view


def staging_for(device) -> Staging:
    """The staging hooks of a compute device (CpuDevice has none of its own: HostStaging)."""
    return getattr(device, "staging", None) or HostStaging()
