"""Decode and prompt speed of this engine vs llama.cpp on the same GGUF, measured side by side.

Each run is a fresh subprocess (so load time and peak RSS are per run); engine and llama.cpp runs
alternate, and the medians are reported with their ratio. Both decode a fixed number of greedy
tokens (end-of-generation ignored) after the same prompt, with the same thread count.

    python scripts/bench_decode.py [--model PATH] [--threads 2 [1 ...]] [--isa native [avx2]]
                                   [--cpu-activations int16 [int8]] [--python-block] [--baseline DIR]
                                   [--tokens 128] [--runs 3] [--json]
    python scripts/bench_decode.py --big-layers 4 --threads 1 2 --isa native avx2 --tokens 16

--big-layers N writes (once, cached under $ENGINE_CACHE_DIR/bench) a synthetic GGUF of N blocks shaped
like Llama-70B's (hidden 8192, FFN 28672, 64/8 heads of 128, Q4_K blocks, vocab 4096 with a Q6_K head)
with the project's writer (scripts/make_synthetic_model.py); both engines then get the same prompt of
token ids. Every round also measures the machine's read bandwidth (a torch sum over 1 GiB with the same
thread count) in its own process, so the weights' GB/s per decoded token can be set against it.
--isa runs the engine once per kernel flavour (ENGINE_CPU_ISA: native = AVX-512 here, avx2 = the
portable path as an AVX2 CPU builds it); --cpu-activations int16 int8 also runs each flavour with the
kernels' opt-in 8-bit activations (rows 'engine/ISA/int8'); llama.cpp runs as installed. --python-block
adds a run of the engine with the CPU's native decode step off (every block through the Python
definition), to see what that step is worth in the same run.
llama.cpp comes from llama-cpp-python if installed (it is not a dependency of the engine).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nI am planning a three-day trip to Lisbon in late spring with two friends who love food, "
    "old neighbourhoods and the sea. We do not want to rent a car. Could you suggest a simple plan for each day, "
    "with one place to eat, and tell us how to get around the city cheaply?<|im_end|>\n<|im_start|>assistant\n"
)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def weight_bytes(model: str) -> int:
    """Bytes of the weights one decoded token reads: every tensor but the embedding table (unless the
    output head is tied to it)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(model).tensors}
    tied = "output.weight" not in tensors
    return sum(n for name, n in tensors.items() if tied or name != "token_embd.weight")


def worker_read(model: str, threads: int, n: int, prompt_ids) -> dict:
    """The machine's read bandwidth with `threads` threads: best of 5 sums over 1 GiB."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(1 << 28)
    a.sum()
    best = min(_timed(a.sum) for _ in range(5))
    return {"read_GBps": a.numel() * 4 / best / 1e9}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def worker_engine(model: str, threads: int, n: int, prompt_ids) -> dict:
    t0 = time.perf_counter()
    import torch

    import engine

    m = engine.load(model, threads=threads, cpu_activations=os.environ.get("BENCH_CPU_ACTIVATIONS", "int16"))
    if os.environ.get("BENCH_PYTHON_BLOCK") == "1":
        m.weights.device_for(0, 1).native_step = False
    load_s = time.perf_counter() - t0
    ids = prompt_ids or m.tokenize(PROMPT)
    t1, c1 = time.perf_counter(), time.process_time()
    logits = m.forward(torch.tensor([ids]), 0, last_only=True)[0, -1]
    t2, c2 = time.perf_counter(), time.process_time()
    pos = len(ids)
    for _ in range(n):
        tok = int(torch.argmax(logits))
        logits = m.forward(torch.tensor([[tok]]), pos, last_only=True)[0, -1]
        pos += 1
    t3, c3 = time.perf_counter(), time.process_time()
    return _result(load_s, len(ids), n, (t1, c1), (t2, c2), (t3, c3))


def _result(load_s: float, prompt_tokens: int, n: int, t1, t2, t3) -> dict:
    """Rates from (wall, CPU) clock pairs taken before the prompt, after it and after n decoded tokens.
    CPU ms per token (all the process's threads) is robust to other processes taking the cores."""
    return {"load_s": load_s, "prompt_tokens": prompt_tokens, "prompt_tps": prompt_tokens / (t2[0] - t1[0]),
            "decode_tps": n / (t3[0] - t2[0]), "decode_cpu_ms": (t3[1] - t2[1]) / n * 1e3,
            "peak_rss_mb": peak_rss_mb()}


def worker_llamacpp(model: str, threads: int, n: int, prompt_ids) -> dict:
    t0 = time.perf_counter()
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model, n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
                          verbose=False)
    load_s = time.perf_counter() - t0
    ids = prompt_ids or llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    t1, c1 = time.perf_counter(), time.process_time()
    llm.eval(ids)
    t2, c2 = time.perf_counter(), time.process_time()
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    t3, c3 = time.perf_counter(), time.process_time()
    return _result(load_s, len(ids), n, (t1, c1), (t2, c2), (t3, c3))


