"""Sequences and their KV slots, and the ragged batch one pass over the weights serves.

A Sequence owns one KV slot: per layer, keys and values (Hkv, n_ctx, hd) on that layer's KV device
in its KV dtype, allocated when the sequence opens and freed when it closes. `pos` counts the cached
tokens; a pass writes its tokens' keys at pos.. and advances pos only once the whole pass succeeded,
so a pass that fails leaves every sequence it was writing as it was before the pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from .errors import EngineError


class Sequence:
    """One generation's KV slot (see the module docstring). Use model.open_sequence()."""

    def __init__(self, owner, keys: list[torch.Tensor], vals: list[torch.Tensor], n_ctx: int):
        self.owner, self.n_ctx = owner, n_ctx
        self.keys, self.vals = keys, vals  # per layer (Hkv, n_ctx, hd)
        self.pos = 0
        self.tree: tuple[int, tuple[int, ...]] | None = None  # (start, parents) of the last pass, if a tree

    @property
    def closed(self) -> bool:
        return self.keys is None

    def check_open(self) -> None:
        if self.closed:
            raise EngineError("the sequence is closed", field="sequence")

    def truncate(self, n: int) -> None:
        """Keep the first n cached tokens (speculative rejection, a new turn over a shared prefix)."""
        self.check_open()
        if not isinstance(n, int) or not 0 <= n <= self.pos:
            raise EngineError(f"cannot keep {n!r} of {self.pos} cached tokens", field="n")
        self.pos, self.tree = n, None

    def keep_path(self, nodes: Seq[int]) -> None:
        """After a tree pass: keep only the KV of `nodes` (indices among that pass's tokens, a path
        from the root down), moved to be contiguous after the tokens cached before the pass."""
        self.check_open()
        if self.tree is None:
            raise EngineError("keep_path needs the sequence's last pass to be a tree pass", field="nodes")
        start, parents = self.tree
        nodes = [int(j) for j in nodes]
        prev = -1
        for j in nodes:
            if not 0 <= j < len(parents) or parents[j] != prev:
                raise EngineError(f"nodes {nodes} are not a path from the root of the tree {list(parents)}",
                                  field="nodes")
            prev = j
        if nodes != list(range(len(nodes))):  # the path is not already in place
            for keys, vals in zip(self.keys, self.vals):
                idx = torch.tensor(nodes, device=keys.device) + start
                keys[:, start:start + len(nodes)] = keys.index_select(1, idx)
                vals[:, start:start + len(nodes)] = vals.index_select(1, idx)
        self.pos, self.tree = start + len(nodes), None

    def close(self) -> None:
        """Free the KV slot (idempotent)."""
        if not self.closed:
            self.keys = self.vals = None
            self.owner.sequences.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tree_depths(parents: Seq[int]) -> list[int]:
    """Depth of each node of a draft tree (roots, parent -1, have depth 0); parents come first."""
    depth: list[int] = []
    for j, p in enumerate(parents):
        if not isinstance(p, int) or not -1 <= p < j:
            raise EngineError(f"parents[{j}] = {p!r}: each parent must be -1 or an earlier node", field="trees")
        depth.append(0 if p < 0 else depth[p] + 1)
    return depth


def tree_mask(parents: Seq[int]) -> torch.Tensor:
    """(T, T) bool: node t sees node j iff j is t or one of its ancestors."""
    T = len(parents)
    m = torch.eye(T, dtype=torch.bool)
    for t, p in enumerate(parents):
        if p >= 0:
            m[t] |= m[p]
    return m


@dataclass(frozen=True, slots=True)
class Row:
    """One sequence's share of a pass: tokens offset..offset+T of the packed batch, cached at start.."""

    seq: Sequence
    offset: int
    T: int
    start: int
    tree: torch.Tensor | None  # (T, T) bool on the host, or None: causal


class Batch:
    """A ragged pass: every row's new tokens packed along one axis (no padding), their rope positions,
    and per row where its keys go. Device copies of the small index tensors are made once per device."""

    def __init__(self, rows: list[Row], ids: torch.Tensor, positions: torch.Tensor, want: Seq[int] | None):
        """want: per row, how many of its last tokens need logits (None: every token of every row)."""
        self.rows, self.ids, self.positions = rows, ids, positions  # (N,) int64 host
        self.want = None if want is None else list(want)
        self.last_only = want is not None  # the head runs only on the `last` tokens
        self.last = torch.tensor([] if want is None else  # (M,) the tokens whose logits the pass returns
                                 [j for r, n in zip(rows, want) for j in range(r.offset + r.T - n, r.offset + r.T)],
                                 dtype=torch.int64)
        self._on: dict[torch.device, BatchOn] = {}

    @property
    def n_tokens(self) -> int:
        return self.ids.numel()

    def on(self, device: torch.device) -> "BatchOn":
        """The batch's index tensors on `device`, copied there once."""
        got = self._on.get(device)
        if got is None:
            got = self._on[device] = BatchOn(self.positions.to(device), [None if r.tree is None else r.tree.to(device)
                                                                         for r in self.rows], self.last.to(device))
        return got


@dataclass(frozen=True, slots=True)
class BatchOn:
    positions: torch.Tensor  # (N,) int64 rope positions
    trees: list[torch.Tensor | None]  # per row: (T, T) bool tree mask, or None (causal)
    last: torch.Tensor  # (M,) int64: the tokens whose logits the pass returns, in the packed axis
