"""Plan.table(): the plan as text, for people."""
from __future__ import annotations

from collections.abc import Sequence

from ..footprint import GROUPS
from ..units import format_seconds, format_size
from .contract import DISK, HOST, RESIDENT, LayerPlacement, Plan

_SYMBOL = {RESIDENT: "R", HOST: "H", DISK: "D"}


def render(p: Plan) -> str:
    w, pr = p.workload, p.predicted
    dev_mem = "VRAM" if p.device == "cuda" else "RAM"
    lines = [f"plan: {p.model} on {p.hardware}",
             f"workload: batch {w.batch}, prompt {w.prompt_tokens} tokens, generate {w.gen_tokens} tokens"]
    kv_res = p.kv_bytes - p.kv_host_bytes
    lines.append(f"resident ({dev_mem}): {format_size(p.resident_bytes)} of {format_size(p.resident_budget)} "
                 f"= weights {format_size(p.resident_weight_bytes)} + staging {p.ring_size} x "
                 f"{format_size(p.staging_bytes)} + KV {format_size(kv_res)} + workspace "
                 f"{format_size(p.workspace_bytes)}")
    if p.device == "cuda":
        bounce = p.ring_size * p.staging_bytes if p.host_staging else 0
        kv_host = p.kv_host_bytes
        lines.append(f"host RAM: {format_size(p.host_bytes)} of {format_size(p.host_budget)} = weights (pinned) "
                     f"{format_size(p.host_weight_bytes)} + disk bounce buffers {format_size(bounce)} + KV "
                     f"{format_size(kv_host)}")
    head = f" in {p.output_chunks} chunks of {p.output_chunk_rows} rows" if p.output_chunks > 1 else ""
    kv_where = " (attention computed on the CPU beside it)" if p.kv_tier == HOST else ""
    lines.append(f"KV cache: {p.kv_tier}{kv_where}, {format_size(p.kv_bytes)} ({p.kv_context} tokens x batch {w.batch}, "
                 f"{p.kv_dtype}); embedding: {p.embedding_tier}; output head: {p.output_tier}{head}")
    if p.ring_size:
        lines.append(f"staging: ring of {p.ring_size} x {format_size(p.staging_bytes)}, prefetch depth "
                     f"{p.prefetch_depth}; io {p.io_backend}, {p.io_threads} threads")
    cpu_note = "; C = host, computed on the CPU at decode" if p.cpu_max_rows else ""
    lines.append(f"layer map (R resident, H host, D disk; lower case = partly resident{cpu_note}):")
    partly = {x.layer for x in p.experts if x.count(RESIDENT) < len(x.tiers)}  # MoE: some experts elsewhere
    lines.append("  " + "".join("C" if lp.cpu_decode else _SYMBOL[lp.tier].lower()
                                if (lp.tier != RESIDENT and lp.resident_roles) or lp.index in partly
                                else _SYMBOL[lp.tier] for lp in p.layers))
    lines.append(f"  {'tier':<9} {'resident part':<14} {'decode on':<10} {'streamed/step':<22} layers")
    for (tier, kept, cpu), group in _groups(p.layers, partly).items():
        per = sum(lp.streamed_bytes for lp in group) if not cpu else 0
        per = f"{format_size(per)} ({len(group)} layer{'s' if len(group) > 1 else ''})" if per else "-"
        on = "cpu" if cpu else p.device
        lines.append(f"  {tier:<9} {kept:<14} {on:<10} {per:<22} {_ranges([lp.index for lp in group])}")
    if p.cpu_max_rows:
        lines.append(f"hybrid: passes of <= {p.cpu_max_rows} rows compute the C layers"
                     f"{' and the output head' if p.output_cpu_decode else ''} on the CPU over pinned RAM (their "
                     "KV cache in host RAM); larger passes stream them to the GPU")
    if p.experts:
        lines.extend(_experts(p))
    streamed = ", ".join(f"{t} {format_size(n)}" for t, n in p.streamed_bytes.items() if n) or "none"
    links = ", ".join(f"{k} {format_seconds(v)}" for k, v in pr.transfer_s.items()) or "no transfers"
    lines.append(f"streamed per step: {streamed}")
    cpu = f" (CPU {format_seconds(pr.cpu_s)})" if pr.cpu_s else ""
    lines.append(f"predicted per step: compute {format_seconds(pr.compute_s)}{cpu}; {links}; bound "
                 f"{format_seconds(pr.bound_s)} ({pr.bound}); pipeline {format_seconds(pr.token_s)} -> "
                 f"{pr.tokens_per_s:.3g} tokens/s")
    lines.append(f"predicted workload: prefill {format_seconds(pr.prefill_s)} "
                 f"({w.batch * w.prompt_tokens / pr.prefill_s:.3g} tokens/s) + {w.gen_tokens} steps = "
                 f"{format_seconds(pr.total_s)}")
    lines.extend(f"note: {n}" for n in p.notes)
    return "\n".join(lines)


