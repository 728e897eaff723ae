#!/usr/bin/env python
"""Benchmark engine.cpu.linear on SmolLM2-135M-shaped matrices against torch, in one run.

For each matrix and T (rows of x) it reports the wall time per call, weight GB/s, GFLOP/s of
  kernel : engine.cpu.linear on the raw GGUF bytes
  mm     : torch.mm on weights already dequantized to fp32 (what a dequantized cache would cost)
  dq+mm  : gguf.quants.dequantize to fp32, then torch.mm (what the fallback path costs per call)
Measurements are interleaved round by round so machine noise hits all columns alike; the
ratio columns are the meaningful numbers on a shared machine. Also printed:
  * memory bandwidth (large torch copy / sum);
  * a decode sweep: the 211 distinct matrices of SmolLM2-135M (30 blocks + Q8_0 head, 96 MB, so
    weights stream from memory as in real decoding), T=1, at 1 thread and at --threads;
  * coexistence with torch: kernel calls interleaved with multi-threaded torch ops, against the
    sum of both run separately (a ratio near 1 means no oversubscription between the pools).

  * --big: Llama-70B-shaped Q4_K/Q6_K matrices (130-190 MB each, so they stream from memory) at T=1
    and T=64, the default integer path against exact=True (fp32), as wall GB/s and as GB/s per CPU
    second of the process (the kernel's own speed, robust to other processes sharing the cores).

  * --layout FMT [FMT ...]: one decode token of 2 Llama-70B-shaped blocks in FMT (q/k/v, o, gate/up, down:
    linear_many calls as the model makes them, ~1 GB, from memory) on the file's plain rows and on rows
    interleaved as the CPU resident store lays them out (engine.weights.interleave_rows), alternated token
    by token in ABBA order (the ratio: the median of each round's), int16 and 8-bit activations: GB/s of
    weights and their share of a torch-sum read measured after the tokens (torch's threads spin on after a
    parallel op, slowing what runs next); outputs checked bit-identical.

  * --layout-model N: the same question in the model: scripts/bench_decode.py's N Llama-70B-shaped blocks
    loaded twice in one process, once with the resident matrices interleaved as the CPU device asks and
    once on the file's rows, decoding 4 tokens each in turn (ABBA), with --activations (default int8).

    python scripts/bench_cpu_kernels.py [--threads 2] [--json out.json] [--quick]
                                        [--big | --layout Q4_K Q6_K | --layout-model 4 [--activations int16]]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cpu.launcher import default_kernels  # noqa: E402

# (name, N, K, format, count per token): one SmolLM2-135M block (x30) and the tied output head.
SHAPES = (
    ("attn_q/o", 576, 576, "Q4_1", 60),
    ("attn_k/v", 192, 576, "Q4_1", 60),
    ("ffn_gate/up", 1536, 576, "Q4_1", 60),
    ("ffn_down", 576, 1536, "Q4_1", 30),
    ("output", 49152, 576, "Q8_0", 1),
)
TS = (1, 8, 128)
# Llama-70B shapes (hidden 8192, FFN 28672): ffn_gate/up, ffn_down, and a Q4_K_M file's Q6_K ffn_down.
BIG_SHAPES = (("ffn_gate/up", 28672, 8192, "Q4_K"), ("ffn_down", 8192, 28672, "Q4_K"),
              ("ffn_down", 8192, 28672, "Q6_K"))


def timed(fn, min_time: float) -> float:
    """Seconds per call: calls are batched until a batch lasts min_time."""
    fn()
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return dt / n
        n = max(n * 2, int(n * min_time / max(dt, 1e-9)) + 1)


def bandwidth(threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    a = torch.ones(64 << 20)  # 256 MiB of fp32
    b = torch.empty_like(a)
    copy = min(timed(lambda: b.copy_(a), 0.2) for _ in range(3))
    read = min(timed(lambda: a.sum(), 0.2) for _ in range(3))
    return {"copy_GBps": 2 * a.numel() * 4 / copy / 1e9, "read_GBps": a.numel() * 4 / read / 1e9}


def bench_shape(kern, name, n, k, fmt, t, rounds, min_time, rng) -> dict:
    qtype = GGMLQuantizationType[fmt]
    raw = quantize(rng.standard_normal((n, k), dtype=np.float32), qtype)
    w = torch.from_numpy(raw.reshape(-1))
    w32 = torch.from_numpy(dequantize(raw, qtype).reshape(n, k))
    x = torch.randn(t, k)
    out = torch.empty(t, n)
    cases = {
        "kernel": lambda: kern.linear(x, w, fmt, n, k, out),
        "mm": lambda: torch.mm(x, w32.T, out=out),
        "dq+mm": lambda: torch.mm(x, torch.from_numpy(dequantize(raw, qtype).reshape(n, k)).T, out=out),
    }
    times: dict[str, list[float]] = {c: [] for c in cases}
    for _ in range(rounds):
        for c, fn in cases.items():
            times[c].append(timed(fn, min_time if c != "dq+mm" else min_time / 2))
    rec = {"name": name, "N": n, "K": k, "fmt": fmt, "T": t, "weight_bytes": raw.nbytes}
    for c, ts in times.items():
        s = statistics.median(ts)
        rec[c] = {"us": s * 1e6, "GBps": raw.nbytes / s / 1e9, "GFLOPs": 2 * t * n * k / s / 1e9}
    return rec


def decode_sweep(kern, threads: int, rounds: int, rng) -> dict[str, float]:
    """ms per token for all linear layers of the model, each matrix its own memory."""
    protos = {name: (n, k, fmt, quantize(rng.standard_normal((n, k), dtype=np.float32), GGMLQuantizationType[fmt]))
              for name, n, k, fmt, _ in SHAPES}
    calls = []
    for _ in range(30):
        for name, (n, k, fmt, raw) in protos.items():
            if name == "output":
                continue
            reps = 2 if name in ("attn_q/o", "attn_k/v", "ffn_gate/up") else 1
            calls += [(torch.from_numpy(raw.copy().reshape(-1)), fmt, n, k) for _ in range(reps)]
    n, k, fmt, raw = protos["output"]
    calls.append((torch.from_numpy(raw.reshape(-1)), fmt, n, k))
    xs = {k: torch.randn(1, k) for _, _, k, _, _ in SHAPES}
    outs = {n: torch.empty(1, n) for _, n, _, _, _ in SHAPES}
    total_bytes = sum(w.numel() for w, *_ in calls)

    def token():
        for w, fmt, n, k in calls:
            kern.linear(xs[k], w, fmt, n, k, outs[n])

    res = {}
    for th in sorted({1, threads}):
        kern.set_num_threads(th)
        token()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(5):
                token()
            times.append((time.perf_counter() - t0) / 5)
        res[f"ms_per_token_{th}t"] = statistics.median(times) * 1e3
    res["calls_per_token"] = len(calls)
    res["weight_MB_per_token"] = total_bytes / 1e6
    kern.set_num_threads(threads)
    return res


def coexistence(kern, rounds: int, rng) -> dict[str, float]:
    """Kernel call and multi-threaded torch ops, separately and interleaved (us per pair)."""
    raw = quantize(rng.standard_normal((1536, 576), dtype=np.float32), GGMLQuantizationType.Q4_1)
    w, x, out = torch.from_numpy(raw.reshape(-1)), torch.randn(1, 576), torch.empty(1, 1536)
    a, b, big = torch.randn(64, 576), torch.randn(576, 576), torch.randn(1 << 20)
    kernel = lambda: kern.linear(x, w, "Q4_1", 1536, 576, out)  # noqa: E731
    torch_ops = lambda: (torch.mm(a, b), torch.sigmoid(big))  # noqa: E731
    both = lambda: (kernel(), torch_ops())  # noqa: E731
    times = {name: statistics.median([timed(fn, 0.05) for _ in range(rounds)])
             for name, fn in (("kernel", kernel), ("torch", torch_ops), ("interleaved", both))}
    return {f"{k}_us": v * 1e6 for k, v in times.items()} | {
        "interleaved_over_sum": times["interleaved"] / (times["kernel"] + times["torch"])}


def big_layers(kern, rounds: int, rng) -> list[dict]:
    """Integer path vs exact=True on 70B-shaped matrices, alternated call by call."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_synthetic_model import random_kquant

    records = []
    for name, n, k, fmt in BIG_SHAPES:
        w = torch.from_numpy(random_kquant(rng, (n, k), fmt).reshape(-1))
        for t in (1, 64):
            x = torch.randn(t, k)
            samples: dict[str, list[tuple[float, float]]] = {"int16": [], "exact": []}
            for _ in range(rounds):
                for path in samples:
                    c0, t0 = time.process_time(), time.perf_counter()
                    kern.linear(x, w, fmt, n, k, exact=path == "exact")
                    samples[path].append((time.perf_counter() - t0, time.process_time() - c0))
            rec = {"name": name, "N": n, "K": k, "fmt": fmt, "T": t, "weight_bytes": w.numel()}
            for path, v in samples.items():
                wall, cpu = statistics.median(a for a, _ in v), statistics.median(b for _, b in v)
                rec[path] = {"GBps": w.numel() / wall / 1e9, "GBps_per_cpu_s": w.numel() / max(cpu, 1e-9) / 1e9,
                             "GMACps": t * n * k / wall / 1e9}
            records.append(rec)
    return records


