"""Decode and prompt speed of this engine vs llama.cpp on the same GGUF, measured side by side.

Each run is a fresh subprocess (so load time and peak RSS are per run); engine and llama.cpp runs
alternate, and the medians are reported with their ratio. Both decode a fixed number of greedy
tokens (end-of-generation ignored) after the same prompt, with the same thread count.

    python scripts/bench_decode.py [--model PATH] [--threads 2] [--tokens 128] [--runs 3] [--json]
llama.cpp comes from llama-cpp-python if installed (it is not a dependency of the engine).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

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


def worker_engine(model: str, threads: int, n: int) -> dict:
    t0 = time.perf_counter()
    import torch

    import engine

    m = engine.load(model, threads=threads)
    load_s = time.perf_counter() - t0
    ids = m.tokenize(PROMPT)
    t1 = time.perf_counter()
    logits = m.forward(torch.tensor([ids]), 0, last_only=True)[0, -1]
    t2 = time.perf_counter()
    pos = len(ids)
    for _ in range(n):
        tok = int(torch.argmax(logits))
        logits = m.forward(torch.tensor([[tok]]), pos, last_only=True)[0, -1]
        pos += 1
    t3 = time.perf_counter()
    return {"load_s": load_s, "prompt_tokens": len(ids), "prompt_tps": len(ids) / (t2 - t1),
            "decode_tps": n / (t3 - t2), "peak_rss_mb": peak_rss_mb()}


def worker_llamacpp(model: str, threads: int, n: int) -> dict:
    t0 = time.perf_counter()
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model, n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
                          verbose=False)
    load_s = time.perf_counter() - t0
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    t1 = time.perf_counter()
    llm.eval(ids)
    t2 = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    t3 = time.perf_counter()
    return {"load_s": load_s, "prompt_tokens": len(ids), "prompt_tps": len(ids) / (t2 - t1),
            "decode_tps": n / (t3 - t2), "peak_rss_mb": peak_rss_mb()}


WORKERS = {"engine": worker_engine, "llama.cpp": worker_llamacpp}


def measure(which: str, model: str, threads: int, n: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", which, "--model", model, "--threads", str(threads),
                        "--tokens", str(n)], capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise SystemExit(f"{which} worker failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.model is None:
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
        from engine.defaults import default_model_path

        a.model = str(default_model_path())
    if a.worker:
        print(json.dumps(WORKERS[a.worker](a.model, a.threads, a.tokens)))
        return
    try:
        import llama_cpp  # noqa: F401

        names = ["engine", "llama.cpp"]
    except ImportError:
        print("llama-cpp-python is not installed: measuring the engine alone", file=sys.stderr)
        names = ["engine"]
    runs: dict[str, list[dict]] = {k: [] for k in names}
    for _ in range(a.runs):
        for k in names:
            runs[k].append(measure(k, a.model, a.threads, a.tokens))
    med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in runs.items()}
    out = {"model": a.model, "threads": a.threads, "decode_tokens": a.tokens, "runs": a.runs, "median": med}
    if "llama.cpp" in med:
        out["ratio_engine_over_llamacpp"] = {f: med["engine"][f] / med["llama.cpp"][f] for f in
                                             ("decode_tps", "prompt_tps")}
    if a.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{'':12} {'load s':>8} {'prompt tok/s':>13} {'decode tok/s':>13} {'peak RSS MB':>12}")
    for k, m in med.items():
        print(f"{k:12} {m['load_s']:8.2f} {m['prompt_tps']:13.1f} {m['decode_tps']:13.1f} {m['peak_rss_mb']:12.0f}")
    if "ratio_engine_over_llamacpp" in out:
        r = out["ratio_engine_over_llamacpp"]
        print(f"engine / llama.cpp: decode {r['decode_tps']:.2f}x, prompt {r['prompt_tps']:.2f}x "
              f"(medians of {a.runs}, {a.threads} threads, {a.tokens} decode tokens, prompt {m['prompt_tokens']} tokens)")


if __name__ == "__main__":
    main()
