#!/usr/bin/env python3
"""Benchmark the GPU data path: host->device copies and weight-file reads. Prints one JSON document.

  * h2d: one copy per size from pinned and from pageable host memory, best of --reps, timed with
    CUDA events (engine.cuda.nvml.h2d_bandwidth, what calibrate measures);
  * read: a scratch file (or --file) read cold (its pages evicted with posix_fadvise before every
    read) by the engine's POSIX reader (O_DIRECT where allowed) into pinned memory, and by
    engine.cuda.kvikio_io.KvikioReader into pinned host memory and into device memory, with
    kvikio's mode (gds = GPUDirect Storage, compat = POSIX through bounce buffers) and whether each
    read bypassed the page cache (only GDS into device memory does).
Without a CUDA device it prints {"error": ...} and exits 2: no numbers are invented on machines that
cannot measure them. Without kvikio the read section says why instead of its kvikio numbers.

Usage: python scripts/bench_pcie.py [--sizes 1MiB,16MiB,256MiB] [--reps 5]
                                    [--file PATH | --file-size 1GiB --dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.errors import EngineError
from engine.tiers.units import parse_size

CHUNK = 8 << 20


def write_scratch(path: Path, nbytes: int) -> None:
    block = os.urandom(CHUNK)
    with open(path, "wb") as fh:
        fh.writelines(block[:min(CHUNK, nbytes - off)] for off in range(0, nbytes, CHUNK))
        fh.flush()
        os.fsync(fh.fileno())


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed_read(reader, path: Path, nbytes: int, buf, reps: int) -> float:
    """Best B/s of reading the whole file into `buf` with a FileReader-like reader, cold each time."""
    import torch

    plan = reader.plan([(0, nbytes)])
    best = float("inf")
    for _ in range(reps):
        evict(path)
        t0 = time.perf_counter()
        reader.submit(plan, buf, "bench").wait()
        if buf.device.type == "cuda":
            torch.cuda.synchronize(buf.device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def bench_reads(path: Path, nbytes: int, reps: int, device) -> dict:
    from engine.cuda.staging import CudaStaging, TorchCudaOps
    from engine.cuda.kvikio_io import KvikioReader
    from engine.tiers.io import FileReader

    ops = TorchCudaOps(device)
    staging = CudaStaging(ops, ops.current_stream(), ops.new_stream(), str(device))
    out: dict = {"file": str(path), "bytes": nbytes}
    posix = FileReader(str(path), backend="odirect", threads=4)
    try:
        host = staging.alloc_host(posix.plan([(0, nbytes)]).size, posix.align)
        out["posix"] = {"o_direct": posix.direct, "host_gbs": timed_read(posix, path, nbytes, host, reps) / 1e9}
    finally:
        posix.close()
    out["kvikio"] = {}
    for into in ("host", "device"):  # kvikio into pinned host memory (POSIX reads), into device memory
        try:
            kv = KvikioReader(path, device_reads=into == "device")
        except EngineError as e:
            out["kvikio"] = {"error": str(e)}
            return out
        try:
            size = kv.plan([(0, nbytes)]).size
            buf = staging.alloc_host(size, kv.align) if into == "host" else staging.alloc_device(size)
            out["kvikio"]["mode"] = kv.mode
            out["kvikio"][f"{into}_direct"] = kv.direct
            out["kvikio"][f"{into}_gbs"] = timed_read(kv, path, nbytes, buf, reps) / 1e9
        finally:
            kv.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1MiB,16MiB,256MiB", help="H2D copy sizes")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--file", help="read this file instead of writing a scratch file")
    ap.add_argument("--file-size", default="1GiB", help="scratch file size")
    ap.add_argument("--dir", default=None, help="where to write the scratch file (the disk models stream from)")
    args = ap.parse_args(argv)
    try:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
        sizes = [parse_size(s.strip(), field="--sizes") for s in args.sizes.split(",")]
        scratch_bytes = parse_size(args.file_size, field="--file-size")
    except (ImportError, RuntimeError, EngineError) as e:
        print(json.dumps({"error": f"cannot benchmark: {e}"}))
        return 2

    from engine.cuda.nvml import h2d_bandwidth

    device = torch.device("cuda", torch.cuda.current_device())
    result: dict = {"device": {"name": torch.cuda.get_device_name(device), "torch": torch.__version__,
                               "cuda": torch.version.cuda}, "h2d": []}
    for n in sizes:
        result["h2d"].append({"bytes": n,
                              "pinned_gbs": h2d_bandwidth(device, n, pinned=True, repeats=args.reps) / 1e9,
                              "pageable_gbs": h2d_bandwidth(device, n, pinned=False, repeats=args.reps) / 1e9})
    if args.file:
        path = Path(args.file)
        result["read"] = bench_reads(path, path.stat().st_size, args.reps, device)
    else:
        fd, name = tempfile.mkstemp(prefix="engine-bench-pcie-", dir=args.dir)
        os.close(fd)
        path = Path(name)
        try:
            write_scratch(path, scratch_bytes)
            result["read"] = bench_reads(path, scratch_bytes, args.reps, device)
        finally:
            path.unlink(missing_ok=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
