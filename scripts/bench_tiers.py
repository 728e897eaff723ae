"""Tier benchmark: decode speed, achieved streaming bandwidth and peak RSS at weight budgets 100/50/33/10%.

    python scripts/bench_tiers.py [--synthetic PATH] [--budgets 100,50,33,10] [--tokens 64]
                                  [--synthetic-tokens 12] [--rounds 4] [--hardware JSON] [--quick]
                                  [--json] [--no-drop-caches]

Models: the default SmolLM2, and a synthetic Llama-3-8B-shaped Q4_K model (skipped when the file is
absent; make it with `python scripts/make_synthetic_model.py PATH`). Per model, each step in a fresh
subprocess, the page cache dropped before each when permitted (root and /proc/sys/vm/drop_caches):
  * disk: the whole file read with O_DIRECT through engine.tiers.io.FileReader (reference only);
  * baseline: torch and the engine imported, the model's header, spec and tokenizer parsed, the compute
    device made and one forward pass run on a ~1 MiB model -- everything of a run but the model's
    weights, staging, KV cache and activations (peak RSS);
  * one run per budget: engine.load with {"resident_budget": "N%", io_backend odirect} (the planner
    adds KV cache and workspace to the percentage), a 16-token prompt, `warmup` greedy tokens, then
    `tokens` timed greedy tokens through Model.forward (end of generation ignored) in `rounds` rounds.
    A round ends when the reads it issued are done; after it the run measures the disk on exactly the
    byte ranges it streams, as many bytes as the round streamed (O_DIRECT, same reader and io_threads,
    two 64 MiB requests in flight), and then the plan's own loads alone (its ring buffers, its depth, no
    compute): this VM's disk speed drifts by +-30% within seconds, so a measurement elsewhere would
    not describe the round.
Per row: token time and tok/s; bytes streamed per token (the aligned reads of every streamed unit, as
the scheduler issues them) and achieved GB/s = those bytes / token time; the planner's predicted token
time; the bound max(compute, streamed bytes / disk bandwidth) summed over the rounds, compute being the
100% row's measured token time (same invocation) and the disk bandwidth the round's own measurement;
measured/bound (target <= 1.15); measured / max(compute, streamed / its loads' own speed), and the same
with its loads read while a linear keeps the compute threads busy throughout (a diagnostic: on a VM
reads and compute interfere; continuous compute interferes more than decode does, so this speed is
pessimistic); peak RSS (VmHWM) against the plan's resident budget, raw and net of the baseline process
(target <= 1.15); whether the greedy tokens equal the 100% run's. Numbers on a shared 2-core machine
are noisy: compare rows of one invocation. --quick: SmolLM2 only, 16 tokens. --runner-up PAIRS: per streamed
budget, the planner's best and second-best placements (Model.load rank 0 and 1) side by side in one
process, timed alternately, 4 tokens at a time: the median of the paired ratios checks the ranking.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SYNTHETIC = Path(tempfile.gettempdir()) / "engine-bench" / "synthetic-8b.gguf"
BUDGETS = (100, 50, 33, 10)
TARGET = 1.15
PROMPT_TOKENS = 16
DISK_REQUEST = 64 << 20  # bytes per request of the disk measurement
DISK_MIN, DISK_MAX = 512 << 20, 2 << 30  # bytes read by the disk measurement (file re-read if smaller)


def status_bytes(key: str) -> int:
    """A /proc/self/status memory line (VmHWM, VmRSS) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def drop_page_cache() -> bool:
    """Write back dirty pages and drop the page cache; False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux /proc/self/clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5\n")
        return True
    except OSError:
        return False


def config_for(budget: int, io_threads: int, ctx: int, hardware: str = "auto") -> dict:
    return {"device": "cpu", "resident_budget": f"{budget}%", "io_backend": "odirect", "io_threads": io_threads,
            "kv_cache": {"max_context": ctx}, "hardware": hardware}


# -- workers (each runs in its own subprocess) ----------------------------------------------------------
def timed_reads(reader, plans, bufs, label: str) -> float:
    """Seconds to read `plans` in order, plan j into bufs[j % len(bufs)], with as many in flight as
    there are buffers (a buffer is reused once its previous read is done)."""
    pending = []
    t0 = time.perf_counter()
    for j, plan in enumerate(plans):
        if len(pending) == len(bufs):
            pending.pop(0).wait()
        pending.append(reader.submit(plan, bufs[j % len(bufs)], label))
    for t in pending:
        t.wait()
    return time.perf_counter() - t0


def read_bandwidth(reader, runs, min_bytes: int = DISK_MIN, max_bytes: int = DISK_MAX) -> dict:
    """Read speed of the byte ranges `runs` ((offset, length)) in file order through `reader`, split into
    DISK_REQUEST requests with two in flight, the runs repeated until `min_bytes` (at most `max_bytes`)."""
    from engine.tiers.io import aligned_empty

    requests = [(off + c, min(DISK_REQUEST, n - c)) for off, n in runs for c in range(0, n, DISK_REQUEST)]
    target = min(max(sum(n for _, n in requests), min_bytes), max_bytes)
    plans, done = [], 0
    while done < target:
        off, n = requests[len(plans) % len(requests)]
        plans.append(reader.plan(((off, n),)))
        done += n
    bufs = [aligned_empty(DISK_REQUEST, reader.align) for _ in range(2)]
    dt = timed_reads(reader, plans, bufs, "disk benchmark")
    return {"bytes": done, "seconds": dt, "bandwidth": done / dt, "direct": reader.direct}


def ring_bandwidth(w, tokens: int, busy: bool = False) -> dict:
    """The plan's own loads for `tokens` tokens -- its streamed units in order, into its ring buffers, as
    many in flight as it has buffers -- with no compute between: what this schedule's reads can do at the
    depth its memory budget allows. The ring is reloaded afterwards (its buffers were overwritten).
    busy: the same while this thread keeps the compute threads busy (compute_load) and another one
    issues the reads, i.e. what these reads can do while the CPU computes: on a VM the two interfere."""
    import threading

    reads = [w.plans[i] for i in w.seq] * tokens
    if busy:
        took, done = [], threading.Event()

        def read_all() -> None:
            try:
                took.append(timed_reads(w.reader, reads, w.slots, "ring benchmark"))
            finally:
                done.set()

        reader = threading.Thread(target=read_all)
        reader.start()
        compute_load(done)  # here, not in a new thread: the kernels' per-thread scratch already exists
        reader.join()
        dt = took[0]
    else:
        dt = timed_reads(w.reader, reads, w.slots, "ring benchmark")
    w.reload()
    nbytes = sum(p.size for p in reads)
    return {"bytes": nbytes, "seconds": dt, "bandwidth": nbytes / dt}


def compute_load(stop, rows: int = 8192, k: int = 2048) -> None:
    """Decode-like compute until `stop` is set: the engine's Q8_0 linear (its thread pool, GIL released)
    over a 17 MiB matrix that no cache holds, built as calibrate builds its kernel benchmarks."""
    import torch

    import engine.cpu
    from engine.calibrate import _weights

    w, x, out = _weights("Q8_0", rows, k), torch.randn(1, k), torch.empty(1, rows)
    while not stop.is_set():
        engine.cpu.linear(x, w, "Q8_0", rows, k, out)


def greedy_step(m, logits, pos: int):
    """One greedy decode step: the argmax of `logits` fed at `pos` -> (that token, the next logits)."""
    import torch

    tok = int(torch.argmax(logits))
    return tok, m.forward(torch.tensor([[tok]]), pos, last_only=True)[0, -1]


def work_disk(spec: dict) -> dict:
    """The whole model file read sequentially (re-read from the start while under DISK_MIN)."""
    from engine.tiers.io import FileReader

    reader = FileReader(spec["path"], backend="odirect", threads=spec["io_threads"])
    try:
        return read_bandwidth(reader, ((0, os.path.getsize(spec["path"]) // reader.align * reader.align),))
    finally:
        reader.close()


def work_baseline(spec: dict) -> dict:
    """Everything of a run but the model's weights, staging, KV cache and activations: imports, the
    model's header, spec and tokenizer, the compute device, and one forward pass of the engine on a
    negligible model (~1 MiB, same code paths) so the code pages a forward touches are counted too."""
    import torch
    from make_synthetic_model import SyntheticConfig, write_synthetic_model

    import engine
    from engine.gguf_file import GGUFFile
    from engine.spec import ModelSpec
    from engine.tokenizer import Tokenizer

    f = GGUFFile(spec["path"])
    model_spec = ModelSpec.from_gguf(f)
    tok = Tokenizer.from_metadata(f.metadata, f.path)
    tiny_cfg = SyntheticConfig(n_layers=1, dim=256, ffn=512, n_heads=4, n_kv_heads=2, vocab=1024, ctx=64)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_synthetic_model(Path(tmp) / "tiny.gguf", tiny_cfg)
        with engine.load(tiny, config=config_for(100, 1, 16), n_ctx=16, threads=spec["threads"]) as m:
            logits = m.forward(torch.arange(8)[None], 0, last_only=True)
            m.forward(logits[:, -1].argmax(-1, keepdim=True), 8, last_only=True)
    return {"vmhwm": status_bytes("VmHWM"), "vmrss": status_bytes("VmRSS"), "vocab": model_spec.vocab_size,
            "tokenizer_vocab": tok.vocab_size, "tiny_model_bytes": tiny_cfg.file_bytes()}


def work_run(spec: dict) -> dict:
    """Load under a budget, prefill, `warmup` tokens, then `tokens` timed greedy tokens in `rounds` rounds.
    A round of a streamed plan ends when the reads it issued (the next token's first units) are done, and
    is followed by a disk measurement on exactly the byte ranges the run streams, as many bytes as the
    round streamed: the round's bound uses the disk speed of that moment (this VM's disk drifts by +-30%
    within a minute), and no round is credited with prefetches it did not wait for. After the memory
    measurements, each round's loads are read once more beside a compute load (ring_bandwidth busy)."""
    import torch

    import engine
    from engine.gguf_file import coalesce

    t0 = time.perf_counter()
    config = spec.get("config") or config_for(spec["budget"], spec["io_threads"], spec["ctx"],
                                              spec.get("hardware", "auto"))
    m = engine.load(spec["path"], config=config, n_ctx=spec["ctx"], threads=spec["threads"])
    load_s = time.perf_counter() - t0
    try:
        w, plan = m.weights, m.plan
        per_token = sum(w.plans[i].size for i in w.seq) if w.cyclic else 0
        ranges = coalesce([(off, need) for i in w.seq for off, _, _, need in w.plans[i].spans])
        vocab = m.spec.vocab_size
        ids = [(17 + 7919 * i) % vocab for i in range(spec["prompt_tokens"])]
        logits = m.forward(torch.tensor([ids]), 0, last_only=True)[0, -1]
        hwm = status_bytes("VmHWM")  # load and prefill
        pos, out, times, rounds = len(ids), [], [], []

        def step() -> None:
            nonlocal logits, pos
            tok, logits = greedy_step(m, logits, pos)
            pos += 1
            out.append(tok)

        for _ in range(spec["warmup"]):
            step()
        n_rounds = max(1, min(spec.get("rounds", 1), spec["tokens"]))
        for r in range(n_rounds):
            n = spec["tokens"] * (r + 1) // n_rounds - spec["tokens"] * r // n_rounds
            w.drain()
            tr = time.perf_counter()
            for _ in range(n):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            w.drain()
            rec = {"tokens": n, "seconds": time.perf_counter() - tr}
            hwm = max(hwm, status_bytes("VmHWM"))
            if per_token:  # its buffers come and go outside the RSS measurement
                rec["disk"] = read_bandwidth(m.reader, ranges, min_bytes=per_token * n, max_bytes=per_token * n)
                rec["ring_io"] = ring_bandwidth(w, n)
                reset_peak_rss()
            rounds.append(rec)
        rss = status_bytes("VmRSS")
        if per_token:  # after the memory measurements: the compute load's thread and arrays would count
            for rec in rounds:
                rec["ring_busy"] = ring_bandwidth(w, rec["tokens"], busy=True)
        disk = None
        if per_token:
            nbytes, secs = sum(r["disk"]["bytes"] for r in rounds), sum(r["disk"]["seconds"] for r in rounds)
            disk = {"bytes": nbytes, "seconds": secs, "bandwidth": nbytes / secs,
                    "each": [r["disk"]["bandwidth"] for r in rounds],
                    **{f"{key}_bandwidth": sum(r[key]["bytes"] for r in rounds) / sum(r[key]["seconds"] for r in rounds)
                       for key in ("ring_io", "ring_busy")}}
        pred = plan.predicted
        return {
            "load_s": load_s, "token_s": sum(r["seconds"] for r in rounds) / spec["tokens"], "token_times": times,
            "rounds": rounds, "tokens": out,
            "streamed_bytes": per_token, "streamed_units": len(w.seq), "units": len(w.units), "ring": w.k,
            "slot_bytes": w.slot_bytes, "direct": m.reader.direct, "summary": m.plan_summary(),
            "predicted_token_s": pred.token_s, "predicted_compute_s": pred.compute_s,
            "predicted_bound": pred.bound, "plan_hardware": plan.hardware, "resident_budget": plan.resident_budget,
            "planned_resident_bytes": plan.resident_bytes, "weight_bytes_resident": w.resident.nbytes,
            "vmhwm": hwm, "vmrss": rss, "disk": disk,
        }
    finally:
        m.close()


