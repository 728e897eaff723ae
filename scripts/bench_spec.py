"""Speculative decoding and batching benchmark: many tokens per pass over the weights.

    python scripts/bench_spec.py [--tokens 96] [--budgets 100,10|none] [--widths auto,4,8] [--rounds 2]
                                 [--synthetic PATH,PATH] [--batches 1,4,16,64] [--synthetic-budgets 10,33]
                                 [--batch-tokens 3] [--hardware JSON] [--json]

Part 1, prompt lookup on SmolLM2 (the default model): a code-editing chat prompt (the answer repeats
much of the prompt), greedy. Per weight budget (engine.load with {"resident_budget": "N%", io_backend
odirect}, as bench_tiers.py sets them; 10% streams nearly every layer from disk per pass), in one process:
plain decode and prompt-lookup speculation at each verification width (auto = the cost model's
choice, engine.tiers.speculation), alternated `rounds` times; per row decode tok/s (medians), passes
over the weights, tokens per pass, drafts kept, and whether the text equals plain greedy.

Part 2, batching: `batch` sequences with cached 8-token prompts decode together, all rows in one
pass over the weights (model.step); the median pass time and total tok/s, beside the cost model's
predicted pass time at that many rows (engine.tiers.speculation.pass_costs: max(compute, streamed
bytes / disk speed) per unit), on each synthetic model (scripts/make_synthetic_model.py: the
8B-shaped default and a 4-block Llama-70B-shaped one) streamed at the given budgets.
`--budgets none` skips part 1. Numbers on a shared 2-core VM are noisy: compare rows of one
invocation; the load average before and after each part is printed with the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiers import config_for, drop_page_cache  # noqa: E402

DEFAULT_SYNTHETIC = (Path(tempfile.gettempdir()) / "engine-bench" / "synthetic-8b.gguf",
                     Path.home() / ".cache" / "engine" / "bench" / "llama70b-shaped-4.gguf")
SYNTHETIC_HINT = {"llama70b-shaped-4.gguf": " --layers 4 --dim 8192 --ffn 28672 --heads 64 --vocab 4096 --ctx 1024"}
PROMPTS = {  # chat prompts whose answers repeat much of the prompt
    "summarise": "Summarize the following text in two sentences.\n\nThe James Webb Space Telescope is a space "
                 "telescope designed to conduct infrared astronomy. Its high-resolution and high-sensitivity "
                 "instruments allow it to view objects too old, distant, or faint for the Hubble Space Telescope. "
                 "This enables investigations across many fields of astronomy and cosmology, such as observation "
                 "of the first stars and the formation of the first galaxies.",
    "edit": "Correct the spelling mistakes in this paragraph and write out the corrected paragraph:\n\nThe quick "
            "brown fox jumpd over the lazy dog. Every morning the fox runs thru the forest, looking for food and "
            "water. The dog sleeps all day in the sun and never notices the fox.",
}


def run_once(m, ids, tokens, drafter, depth):
    from engine.model import GenerationStats
    from engine.sampling import SamplingParams
    from engine.serving.batcher import generate
    from engine.serving.decode import Usage

    st = GenerationStats()
    usage = Usage()
    text = "".join(generate(m, ids, SamplingParams(temperature=0), tokens, drafter=drafter, depth=depth,
                            stats=st, usage=usage))
    return text, st, usage


def bench_prompt(m, ids, widths, tokens: int, rounds: int, drafter) -> list[dict]:
    """Plain decode (width 1) and each width, alternated `rounds` times in this process."""
    runs = [[] for _ in widths]
    run_once(m, ids, 8, None, 1)  # warm up
    for _ in range(rounds):
        for i, d in enumerate(widths):
            runs[i].append(run_once(m, ids, tokens, drafter if d != 1 else None, d))
    plain_text, rows = runs[0][0][0], []
    for d, rs in zip(widths, runs):
        u = rs[-1][2]
        rows.append({"width": d if isinstance(d, int) else "auto",
                     "decode_tps": statistics.median(r[1].decode_tps for r in rs),
                     "passes": u.passes, "tokens": u.completion_tokens,
                     "tokens_per_pass": u.completion_tokens / max(1, u.passes), "drafted": u.drafted,
                     "accepted": u.accepted, "same_text": {r[0] for r in rs} == {plain_text}})
    for r in rows:
        r["speedup"] = r["decode_tps"] / rows[0]["decode_tps"]
    return rows


def bench_lookup(args) -> list[dict]:
    import engine
    from engine.serving.speculative import PromptLookup, verify_widths

    rows = []
    for budget in args.budgets:
        dropped = drop_page_cache()
        m = engine.load(config=config_for(budget, 4, 2048, args.hardware), n_ctx=2048, threads=args.threads)
        try:
            pl = PromptLookup()
            widths = [1] + [verify_widths(m, pl) if d == "auto" else int(d) for d in args.depths if d != "1"]
            for name, prompt in PROMPTS.items():
                for r in bench_prompt(m, m.prompt_ids(prompt, chat=True), widths, args.tokens, args.rounds, pl):
                    rows.append({"budget": budget, "prompt": name, "plan": m.plan_summary(),
                                 "cache_dropped": dropped, **r})
        finally:
            m.close()
    return rows


def bench_batch(args) -> list[dict]:
    """Decode passes of `batch` sequences at once (after their prompts are cached): total tok/s, and the
    cost model's pass time for that many rows."""
    import torch

    import engine
    from engine.errors import PlanError
    from engine.plan import hardware_for
    from engine.tiers.footprint import footprint_from_gguf
    from engine.tiers.speculation import pass_costs

    rows = []
    for path in args.synthetic:
        if not path.exists():
            print(f"part 2: {path} missing (python scripts/make_synthetic_model.py {path}"
                  f"{SYNTHETIC_HINT.get(path.name, '')})", file=sys.stderr)
            continue
        for budget in args.synthetic_budgets:
            drop_page_cache()
            try:
                m = engine.load(path, config=config_for(budget, 4, 256, args.hardware), n_ctx=256,
                                threads=args.threads)
            except PlanError as e:  # e.g. one 70B-shaped block (459 MiB) is more than 10% of a 4-block file
                print(f"  {path.name} {budget}%: no plan fits: {e}", file=sys.stderr)
                rows.append({"model": path.name, "budget": budget, "batch": None, "error": str(e)})
                continue
            try:
                costs = pass_costs(footprint_from_gguf(m.file, m.spec), hardware_for(m.config), m.config, m.plan,
                                   max_tokens=max(args.batches))
                vocab = m.spec.vocab_size
                for batch in args.batches:
                    seqs = [m.open_sequence() for _ in range(batch)]
                    try:
                        prompts = [[(17 + 7919 * (i + j)) % vocab for i in range(8)] for j in range(batch)]
                        logits = m.step(list(zip(seqs, prompts)), last_only=True)
                        times = []
                        for _ in range(args.batch_tokens):
                            nxt = [[int(torch.argmax(lg[-1]))] for lg in logits]
                            t0 = time.perf_counter()
                            logits = m.step(list(zip(seqs, nxt)), last_only=True)
                            times.append(time.perf_counter() - t0)
                        pass_s = statistics.median(times)
                        rows.append({"model": path.name, "budget": budget, "batch": batch, "pass_s": pass_s,
                                     "tps": batch / pass_s, "predicted_pass_s": costs.pass_s[batch - 1],
                                     "plan": m.plan_summary()})
                        print(f"  {path.name} {budget}% batch {batch}: {pass_s:.2f} s per pass", file=sys.stderr)
                    finally:
                        for s in seqs:
                            s.close()
            finally:
                m.close()
    return rows


