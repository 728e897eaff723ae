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
    """What the runtime needs of a plan: per unit (blocks 0..L-1, then the output head's row chunks),
    the names of the tensors that stream from disk; the head's row ranges; whether the embedding rows
    are resident; the ring depth and the size of one staging buffer (0: as the largest load needs)."""

    streamed: tuple[frozenset[str], ...]
    head_rows: tuple[tuple[int, int], ...]
    embedding_resident: bool
    ring_size: int
    staging_bytes: int = 0

    @classmethod
    def from_plan(cls, plan, layouts: Sequence[LayerLayout], head: TensorInfo) -> "Placement":
        streamed = [frozenset() if lp.tier == "resident" else
                    frozenset(t.name for role, t in lay.tensors if role in lp.streamed_roles)
                    for lp, lay in zip(plan.layers, layouts)]
        vocab = head.shape[0]
        if plan.output_tier == "resident":
            rows = ((0, vocab),)
        else:
            step = plan.output_chunk_rows
            rows = tuple((r, min(vocab, r + step)) for r in range(0, vocab, step))
        for r0, r1 in rows:
            streamed.append(frozenset() if plan.output_tier == "resident" else frozenset({_rows_name(head, r0, r1)}))
        return cls(tuple(streamed), rows, plan.embedding_tier != "disk", plan.ring_size, plan.staging_bytes)

    @classmethod
    def uniform(cls, layouts: Sequence[LayerLayout], head: TensorInfo, stream: bool, ring_size: int = 2,
                head_chunks: int = 1):
        """Everything resident, or every block and the head (in `head_chunks` row chunks) streamed."""
        s = [frozenset(t.name for _, t in lay.tensors) if stream else frozenset() for lay in layouts]
        vocab = head.shape[0]
        step = -(-vocab // head_chunks)
        rows = tuple((r, min(vocab, r + step)) for r in range(0, vocab, step))
        s += [frozenset({_rows_name(head, r0, r1)}) if stream else frozenset() for r0, r1 in rows]
        return cls(tuple(s), rows, not stream, ring_size)


def _rows_name(head: TensorInfo, r0: int, r1: int) -> str:
    return head.name if (r0, r1) == (0, head.shape[0]) else f"{head.name}[{r0}:{r1}]"


def head_rows_info(head: TensorInfo, r0: int, r1: int) -> TensorInfo:
    """Rows r0..r1 of the output head as a tensor of its own (rows are contiguous in GGUF)."""
    rb = head.fmt.row_nbytes(head.shape[1])
    return TensorInfo(_rows_name(head, r0, r1), head.fmt, (r1 - r0, head.shape[1]), head.offset + r0 * rb,
                      (r1 - r0) * rb)


def head_info(f: GGUFFile, spec: ModelSpec) -> TensorInfo:
    return f.tensor("token_embd.weight" if spec.tied_output else "output.weight")


def build_weights(f: GGUFFile, spec: ModelSpec, layouts: Sequence[LayerLayout], placement: Placement,
                  reader: FileReader, device, tracer=None) -> tuple[TieredWeights, GlobalWeights]:
    from ..cuda.device import staging_for

    staging = staging_for(device)
    head = head_info(f, spec)
    units = [Unit(f"blk.{lay.index}", tuple(t for _, t in lay.tensors), lay.bind) for lay in layouts]
    for r0, r1 in placement.head_rows:
        t = head_rows_info(head, r0, r1)
        units.append(Unit(f"output[{r0}:{r1}]", (t,), lambda view, t=t: QWeight(t.name, t.fmt, t.shape, view(t))))
    resident = [t for u, s in zip(units, placement.streamed) for t in u.tensors if t.name not in s]
    embd = f.tensor("token_embd.weight")
    if placement.embedding_resident and all(t.name != embd.name for t in resident):
        resident.append(embd)
    store = ResidentStore(reader, resident, staging)
    glob = global_weights(f, spec)
    if embd in store:  # embedding rows from the resident copy, else from the (page-cached) map
        glob = GlobalWeights(QWeight(embd.name, embd.fmt, embd.shape, store.view(embd)), glob.output_norm,
                             glob.rope_freqs)
    weights = TieredWeights(units, placement.streamed, reader, store, placement.ring_size, staging, tracer,
                            slot_bytes=placement.staging_bytes)
    weights.head_rows = placement.head_rows
    return weights, glob
