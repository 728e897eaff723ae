"""The pipeline the prediction simulates: units in order, loads through a ring of staging buffers on
links that serve one load at a time, compute in order on the device(s)."""
from __future__ import annotations

import math


def _simulate(seq, lookahead: int, start_s: float, steps: int) -> list[float]:
    """Compute end time of each step. seq: per unit (compute seconds, load stages ((link, seconds), ...))."""
    link_free: dict[str, float] = {}
    done: list[float] = []  # compute end of each streamed unit, in load order
    t, ends = 0.0, []
    for _ in range(steps):
        t += start_s
        for compute, stages in seq:
            if stages:
                m = len(done)
                ready = done[m - lookahead] if m >= lookahead else 0.0
                for link, dur in stages:
                    ready = max(ready, link_free.get(link, 0.0)) + dur
                    link_free[link] = ready
                t = max(t, ready)
            t += compute
            if stages:
                done.append(t)
        ends.append(t)
    return ends


def _steady_state(seq, lookahead: int, start_s: float) -> float:
    n_streamed = sum(1 for _, s in seq if s)
    if not n_streamed:
        return start_s + sum(c for c, _ in seq)
    warm = 3 + math.ceil(2 * lookahead / n_streamed)
    measure = 4
    ends = _simulate(seq, lookahead, start_s, warm + measure)
    return (ends[-1] - ends[-1 - measure]) / measure


def _one_pass(seq, lookahead: int, start_s: float) -> float:
    return _simulate(seq, max(1, lookahead), start_s, 1)[0]