WORKERS = {"engine": worker_engine, "llama.cpp": worker_llamacpp, "read": worker_read}


def measure(which: str, model: str, threads: int, n: int, prompt_ids, isa: str = "native",
            engine_path: str | None = None, python_block: bool = False, activations: str = "int16") -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--model", model, "--threads", str(threads),
           "--tokens", str(n)]
    if prompt_ids:
        cmd += ["--prompt-ids", ",".join(map(str, prompt_ids))]
    env = {**os.environ, "ENGINE_CPU_ISA": isa, "BENCH_PYTHON_BLOCK": "1" if python_block else "0",
           "BENCH_CPU_ACTIVATIONS": activations}
    if engine_path:  # another checkout of the engine (--baseline)
        env["PYTHONPATH"] = engine_path
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if r.returncode:
        raise SystemExit(f"{which} worker failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def big_layer_model(n_layers: int) -> str:
    """The cached synthetic GGUF of n_layers Llama-70B-shaped Q4_K blocks (written on first use)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_synthetic_model import SyntheticConfig, write_synthetic_model

    cfg = SyntheticConfig(n_layers=n_layers, dim=8192, ffn=28672, n_heads=64, n_kv_heads=8, vocab=4096, ctx=1024)
    cache = Path(os.environ.get("ENGINE_CACHE_DIR") or Path.home() / ".cache" / "engine") / "bench"
    path = cache / f"llama70b-shaped-{n_layers}.gguf"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} ...", file=sys.stderr)
        write_synthetic_model(path, cfg)
    return str(path)


def main() -> None:
    from engine.tiers.config import CPU_ACTIVATIONS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--big-layers", type=int, metavar="N", help="synthetic model of N Llama-70B-shaped blocks")
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--isa", nargs="+", default=["native"], choices=["native", "avx2"])
    ap.add_argument("--cpu-activations", nargs="+", default=["int16"], choices=CPU_ACTIVATIONS,
                    help="run the engine once per activation rounding of its CPU kernels (int8: 'engine/ISA/int8')")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64, help="prompt length of the --big-layers model")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", metavar="DIR", help="also time the engine of another checkout (e.g. a git worktree "
                                                      "of an older commit), as 'baseline'")
    ap.add_argument("--python-block", action="store_true", help="also time the engine with its native decode step "
                                                                 "off, as 'engine/python-block'")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        ids = [int(i) for i in a.prompt_ids.split(",")] if a.prompt_ids else None
        print(json.dumps(WORKERS[a.worker](a.model, a.threads[0], a.tokens, ids)))
        return
    prompt_ids = None
    if a.big_layers:
        a.model = big_layer_model(a.big_layers)
        prompt_ids = [600 + 7 * i % 3000 for i in range(a.prompt_tokens)]  # ordinary tokens of the synthetic vocab
    elif a.model is None:
        sys.path.insert(0, str(ROOT))
        from engine.defaults import default_model_path

        a.model = str(default_model_path())
    names = [f"engine/{isa}" + ("" if act == "int16" else f"/{act}") for isa in a.isa for act in a.cpu_activations] \
        + (["engine/python-block"] if a.python_block else []) + (["baseline"] if a.baseline else [])
    try:
        import llama_cpp

        names.append("llama.cpp")
        llama_version = llama_cpp.__version__
    except ImportError:
        print("llama-cpp-python is not installed: measuring the engine alone", file=sys.stderr)
        llama_version = None
    if a.big_layers:
        names.append("read")
    wbytes = weight_bytes(a.model)
    load = os.getloadavg()[0]
    out = {"model": a.model, "baseline": a.baseline, "weight_bytes_per_token": wbytes, "decode_tokens": a.tokens, "runs": a.runs,
           "llama_cpp": llama_version, "load_avg_1min_before": load, "threads": {}}
    for threads in a.threads:
        runs: dict[str, list[dict]] = {k: [] for k in names}
        for _ in range(a.runs):  # alternate: one run of each, in fresh processes, per round
            for k in names:
                which, _, isa = k.partition("/")
                isa, _, act = isa.partition("/")
                if which == "baseline":
                    runs[k].append(measure("engine", a.model, threads, a.tokens, prompt_ids, engine_path=a.baseline))
                elif isa == "python-block":
                    runs[k].append(measure("engine", a.model, threads, a.tokens, prompt_ids, python_block=True))
                else:
                    runs[k].append(measure(which, a.model, threads, a.tokens, prompt_ids, isa or "native",
                                           activations=act or "int16"))
        med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in runs.items()}
        for m in med.values():
            if "decode_tps" in m:
                m["decode_GBps"] = m["decode_tps"] * wbytes / 1e9
        res = {"median": med}
        if "llama.cpp" in med:
            res["ratio_over_llamacpp"] = {k: {f: med[k][f] / med["llama.cpp"][f] for f in ("decode_tps", "prompt_tps")}
                                          | {"decode_cpu": med["llama.cpp"]["decode_cpu_ms"] / med[k]["decode_cpu_ms"]}
                                          for k in med if k != "llama.cpp" and k != "read"}
        if "read" in med:
            res["decode_GBps_over_read"] = {k: med[k]["decode_GBps"] / med["read"]["read_GBps"]
                                            for k in med if "decode_GBps" in med[k]}
        out["threads"][threads] = res
    out["load_avg_1min_after"] = os.getloadavg()[0]
    if a.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{a.model}: {wbytes / 2**20:.0f} MiB of weights per token; llama-cpp-python {llama_version}; "
          f"load average {out['load_avg_1min_before']:.1f} before, {out['load_avg_1min_after']:.1f} after")
    for threads, res in out["threads"].items():
        print(f"-- {threads} thread(s), medians of {a.runs} alternated fresh processes")
        print(f"{'':20} {'load s':>7} {'prompt tok/s':>13} {'decode tok/s':>13} {'decode GB/s':>12} "
              f"{'CPU ms/tok':>11} {'peak RSS MB':>12} {'x llama.cpp':>16} {'CPU x':>6} {'/ read':>7}")
        for k, m in res["median"].items():
            if k == "read":
                print(f"{'read (torch sum)':20} {'':7} {'':13} {'':13} {m['read_GBps']:12.1f}")
                continue
            r = res.get("ratio_over_llamacpp", {}).get(k)
            ratio = f"{r['decode_tps']:.2f} / {r['prompt_tps']:.2f}" if r else ""
            frac = res.get("decode_GBps_over_read", {}).get(k)
            cpu = f"{r['decode_cpu']:.2f}" if r else ""
            print(f"{k:20} {m['load_s']:7.2f} {m['prompt_tps']:13.1f} {m['decode_tps']:13.1f} {m['decode_GBps']:12.1f} "
                  f"{m['decode_cpu_ms']:11.1f} {m['peak_rss_mb']:12.0f} {ratio:>16} {cpu:>6} "
                  f"{'' if frac is None else f'{frac:.2f}':>7}")
    print("(x llama.cpp: decode / prompt ratio of medians; CPU x: llama.cpp's CPU time per decoded token over this "
          "one's, robust to other processes taking the cores, meaningful at 1 thread)")


if __name__ == "__main__":
    main()
