"""MoE benchmark: experts as placement units vs whole-layer streaming, on a Qwen3-30B-A3B-shaped model.

    python scripts/bench_moe.py [--layers 8] [--budgets 50,25,10] [--tokens 24] [--warmup 8]
                                [--baseline-tokens 3] [--zipf 0.8] [--json]

The model: scripts/make_synthetic_model.py --qwen3-moe (dim 2048, 32 query / 4 KV heads of 128, 128
experts of FFN 768, top-8, every matrix Q4_K, output head Q6_K) cut to --layers layers (48 in the real
model) and a 32768-token vocabulary (151936 in the real one: its head alone would not fit the 10% budget
of a few layers), written once under ~/.cache/engine/bench/. Its router is synthetic: Zipf-like
popularity with exponent --zipf (capped at 0.45 per expert, see make_synthetic_model); the benchmark
measures the selection frequencies it actually gets on the token stream and prints them.

Token stream: a fixed random sequence of token ids fed one per decode step (teacher-forced; greedy decoding
of random weights repeats a few tokens, which would flatter any cache). Per run: a 16-token prompt,
--warmup steps, then --tokens timed steps.
Rows, all in this one invocation (the disk drifts 1.0-2.2 GB/s minute to minute here, and the machine
is shared: the load average is printed):
  * 100%: everything resident: the compute time of a step (the bound's compute term).
  * per budget, expert-level (the planner's plan for resident_budget N%, io_backend odirect): tok/s,
    MiB read per token (what the reader read for experts, O_DIRECT alignment included), the routed
    experts' bytes per token that were not resident (what a cache-less engine must read), their ratio
    (goal <= 1.2), the expert cache's hit rate and the share of lookups a next-layer prefetch served, the disk's GB/s measured right after the timed steps by
    re-reading exactly the expert reads of those steps with the same reader, the bound
    max(compute, MiB read / that GB/s) and token time / bound (goal <= 1.2).
  * per budget again with a router profile gathered on --profile-tokens other random tokens (what
    engine.calibrate --moe-profile stores; the planner then keeps the measured hottest experts resident).
  * per budget, the same engine streaming whole layers: as many whole layers resident as the budget's
    bytes hold after the head and embedding (its ring of two layer buffers is not counted), the rest read
    from disk every token: tok/s and MiB read per token.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PROMPT = 16
CACHE_ENV = "ENGINE_CACHE_DIR"  # engine.tiers.hardware.CACHE_ENV


def model_path(layers: int, zipf: float) -> Path:
    from engine.tiers.hardware import cache_dir

    return cache_dir() / "bench" / f"qwen3moe-synthetic-{layers}L-zipf{zipf:g}.gguf"


def ensure_model(path: Path, layers: int, zipf: float) -> None:
    from make_synthetic_model import SyntheticConfig, write_synthetic_model

    if path.is_file():
        return
    cfg = SyntheticConfig.qwen3_moe(n_layers=layers, zipf=zipf)
    print(f"writing {path} ({cfg.file_bytes() / 2**30:.2f} GiB) ...", file=sys.stderr, flush=True)
    write_synthetic_model(path, cfg)


def config(budget: int) -> dict:
    return {"device": "cpu", "resident_budget": f"{budget}%", "slow_tier": "disk", "io_backend": "odirect",
            "kv_cache": {"placement": "resident", "max_context": 256}}


class Recorder:
    """Wraps a model's reader and provider: the reads it submits and the experts each pass routes."""

    def __init__(self, m):
        self.m, self.reads, self.routed = m, [], []
        submit, experts = m.reader.submit, m.weights.experts

        def rec_submit(plan, buf, label):
            self.reads.append((label, plan))
            return submit(plan, buf, label)

        def rec_experts(i, ids, rows=None):
            self.routed.append((i, tuple(ids)))
            return experts(i, ids, rows)

        m.reader.submit = rec_submit
        m.weights.experts = rec_experts

    def clear(self):
        self.reads.clear()
        self.routed.clear()

    def read_bytes(self, prefix: str = "") -> int:
        return sum(n for label, plan in self.reads if label.startswith(prefix) for _, n, _, _ in plan.spans)


def run_tokens(m, seq, tokens) -> float:
    t0 = time.perf_counter()
    for t in tokens:
        m.step([(seq, [t])], last_only=True)
    return time.perf_counter() - t0


def expert_bytes_of(m) -> dict:
    from engine.weights import EXPERT_ROLES, expert_slice, layer_layout

    out = {}
    for i in range(m.spec.n_layers):
        st = {r: t for r, t in layer_layout(m.file, m.spec, i).tensors if r in EXPERT_ROLES}
        out[i] = sum(expert_slice(st[r], 0).nbytes for r in EXPERT_ROLES)
    return out


