"""The model-facing side of serving: sequences that own a KV slot, and passes over the weights for
rows of several sequences.

`Slots(model)` uses the model's `open_sequence()` / `step()`: one pass over the weights for all rows.
Everything above this module talks to `Slots` only.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import EngineError


class Slots:
    def __init__(self, model):
        self.model = model
        self.trees = True  # draft trees verified in one pass (tree attention mask, seq.keep_path)
        self.n_ctx = model.n_ctx

    def open(self):
        return self.model.open_sequence()

    @torch.inference_mode()
    def step(self, rows: Sequence[tuple[object, list[int]]], want: Sequence[int],
             trees: Sequence[list[int] | None] | None = None) -> list[torch.Tensor]:
        """rows: (sequence, new token ids); want[i]: how many last positions of row i need logits;
        trees[i]: row i's tree parents (see model.step) or None.
        -> per row fp32 logits (want[i], vocab) on the compute device (the output head runs only on
        those positions). Each row's cache grows by its ids; an exception leaves every row as it was
        before the pass (model.step), and callers end the pass's generations."""
        for seq, ids in rows:
            if seq.pos + len(ids) > self.n_ctx:
                raise EngineError(f"context of {self.n_ctx} tokens exceeded ({seq.pos} + {len(ids)})",
                                  field="n_ctx")
        if trees is not None and all(t is None for t in trees):
            trees = None
        return self.model.step([(s, list(ids)) for s, ids in rows], want=list(want), trees=trees)
