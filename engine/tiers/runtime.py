"""From a frozen Plan to live stores: the resident store, the reader and the streaming scheduler."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..gguf_file import GGUFFile, TensorInfo
from ..spec import ModelSpec
from ..weights import GlobalWeights, LayerLayout, QWeight, global_weights
from .io import FileReader
from .scheduler import ResidentStore, TieredWeights, Unit


@dataclass(frozen=True, slots=True)
class Placement:
    """What the runtime needs of a plan: per unit (blocks 0..L-1, then the output head), the names of
    the tensors that stream from disk; whether the embedding rows are resident; the ring depth."""

    streamed: tuple[frozenset[str], ...]
    embedding_resident: bool
    ring_size: int

    @classmethod
    def from_plan(cls, plan, layouts: Sequence[LayerLayout], head: TensorInfo) -> "Placement":
        streamed = []
        for lp, lay in zip(plan.layers, layouts):
            if lp.tier == "resident":
                streamed.append(frozenset())
            else:
                streamed.append(frozenset(t.name for role, t in lay.tensors if role not in lp.resident_roles))
        streamed.append(frozenset() if plan.output_tier == "resident" else frozenset({head.name}))
        return cls(tuple(streamed), plan.embedding_tier == "resident", plan.ring_size)

    @classmethod
    def uniform(cls, layouts: Sequence[LayerLayout], head: TensorInfo, stream: bool, ring_size: int = 2):
        """Everything resident, or every block and the head streamed (tests, tools)."""
        s = [frozenset(t.name for _, t in lay.tensors) if stream else frozenset() for lay in layouts]
        s.append(frozenset({head.name}) if stream else frozenset())
        return cls(tuple(s), not stream, ring_size)


def head_info(f: GGUFFile, spec: ModelSpec) -> TensorInfo:
    return f.tensor("token_embd.weight" if spec.tied_output else "output.weight")


def build_weights(f: GGUFFile, spec: ModelSpec, layouts: Sequence[LayerLayout], placement: Placement,
                  reader: FileReader, tracer=None) -> tuple[TieredWeights, GlobalWeights]:
    head = head_info(f, spec)
    units = [Unit(f"blk.{lay.index}", tuple(t for _, t in lay.tensors), lay.bind) for lay in layouts]
    units.append(Unit("output", (head,), lambda view: QWeight(head.name, head.fmt, head.shape, view(head))))
    resident = [t for u, s in zip(units, placement.streamed) for t in u.tensors if t.name not in s]
    embd = f.tensor("token_embd.weight")
    if placement.embedding_resident and all(t.name != embd.name for t in resident):
        resident.append(embd)
    store = ResidentStore(reader, resident)
    glob = global_weights(f, spec)
    if embd in store:  # embedding rows from the resident copy, else from the (page-cached) map
        glob = GlobalWeights(QWeight(embd.name, embd.fmt, embd.shape, store.view(embd)), glob.output_norm,
                             glob.rope_freqs)
    weights = TieredWeights(units, placement.streamed, reader, store, placement.ring_size, tracer)
    return weights, glob