def disk_speed(m, reads) -> float:
    """Re-read exactly these expert ReadPlans with the model's reader into its expert cache's buffers (the
    cache is cleared afterwards), as many in flight as it has slots (at most 8): bytes / second."""
    store = m.weights.expert_store
    store.clear()
    bufs = [b for b in store.host_slots if b is not None][:8]
    plans = [p for label, p in reads if ".expert." in label]
    if not plans or not bufs:
        return float("nan")
    total, t0 = 0, time.perf_counter()
    for j in range(0, len(plans), len(bufs)):
        tickets = [m.reader.submit(p, bufs[n], "disk speed") for n, p in enumerate(plans[j:j + len(bufs)])]
        for t in tickets:
            t.wait()
        total += sum(n for p in plans[j:j + len(bufs)] for _, n, _, _ in p.spans)
    return total / (time.perf_counter() - t0)


def resident_row(path, stream, warmup) -> dict:
    from engine.model import Model

    with Model.load(path, config=config(100), n_ctx=256) as m:
        rec = Recorder(m)
        with m.open_sequence() as seq:
            m.step([(seq, stream[:PROMPT])], last_only=True)
            run_tokens(m, seq, stream[PROMPT:PROMPT + warmup])
            rec.clear()
            timed = stream[PROMPT + warmup:]
            dt = run_tokens(m, seq, timed)
        counts = {}
        for i, ids in rec.routed:
            for e in ids:
                counts[(i, e)] = counts.get((i, e), 0) + 1
        n = len(timed)
        freq = sorted((c / n for c in counts.values()), reverse=True)
        per_layer = sorted(((c / n) for (i, e), c in counts.items() if i == 0), reverse=True)
        return {"token_s": dt / n, "tok_s": n / dt, "plan": m.plan_summary(),
                "layer0_top": [round(x, 3) for x in per_layer[:8]],
                "top16_share": sum(sorted((c for (i, e), c in counts.items() if i == 0), reverse=True)[:16])
                / max(1, sum(c for (i, e), c in counts.items() if i == 0)),
                "experts_used_layer0": len(per_layer), "n_freq": len(freq)}


def expert_row(path, budget, stream, warmup, compute_s) -> dict:
    from engine.model import Model

    with Model.load(path, config=config(budget), n_ctx=256) as m:
        plan, store = m.plan, m.weights.expert_store
        ebytes = expert_bytes_of(m)
        tiers = {(x.layer, e): t for x in plan.experts for e, t in enumerate(x.tiers)}
        rec = Recorder(m)
        with m.open_sequence() as seq:
            m.step([(seq, stream[:PROMPT])], last_only=True)
            run_tokens(m, seq, stream[PROMPT:PROMPT + warmup])
            rec.clear()
            s0 = store.stats.snapshot()
            timed = stream[PROMPT + warmup:]
            dt = run_tokens(m, seq, timed)
            m.weights.drain()
            ex = store.stats.since(s0)
        n = len(timed)
        routed = sum(ebytes[i] for i, ids in rec.routed for e in ids if tiers[(i, e)] != "resident") / n
        read = rec.read_bytes("blk.") / n
        reads = list(rec.reads)
        bw = disk_speed(m, reads)
        bound = max(compute_s, read / bw)
        return {"budget": budget, "tok_s": n / dt, "token_s": dt / n, "read_mib": read / 2**20,
                "routed_mib": routed / 2**20, "read_over_routed": read / routed if routed else 0.0,
                "hit_rate": ex.hit_rate, "hint_mib": ex.hint_bytes / n / 2**20,
                "prefetched_share": ex.hinted_used / max(1, ex.hits + ex.misses), "disk_gbs": bw / 1e9,
                "compute_s": compute_s, "bound_s": bound, "token_over_bound": (dt / n) / bound,
                "predicted_tok_s": plan.predicted.tokens_per_s, "cache_slots": store.n_slots,
                "resident_experts": sum(1 for t in tiers.values() if t == "resident"), "experts": len(tiers),
                "plan": m.plan_summary()}


def use_router_profile(path: Path, tokens: int, tmp: str) -> None:
    """Gather router statistics on `tokens` random tokens (seed 1: not the timed stream) with the model all
    resident, and save them where the planner looks for this model's profile, under a temporary cache dir."""
    from engine.model import Model
    from engine.tiers.router_stats import gather, profile_path, save_router_profile

    rng = random.Random(1)
    with Model.load(path, config=config(100), n_ctx=256) as m:
        prof = gather(m, [[rng.randrange(600, 32000) for _ in range(min(tokens, 250))]])
    os.environ[CACHE_ENV] = tmp
    save_router_profile(prof, profile_path(path))