def layout_token(kern, fmt: str, rounds: int, rng, blocks: int = 2) -> dict:
    """Plain vs interleaved rows of one decode token's matrices (see --layout), alternated per token."""
    from engine.cpu import INT8_FORMATS, ROW_GROUP
    from engine.formats.registry import FORMATS
    from engine.synthetic import random_quantized
    from engine.tiers.io import aligned_empty
    from engine.weights import interleave_rows

    d, ff, kv = 8192, 28672, 1024
    groups = (((d, d), (kv, d), (kv, d)), ((d, d),), ((ff, d), (ff, d)), ((d, ff),))  # q/k/v, o, gate/up, down
    protos = {nk: torch.from_numpy(random_quantized(rng, nk, FORMATS[fmt], lambda nb, nf: [rng.uniform(1e-3, 3e-3, nb)] * nf)
                                   .reshape(-1)) for g in groups for nk in g}  # (the speed does not depend on the values)

    def placed(w: torch.Tensor, nk, group: int) -> torch.Tensor:
        buf = aligned_empty(w.numel())  # as the resident store holds weights: 2 MiB pages
        buf.copy_(w)
        if group > 1:
            interleave_rows(buf, FORMATS[fmt], nk, group)
        return buf

    mats = {g: [(nks[0][1], [(placed(protos[nk], nk, g), fmt, nk[0], g) for nk in nks]) for _ in range(blocks)
                for nks in groups] for g in (1, ROW_GROUP)}  # per call: (K, linear_many's matrices)
    xs = {d: torch.randn(1, d), ff: torch.randn(1, ff)}
    nbytes = sum(w.numel() for _, grp in mats[1] for w, *_ in grp)
    big = torch.ones(512 << 20)  # 2 GiB read by torch.sum

    def token(g: int, act: str) -> list[torch.Tensor]:
        return [y for k, grp in mats[g] for y in kern.linear_many(xs[k], grp, k, activations=act)]

    rec = {"fmt": fmt, "weight_bytes": nbytes}
    for act in ("int16", "int8") if fmt in INT8_FORMATS else ("int16",):
        same = all(torch.equal(a, b) for a, b in zip(token(1, act), token(ROW_GROUP, act)))
        read: list[float] = []
        t = {"plain": [], "interleaved": []}
        for r in range(rounds):  # ABBA: neither layout always follows the other
            for name in ("plain", "interleaved") if r % 2 == 0 else ("interleaved", "plain"):
                t0 = time.perf_counter()
                token(1 if name == "plain" else ROW_GROUP, act)
                t[name].append(time.perf_counter() - t0)
        for _ in range(3):  # after the tokens: torch's threads spin a while after a parallel op
            t0 = time.perf_counter()
            big.sum()
            read.append(time.perf_counter() - t0)
        ratios = [a / b for a, b in zip(t["plain"], t["interleaved"])]
        rec[act] = {"plain_GBps": nbytes / statistics.median(t["plain"]) / 1e9,
                    "interleaved_GBps": nbytes / statistics.median(t["interleaved"]) / 1e9,
                    "ratio": statistics.median(ratios), "read_GBps": big.numel() * 4 / min(read) / 1e9,
                    "same_bits": same}
    return rec


