"""python -m engine.calibrate [--quick] [--json] [--dir DIR] [--size SIZE] [--output PATH]

Measures this machine for the planner and writes the hardware profile JSON (default
$ENGINE_CACHE_DIR/hardware-cpu.json, else ~/.cache/engine/hardware-cpu.json):
  * disk reads of a scratch file written under --dir: O_DIRECT into the engine's staging buffers
    (2 MiB-aligned, transparent huge pages) from a pool of reader threads (median of the passes), and buffered reads, both cold (the file's pages are evicted with
    posix_fadvise(DONTNEED); as root the global page cache is also dropped unless --no-drop-caches),
    plus the latency of small random O_DIRECT reads (embedding rows);
  * memcpy, and single-thread streaming reads of RAM (what attention over the KV cache does);
  * every CPU linear kernel (engine.cpu.linear on random weight bytes) at T=1 and T=32, and those with an
    8-bit-activation path (engine.cpu.INT8_FORMATS) again with activations="int8" (cpu_activations: int8);
  * a per-layer and a per-token fixed-cost proxy (tiny kernel calls and small torch ops).
--quick keeps the whole run under ~20 s on two cores. Errors: one line on stderr, exit 1.

python -m engine.calibrate --moe-profile PROMPTS --model M [--moe-tokens N] [--output PATH] measures a
mixture-of-experts model's router instead: it runs M over the prompts (a text file, one prompt per
non-empty line) one token per pass and writes each layer's per-expert selection frequencies (JSON, versioned)
beside the hardware profile, in $ENGINE_CACHE_DIR/moe/<model file name>.json, where engine.plan and model
loads find them (the planner keeps the hottest experts resident).
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .cli import guarded
from .errors import EngineError
from .tiers.config import MAX_IO_THREADS
from .tiers.hardware import ComputeRate, HardwareProfile, cache_dir, save_profile
from .tiers.io import aligned_empty
from .tiers.units import format_rate, format_size, parse_size

ALIGN = 4096
CHUNK = 8 << 20  # bytes per read request


@dataclass(frozen=True, slots=True)
class Settings:
    file_bytes: int  # scratch file for the disk measurements
    ram_bytes: int  # buffers for memcpy / RAM reads
    matrix_bytes: int  # weight bytes per kernel measurement
    repeats: int
    io_threads: int
    drop_caches: bool

    @classmethod
    def make(cls, quick: bool, size: int | None, io_threads: int, drop_caches: bool) -> "Settings":
        if quick:
            return cls(size or 128 << 20, 64 << 20, 8 << 20, 2, io_threads, drop_caches)
        return cls(size or 1 << 30, 256 << 20, 64 << 20, 3, io_threads, drop_caches)


def _best(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls (the least disturbed by other load on a shared machine)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# -- disk ------------------------------------------------------------------------------------------------
def _write_scratch(path: Path, nbytes: int) -> None:
    block = os.urandom(CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        written = 0
        while written < nbytes:
            written += os.write(fd, block[:min(CHUNK, nbytes - written)])
        os.fsync(fd)
    finally:
        os.close(fd)


def _evict(path: Path, drop_caches: bool) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if drop_caches:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as fh:
                fh.write("1\n")
            return "fadvise+drop_caches"
        except OSError:
            pass
    return "fadvise"


def _read_all(path: Path, nbytes: int, threads: int, direct: bool) -> float:
    """Seconds to read the whole file in CHUNK requests spread over `threads` readers."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    buffers = [memoryview(aligned_empty(CHUNK).numpy()) for _ in range(threads)]  # as the engine's buffers
    offsets = list(range(0, nbytes, CHUNK))

    def reader(worker: int) -> int:
        got = 0
        for off in offsets[worker::threads]:
            got += os.preadv(fd, [buffers[worker]], off)
        return got

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(reader, range(threads)))
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    if total != nbytes:
        raise EngineError(f"read {total} of {nbytes} bytes", path=str(path))
    return dt