def work_pair(spec: dict) -> dict:
    """The planner's best and second-best placements for one budget, loaded side by side in this process
    and timed alternately, `group` greedy tokens each, `pairs` times: a paired comparison that the disk's
    drift affects equally, to check the planner's ranking against a measurement."""
    import statistics

    import torch

    import engine

    config = config_for(spec["budget"], spec["io_threads"], spec["ctx"], spec.get("hardware", "auto"))
    runs = []
    try:
        for rank in (0, 1):
            m = engine.load(spec["path"], config=config, n_ctx=spec["ctx"], threads=spec["threads"], rank=rank)
            runs.append({"model": m, "pos": 1, "times": [],
                         "logits": m.forward(torch.tensor([[1]]), 0, last_only=True)[0, -1]})
        for i in range(spec["pairs"] + 1):  # the first pair warms up
            for r in runs:
                m = r["model"]
                m.weights.drain()  # no pair is credited with the other's prefetches
                t0 = time.perf_counter()
                for _ in range(spec["group"]):
                    _, r["logits"] = greedy_step(m, r["logits"], r["pos"])
                    r["pos"] += 1
                m.weights.drain()
                if i:
                    r["times"].append((time.perf_counter() - t0) / spec["group"])
        ratios = [b / a for a, b in zip(runs[0]["times"], runs[1]["times"])]
        return {"plans": [{"summary": r["model"].plan_summary(), "predicted_token_s": r["model"].plan.predicted.token_s,
                           "token_s": statistics.median(r["times"])} for r in runs],
                "ratio": statistics.median(ratios), "second_faster": sum(x < 1 for x in ratios), "pairs": len(ratios)}
    finally:
        for r in runs:
            r["model"].close()