def layout_model(n_layers: int, threads: int, activations: str, rounds: int) -> dict:
    """Decode tok/s of one model loaded with interleaved resident rows and with the file's rows, in turn."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_decode import big_layer_model

    import engine.cpu
    from engine import load

    path = big_layer_model(n_layers)
    ask = engine.cpu.row_interleave
    models = {}
    for name, policy in (("interleaved", ask), ("file's rows", lambda *a: 1)):
        engine.cpu.row_interleave = policy
        try:
            m = load(path, threads=threads, cpu_activations=activations)
        finally:
            engine.cpu.row_interleave = ask
        groups = {w.interleave for w in vars_of(m.weights.fixed[0])}
        ids = [600 + 7 * i % 3000 for i in range(32)]  # ordinary tokens of the synthetic vocab
        m.forward(torch.tensor([ids]), 0, last_only=True)
        models[name] = [m, len(ids), groups]
    tps: dict[str, list[float]] = {k: [] for k in models}
    for r in range(rounds):  # ABBA
        for name in list(models) if r % 2 == 0 else list(models)[::-1]:
            m, pos, _ = models[name]
            t0 = time.perf_counter()
            for _ in range(4):
                m.forward(torch.tensor([[5]]), pos, last_only=True)
                pos += 1
            tps[name].append(4 / (time.perf_counter() - t0))
            models[name][1] = pos
    ratios = [a / b for a, b in zip(tps["interleaved"], tps["file's rows"])]
    return {"model": path, "activations": activations, "threads": threads,
            "groups": {k: sorted(v[2]) for k, v in models.items()},
            "decode_tps": {k: statistics.median(v) for k, v in tps.items()}, "ratio": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)]}


def vars_of(layer) -> list:
    """A layer's quantized matrices."""
    from engine.weights import QWeight

    return [getattr(layer, f) for f in layer.__slots__ if isinstance(getattr(layer, f), QWeight)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds, shorter timings")
    ap.add_argument("--big", action="store_true", help="only the 70B-shaped integer-path vs exact comparison")
    ap.add_argument("--layout-model", type=int, metavar="N", help="only N 70B-shaped blocks decoded on both layouts")
    ap.add_argument("--activations", default="int8", choices=("int16", "int8"), help="for --layout-model")
    ap.add_argument("--layout", nargs="+", choices=("Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"), metavar="FMT",
                    help="only a 70B-shaped token on plain vs interleaved rows (Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS)")
    args = ap.parse_args(argv)

    kern = default_kernels()
    kern.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rounds, min_time = (3, 0.02) if args.quick else (5, 0.05)
    rng = np.random.default_rng(0)

    bw = bandwidth(args.threads)
    print(f"threads={args.threads} isa={kern.isa} torch={torch.__version__}  memory: copy "
          f"{bw['copy_GBps']:.1f} GB/s (read+write), sum {bw['read_GBps']:.1f} GB/s (read), 256 MiB; "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.layout_model:
        r = layout_model(args.layout_model, args.threads, args.activations, 6 if args.quick else 12)
        inter, plain = r["decode_tps"]["interleaved"], r["decode_tps"]["file's rows"]
        print(f"{r['model']}: {args.activations}, {args.threads} thread(s), rows per group {r['groups']}: decode "
              f"interleaved {inter:.2f} tok/s, file's rows {plain:.2f}; ratio (median of rounds) {r['ratio']:.3f} "
              f"({r['ratio_range'][0]:.3f}-{r['ratio_range'][1]:.3f})")
        if args.json:
            text = json.dumps(r, indent=2)
            print(text) if args.json == "-" else Path(args.json).write_text(text + "\n")
        return 0
    if args.layout:
        records = [layout_token(kern, fmt, 4 * rounds, rng) for fmt in args.layout]
        print(f"{'fmt':6s} {'activations':11s} | {'plain GB/s':>10s} {'/ read':>6s} | {'interleaved GB/s':>16s} "
              f"{'/ read':>6s} | {'ratio':>5s} {'read GB/s':>9s} bits")
        for r in records:
            for act in ("int16", "int8"):
                if act in r:
                    a = r[act]
                    print(f"{r['fmt']:6s} {act:11s} | {a['plain_GBps']:10.1f} {a['plain_GBps'] / a['read_GBps']:6.2f} | "
                          f"{a['interleaved_GBps']:16.1f} {a['interleaved_GBps'] / a['read_GBps']:6.2f} | "
                          f"{a['ratio']:5.2f} {a['read_GBps']:9.1f} "
                          f"{'same' if a['same_bits'] else 'DIFFER'}")
        if args.json:
            text = json.dumps({"threads": args.threads, "isa": kern.isa, "layout": records}, indent=2)
            print(text) if args.json == "-" else Path(args.json).write_text(text + "\n")
        return 0
    if args.big:
        records = big_layers(kern, rounds, rng)
        print(f"{'matrix':12s} {'N x K':>12s} {'fmt':5s} {'T':>3s} | {'int16 GB/s':>10s} {'/cpu s':>7s} "
              f"{'GMAC/s':>7s} | {'exact GB/s':>10s} {'/cpu s':>7s} {'GMAC/s':>7s} | {'int16/exact':>11s}")
        for r in records:
            a, b = r["int16"], r["exact"]
            print(f"{r['name']:12s} {str(r['N']) + 'x' + str(r['K']):>12s} {r['fmt']:5s} {r['T']:3d} | {a['GBps']:10.1f} "
                  f"{a['GBps_per_cpu_s']:7.1f} {a['GMACps']:7.1f} | {b['GBps']:10.1f} {b['GBps_per_cpu_s']:7.1f} "
                  f"{b['GMACps']:7.1f} | {a['GBps'] / b['GBps']:11.2f}")
        if args.json:
            text = json.dumps({"threads": args.threads, "isa": kern.isa, "bandwidth": bw, "big": records}, indent=2)
            print(text) if args.json == "-" else Path(args.json).write_text(text + "\n")
        return 0
    hdr = (f"{'matrix':12s} {'N x K':>12s} {'fmt':5s} {'T':>4s} | {'kernel us':>10s} {'GB/s':>6s} {'GFLOP/s':>8s}"
           f" | {'mm us':>9s} {'GFLOP/s':>8s} | {'dq+mm us':>9s} | {'mm/kern':>7s} {'dq+mm/kern':>10s}")
    print(hdr)
    print("-" * len(hdr))
    records = []
    for name, n, k, fmt, _ in SHAPES:
        for t in TS:
            r = bench_shape(kern, name, n, k, fmt, t, rounds, min_time, rng)
            records.append(r)
            kr, mm, dq = r["kernel"], r["mm"], r["dq+mm"]
            print(f"{name:12s} {f'{n}x{k}':>12s} {fmt:5s} {t:4d} | {kr['us']:10.1f} {kr['GBps']:6.1f} "
                  f"{kr['GFLOPs']:8.1f} | {mm['us']:9.1f} {mm['GFLOPs']:8.1f} | {dq['us']:9.0f} | "
                  f"{mm['us'] / kr['us']:7.2f} {dq['us'] / kr['us']:10.1f}", flush=True)

    per_token = {c: sum(r[c]["us"] * cnt for r in records if r["T"] == 1
                        for name, _, _, _, cnt in SHAPES if name == r["name"]) for c in ("kernel", "mm", "dq+mm")}
    weight_bytes = sum(r["weight_bytes"] * cnt for r in records if r["T"] == 1
                       for name, _, _, _, cnt in SHAPES if name == r["name"])
    print(f"\nSmolLM2-135M decode, linear layers only, from the T=1 rows above (hot caches; 210 block matrices + head, "
          f"{weight_bytes / 1e6:.0f} MB/token): kernel {per_token['kernel'] / 1e3:.2f} ms/token "
          f"= {1e6 / per_token['kernel']:.0f} tok/s ({weight_bytes / per_token['kernel'] / 1e3:.1f} GB/s); "
          f"torch mm on fp32 weights {per_token['mm'] / 1e3:.2f} ms/token")
    sweep = decode_sweep(kern, args.threads, rounds, rng)
    print(f"decode sweep ({sweep['calls_per_token']} calls, {sweep['weight_MB_per_token']:.0f} MB of distinct weights "
          f"per token): " + ", ".join(f"{sweep[f'ms_per_token_{th}t']:.2f} ms/token = "
                                      f"{1e3 / sweep[f'ms_per_token_{th}t']:.0f} tok/s at {th} thread(s)"
                                      for th in sorted({1, args.threads})))
    co = coexistence(kern, rounds, rng)
    print(f"with torch ops ({args.threads} torch threads): kernel {co['kernel_us']:.1f} us, torch ops "
          f"{co['torch_us']:.1f} us, interleaved {co['interleaved_us']:.1f} us "
          f"= {co['interleaved_over_sum']:.2f} x the sum")
    if args.json:
        doc = {"threads": args.threads, "isa": kern.isa, "bandwidth": bw, "results": records,
               "decode_linear_ms_per_token_hot": {c: v / 1e3 for c, v in per_token.items()},
               "decode_sweep": sweep, "coexistence": co}
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