def _random_latency(path: Path, nbytes: int, samples: int) -> float:
    import random

    rng = random.Random(0)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, ALIGN)
    times = []
    try:
        for _ in range(samples):
            off = rng.randrange(nbytes // ALIGN) * ALIGN
            t0 = time.perf_counter()
            os.preadv(fd, [buf], off)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        buf.close()
    return statistics.median(times)


def measure_disk(directory: Path, s: Settings) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"engine-calibrate-{os.getpid()}.bin"
    try:
        _write_scratch(path, s.file_bytes)
        how = _evict(path, s.drop_caches)
        try:
            # the median of `repeats` passes: this kind of disk drifts by +-30% within a minute, and the
            # planner needs its usual speed, not its best burst
            direct = s.file_bytes / statistics.median(_read_all(path, s.file_bytes, s.io_threads, direct=True)
                                                      for _ in range(s.repeats))
            latency = _random_latency(path, s.file_bytes, 64)
            direct_ok = True
        except OSError:  # O_DIRECT refused (tmpfs, some overlay filesystems)
            direct_ok, latency = False, None
        _evict(path, s.drop_caches)
        buffered = s.file_bytes / _read_all(path, s.file_bytes, s.io_threads, direct=False)
        if not direct_ok:
            direct = buffered
            _evict(path, False)
            latency = _random_latency_buffered(path, s.file_bytes)
    finally:
        path.unlink(missing_ok=True)
    return {"disk_read_direct": direct, "disk_read_buffered": buffered, "disk_latency_s": latency,
            "disk_dir": str(directory), "disk_file_bytes": s.file_bytes, "disk_threads": s.io_threads,
            "o_direct": direct_ok, "cache_eviction": how}


def _random_latency_buffered(path: Path, nbytes: int) -> float:
    import random

    rng = random.Random(0)
    fd = os.open(path, os.O_RDONLY)
    times = []
    try:
        for _ in range(64):
            off = rng.randrange(nbytes // ALIGN) * ALIGN
            t0 = time.perf_counter()
            os.pread(fd, ALIGN, off)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return statistics.median(times)


# -- memory ------------------------------------------------------------------------------------------------
def measure_memory(s: Settings) -> dict:
    import torch

    src = torch.ones(s.ram_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages
    memcpy = s.ram_bytes / _best(lambda: dst.copy_(src), s.repeats + 1)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine runs attention with one torch thread
    try:
        read = s.ram_bytes / _best(lambda: src.sum(), s.repeats + 1)
    finally:
        torch.set_num_threads(prev)
    return {"memcpy": memcpy, "resident_bandwidth": read}


# -- kernels -----------------------------------------------------------------------------------------------
def _weights(fmt: str, n: int, k: int):
    import torch

    from .formats import FORMATS

    f = FORMATS[fmt]
    if fmt in ("F32", "F16", "BF16"):  # finite values: no NaN/denormal slow paths in the timing
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[fmt]
        return (torch.randn(n, k) * 0.05).to(dtype).contiguous().view(torch.uint8).reshape(-1)
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n * f.row_nbytes(k),), dtype=torch.uint8, generator=g)


def measure_kernels(s: Settings, threads: int, batched_tokens: int = 32) -> tuple[dict, dict, dict]:
    """Per format, the kernels' ComputeRate with the default int16 activations and, for INT8_FORMATS,
    with int8 ones (the same matrices and method), and the raw timings."""
    import torch

    from . import cpu
    from .formats import FORMATS

    if not cpu.available():
        raise EngineError("the CPU linear kernels are unavailable; nothing to calibrate", field="engine.cpu")
    cpu.set_num_threads(threads)
    k = 4096
    rates, rates_int8, raw = {}, {}, {}
    x1, xb = torch.randn(1, k), torch.randn(batched_tokens, k)
    for fmt in sorted(cpu.SUPPORTED):
        n = max(1, s.matrix_bytes // FORMATS[fmt].row_nbytes(k))
        w = _weights(fmt, n, k)
        raw[fmt] = {"n": n, "k": k, "weight_bytes": w.numel()}
        for activations, into in (("int16", rates), ("int8", rates_int8)):
            if activations == "int8" and fmt not in cpu.INT8_FORMATS:
                continue
            cpu.linear(x1, w, fmt, n, k, activations=activations)  # warm up: pages, caches, the thread pool
            t1 = _best(lambda: cpu.linear(x1, w, fmt, n, k, activations=activations), s.repeats + 2)
            tb = _best(lambda: cpu.linear(xb, w, fmt, n, k, activations=activations), s.repeats)
            into[fmt] = ComputeRate(t1=w.numel() / t1, batched=batched_tokens * w.numel() / tb)
            suffix = "" if activations == "int16" else "_int8"
            raw[fmt] |= {f"t1{suffix}_s": t1, f"t{batched_tokens}{suffix}_s": tb}
    return rates, rates_int8, raw


def measure_overheads(threads: int) -> dict:
    """Proxies for fixed costs the kernels' byte rates do not capture. Per layer: 7 kernel calls on a
    tiny matrix plus the small torch ops of a block (norms, rope-sized elementwise ops, attention over a
    short context); per token: softmax and top-k over a 128k vocabulary. Each part is the best of many
    calls, i.e. the cost on an idle machine (the median is kept in the measurements: on a busy machine,
    waking the kernel thread pool can take a scheduler tick)."""
    import torch

    from . import cpu

    cpu.set_num_threads(threads)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, w = torch.randn(1, 64), _weights("Q8_0", 64, 64)
        h = torch.randn(1, 1, 512)
        q, kk = torch.randn(1, 8, 1, 64), torch.randn(1, 8, 256, 64)
        logits = torch.randn(128256)

        def small_ops():
            for _ in range(2):
                torch.nn.functional.rms_norm(h, (512,))
            sc = torch.matmul(q, kk.transpose(-1, -2)).softmax(-1)
            torch.matmul(sc, kk)
            torch.nn.functional.silu(h) * h
            h * h + h  # rope-like elementwise work

        def token():
            torch.topk(logits, 40)
            torch.softmax(logits, -1)

        def samples(fn, n):
            fn()
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            return out

        lin = samples(lambda: cpu.linear(x, w, "Q8_0", 64, 64), 100)
        ops = samples(small_ops, 50)
        tok = samples(token, 10)
    finally:
        torch.set_num_threads(prev)
    return {"layer_overhead_s": 7 * min(lin) + min(ops), "token_overhead_s": min(tok),
            "layer_overhead_median_s": 7 * statistics.median(lin) + statistics.median(ops),
            "token_overhead_median_s": statistics.median(tok)}


def calibrate(s: Settings, directory: Path, threads: int, progress=lambda msg: None) -> HardwareProfile:
    import psutil

    t0 = time.perf_counter()
    progress(f"disk: {format_size(s.file_bytes)} scratch file under {directory}")
    disk = measure_disk(directory, s)
    progress("memory")
    mem = measure_memory(s)
    progress(f"kernels ({threads} threads)")
    rates, rates_int8, raw = measure_kernels(s, threads)
    progress("overheads")
    over = measure_overheads(threads)
    meas = {**{k: v for k, v in disk.items() if k.startswith("disk_") and k not in
               ("disk_read_direct", "disk_read_buffered", "disk_latency_s")},
            "o_direct": disk["o_direct"], "cache_eviction": disk["cache_eviction"],
            "compute_threads": threads, "kernels": raw,
            **{k: v for k, v in over.items() if k.endswith("median_s")}, "seconds": time.perf_counter() - t0,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": s.matrix_bytes < (64 << 20)}
    return HardwareProfile(
        device="cpu", name=f"cpu ({os.cpu_count()} threads)",
        resident_bytes=int(psutil.virtual_memory().available), host_bytes=0,
        disk_read_direct=disk["disk_read_direct"], disk_read_buffered=disk["disk_read_buffered"],
        disk_latency_s=disk["disk_latency_s"], host_to_device=mem["memcpy"], memcpy=mem["memcpy"],
        resident_bandwidth=mem["resident_bandwidth"], compute=rates, compute_int8=rates_int8,
        layer_overhead_s=over["layer_overhead_s"], token_overhead_s=over["token_overhead_s"],
        source=f"calibrated {meas['date']}", measurements=meas)


def describe_profile(p: HardwareProfile) -> str:
    lines = [f"{p.name} [{p.source}]",
             f"  RAM available      {format_size(p.resident_bytes)}",
             f"  disk O_DIRECT      {format_rate(p.disk_read_direct)}   buffered {format_rate(p.disk_read_buffered)}"
             f"   random 4 KiB read {p.disk_latency_s * 1e6:.0f} us",
             f"  memcpy             {format_rate(p.memcpy)}   1-thread RAM read {format_rate(p.resident_bandwidth)}",
             f"  overheads          {p.layer_overhead_s * 1e6:.0f} us/layer, {p.token_overhead_s * 1e6:.0f} us/token",
             "  linear kernels     weight GB/s at T=1 | token x GB/s at T=32   (with cpu_activations int8)"]
    for fmt, r in p.compute.items():
        r8 = p.compute_int8.get(fmt)
        int8 = f"   ({r8.t1 / 1e9:7.2f} | {r8.batched / 1e9:7.2f})" if r8 else ""
        lines.append(f"    {fmt:<6} {r.t1 / 1e9:7.2f} | {r.batched / 1e9:7.2f}{int8}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller scratch file and matrices (< ~20 s)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument("--dir", help="where to write the scratch file: put it on the disk models stream from "
                                 "(default: the engine cache directory)")
    p.add_argument("--size", help="scratch file size, e.g. 2GiB (default 1 GiB, 128 MiB with --quick)")
    p.add_argument("--io-threads", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    p.add_argument("--no-drop-caches", action="store_true",
                   help="only evict the scratch file's pages, never the global page cache")
    p.add_argument("--output", help="profile path (default: the cache directory)")
    p.add_argument("--moe-profile", metavar="PROMPTS",
                   help="instead of the hardware: router statistics of --model over these prompts (one per line)")
    p.add_argument("--model", help="--moe-profile: the mixture-of-experts GGUF to run")
    p.add_argument("--config", help="--moe-profile: tier config for loading the model (default: auto)")
    p.add_argument("--moe-tokens", type=int, default=4096, help="--moe-profile: at most this many tokens in all")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="also calibrate the GPU when there is a usable one (auto), never (cpu) or must (cuda)")
    return p


def moe_profile(args: argparse.Namespace):
    """--moe-profile: gather the router statistics of --model over the prompts file and save them."""
    from . import load
    from .tiers.router_stats import gather, profile_path, save_router_profile

    if not args.model:
        raise EngineError("--moe-profile needs --model (the mixture-of-experts GGUF)", field="--model")
    if args.moe_tokens < 1:
        raise EngineError("must be >= 1", field="--moe-tokens")
    try:
        with open(args.moe_profile, encoding="utf-8") as fh:
            lines = [line.strip() for line in fh if line.strip()]
    except OSError as e:
        raise EngineError(f"cannot read the prompts: {e.strerror}", path=args.moe_profile, field="--moe-profile") \
            from None
    except UnicodeDecodeError:
        raise EngineError("the prompts file is not UTF-8 text", path=args.moe_profile, field="--moe-profile") from None
    if not lines:
        raise EngineError("no prompts (one per non-empty line)", path=args.moe_profile, field="--moe-profile")
    model = load(args.model, config=args.config, threads=args.threads)
    try:
        profile = gather(model, [model.tokenize(line) for line in lines], args.moe_tokens)
    finally:
        model.close()
    return profile, save_router_profile(profile, args.output or profile_path(args.model))


def run(args: argparse.Namespace) -> tuple[HardwareProfile, Path]:
    if args.moe_profile is not None:
        return moe_profile(args)
    if not 1 <= args.io_threads <= MAX_IO_THREADS:
        raise EngineError(f"must be in [1, {MAX_IO_THREADS}]", field="--io-threads")
    if args.threads is not None and args.threads < 1:
        raise EngineError("must be >= 1", field="--threads")
    size = parse_size(args.size, field="--size") if args.size else None
    if size is not None and size < CHUNK:
        raise EngineError(f"must be at least {format_size(CHUNK)}", field="--size")
    if size is not None:
        size = -(-size // CHUNK) * CHUNK
    threads = args.threads or os.cpu_count() or 1
    s = Settings.make(args.quick, size, args.io_threads, drop_caches=not args.no_drop_caches and os.geteuid() == 0)
    directory = Path(args.dir) if args.dir else cache_dir()
    progress = (lambda msg: None) if args.json else (lambda msg: print(f"measuring {msg} ...", file=sys.stderr))
    profile = calibrate(s, directory, threads, progress)
    path = save_profile(profile, args.output)
    if args.device != "cpu":  # a usable GPU: its own profile (H2D, HBM, kernels), on top of this host's
        from .cuda.device import cuda_unavailable_reason
        from .cuda.nvml import calibrate_gpu

        reason = cuda_unavailable_reason(0)
        if reason is None:
            progress("the GPU (H2D pinned, device memory, kernels)")
            gpu = calibrate_gpu(0, quick=args.quick, host=profile)
            print(f"GPU profile written to {save_profile(gpu)}", file=sys.stderr)
        elif args.device == "cuda":
            raise EngineError(f"cannot calibrate the GPU: {reason}", field="--device")
    return profile, path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code, got = guarded(lambda: run(args))
    if code:
        return code
    profile, path = got
    if args.moe_profile is not None:
        if args.json:
            print(json.dumps({"path": str(path), "profile": profile.to_json()}))
        else:
            hot = [max(range(profile.n_experts), key=row.__getitem__) for row in profile.frequency]
            print(f"router statistics of {profile.model}: {profile.tokens} tokens, {profile.n_layers} layers x "
                  f"{profile.n_experts} experts (top-{profile.n_experts_used}); hottest expert per layer: "
                  f"{', '.join(map(str, hot[:8]))}{' ...' if len(hot) > 8 else ''}")
            print(f"written to {path}")
        return 0
    if args.json:
        print(json.dumps({"path": str(path), "profile": profile.to_json()}, indent=2))
    else:
        print(describe_profile(profile))
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
