"""Expert-level placement of a mixture-of-experts model: every routed expert of every layer is a unit.

Order of residency: the dense part of every layer (attention, norms, router), the norms, the output head,
the KV cache, the workspace and a minimal expert cache first; then the embedding if it fits; then the
experts, hottest first (router statistics, or uniform k/E: every layer then gets the same count), into
the resident tier, then the host tier (CUDA), then the disk. What is left of the budget after whole
experts goes to the expert cache (LRU, in the resident tier) that holds recently routed non-resident ones.

Cost model per decode step (b sequences): expert e of layer i is routed with frequency p (share of tokens
selecting it), so some token of the step needs it with probability q = 1 - (1 - p)^b. A non-resident
expert is read (host: copied) when it is needed and not cached; the cache's hit probability follows the
Che approximation of an LRU cache of C slots over independent references (characteristic time T with
sum over non-resident experts of 1 - exp(-q T) = C, hit = 1 - exp(-q T)). Reads are issued after the
router and overlap the compute of the layer's other experts, so a layer costs its dense compute plus
max(expert compute, its expected reads / the link's bandwidth); no schedule beats max(compute, link time).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from types import MappingProxyType

from ...errors import PlanError
from ..footprint import ModelFootprint
from ..router_stats import RouterProfile
from ..units import DIRECT_IO_ALIGN, format_size
from .contract import (DISK, HOST, LINK_DISK, LINK_H2D, RESIDENT, ExpertPlacement, LayerPlacement, Plan,
                       Prediction, Workload)

CACHE_SHARE = 0.1  # of the resident bytes left for experts, kept as the expert cache (at least a pass's experts)


def expert_slot_bytes(fp: ModelFootprint) -> int:
    """One cache slot: the largest expert's three slices, each with O_DIRECT alignment slack."""
    need = max((lay.expert_bytes + 2 * DIRECT_IO_ALIGN * len(lay.expert_tensors) for lay in fp.layers
                if lay.n_experts), default=0)
    return -(-need // DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN


def routing(fp: ModelFootprint, profile: RouterProfile | None) -> list[tuple[float, ...]]:
    """Per layer the routing frequency of each expert (empty for dense layers)."""
    s = fp.spec
    if profile is not None:
        profile.check(s.n_layers, s.n_experts, s.n_experts_used)
        return [profile.frequency[lay.index] if lay.n_experts else () for lay in fp.layers]
    return [(s.n_experts_used / lay.n_experts,) * lay.n_experts if lay.n_experts else () for lay in fp.layers]


def lru_hits(q: Sequence[float], slots: int) -> list[float]:
    """Hit probability of each item of an LRU cache of `slots` entries that sees item j with probability
    q[j] per step, independently (Che's approximation)."""
    if slots <= 0:
        return [0.0] * len(q)
    if slots >= sum(1 for x in q if x > 0):
        return [1.0 if x > 0 else 0.0 for x in q]
    lo, hi = 0.0, 1.0
    while sum(1 - math.exp(-x * hi) for x in q) < slots:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(1 - math.exp(-x * mid) for x in q) < slots else (lo, mid)
    return [1 - math.exp(-x * hi) for x in q]


def plan_experts(p, profile: RouterProfile | None) -> Plan:
    """The expert-level plan for planner state `p` (a search._Planner: budgets, KV, links, rates)."""
    fp, hw, work, cfg = p.fp, p.hw, p.work, p.cfg
    s, b = fp.spec, work.batch
    freq = routing(fp, profile)
    slot = expert_slot_bytes(fp)
    kv_tier = RESIDENT if RESIDENT in p.kv_tiers else HOST
    head = fp.head.nbytes
    emb = fp.embedding.nbytes if fp.output is not None else 0  # tied: the head, resident
    dense = sum(lay.dense_bytes if lay.n_experts else lay.nbytes for lay in fp.layers)
    min_cache = min(b * s.n_experts_used, s.n_experts)  # one decode pass's experts of a layer
    fixed = p.small + p.kv_resident(kv_tier) + p.workspace + dense + head
    budget = p.resident_budget
    experts = [(i, e) for i, lay in enumerate(fp.layers) for e in range(lay.n_experts)]
    ebytes = {i: lay.expert_bytes for i, lay in enumerate(fp.layers)}
    all_experts = sum(ebytes[i] for i, _ in experts)
    if fixed + emb + all_experts <= budget:  # everything fits: no cache, no reads
        res_set, emb_tier, cache = set(experts), RESIDENT, 0
    else:
        if not p.slow and not (p.cuda and p.host_budget > 0):
            raise PlanError(f"everything must be resident (slow_tier is none): the model needs "
                            f"{format_size(fixed + emb + all_experts)} but the resident budget is "
                            f"{format_size(budget)}", path=cfg.source, field="resident_budget")
        need = fixed + min_cache * slot
        if need > budget:
            raise PlanError(f"the dense part of every layer (attention, norms, router: {format_size(dense)}), the "
                            f"output head ({format_size(head)}), KV, workspace and an expert cache of {min_cache} x "
                            f"{format_size(slot)} need {format_size(need)} of the resident tier; the budget is "
                            f"{format_size(budget)} (streaming an MoE layer's dense part is not supported)",
                            path=cfg.source, field="resident_budget")
        # the embedding is only looked up (a row per token): resident if it fits, else host RAM, else the file
        emb_tier = RESIDENT if need + emb <= budget else HOST if p.cuda and p.host_budget >= emb else DISK
        left = budget - need - (emb if emb_tier == RESIDENT else 0)
        extra = int(CACHE_SHARE * left) // slot if slot else 0
        cache = min_cache + extra
        left -= extra * slot
        # hottest first; ties (uniform routing) by expert then layer, so every layer keeps the same count
        order = sorted(experts, key=lambda ie: (-freq[ie[0]][ie[1]], ie[1], ie[0]))
        res_set = set()
        for i, e in order:
            if ebytes[i] <= left:
                res_set.add((i, e))
                left -= ebytes[i]
    rest = [ie for ie in sorted(experts, key=lambda ie: (-freq[ie[0]][ie[1]], ie[1], ie[0])) if ie not in res_set]
    host_fixed = (p.kv_bytes if kv_tier == HOST else 0) + (emb if emb_tier == HOST else 0)
    host_set = set()
    if p.cuda:
        host_left = p.host_budget - host_fixed - (cache * slot if p.host_staging and p.slow else 0)
        for i, e in rest:
            if ebytes[i] <= host_left:
                host_set.add((i, e))
                host_left -= ebytes[i]
    if len(res_set) + len(host_set) < len(experts) and not p.slow:
        raise PlanError(f"{len(experts) - len(res_set) - len(host_set)} experts fit neither the resident "
                        f"({format_size(budget)}) nor the host ({format_size(p.host_budget)}) budget and slow_tier "
                        f"is {cfg.slow_tier}", path=cfg.source, field="host_budget")
    if not rest:
        cache = 0

    def tier_of(i: int, e: int) -> str:
        return RESIDENT if (i, e) in res_set else HOST if (i, e) in host_set else DISK

    placements, layers = [], []
    for i, lay in enumerate(fp.layers):
        roles = frozenset(t.role for t in lay.tensors)
        if not lay.n_experts:
            layers.append(LayerPlacement(i, RESIDENT, roles, frozenset(), 0))
            continue
        layers.append(LayerPlacement(i, RESIDENT, frozenset(t.role for t in lay.dense_tensors), frozenset(), 0))
        placements.append(ExpertPlacement(i, tuple(tier_of(i, e) for e in range(lay.n_experts)), tuple(freq[i]),
                                          ebytes[i]))
    placements, q = _with_reads(placements, b, cache)
    pred = _predict(p, fp, placements, emb_tier, kv_tier, q)
    res_weights = (dense + p.small + head + (emb if emb_tier == RESIDENT else 0)
                   + sum(ebytes[i] for i, _ in res_set))
    host_weights = sum(ebytes[i] for i, _ in host_set) + (emb if emb_tier == HOST else 0)
    resident_bytes = fixed + (emb if emb_tier == RESIDENT else 0) + sum(ebytes[i] for i, _ in res_set) + cache * slot
    resident_budget = budget
    if p.resident_weights_fraction is not None and kv_tier == RESIDENT:
        resident_bytes += p.kv_bytes
        resident_budget += p.kv_bytes
    n_slow = len(experts) - len(res_set)
    notes = list(p.notes)
    notes.append(f"experts: {len(res_set)} of {len(experts)} resident (hottest first by "
                 f"{'router statistics ' + profile.source if profile else 'uniform routing: no router profile'}), "
                 f"{len(host_set)} in the host tier, {n_slow - len(host_set)} on disk; an LRU expert cache of "
                 f"{cache} x {format_size(slot)} keeps recently routed ones")
    return Plan(
        model=fp.source, hardware=f"{hw.name} [{hw.source}]", device=p.device, workload=work, layers=tuple(layers),
        embedding_tier=emb_tier if fp.output is not None else RESIDENT, output_tier=RESIDENT, kv_tier=kv_tier,
        kv_bytes=p.kv_bytes, kv_context=p.kv_context, kv_dtype=p.kv_dtype, ring_size=0, prefetch_depth=0,
        staging_bytes=0, host_staging=p.host_staging and bool(n_slow - len(host_set)),
        resident_bytes=resident_bytes, host_bytes=host_fixed + host_weights - (emb if emb_tier == HOST else 0),
        resident_budget=resident_budget, host_budget=p.host_budget, resident_weight_bytes=res_weights,
        host_weight_bytes=host_weights, workspace_bytes=p.workspace, io_backend=p.io_backend,
        io_threads=cfg.io_threads or 4, compute_threads=cfg.compute_threads, output_bytes=head,
        output_chunk_rows=fp.head.shape[0], output_chunks=1, predicted=pred, notes=tuple(notes),
        experts=tuple(placements), expert_cache=cache, expert_slot_bytes=slot if cache else 0,
        router=profile.source if profile else "uniform")


def _with_reads(placements: Sequence[ExpertPlacement], batch: int, cache: int
                ) -> tuple[tuple[ExpertPlacement, ...], dict]:
    """The placements with their expected reads per step of `batch` tokens: q = P(some token of the step
    routes to e) from the routing frequency; a non-resident expert is read when routed and not in the LRU
    cache of `cache` slots (Che's approximation). -> (placements, q per (layer, expert))."""
    q = {(x.layer, e): 1 - (1 - f) ** batch for x in placements for e, f in enumerate(x.frequency)}
    slow = [(x.layer, e) for x in placements for e, t in enumerate(x.tiers) if t != RESIDENT]
    hits = dict(zip(slow, lru_hits([q[k] for k in slow], cache)))
    out = []
    for x in placements:
        read = {HOST: 0.0, DISK: 0.0}
        for e, t in enumerate(x.tiers):
            if t != RESIDENT:
                read[t] += q[(x.layer, e)] * (1 - hits[(x.layer, e)]) * x.expert_bytes
        out.append(dataclasses.replace(x, host_read=read[HOST], disk_read=read[DISK]))
    return tuple(out), q


def evaluate_experts(fp: ModelFootprint, hw, cfg, plan: Plan, work: Workload) -> Prediction:
    """The cost model's prediction for an expert-level plan under another workload (a batch of t rows,
    as a speculative pass verifying t tokens is): more rows route to more distinct experts."""
    from .search import _Planner

    p = _Planner(fp, hw, cfg, work)
    placements, q = _with_reads(plan.experts, work.batch, plan.expert_cache)
    return _predict(p, fp, placements, plan.embedding_tier, plan.kv_tier, q)


def _predict(p, fp: ModelFootprint, placements: Sequence[ExpertPlacement], emb_tier: str, kv_tier: str,
             q: dict) -> Prediction:
    hw, work = p.hw, p.work
    b = work.batch
    rows = b * work.prompt_tokens
    by_layer = {x.layer: x for x in placements}

    def cost(tensors, tokens: float, share: float = 1.0) -> float:
        return sum(p.rate(t.fmt).seconds(int(t.nbytes * share), max(1, round(tokens))) for t in tensors)

    disk_bw = p.disk_bw
    h2d = hw.host_to_device
    kv_s = p.kv_read_s(kv_tier)
    token_s = compute_s = hw.token_overhead_s + p.lookup_s(emb_tier, b)
    prefill_s = p.lookup_s(emb_tier, rows)
    links = {LINK_DISK: 0.0, LINK_H2D: 0.0} if p.cuda else {LINK_DISK: 0.0}
    for lay in fp.layers:
        x = by_layer.get(lay.index)
        dense = lay.dense_tensors if x else lay.tensors
        d_decode = cost(dense, b) + hw.layer_overhead_s + kv_s
        d_prefill = cost(dense, rows) + hw.layer_overhead_s
        if x is None:
            token_s += d_decode
            compute_s += d_decode
            prefill_s += d_prefill
            continue
        one = 1.0 / x.tiers.__len__()  # one expert's share of a stacked tensor
        e_decode = sum(q[(x.layer, e)] * cost(lay.expert_tensors, b * x.frequency[e] / max(q[(x.layer, e)], 1e-12),
                                              one) for e in range(len(x.tiers)))
        e_prefill = cost(lay.expert_tensors, rows * fp.spec.n_experts_used / len(x.tiers))
        read_s = x.disk_read / disk_bw + (x.host_read + (x.disk_read if p.host_staging else 0.0)) / h2d * p.cuda
        links[LINK_DISK] += x.disk_read / disk_bw
        if p.cuda:
            links[LINK_H2D] += (x.host_read + (x.disk_read if p.host_staging else 0.0)) / h2d
        token_s += d_decode + max(e_decode, read_s)
        compute_s += d_decode + e_decode
        slow_bytes = sum(x.expert_bytes for t in x.tiers if t != RESIDENT)  # a long prompt routes to all
        prefill_s += d_prefill + max(e_prefill, slow_bytes / disk_bw)
    head = (fp.head,)
    token_s += cost(head, b) + hw.layer_overhead_s
    compute_s += cost(head, b) + hw.layer_overhead_s
    prefill_s += cost(head, b) + hw.layer_overhead_s
    links = {k: v for k, v in links.items() if v}
    bound, bound_s = "compute", compute_s
    for link, busy in links.items():
        if busy > bound_s:
            bound, bound_s = link, busy
    token_s = max(token_s, bound_s)
    return Prediction(token_s, compute_s, MappingProxyType(links), bound_s, bound, prefill_s,
                      prefill_s + work.gen_tokens * token_s, b)