def table(lookup: list[dict], batch: list[dict]) -> str:
    out = [] if not lookup else ["| SmolLM2 budget | prompt | tokens verified per pass | decode tok/s | vs plain | tokens per weight pass "
           "| drafts kept | text = plain greedy |", "|---|---|---|---|---|---|---|---|"]
    for r in lookup:
        width = {1: "1 (plain)", "auto": "auto (cost model)"}.get(r["width"], str(r["width"]))
        kept = f"{r['accepted']}/{r['drafted']}" if r["drafted"] else "-"
        out.append(f"| {r['budget']}% | {r['prompt']} | {width} | {r['decode_tps']:.1f} | {r['speedup']:.2f}x | "
                   f"{r['tokens_per_pass']:.2f} | {kept} | {'yes' if r['same_text'] else 'NO'} |")
    if batch:
        out += ["", "| model | budget | batch | pass (median) | predicted pass | total tok/s | vs batch 1 |",
                "|---|---|---|---|---|---|---|"]
        one = {(r["model"], r["budget"]): r["tps"] for r in batch if r["batch"] == 1}
        for r in batch:
            if r["batch"] is None:
                out.append(f"| {r['model']} | {r['budget']}% | - | no plan fits this budget | | | |")
                continue
            base = one.get((r["model"], r["budget"]))
            gain = f"{r['tps'] / base:.1f}x" if base else "-"
            out.append(f"| {r['model']} | {r['budget']}% | {r['batch']} | {r['pass_s']:.2f} s | "
                       f"{r['predicted_pass_s']:.2f} s | {r['tps']:.2f} | {gain} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--budgets", default="100,10")
    p.add_argument("--widths", dest="depths", default="auto,4,8")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--synthetic", default=",".join(map(str, DEFAULT_SYNTHETIC)), help="comma-separated GGUF paths")
    p.add_argument("--synthetic-budgets", default="10,33")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--batch-tokens", type=int, default=3, help="timed decode passes per batch size")
    p.add_argument("--hardware", default="auto",
                   help="hardware profile JSON the planner and the predicted pass use (python -m engine.calibrate "
                        "--output PATH; default: the calibrated one, else defaults)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.hardware = args.hardware if args.hardware == "auto" else os.path.abspath(args.hardware)
    args.budgets = [] if args.budgets == "none" else [int(b) for b in args.budgets.split(",")]
    args.synthetic = [Path(x).expanduser() for x in args.synthetic.split(",") if x]
    args.synthetic_budgets = [int(b) for b in args.synthetic_budgets.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.depths = args.depths.split(",")
    load = [os.getloadavg()[0]]
    lookup = bench_lookup(args)
    load.append(os.getloadavg()[0])
    if lookup and not args.json:  # printed at once: part 2 takes minutes
        print(table(lookup, []) + f"\n\n1-minute load average: {load[0]:.1f} at start, {load[1]:.1f} at the end\n",
              flush=True)
    batch = bench_batch(args)
    load.append(os.getloadavg()[0])
    if args.json:
        print(json.dumps({"lookup": lookup, "batch": batch, "load_average": load}, indent=1))
    elif batch:
        print(table([], batch) + f"\n\n1-minute load average: {load[1]:.1f} at start, {load[2]:.1f} at the end")
    return 0 if all(r["same_text"] for r in lookup) else 1


if __name__ == "__main__":
    sys.exit(main())