WORKERS = {"disk": work_disk, "baseline": work_baseline, "run": work_run, "pair": work_pair}


def run_worker(spec: dict, timeout: float = 1800) -> dict:
    """Run one worker in a fresh interpreter; its last stdout line is the JSON result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=False, capture_output=True,
                       text=True, timeout=timeout, env=env, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"{spec['mode']} worker failed ({spec}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- the benchmark ---------------------------------------------------------------------------------------
def bench_model(name: str, path: str, budgets, tokens: int, rounds: int, warmup: int, threads: int,
                io_threads: int, hardware: str, drop: bool, log) -> dict:
    """Whole-file disk read and baseline, then one run per budget after a page-cache drop. A streamed
    row's bound uses the disk speed measured inside that run, just before and just after its timed
    tokens, on exactly the byte ranges it streams: this VM's disk speed drifts by +-30% within minutes."""
    ctx = PROMPT_TOKENS + warmup + tokens + 16
    dropped = drop and drop_page_cache()
    disk = run_worker({"mode": "disk", "path": path, "io_threads": io_threads})
    log(f"{name}: whole-file O_DIRECT read {disk['bandwidth'] / 1e9:.2f} GB/s over {disk['bytes'] / 2**20:.0f} MiB "
        f"(direct={disk['direct']}, page cache dropped={dropped})")
    base = run_worker({"mode": "baseline", "path": path, "threads": threads})
    log(f"{name}: baseline process (no weights) peak RSS {base['vmhwm'] / 2**20:.0f} MiB")
    rows = []
    for b in budgets:
        dropped = drop and drop_page_cache()
        r = run_worker({"mode": "run", "path": path, "budget": b, "threads": threads, "io_threads": io_threads,
                        "ctx": ctx, "prompt_tokens": PROMPT_TOKENS, "warmup": warmup, "tokens": tokens,
                        "rounds": rounds,
                        "hardware": hardware})
        r.update(model=name, budget=b, cache_dropped=dropped)
        rows.append(r)
        bw = f", its ranges read at {r['disk']['bandwidth'] / 1e9:.2f} GB/s" if r["disk"] else ""
        log(f"{name} {b}%: {r['token_s'] * 1e3:.1f} ms/token{bw}; {r['summary']}")
    full = next((r for r in rows if r["budget"] == 100), None)
    compute_s = full["token_s"] if full else None
    for r in rows:
        n = sum(rd["tokens"] for rd in r["rounds"])
        disk_s = [r["streamed_bytes"] / rd["disk"]["bandwidth"] if r["disk"] else 0.0 for rd in r["rounds"]]
        r["disk_s"] = sum(rd["tokens"] * d for rd, d in zip(r["rounds"], disk_s)) / n
        r["gbps"] = r["streamed_bytes"] / r["token_s"] / 1e9
        if compute_s:  # per round: its tokens against the disk speed measured right after them
            bounds = [rd["tokens"] * max(compute_s, d) for rd, d in zip(r["rounds"], disk_s)]
            r["bound_s"] = sum(bounds) / n
            r["ratio"] = r["token_s"] / r["bound_s"]
            r["round_ratios"] = [rd["seconds"] / b for rd, b in zip(r["rounds"], bounds)]
            for key, field in (("ring_io", "ring_ratio"), ("ring_busy", "busy_ratio")):  # the same, other speeds
                r[field] = r["token_s"] * n / sum(rd["tokens"] * max(compute_s, r["streamed_bytes"] / rd[key]["bandwidth"]
                                                                    if r["disk"] else 0.0) for rd in r["rounds"])
        else:
            r["bound_s"] = r["ratio"] = r["ring_ratio"] = r["busy_ratio"] = None
            r["round_ratios"] = []
        r["rss_ratio"] = r["vmhwm"] / r["resident_budget"]
        r["net_rss_ratio"] = (r["vmhwm"] - base["vmhwm"]) / r["resident_budget"]
        r["same_tokens"] = full["tokens"] == r["tokens"] if full else None
        if r["disk"] and r["round_ratios"]:
            log(f"{name} {r['budget']}%: per round meas/bound " + " ".join(f"{x:.2f}" for x in r["round_ratios"])
                + "; disk GB/s " + " ".join(f"{x / 1e9:.2f}" for x in r["disk"]["each"])
                + "; its ring's loads alone GB/s " + " ".join(f"{rd['ring_io']['bandwidth'] / 1e9:.2f}"
                                                             for rd in r["rounds"])
                + "; the same beside busy compute threads (after the rounds) GB/s " + " ".join(f"{rd['ring_busy']['bandwidth'] / 1e9:.2f}"
                                                                            for rd in r["rounds"]))
    return {"model": name, "path": path, "disk": disk, "baseline": base, "compute_s": compute_s, "rows": rows}


