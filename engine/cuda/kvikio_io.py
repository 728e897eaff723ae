"""The NVMe tier on a GPU machine: kvikio (cuFile) reads with engine.tiers.io.FileReader's contract.

`KvikioReader.submit(plan, buf, label)` reads a ReadPlan's spans into `buf`, a uint8 tensor: with
GPUDirect Storage (`mode` "gds") into device memory, NVMe -> GPU without a host bounce; where GDS is
unavailable (GeForce cards, most file systems, containers) kvikio runs in compat mode, and the
reader then fills pinned host buffers (POSIX reads; kvikio's own bounce into device memory would be
the same read plus a copy the scheduler already does). kvikio picks the mode itself
(KVIKIO_COMPAT_MODE=AUTO). `device_reads` says which buffers the reader takes -- device memory when
True, host memory when False; the other side's are refused -- and `direct` (page cache bypassed) is
True only for GDS reads into device memory, so both hold for every read. Its thread pool size comes
from KVIKIO_NTHREADS.

engine.tiers.io.open_reader imports this module only when it picks kvikio; without kvikio or a CUDA
driver it logs one line and returns a FileReader instead.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import torch

from ..errors import KernelError, WeightIOError
from ..tiers.io import DIRECT_ALIGN, FileChecks, ReadPlan, Ticket


def _import_kvikio():
    try:
        import kvikio
        from kvikio import defaults
    except ImportError as e:
        raise KernelError("kvikio is not installed (pip install 'engine[cuda12]')", field="io_backend") from e
    return kvikio, defaults


class _Read:
    """One kvikio pread as a Ticket future: result() returns once and re-raises the read's error as
    WeightIOError; the destination stays referenced until then."""

    __slots__ = ("_error", "_finished", "_future", "_t0", "_target", "label", "need", "offset", "reader")

    def __init__(self, future, target, need: int, offset: int, label: str, reader: KvikioReader, t0: float):
        self._future, self._target = future, target
        self.need, self.offset, self.label, self.reader, self._t0 = need, offset, label, reader, t0
        self._error: WeightIOError | None = None
        self._finished = False

    def result(self) -> None:
        if not self._finished:
            self._finished = True
            self._error = self._complete()
            self._future = self._target = None
        if self._error is not None:
            raise self._error

    def _complete(self) -> WeightIOError | None:
        r = self.reader
        try:
            got = self._future.get()
        except (RuntimeError, OSError) as e:
            return r.error_for(self.label, self.offset, self.need, str(e))
        if got < self.need:
            return r.error_for(self.label, self.offset, self.need, f"only {got} bytes arrived")
        tr = r.tracer
        if tr:
            tr.span("read " + self.label, self._t0, tr.now(), tid=threading.get_ident(), args={"bytes": got})
        return None

    def done(self) -> bool:
        return self._finished or self._future.done()

    def cancel(self) -> bool:
        return False  # a submitted cuFile read cannot be withdrawn


class KvikioReader(FileChecks):
    """Reads spans of one file with kvikio.CuFile.pread into pinned host or device buffers.

    Same interface as engine.tiers.io.FileReader: `plan(runs)`, `submit(plan, buf, label) -> Ticket`,
    `close()`, the attributes `path`, `align`, `direct`, `device_reads`, `tracer`, and FileChecks'
    `pread` (embedding rows through the page cache) and `file_changed` (size or mtime changed under the
    model), on a buffered descriptor of its own. KernelError from the constructor when kvikio is
    missing or cannot run (no CUDA driver).

    kvikio writes device buffers from its own threads and streams, outside the compute stream's
    order: a device buffer must not be submitted while queued kernels may still read it.
    """

    def __init__(self, path: str | os.PathLike, task_size: int | None = None, *, device_reads: bool | None = None):
        """device_reads: None = device memory with GDS, host memory in compat mode; True / False forces
        one side (benchmarks measure both)."""
        kvikio, defaults = _import_kvikio()
        self.path = os.fspath(path)
        self.task_size = task_size
        self.align = DIRECT_ALIGN  # GDS reads whole 4 KiB pages; host plans stay O_DIRECT-compatible
        self.tracer = None
        self._pending: list[_Read] = []
        self._closed = False
        try:
            self._open_checks()
        except OSError as e:
            raise WeightIOError(f"cannot open the file: {e.strerror}", path=self.path) from None
        try:
            self._file = kvikio.CuFile(self.path, "r")
        except (RuntimeError, OSError) as e:
            self._close_bfd()
            raise WeightIOError(f"kvikio cannot open the file: {e}", path=self.path) from None
        try:
            self._probe()
        except (RuntimeError, OSError) as e:
            self._file.close()
            self._close_bfd()
            raise KernelError(f"kvikio cannot read: {e}", path=self.path, field="io_backend") from None
        preferred = getattr(defaults, "is_compat_mode_preferred", None) or defaults.compat_mode  # kvikio < 24.12
        self.mode = "compat" if preferred() else "gds"
        # GPUDirect Storage: the scheduler reads straight into device slots (no pinned bounce, no upload)
        self.device_reads = self.mode == "gds" if device_reads is None else bool(device_reads)
        # page cache bypassed: only GDS reads into device memory (host reads and compat mode are POSIX reads)
        self.direct = self.mode == "gds" and self.device_reads

    def _probe(self) -> None:
        """One small host read: kvikio needs the CUDA driver even for host memory (pointer queries)."""
        n = min(DIRECT_ALIGN, os.path.getsize(self.path))
        if n:
            probe = np.empty(n, dtype=np.uint8)
            self._file.pread(probe, n, 0).get()

    def plan(self, runs) -> ReadPlan:
        return ReadPlan.build(tuple(runs), self.align)

    def submit(self, plan: ReadPlan, buf: torch.Tensor, label: str) -> Ticket:
        if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
            raise KernelError("the staging buffer must be a contiguous 1-D uint8 tensor", field="buf")
        if buf.device.type != ("cuda" if self.device_reads else "cpu"):
            raise KernelError(f"this kvikio reader reads into {'device' if self.device_reads else 'host'} memory, "
                              f"got a buffer on {buf.device}", field="buf")
        if buf.numel() < plan.size:
            raise WeightIOError(f"staging buffer of {buf.numel()} bytes is smaller than {label} ({plan.size})",
                                path=self.path)
        target = buf.numpy() if buf.device.type == "cpu" else buf  # host: buffer protocol; device: CUDA array interface
        self._pending = [r for r in self._pending if not r.done()]
        reads = []
        tr = self.tracer
        for off, _, dest, need in plan.spans:  # only the needed bytes: aligned tails may pass the end of file
            if need <= 0:
                continue
            view = target[dest:dest + need]
            t0 = tr.now() if tr else 0.0
            try:
                fut = self._file.pread(view, need, off, self.task_size)
            except (RuntimeError, OSError) as e:
                raise self.error_for(label, off, need, str(e)) from None
            reads.append(_Read(fut, view, need, off, label, self, t0))
        self._pending.extend(reads)
        return Ticket(reads)

    def error_for(self, label: str, offset: int, need: int, why: str) -> WeightIOError:
        size = self._file_stamp()[0]
        if 0 <= size < offset + need:
            return self._eof_error(label, offset, need)
        return self._failed(label, offset, need, why)

    def close(self) -> None:
        """Waits for reads in flight (their buffers must outlive them), then closes the file."""
        for r in self._pending:
            try:
                r.result()
            except WeightIOError:
                pass
        self._pending = []
        if not self._closed:
            self._closed = True
            self._file.close()
            self._close_bfd()

    def _close_bfd(self) -> None:
        fd, self._bfd = self._bfd, -1
        if fd >= 0:
            os.close(fd)
