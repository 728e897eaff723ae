"""Reading weight byte runs from the model file into staging buffers.

A pool of reader threads issues `os.preadv` (which releases the GIL, so reads overlap compute).
With O_DIRECT the page cache is bypassed, so a memory budget is real; buffers, file offsets and
lengths are then 4096-aligned, which `ReadPlan` arranges: each run is read as its aligned superset
and tensors are found at their offset inside it. Where the file system refuses O_DIRECT, the reader
falls back to buffered reads and says so once.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import importlib.util
import logging
import os
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import KernelError, WeightIOError
from .units import DIRECT_IO_ALIGN as DIRECT_ALIGN
from .units import HUGE_PAGE
from .units import READ_CHUNK as CHUNK

log = logging.getLogger("engine.io")

NATIVE_SOURCE = Path(__file__).with_name("preadq.cpp")
SHORT_READ = -1  # inject_fault: the file seems to end at the read (what the native side reports as -1)


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """Where a unit's file runs land in its staging buffer.

    spans: (file offset, read length, buffer offset, needed length); reads may extend past the data
    (alignment) but at least `needed` bytes must arrive.
    """

    spans: tuple[tuple[int, int, int, int], ...]
    size: int  # bytes of staging buffer needed
    align: int

    @classmethod
    def build(cls, runs: tuple[tuple[int, int], ...], align: int = 1) -> "ReadPlan":
        spans, dest = [], 0
        merged: list[list[int]] = []
        for off, n in sorted(runs):
            lo, hi = off // align * align, -(-(off + n) // align) * align
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
                merged[-1][2] = max(merged[-1][2], off + n)
            else:
                merged.append([lo, hi, off + n])
        for lo, hi, data_end in merged:
            spans.append((lo, hi - lo, dest, data_end - lo))
            dest += hi - lo
        return cls(tuple(spans), dest, align)

    def pieces(self, max_bytes: int) -> list[tuple[int, "ReadPlan"]]:
        """The plan cut into consecutive parts of at most max_bytes of buffer (rounded up to the
        alignment): (buffer offset of the part, the part as a plan whose buffer starts at 0)."""
        step = max(self.align, max_bytes // self.align * self.align)
        out: list[tuple[int, ReadPlan]] = []
        part: list[tuple[int, int, int, int]] = []
        start = 0
        for off, n, dest, need in self.spans:
            for c in range(0, n, step):
                m = min(step, n - c)
                if part and dest + c + m - start > step:
                    out.append((start, ReadPlan(tuple(part), part[-1][2] + part[-1][1], self.align)))
                    part = []
                if not part:
                    start = dest + c
                part.append((off + c, m, dest + c - start, max(0, min(m, need - c))))
        if part:
            out.append((start, ReadPlan(tuple(part), part[-1][2] + part[-1][1], self.align)))
        return out

    def where(self, file_offset: int) -> int:
        """Buffer offset of a byte that lies in one of the runs."""
        for off, n, dest, _ in self.spans:
            if off <= file_offset < off + n:
                return dest + file_offset - off
        raise ValueError(f"offset {file_offset} is not in this read plan")


def aligned_empty(nbytes: int, align: int = DIRECT_ALIGN) -> torch.Tensor:
    """A uint8 buffer whose data pointer is `align`-aligned (O_DIRECT needs it). Buffers of at least a
    huge page are 2 MiB-aligned and their whole huge pages advised to use transparent huge pages:
    O_DIRECT reads into them run ~2x faster on a VM (one scatter-gather segment per 2 MiB, not per
    4 KiB) and the kernels reading them ~15% faster (fewer TLB misses)."""
    huge = nbytes >= HUGE_PAGE
    align = max(align, HUGE_PAGE) if huge else align
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % align
    buf = raw[shift:shift + nbytes]
    if huge:
        madvise_huge(buf.data_ptr(), nbytes // HUGE_PAGE * HUGE_PAGE)
    return buf


def madvise_huge(addr: int, length: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), 14)  # MADV_HUGEPAGE; advisory only
    except (OSError, AttributeError):
        pass


class FileChecks:
    """The part of the reader contract every backend does alike, on a buffered descriptor `_bfd` of
    `path`: `pread` of small pieces through the page cache (the embedding rows when the embedding is
    not resident: a memory-mapped view would be a SIGBUS once the file shrinks), `file_changed` (the
    scheduler drops its read-ahead when the file's size or modification time changed under it), and
    typed errors naming the unit, the byte range and the file. `_fault`: fault injection (tests)."""

    path: str
    _bfd: int = -1
    _fault: tuple[int, int, int] | None = None

    def _open_checks(self) -> int:
        """Open the buffered descriptor and take the file's first stamp -> the descriptor."""
        self._bfd = os.open(self.path, os.O_RDONLY)
        self._stamp = self._file_stamp()
        return self._bfd

    def _file_stamp(self) -> tuple[int, int]:
        try:
            st = os.fstat(self._bfd)
        except OSError:
            return (-1, -1)
        return st.st_size, st.st_mtime_ns

    def file_changed(self) -> bool:
        """True (once) when the file's size or modification time changed since the last call: it was
        truncated or written under the model, and reads made ahead may hold what is no longer there."""
        stamp = self._file_stamp()
        changed, self._stamp = stamp != self._stamp, stamp
        return changed

    def pread(self, offset: int, length: int, label: str) -> bytes:
        """A small synchronous read through the page cache (embedding rows). Every failure, a file that
        shrank under the model included, is a WeightIOError: a memory-mapped view would be a SIGBUS."""
        fault = self._fault
        if fault is not None and fault[0] <= offset < fault[1]:
            if fault[2] == SHORT_READ:
                raise self._eof_error(label, offset, length)
            raise self._os_error(label, offset, length, fault[2])
        parts, got = [], 0
        try:
            while got < length:
                b = os.pread(self._bfd, length - got, offset + got)
                if not b:
                    raise self._eof_error(label, offset, length)
                parts.append(b)
                got += len(b)
        except OSError as e:
            raise self._os_error(label, offset, length, e.errno) from None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _eof_error(self, label: str, offset: int, need: int) -> WeightIOError:
        try:
            at = f" at {os.fstat(self._bfd).st_size} bytes"
        except OSError:  # the reader is closed
            at = ""
        return WeightIOError(f"{label}: file ended{at} while reading [{offset}, {offset + need}); was "
                             "the model file truncated?", path=self.path)

    def _os_error(self, label: str, offset: int, need: int, err: int) -> WeightIOError:
        return self._failed(label, offset, need, os.strerror(err))

    def _failed(self, label: str, offset: int, need: int, why: str) -> WeightIOError:
        return WeightIOError(f"{label}: read of {need} bytes at offset {offset} failed: {why}", path=self.path)


class FileReader(FileChecks):
    """Reads spans of one file into buffers; `submit` returns a Ticket.

    The reads run on native threads (preadq.cpp) that never take the GIL, so the model's Python code
    cannot stall the disk; where that library cannot be built (no C++ compiler) a pool of Python
    threads issuing os.preadv does the same work, more slowly under load."""

    def __init__(self, path: str, backend: str = "odirect", threads: int = 2, chunk: int = CHUNK):
        self.path, self.threads = path, max(1, threads)
        self.chunk = max(DIRECT_ALIGN, chunk // DIRECT_ALIGN * DIRECT_ALIGN)  # bytes per read request
        self.direct = False
        lib = _native_library()  # first: a KernelError here leaves no descriptor open
        self.fd = self._open_checks()  # buffered; pread() of small pieces always uses it
        if backend in ("odirect", "auto") and hasattr(os, "O_DIRECT"):
            dfd = -1
            try:
                dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                probe = aligned_empty(DIRECT_ALIGN)
                os.preadv(dfd, [memoryview(probe.numpy())], 0)
            except OSError as e:
                if dfd >= 0:  # the open worked but the probe read did not: keep the buffered descriptor
                    os.close(dfd)
                log.warning("O_DIRECT refused for %s (%s); using buffered reads", path, e.strerror)
            else:
                self.fd, self.direct = dfd, True
        self.align = DIRECT_ALIGN if self.direct else 1
        self.device_reads = False  # reads land in host memory only
        self.tracer = None
        self._lib = lib
        self._queue = lib.pq_open(self.fd, self.threads) if lib is not None else None
        if lib is not None and not self._queue:  # the C++ side could not start its threads
            self._close_fds()
            raise WeightIOError(f"cannot start {self.threads} reader threads (lower io_threads)", path=path,
                                field="io_threads")
        self._free: list[int] = []  # idle native tickets
        self._args: dict[tuple[int, int], tuple] = {}  # (id(plan), buffer address) -> ctypes arguments
        self.pool = None if lib is not None else ThreadPoolExecutor(self.threads, thread_name_prefix="engine-read")
        self._fault = None

    @property
    def native(self) -> bool:
        return self._queue is not None

    def plan(self, runs) -> ReadPlan:
        return ReadPlan.build(tuple(runs), self.align)

    def submit(self, plan: ReadPlan, buf: torch.Tensor, label: str) -> "Ticket | NativeTicket":
        if buf.numel() < plan.size:
            raise WeightIOError(f"staging buffer of {buf.numel()} bytes is smaller than {label} ({plan.size})",
                                path=self.path)
        if buf.data_ptr() % self.align:
            raise WeightIOError(f"{label}: staging buffer is not {self.align}-byte aligned (O_DIRECT); allocate it "
                                "with aligned_empty()", path=self.path)
        if self._queue is not None:
            return self._submit_native(plan, buf, label)
        mv = memoryview(buf.numpy())
        futures = []
        for off, n, dest, need in plan.spans:
            for c in range(0, n, self.chunk):
                m = min(self.chunk, n - c)
                futures.append(self.pool.submit(self._read, mv[dest + c:dest + c + m], off + c,
                                                max(0, min(m, need - c)), label))
        return Ticket(futures, label, self.path)

    def _submit_native(self, plan: ReadPlan, buf: torch.Tensor, label: str) -> "NativeTicket":
        ptr = buf.data_ptr()
        key = (id(plan), ptr)
        args = self._args.get(key)
        if args is None or args[0] is not plan:
            if len(self._args) > 4096:
                self._args.clear()
            n = len(plan.spans)
            arr = ctypes.c_int64 * n
            args = self._args[key] = (plan, n, arr(*(s[0] for s in plan.spans)), arr(*(s[1] for s in plan.spans)),
                                      arr(*(s[3] for s in plan.spans)),
                                      (ctypes.c_uint64 * n)(*(ptr + s[2] for s in plan.spans)))
        ticket = self._free.pop() if self._free else self._lib.pq_ticket_new()
        if not ticket:
            raise WeightIOError(f"{label}: out of memory for a read ticket", path=self.path)
        self._lib.pq_submit(self._queue, ticket, *args[1:], self.chunk)
        return NativeTicket(self, ticket, buf, label)

    def _read(self, view: memoryview, offset: int, need: int, label: str) -> None:
        tr = self.tracer
        t0 = tr.now() if tr else 0.0
        got = 0
        try:
            fault = self._fault
            if fault is not None and fault[0] <= offset < fault[1]:
                if fault[2] == SHORT_READ:
                    raise self._eof_error(label, offset, need)
                raise OSError(fault[2], os.strerror(fault[2]))
            while got < need:
                n = os.preadv(self.fd, [view[got:]], offset + got)
                if n == 0:
                    raise self._eof_error(label, offset, need)
                got += n
        except OSError as e:
            raise self._os_error(label, offset, need, e.errno) from None
        if tr:
            tr.span("read " + label, t0, tr.now(), tid=threading.get_ident(), args={"bytes": got})

    def _recycle(self, handle: int) -> None:
        """A native ticket whose reads are over: reused while the reader is open, else freed."""
        if self._queue is not None:
            self._free.append(handle)
        else:
            self._lib.pq_ticket_free(handle)

    def inject_fault(self, offset: int | None, err: int = errno.EIO, end: int | None = None) -> None:
        """Fault injection (tests): read requests starting in [offset, end) (end None: to the end of the
        file) fail with errno `err`, or end early with SHORT_READ; offset None turns it off."""
        end = (1 << 62) if end is None else end
        self._fault = None if offset is None else (offset, end, err)
        if self._queue is not None:
            self._lib.pq_fail_at(self._queue, 0 if offset is None else offset, end, 0 if offset is None else err)

    def close(self) -> None:
        if self._queue is not None:
            queue, self._queue = self._queue, None
            self._lib.pq_close(queue)  # finishes reads in progress, cancels queued ones
            for t in self._free:
                self._lib.pq_ticket_free(t)
            self._free.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self._close_fds()

    def _close_fds(self) -> None:
        fds = {self.fd, self._bfd} - {-1}
        self.fd = self._bfd = -1  # once: a second close() must not close whatever reuses the numbers
        for fd in fds:
            os.close(fd)

    def __del__(self):  # a reader dropped without close(): stop its threads, release the descriptors
        if getattr(self, "fd", -1) >= 0:
            self.close()


class NativeTicket:
    """Completion of one native submit: wait() re-raises the first failure as WeightIOError. The buffer
    stays referenced until the reads are done; the native ticket then returns to the reader."""

    __slots__ = ("_buf", "_error", "_handle", "_label", "_reader")

    def __init__(self, reader: FileReader, handle: int, buf: torch.Tensor, label: str):
        self._reader, self._handle, self._buf, self._label = reader, handle, buf, label
        self._error: WeightIOError | None = None

    def wait(self) -> None:
        h = self._handle
        if h is not None:
            r = self._reader
            info = (ctypes.c_int64 * 6)()
            rc = r._lib.pq_wait(h, info)  # returns at once after close(): its reads ran or were cancelled
            self._handle = self._buf = None
            r._recycle(h)
            if rc == -1:
                self._error = r._eof_error(self._label, info[0], info[1])
            elif rc == errno.ECANCELED:
                self._error = WeightIOError(f"{self._label}: the reader was closed before this read ran",
                                            path=r.path)
            elif rc:
                self._error = r._os_error(self._label, info[0], info[1], rc)
            tr = r.tracer
            if tr and info[2]:
                t0, t1 = info[2] / 1e9, info[3] / 1e9
                tr.span("read " + self._label, t0, t1, tid=tr.lane("reads in flight", t0, t1),
                        args={"bytes": info[4], "queued_us": round((info[2] - info[5]) / 1e3, 1)})
        if self._error is not None:
            raise self._error

    def done(self) -> bool:
        return self._handle is None or bool(self._reader._lib.pq_done(self._handle))

    def cancel(self) -> None:
        """Queued native reads are cancelled only by closing the reader."""

    def __del__(self):
        if self._handle is not None:
            try:
                self.wait()  # the native threads may still write into the buffer and the ticket
            except WeightIOError:
                pass


class Ticket:
    """Completion of one submitted read (Python threads): wait() re-raises the first error, but only
    once no chunk of the ticket is still writing into the buffer (queued chunks are cancelled)."""

    __slots__ = ("futures", "label", "path")

    def __init__(self, futures: list[Future], label: str = "", path: str = ""):
        self.futures, self.label, self.path = futures, label, path

    def wait(self) -> None:
        error = None
        for f in self.futures:
            if error is not None:
                f.cancel()  # not started yet: never writes
            try:
                f.result()  # a running chunk is waited for, so a later submit cannot race with it
            except CancelledError:
                error = error or WeightIOError(f"{self.label}: read cancelled", path=self.path)
            except Exception as e:
                error = error or e
        if error is not None:
            raise error

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def cancel(self) -> None:
        for f in self.futures:
            f.cancel()


def kvikio_available() -> bool:
    """Whether the kvikio package is installed (looked up, not imported)."""
    return importlib.util.find_spec("kvikio") is not None


def open_reader(path: str | os.PathLike, backend: str = "auto", threads: int = 2, *, device_type: str = "cpu"):
    """The reader for an io_backend (a config's, or the plan's resolved one) on a compute device.

    kvikio (cuFile) for "kvikio", and for "auto" on a CUDA device when kvikio is installed (looked up,
    not imported); a KvikioReader that cannot start (no CUDA driver) logs one line and a FileReader
    (O_DIRECT where allowed) takes over. "posix", "odirect" and "auto" elsewhere: a FileReader.
    The reader's `device_reads` says where the buffers it is given must live (device memory only
    for kvikio with GPUDirect Storage) and `direct` whether its reads bypass the page cache.
    """
    path = os.fspath(path)
    if backend == "kvikio" or (backend == "auto" and device_type == "cuda" and kvikio_available()):
        from ..cuda.kvikio_io import KvikioReader  # lazy: the CPU path never imports engine.cuda

        try:
            return KvikioReader(path)
        except KernelError as e:
            log.warning("kvikio unavailable (%s); reading with the POSIX reader (O_DIRECT where allowed)", e)
    return FileReader(path, backend="posix" if backend == "posix" else "odirect", threads=threads)


def reader_backend(reader) -> str:
    """The io_backend a plan must assume for an opened reader: "kvikio" only when it reads into device
    memory (GDS: no host bounce, no H2D copy), "odirect" when its reads bypass the page cache, else
    "posix" (buffered reads: a refused O_DIRECT, or kvikio's compat mode)."""
    if getattr(reader, "device_reads", False):
        return "kvikio"
    return "odirect" if reader.direct else "posix"


@functools.cache
def _native_library():
    """The compiled preadq.cpp. When it cannot be built or loaded: a KernelError, or None (logged once)
    under the explicit opt-in ENGINE_SLOW_FALLBACK=1 (Python reader threads, slower under load)."""
    from ..cpu.build import BuildSpec, build, load_library, slow_fallback_allowed
    from ..errors import KernelError

    try:
        lib = load_library(build(BuildSpec.default(source=NATIVE_SOURCE)))
    except KernelError as e:
        if not slow_fallback_allowed():
            raise
        log.warning("native reader unavailable (%s); reading with Python threads (ENGINE_SLOW_FALLBACK=1)", e)
        return None
    vp, i64, i64p, u64p = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_uint64)
    for name, res, args in (("pq_abi_version", ctypes.c_int, ()), ("pq_open", vp, (ctypes.c_int, ctypes.c_int)),
                            ("pq_close", None, (vp,)), ("pq_ticket_new", vp, ()), ("pq_ticket_free", None, (vp,)),
                            ("pq_submit", None, (vp, vp, ctypes.c_int, i64p, i64p, i64p, u64p, i64)),
                            ("pq_wait", ctypes.c_int, (vp, i64p)), ("pq_done", ctypes.c_int, (vp,)),
                            ("pq_fail_at", None, (vp, i64, i64, ctypes.c_int))):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    if lib.pq_abi_version() != 3:
        raise KernelError(f"native reader: ABI {lib.pq_abi_version()}, expected 3 (a stale build in the cache?)")
    return lib