def table(results: list[dict]) -> str:
    head = (f"{'model':<9} {'budget':>6} {'streamed':>9} {'tok/s':>6} {'ms/tok':>7} {'GB/s':>5} {'disk':>5} {'pred ms':>8} "
            f"{'bound ms':>8} {'meas/bd':>7} {'ring':>5} {'/ring':>5} {'busy':>5} {'/busy':>5} {'RSS MiB':>8} {'bud MiB':>8} {'RSS/bud':>7} {'net/bud':>7} "
            f"{'same':>4} {'drop':>4}")
    lines = [head, "-" * len(head)]
    for res in results:
        for r in res["rows"]:
            bound = f"{r['bound_s'] * 1e3:8.1f}" if r["bound_s"] else f"{'-':>8}"
            ratio = f"{r['ratio']:7.2f}" if r["ratio"] else f"{'-':>7}"
            disk = f"{r['disk']['bandwidth'] / 1e9:5.2f}" if r["disk"] else f"{'-':>5}"
            ring = f"{r['disk']['ring_io_bandwidth'] / 1e9:5.2f}" if r["disk"] else f"{'-':>5}"
            ring_ratio = f"{r['ring_ratio']:5.2f}" if r["ring_ratio"] else f"{'-':>5}"
            busy = f"{r['disk']['ring_busy_bandwidth'] / 1e9:5.2f}" if r["disk"] else f"{'-':>5}"
            busy_ratio = f"{r['busy_ratio']:5.2f}" if r["busy_ratio"] else f"{'-':>5}"
            lines.append(
                f"{res['model']:<9} {r['budget']:>5}% {r['streamed_bytes'] / 2**20:>5.0f} MiB {1 / r['token_s']:6.2f} "
                f"{r['token_s'] * 1e3:7.1f} {r['gbps']:5.2f} {disk} {r['predicted_token_s'] * 1e3:8.1f} {bound} {ratio} {ring} {ring_ratio} {busy} {busy_ratio} "
                f"{r['vmhwm'] / 2**20:8.0f} {r['resident_budget'] / 2**20:8.0f} {r['rss_ratio']:7.2f} "
                f"{r['net_rss_ratio']:7.2f} {'yes' if r['same_tokens'] else 'NO':>4} "
                f"{'yes' if r['cache_dropped'] else 'no':>4}")
    lines.append("")
    for res in results:
        d, b = res["disk"], res["baseline"]
        lines.append(f"{res['model']}: whole-file read {d['bandwidth'] / 1e9:.2f} GB/s (O_DIRECT={d['direct']}); compute "
                     f"(100% token time) {res['compute_s'] * 1e3:.1f} ms; baseline RSS {b['vmhwm'] / 2**20:.0f} MiB; "
                     f"planner profile {res['rows'][0]['plan_hardware']}")
    lines.append(f"GB/s: streamed bytes / token time; disk: the row's streamed ranges read (2 x 64 MiB requests in "
                 f"flight) in the same process after each round of tokens; bound = max(compute, streamed / disk); "
                 f"ring: the plan's own loads alone (its buffers, its depth), /ring: measured / max(compute, streamed / "
                 f"ring); busy, /busy: the same with the plan's loads read (after the timed rounds) while a Q8_0 linear keeps the "
                 f"compute threads busy: what the disk gives while the CPU computes on this machine; targets: meas/bd <= {TARGET}, RSS/bud <= {TARGET} (net/bud: RSS minus the baseline process)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[5:]))
    ap.add_argument("--model", help="first model (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--synthetic", default=str(DEFAULT_SYNTHETIC), help="synthetic model path (skipped if absent)")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="weight budgets in percent")
    ap.add_argument("--tokens", type=int, default=64, help="timed decode tokens (SmolLM2)")
    ap.add_argument("--synthetic-tokens", type=int, default=12, help="timed decode tokens (synthetic model)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="timed tokens are split into this many rounds, each followed by its disk measurement")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--hardware", default="auto",
                    help="hardware profile JSON the planner uses (default: the calibrated one, else defaults)")
    ap.add_argument("--runner-up", type=int, default=0, metavar="PAIRS",
                    help="also time the planner's second-best placement against its best at each streamed budget, "
                         "alternately in one process, PAIRS x 4 tokens each (0: off)")
    ap.add_argument("--quick", action="store_true", help="SmolLM2 only, 16 tokens")
    ap.add_argument("--no-drop-caches", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker)
        print(json.dumps(WORKERS[spec["mode"]](spec)))
        return 0
    budgets = [int(b) for b in a.budgets.split(",")]
    if 100 not in budgets:
        budgets.insert(0, 100)  # the compute time of the bound
    sys.path.insert(0, str(ROOT))
    from engine.defaults import default_model_path

    first = Path(a.model).stem if a.model else "smollm2"
    models = [(first, a.model or str(default_model_path()), 16 if a.quick else a.tokens)]
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if a.json else (lambda s: print(s, flush=True))
    if not a.quick:
        if Path(a.synthetic).is_file():
            models.append(("synthetic", a.synthetic, a.synthetic_tokens))
        else:
            log(f"synthetic model {a.synthetic} is absent: skipped "
                f"(make it with python scripts/make_synthetic_model.py {a.synthetic})")
    drop = not a.no_drop_caches and drop_page_cache()
    why = "" if drop else (" (--no-drop-caches)" if a.no_drop_caches else " (not permitted)")
    log(f"page cache dropped before each run: {'yes' if drop else 'no'}{why}")
    hardware = a.hardware if a.hardware == "auto" else os.path.abspath(a.hardware)
    results = [bench_model(name, path, budgets, n, a.rounds, a.warmup, a.threads, a.io_threads, hardware, drop, log)
               for name, path, n in models]
    if a.runner_up:
        for (name, path, _), res in zip(models, results):
            res["runner_up"] = []
            for b in budgets:
                if b == 100:
                    continue
                pr = run_worker({"mode": "pair", "path": path, "budget": b, "threads": a.threads,
                                 "io_threads": a.io_threads, "ctx": 4 * a.runner_up + 32, "pairs": a.runner_up,
                                 "group": 4, "hardware": hardware})
                res["runner_up"].append({"budget": b, **pr})
                best, second = pr["plans"]
                log(f"{name} {b}%: planner's best {best['token_s'] * 1e3:.1f} ms/token (predicted "
                    f"{best['predicted_token_s'] * 1e3:.1f}; {best['summary']}) vs second {second['token_s'] * 1e3:.1f} "
                    f"(predicted {second['predicted_token_s'] * 1e3:.1f}; {second['summary']}): second / best "
                    f"{pr['ratio']:.3f} median over {pr['pairs']} pairs, second faster in {pr['second_faster']}")
    if a.json:
        for res in results:
            for r in res["rows"]:
                r.pop("tokens")
        print(json.dumps(results, indent=1))
    else:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
