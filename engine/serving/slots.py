"""The model-facing side of serving: sequences that own a KV slot, and passes over the weights for
rows of several sequences.

`Slots(model)` uses the model's own `open_sequence()` / `step()` (one pass over the weights for all
rows) when it has them; otherwise a serialised fallback: one KV cache per sequence and one forward
per row, with the same results. Everything above this module talks to `Slots` only.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import EngineError


class _Seq:
    """Fallback sequence: its own KV cache (address space reserved, pages touched as written)."""

    __slots__ = ("cache", "pos")

    def __init__(self, model):
        from ..models.llama import KVCache

        self.cache = KVCache(model.spec, 1, model.n_ctx)
        self.pos = 0

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.pos:
            raise EngineError(f"cannot keep {n} of {self.pos} cached tokens", field="truncate")
        self.pos = n

    def close(self) -> None:
        self.cache = None


class Slots:
    def __init__(self, model):
        self.model = model
        self.native = hasattr(model, "open_sequence") and hasattr(model, "step")
        self.trees = self.native  # draft trees verified in one pass (tree attention mask, seq.keep_path)
        self.n_ctx = model.n_ctx

    def open(self):
        return self.model.open_sequence() if self.native else _Seq(self.model)

    @torch.inference_mode()
    def step(self, rows: Sequence[tuple[object, list[int]]], want: Sequence[int],
             trees: Sequence[list[int] | None] | None = None) -> list[torch.Tensor]:
        """rows: (sequence, new token ids); want[i]: how many last positions of row i need logits;
        trees[i]: row i's tree parents (see model.step) or None.
        -> per row fp32 logits (want[i], vocab). Each row's cache grows by its ids; an exception leaves
        the rows of the pass unusable (callers end their generations)."""
        for seq, ids in rows:
            if seq.pos + len(ids) > self.n_ctx:
                raise EngineError(f"context of {self.n_ctx} tokens exceeded ({seq.pos} + {len(ids)})",
                                  field="n_ctx")
        if trees is not None and all(t is None for t in trees):
            trees = None
        if self.native:
            out = self.model.step([(s, list(ids)) for s, ids in rows], last_only=max(want) == 1, trees=trees)
            return [o[-w:].float().cpu() for o, w in zip(out, want)]
        if trees is not None:
            raise EngineError("this model cannot verify draft trees", field="trees")
        m, res = self.model, []
        for (seq, ids), w in zip(rows, want):
            t = torch.tensor([ids], dtype=torch.int64)  # (1, T)
            m._check_ids(t)
            logits = m.net.forward(t, seq.pos, seq.cache, m.weights, w == 1)[0]  # (T or 1, vocab)
            seq.pos += len(ids)
            res.append(logits[-w:])
        return res
