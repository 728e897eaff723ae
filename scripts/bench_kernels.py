#!/usr/bin/env python3
"""Benchmark the CUDA GEMV and dequantize kernels on a real device: effective GB/s per format and
shape against the device's theoretical DRAM bandwidth, with L2 flushed before every timed launch.
Prints one JSON document. Without cupy or a CUDA device it prints {"error": ...} and exits 2
(no numbers are invented on machines that cannot measure them).

Also reports a device-to-device copy's GB/s (bytes read + written), the bandwidth a kernel can
actually reach, beside the datasheet-style peak computed from the memory clock and bus width.

Usage: python scripts/bench_kernels.py [--formats Q4_K,Q8_0] [--t 1,4,8] [--reps 20] [--shapes default|70b]
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cuda.kernels import FORMATS, KernelLibrary  # noqa: E402
from engine.formats import FORMATS as QUANT_FORMATS  # noqa: E402

# (n, k): typical 7B projection shapes plus the default model's small ones; Llama-3-70B's block
# projections (q/o, k/v, gate/up, down: dim 8192, 8 KV heads of 128, FFN 28672)
SHAPES = {"default": ((4096, 4096), (11008, 4096), (4096, 11008), (1536, 576), (49152, 576)),
          "70b": ((8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672))}


def device_info(cupy) -> dict:
    dev = cupy.cuda.Device()
    attrs = dev.attributes
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    mem_khz = attrs.get("MemoryClockRate") or props.get("memoryClockRate", 0)
    bus_bits = attrs.get("GlobalMemoryBusWidth") or props.get("memoryBusWidth", 0)
    return {
        "name": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "compute_capability": dev.compute_capability,
        "l2_bytes": attrs.get("L2CacheSize", 0),
        "peak_dram_gbs": 2 * mem_khz * 1e3 * bus_bits / 8 / 1e9,  # DDR: two transfers per clock
    }


def time_launch(torch, fn, flush, reps: int) -> float:
    """Median seconds of `fn` over `reps` launches, each after an L2 flush."""
    times = []
    for _ in range(reps + 2):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times = sorted(times[2:])  # drop warm-up (first use compiles)
    return times[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--t", default="1,4,8", help="activation rows for the GEMV")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", choices=list(SHAPES), default="default")
    args = ap.parse_args(argv)
    try:
        import cupy
        import torch

        if cupy.cuda.runtime.getDeviceCount() < 1 or not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
    except Exception as e:  # ImportError or no driver
        print(json.dumps({"error": f"cannot benchmark: {e}"}))
        return 2

    info = device_info(cupy)
    flush = torch.empty(max(2 * info["l2_bytes"], 64 << 20) // 4, dtype=torch.float32, device="cuda")
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB, far beyond L2
    dst = torch.empty_like(src)
    info["copy_gbs"] = round(2 * src.numel() / time_launch(torch, lambda: dst.copy_(src), flush, 5) / 1e9, 1)
    del src, dst
    lib = KernelLibrary()
    results = []
    for fmt_name in args.formats.split(","):
        fmt = FORMATS[fmt_name.strip().upper()]
        for n, k in SHAPES[args.shapes]:
            if k % fmt.k_multiple:
                continue
            w = torch.randint(0, 256, (n, fmt.row_nbytes(k)), dtype=torch.uint8, device="cuda")
            _sanitise_scales(torch, w, fmt)
            bound = lib.bind(w, fmt.name, n, k)
            for t in (int(v) for v in args.t.split(",")):
                x = torch.randn((t, k), dtype=torch.float16, device="cuda")
                y = torch.empty((t, n), dtype=torch.float32, device="cuda")
                run = functools.partial(lib.gemv, x, bound, out=y)
                sec = time_launch(torch, run, flush, args.reps)
                nbytes = w.numel() + x.numel() * 2 + y.numel() * 4
                results.append(_row("gemv", fmt.name, n, k, t, sec, nbytes, info))
            out = torch.empty((n, k), dtype=torch.float16, device="cuda")
            run = functools.partial(lib.dequantize, w, fmt.name, n, k, out=out)
            sec = time_launch(torch, run, flush, args.reps)
            results.append(_row("dequant", fmt.name, n, k, None, sec, w.numel() + out.numel() * 2, info))
    print(json.dumps({"device": info, "results": results}, indent=1))
    return 0


def _sanitise_scales(torch, w, fmt) -> None:
    """Random bytes make arbitrary fp16 scales (NaN/inf slow nothing down but read badly): put
    small finite scales where each block keeps them."""
    blocks = w.view(w.shape[0], -1, fmt.type_size)
    scale = torch.tensor([0.01], dtype=torch.float16, device=w.device).view(torch.uint8)
    if fmt.name in ("F16", "BF16"):
        dtype = torch.float16 if fmt.name == "F16" else torch.bfloat16
        w.copy_(torch.randn(w.shape[0], w.shape[1] // 2, device=w.device).to(dtype).view(torch.uint8))
    for off in QUANT_FORMATS[fmt.name].scale_offsets:  # d, and m / dmin where the block has one
        blocks[:, :, off:off + 2] = scale


def _row(kind, fmt, n, k, t, sec, nbytes, info) -> dict:
    gbs = nbytes / sec / 1e9
    peak = info["peak_dram_gbs"]
    return {"kernel": kind, "format": fmt, "n": n, "k": k, "t": t, "us": round(sec * 1e6, 2),
            "gb_per_s": round(gbs, 1), "fraction_of_peak": round(gbs / peak, 3) if peak else None,
            "fraction_of_copy": round(gbs / info["copy_gbs"], 3)}


if __name__ == "__main__":
    sys.exit(main())