def _experts(p: Plan) -> list[str]:
    """Which experts live where and why: counts per layer per tier, the hottest resident ones, reads."""
    x0 = p.experts[0]
    why = ("router statistics " + p.router) if p.router != "uniform" else "uniform routing (no router profile)"
    lines = [f"experts: {len(x0.tiers)} per layer, {format_size(x0.expert_bytes)} each; dense parts (attention, "
             f"norms, router) resident, then the hottest experts by {why}",
             f"  expert cache (LRU, resident): {p.expert_cache} x {format_size(p.expert_slot_bytes)}; reads issued "
             "after each layer's router, the next layer's guessed ones prefetched",
             f"  {'layers':<14} {'resident':>8} {'host':>5} {'disk':>5}  {'predicted read/step':>19}  hottest resident (share, "
             f"first layer)"]
    rows: dict[tuple, list] = {}
    for x in p.experts:
        rows.setdefault((x.count(RESIDENT), x.count(HOST), x.count(DISK)), []).append(x)
    for (r, h, d), xs in rows.items():
        lo, hi = min(x.read_bytes for x in xs), max(x.read_bytes for x in xs)
        read = format_size(lo) if format_size(lo) == format_size(hi) else f"{format_size(lo)}-{format_size(hi)}"
        hot = ", ".join(f"{e} ({xs[0].frequency[e]:.3f})" for e in xs[0].hottest(RESIDENT)) or "-"
        lines.append(f"  {_ranges([x.layer for x in xs]):<14} {r:>8} {h:>5} {d:>5}  {read:>19}  {hot}")
    return lines


def _groups(layers: Sequence[LayerPlacement], partly: set[int]) -> dict[tuple[str, str, bool], list[LayerPlacement]]:
    """Layers grouped by (tier, which part stays resident, computed on the CPU at decode), in first-seen order;
    `partly`: MoE layers whose dense part is resident but not every expert (see the experts section)."""
    out: dict[tuple[str, str], list[LayerPlacement]] = {}
    for lp in layers:
        if lp.index in partly:
            kept = "dense, experts"
        elif not lp.streamed_roles:
            kept = "all"
        else:
            kept = ", ".join(g for g in GROUPS if any(r.startswith(g + "_") for r in lp.resident_roles)) or "none"
        out.setdefault((lp.tier, kept, lp.cpu_decode), []).append(lp)
    return out


def _ranges(idx: Sequence[int]) -> str:
    """[0, 2, 4, 6, 9, 10] -> "0..6 step 2, 9, 10" (arithmetic runs of three or more are folded)."""
    parts, i = [], 0
    while i < len(idx):
        j = i + 1
        if j < len(idx):
            step = idx[j] - idx[i]
            while j + 1 < len(idx) and idx[j + 1] - idx[j] == step:
                j += 1
        if j - i >= 2:
            parts.append(f"{idx[i]}-{idx[j]}" if step == 1 else f"{idx[i]}..{idx[j]} step {step}")
            i = j + 1
        else:
            parts.append(str(idx[i]))
            i += 1
    return ", ".join(parts)
