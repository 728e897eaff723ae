"""Which candidate wins: plan() is the first of ranked(); evaluate() predicts a placement chosen by hand."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ...errors import PlanError
from ..config import TierConfig
from ..footprint import GROUPS, ModelFootprint
from ..hardware import HardwareProfile
from ..units import READ_CHUNK
from .contract import (
    DISK_QUEUE_SATURATION,
    RESIDENT,
    TIERS,
    LayerPlacement,
    Plan,
    Prediction,
    Workload,
)
from ..router_stats import RouterProfile
from .experts import plan_experts
from .search import _Candidate, _Planner

_NEAR = 0.03  # predicted times this close to the fastest are ties for pipeline depth (see ranked)
_TIE = 1e-3  # relative time difference treated as a tie otherwise

def plan(fp: ModelFootprint, hw: HardwareProfile, cfg: TierConfig, work: Workload = Workload(),
         router: RouterProfile | None = None) -> Plan:
    """The placement with the lowest predicted time for `work`. Pure: reads no weights, allocates nothing.
    Raises PlanError (saying what is needed) when no placement fits the budgets. A mixture-of-experts
    model is placed expert by expert (planner/experts.py), hottest first by `router` (uniform if None)."""
    return ranked(fp, hw, cfg, work, 1, router)[0]


def ranked(fp: ModelFootprint, hw: HardwareProfile, cfg: TierConfig, work: Workload = Workload(),
           n: int = 2, router: RouterProfile | None = None) -> list[Plan]:
    """The planner's n best placements, best first (fewer when fewer fit): `plan()` is the first; the
    others let a benchmark check the ranking against measurements. Raises PlanError like plan().

    Placements predicted within _NEAR of the fastest are ties the cost model cannot separate. If they
    all stream loads smaller than DISK_QUEUE_SATURATION read requests through the staging ring, the
    one with more staging bytes ahead of the computing unit comes first: paired runs of SmolLM2
    (bench_tiers --runner-up) found that one up to 10% faster at 50% and 33% budgets, because
    compute-bound stretches fill a shallow ring and idle the disk. Otherwise the faster prediction
    wins, where _TIE apart counts as equal, and between equals fewer bytes moved per step (robust to
    a cost model that is off), then sparing the resident tier."""
    p = _Planner(fp, hw, cfg, work)
    if fp.is_moe:  # experts as units: one placement (dense parts, then the hottest experts)
        return [plan_experts(p, router)]
    left = [(cand, p.predict(cand)) for cand in p.candidates()]
    if not left:
        raise p.explain()
    fastest = min(pred.total_s for _, pred in left)
    near = [cp for cp in left if cp[1].total_s <= fastest * (1 + _NEAR)]
    # depth matters where one load in flight does not saturate the disk (disk_bw_at): small loads
    by_depth = all(c.streamed and c.staging_bytes < DISK_QUEUE_SATURATION * READ_CHUNK for c, _ in near)
    ahead = {id(c): (p.lookahead(c.ring) - 1) * c.staging_bytes for c, _ in near} if by_depth else {}

    def better(a: tuple[_Candidate, Prediction], b: tuple[_Candidate, Prediction]) -> bool:
        da, db = ahead.get(id(a[0])), ahead.get(id(b[0]))
        if da is not None and db is not None and da != db:
            return da > db
        return _better(*a, *b)

    out = []
    while left and len(out) < n:
        best = left[0]
        for cp in left[1:]:
            if better(cp, best):
                best = cp
        left.remove(best)
        out.append(p.build(*best))
    return out


def _better(c: _Candidate, pred: Prediction, c0: _Candidate, pred0: Prediction) -> bool:
    if pred.total_s < pred0.total_s * (1 - _TIE):
        return True
    if pred.total_s > pred0.total_s * (1 + _TIE):
        return False
    # equal predicted time: prefer fewer bytes moved per step (robust to a cost model that is off),
    # then sparing the scarce resident tier, then the (slightly) faster one
    if c.moved_bytes != c0.moved_bytes:
        return c.moved_bytes < c0.moved_bytes
    if c.resident_bytes != c0.resident_bytes:
        return c.resident_bytes < c0.resident_bytes
    return pred.total_s < pred0.total_s


def evaluate(fp: ModelFootprint, hw: HardwareProfile, cfg: TierConfig, layers: Sequence[LayerPlacement], *,
             output_tier: str = RESIDENT, embedding_tier: str = RESIDENT, kv_tier: str = RESIDENT,
             ring_size: int = 2, work: Workload = Workload(), output_cpu_decode: bool = False) -> Prediction:
    """The cost model's prediction for a placement chosen by hand (budgets are not checked): lets a
    caller compare the planner's choice with an alternative, or a measurement with its prediction.
    Hybrid units (lp.cpu_decode, output_cpu_decode) compute on the CPU when the workload's rows per
    pass (its batch) are few enough for that to beat streaming them, as the runtime decides."""
    p = _Planner(fp, hw, cfg, work)
    if len(layers) != len(fp.layers):
        raise PlanError(f"{len(layers)} placements for {len(fp.layers)} layers", field="layers")
    lay_out = p.layout("layer")
    streamed, source = {}, {}
    for lp, lay in zip(layers, fp.layers):
        if lp.tier not in TIERS:
            raise PlanError(f"tier must be one of {', '.join(TIERS)}, got {lp.tier!r}", field=f"layers[{lp.index}]")
        groups = frozenset(g for g in GROUPS if any(t.role in lp.streamed_roles for t in lay.group_tensors(g)))
        if lp.tier != RESIDENT and groups:
            streamed[lp.index], source[lp.index] = groups, lp.tier
    if output_tier != RESIDENT:
        for i in lay_out.head:
            streamed[i], source[i] = frozenset(lay_out.units[i].groups), output_tier
    cpu = frozenset(lp.index for lp in layers if lp.cpu_decode and lp.index in streamed) | (
        frozenset(lay_out.head) if output_cpu_decode and output_tier != RESIDENT else frozenset())
    cand = _Candidate("layer", streamed, source, ring_size if streamed else 0, embedding_tier, kv_tier, 0, 0, 0, 0,
                      cpu if p.hybrid else frozenset())
    if cand.cpu and p.cpu_max_rows(cand) < work.batch:  # the runtime streams them in passes this large
        cand = dataclasses.replace(cand, cpu=frozenset())
    return p.predict(cand)