def baseline_row(path, budget, stream, tokens) -> dict:
    """The same engine moving whole layers: as many whole layers resident as the budget's bytes hold."""
    from engine.gguf_file import GGUFFile
    from engine.model import Model
    from engine.spec import ModelSpec
    from engine.tiers.footprint import footprint_from_gguf
    from engine.tiers.runtime import Placement, head_info
    from engine.weights import layer_layout

    f = GGUFFile(path)
    spec = ModelSpec.from_gguf(f)
    fp = footprint_from_gguf(f, spec)
    lays = [layer_layout(f, spec, i) for i in range(spec.n_layers)]
    left = budget / 100 * fp.weight_bytes - (fp.weight_bytes - fp.layer_bytes)
    n_res = max(0, min(spec.n_layers, int(left // max(l.nbytes for l in fp.layers))))
    streamed = [frozenset() if i < n_res else frozenset(t.name for _, t in lay.tensors) for i, lay in enumerate(lays)]
    head = head_info(f, spec)
    f.close()
    place = Placement(tuple(streamed) + (frozenset(),), ((0, head.shape[0]),), "resident", 2,
                      sources=tuple("disk" if s else "" for s in streamed) + ("",))
    with Model.load(path, config=config(100), placement=place, n_ctx=256) as m:
        rec = Recorder(m)
        with m.open_sequence() as seq:
            m.step([(seq, stream[:PROMPT])], last_only=True)
            run_tokens(m, seq, stream[PROMPT:PROMPT + 2])
            m.weights.drain()
            rec.clear()
            timed = stream[PROMPT + 2:PROMPT + 2 + tokens]
            dt = run_tokens(m, seq, timed)
            m.weights.drain()
        return {"budget": budget, "resident_layers": n_res, "tok_s": tokens / dt,
                "read_mib": rec.read_bytes("blk.") / tokens / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--budgets", default="50,25,10")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--baseline-tokens", type=int, default=3)
    p.add_argument("--zipf", type=float, default=0.8)
    p.add_argument("--profile-tokens", type=int, default=64,
                   help="also run every budget with a router profile gathered on this many other random tokens "
                        "(engine.tiers.router_stats.gather, as engine.calibrate --moe-profile does); 0: skip")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    budgets = [int(b) for b in a.budgets.split(",")]
    path = model_path(a.layers, a.zipf)
    ensure_model(path, a.layers, a.zipf)
    rng = random.Random(0)
    stream = [rng.randrange(600, 32000) for _ in range(PROMPT + a.warmup + a.tokens)]
    load0 = os.getloadavg()
    res = resident_row(path, stream, a.warmup)
    rows = []
    for b in budgets:
        ex = expert_row(path, b, stream, a.warmup, res["token_s"])
        base = baseline_row(path, b, stream, a.baseline_tokens)
        rows.append({"experts": ex, "whole_layers": base})
        print(f"budget {b}% done: {ex['tok_s']:.2f} vs {base['tok_s']:.2f} tok/s", file=sys.stderr, flush=True)
    if a.profile_tokens:
        with tempfile.TemporaryDirectory() as tmp:
            use_router_profile(path, a.profile_tokens, tmp)
            for r, b in zip(rows, budgets):
                r["experts_profiled"] = expert_row(path, b, stream, a.warmup, res["token_s"])
            os.environ.pop(CACHE_ENV)
    load1 = os.getloadavg()
    out = {"model": str(path), "layers": a.layers, "zipf": a.zipf, "tokens": a.tokens, "warmup": a.warmup,
           "resident": res, "rows": rows, "loadavg_start": load0, "loadavg_end": load1}
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"model: {path.name} ({a.layers} layers, 128 experts top-8, router Zipf {a.zipf:g} capped 0.45); "
          f"{a.tokens} timed decode steps after {a.warmup} warm-up, random token stream")
    print(f"routing measured (layer 0, timed steps): top-8 expert shares {res['layer0_top']}, top-16 experts "
          f"{100 * res['top16_share']:.0f}% of selections, {res['experts_used_layer0']} of 128 used")
    print(f"100% resident: {res['tok_s']:.2f} tok/s = compute {1e3 * res['token_s']:.0f} ms/token")
    print("| budget | router statistics | experts resident | cache slots | tok/s | MiB read/token | routed non-resident MiB/token "
          "| read/routed | cache hit (prefetched) | disk GB/s | bound ms | token ms | token/bound | predicted tok/s "
          "| whole-layer tok/s | whole-layer MiB/token |")
    print("|---" * 16 + "|")
    for r in rows:
        w = r["whole_layers"]
        for router, key in (("uniform", "experts"), (f"profile ({a.profile_tokens} tokens)", "experts_profiled")):
            e = r.get(key)
            if e is None:
                continue
            print(f"| {e['budget']}% | {router} | {e['resident_experts']}/{e['experts']} | {e['cache_slots']} "
                  f"| {e['tok_s']:.2f} | {e['read_mib']:.1f} | {e['routed_mib']:.1f} | {e['read_over_routed']:.2f} "
                  f"| {100 * e['hit_rate']:.0f}% ({100 * e['prefetched_share']:.0f}%) | {e['disk_gbs']:.2f} "
                  f"| {1e3 * e['bound_s']:.0f} | {1e3 * e['token_s']:.0f} | {e['token_over_bound']:.2f} "
                  f"| {e['predicted_tok_s']:.2f} | {w['tok_s']:.2f} ({w['resident_layers']} layers resident) "
                  f"| {w['read_mib']:.0f} |")
    print(f"load average (1/5/15 min): start {'/'.join(f'{x:.1f}' for x in load0)}, end "
          f"{'/'.join(f'{x:.1f}' for x in load1)} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
