"""From a frozen Plan to live stores: the resident store, the reader and the streaming scheduler."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ModelFormatError, PlanError
from ..gguf_file import GGUFFile, TensorInfo, coalesce
from ..spec import ModelSpec
from ..weights import EXPERT_ROLES, FileRows, GlobalWeights, LayerLayout, QWeight, expert_slice, global_weights
from .experts import ExpertStore, region_name
from .io import FileReader
from .planner import HOST, RESIDENT, TIERS
from .scheduler import HostStore, ResidentStore, TieredWeights, Unit
from .staging import staging_for


@dataclass(frozen=True, slots=True)
class Placement:
    """What the runtime needs of a plan, per unit (blocks 0..L-1, then the output head's row chunks):
    `streamed[i]` the names of the tensors that are not in the resident store and `sources[i]` where
    they come from ("disk": read from the model file every pass; "host": the exact-size pinned host
    store, read once at load; empty for resident units; default "disk"). The head's row ranges; the
    embedding's tier ("resident": the compute device, "host": the host store, "disk": the file's
    memory map; a tied embedding whose head is not resident looks rows up in the memory map); the
    ring depth and the size of one staging buffer (0: as the largest load needs). Hybrid compute:
    `cpu_units` compute on the CPU in passes of at most `cpu_max_rows` rows (batch x tokens).
    Mixture of experts: `expert_tiers[i]` (empty: block i's experts travel inside its unit) gives where
    each expert of block i lives (resident | host | disk); block i's unit is then its dense tensors only,
    and the non-resident experts come through an expert cache of `expert_cache` slots. `kv_host`: every
    layer's KV cache lives in host RAM, its attention computed there by the CPU (the plan's kv_tier
    "host" on a GPU)."""

    streamed: tuple[frozenset[str], ...]
    head_rows: tuple[tuple[int, int], ...]
    embedding_tier: str
    ring_size: int
    staging_bytes: int = 0
    sources: tuple[str, ...] = ()
    cpu_units: frozenset[int] = frozenset()
    cpu_max_rows: int = 0
    expert_tiers: tuple[tuple[str, ...], ...] = ()
    expert_cache: int = 0
    expert_slot_bytes: int = 0
    kv_host: bool = False

    def __post_init__(self):
        if self.embedding_tier not in TIERS:
            raise PlanError(f"must be one of {', '.join(TIERS)}, got {self.embedding_tier!r}", field="embedding_tier")
        for i, tiers in enumerate(self.expert_tiers):
            bad = [t for t in tiers if t not in TIERS]
            if bad:
                raise PlanError(f"expert tiers must be one of {', '.join(TIERS)}, got {bad[0]!r}",
                                field=f"expert_tiers[{i}]")
        if isinstance(self.expert_cache, bool) or not isinstance(self.expert_cache, int) or self.expert_cache < 0:
            raise PlanError(f"must be a slot count >= 0, got {self.expert_cache!r}", field="expert_cache")
        bad = [s for s in self.sources if s not in ("", "host", "disk")]
        if bad:
            raise PlanError(f"unit sources must be host or disk, got {bad[0]!r}", field="sources")

    def source(self, i: int) -> str:
        if not self.streamed[i]:
            return ""
        return self.sources[i] if i < len(self.sources) and self.sources[i] else "disk"

    @classmethod
    def from_plan(cls, plan, layouts: Sequence[LayerLayout], head: TensorInfo) -> Placement:
        streamed = [frozenset() if lp.tier == RESIDENT else
                    frozenset(t.name for role, t in lay.tensors if role in lp.streamed_roles)
                    for lp, lay in zip(plan.layers, layouts)]
        sources = [lp.tier if s else "" for lp, s in zip(plan.layers, streamed)]
        cpu = {lp.index for lp in plan.layers if lp.cpu_decode}
        vocab = head.shape[0]
        if plan.output_tier == RESIDENT:
            rows = ((0, vocab),)
        else:
            step = plan.output_chunk_rows
            rows = tuple((r, min(vocab, r + step)) for r in range(0, vocab, step))
        for r0, r1 in rows:
            if plan.output_cpu_decode:
                cpu.add(len(streamed))
            streamed.append(frozenset() if plan.output_tier == RESIDENT else frozenset({_rows_name(head, r0, r1)}))
            sources.append("" if plan.output_tier == RESIDENT else plan.output_tier)
        experts = {x.layer: x.tiers for x in plan.experts}
        return cls(tuple(streamed), rows, plan.embedding_tier, plan.ring_size, plan.staging_bytes, tuple(sources),
                   frozenset(cpu), plan.cpu_max_rows,
                   tuple(experts.get(i, ()) for i in range(len(layouts))) if experts else (),
                   plan.expert_cache, plan.expert_slot_bytes, plan.kv_tier == HOST)

    @classmethod
    def uniform(cls, layouts: Sequence[LayerLayout], head: TensorInfo, stream: bool, ring_size: int = 2,
                head_chunks: int = 1, source: str = "disk"):
        """Everything resident, or every block and the head (in `head_chunks` row chunks) streamed
        from `source` (the embedding then lives there too)."""
        s = [frozenset(t.name for _, t in lay.tensors) if stream else frozenset() for lay in layouts]
        vocab = head.shape[0]
        step = -(-vocab // head_chunks)
        rows = tuple((r, min(vocab, r + step)) for r in range(0, vocab, step))
        s += [frozenset({_rows_name(head, r0, r1)}) if stream else frozenset() for r0, r1 in rows]
        return cls(tuple(s), rows, source if stream else RESIDENT, ring_size,
                   sources=tuple(source if x else "" for x in s))


def _rows_name(head: TensorInfo, r0: int, r1: int) -> str:
    return head.name if (r0, r1) == (0, head.shape[0]) else f"{head.name}[{r0}:{r1}]"


def head_rows_info(head: TensorInfo, r0: int, r1: int, path: str | None = None) -> TensorInfo:
    """Rows r0..r1 of the output head as a tensor of its own (rows are contiguous in GGUF)."""
    if len(head.shape) != 2:
        raise ModelFormatError(f"expected a (vocab, dim) matrix, got shape {head.shape}", path=path, field=head.name)
    if not 0 <= r0 < r1 <= head.shape[0]:
        raise PlanError(f"rows [{r0}, {r1}) are not inside the {head.shape[0]} rows", path=path, field=head.name)
    rb = head.fmt.row_nbytes(head.shape[1], path=path, field=head.name)
    return TensorInfo(_rows_name(head, r0, r1), head.fmt, (r1 - r0, head.shape[1]), head.offset + r0 * rb,
                      (r1 - r0) * rb)


def head_info(f: GGUFFile, spec: ModelSpec) -> TensorInfo:
    return f.tensor("token_embd.weight" if spec.tied_output else "output.weight")


def build_weights(f: GGUFFile, spec: ModelSpec, layouts: Sequence[LayerLayout], placement: Placement,
                  reader: FileReader, device, tracer=None, cpu_threads: int | None = None,
                  cpu_activations: str = "int16") -> tuple[TieredWeights, GlobalWeights]:
    """The stores and the scheduler of a placement on `device`. Every tier is bound where the placement
    says: resident tensors in the device's memory, host-tier units in the host store (uploaded through
    the ring, or computed there by the CPU), disk units read through the ring."""
    staging = staging_for(device)
    head = head_info(f, spec)
    exp_tiers = {i: t for i, t in enumerate(placement.expert_tiers) if t}
    slices: dict[tuple[int, int], tuple[TensorInfo, ...]] = {}
    units = []
    for lay in layouts:
        if lay.index in exp_tiers:  # the dense part is the unit; every expert is one of its own
            stacked = dict((role, t) for role, t in lay.tensors if role in EXPERT_ROLES)
            if len(exp_tiers[lay.index]) != stacked["ffn_gate_exps"].shape[0]:
                raise PlanError(f"{len(exp_tiers[lay.index])} expert tiers for the {stacked['ffn_gate_exps'].shape[0]} "
                                f"experts of blk.{lay.index}", field=f"expert_tiers[{lay.index}]")
            for e in range(len(exp_tiers[lay.index])):
                slices[(lay.index, e)] = tuple(expert_slice(stacked[r], e) for r in EXPERT_ROLES)
            dense = tuple((role, t) for role, t in lay.tensors if role not in EXPERT_ROLES)
            lay = dataclasses.replace(lay, tensors=dense, runs=coalesce([(t.offset, t.nbytes) for _, t in dense]))
        units.append(Unit(f"blk.{lay.index}", tuple(t for _, t in lay.tensors), lay.bind))
    tiers = {key: exp_tiers[key[0]][key[1]] for key in slices}
    for r0, r1 in placement.head_rows:
        t = head_rows_info(head, r0, r1, f.path)
        units.append(Unit(f"output[{r0}:{r1}]", (t,), lambda view, layout, t=t: QWeight.of(t, view(t), layout(t))))
    if len(placement.streamed) != len(units):
        raise PlanError(f"the placement has {len(placement.streamed)} units, the model {len(units)}", field="streamed")
    resident = [t for u, s in zip(units, placement.streamed) for t in u.tensors if t.name not in s]
    resident += [t for key, ts in slices.items() if tiers[key] == RESIDENT for t in ts]
    embd = f.tensor("token_embd.weight")
    regions = {u.name: [t for t in u.tensors if t.name in placement.streamed[i]]
               for i, u in enumerate(units) if placement.source(i) == "host"}
    regions |= {region_name(*key): list(ts) for key, ts in slices.items() if tiers[key] == HOST}
    if not spec.tied_output:  # tied: the head's tensor, resident with it or else looked up in the map
        if placement.embedding_tier == RESIDENT:
            resident.append(embd)
        elif placement.embedding_tier == HOST:
            regions[embd.name] = [embd]
    # the device's layout for the matrices it computes, never for the embedding (its rows are looked up)
    store = ResidentStore(reader, resident, staging,
                          layout=lambda t: 1 if t.name == embd.name else device.row_interleave(t))
    host = HostStore(reader, regions, staging)
    glob = global_weights(f, spec)
    if embd in store:  # embedding rows from the resident copy, else the host store, else read from the file
        glob = dataclasses.replace(glob, token_embd=QWeight.of(embd, store.view(embd)))
    elif embd.name in host.plans:
        glob = dataclasses.replace(glob, token_embd=QWeight.of(embd, host.view(embd.name, embd)))
    elif hasattr(reader, "pread"):  # never from the map: a file truncated under the model is a WeightIOError,
        # not a SIGBUS (FileReader; kvikio's reader has no pread, so its embedding rows stay on the map)
        glob = dataclasses.replace(glob, token_embd=FileRows(embd.name, embd.fmt, embd.shape, embd.offset, reader.pread))
    cpu_device = device
    if (placement.cpu_units or placement.kv_host) and staging.separate:
        from ..device import CpuDevice

        # the KV cache it holds (CPU-computed layers, or all of it) keeps the plan's dtype
        cpu_device = CpuDevice(cpu_threads, kv_dtype=device.kv_dtype, activations=cpu_activations)
    experts = ExpertStore(slices, tiers, store, host, reader, staging, placement.expert_cache,
                          placement.expert_slot_bytes, tracer) if slices else None
    streamed = [s & {t.name for t in u.tensors} for u, s in zip(units, placement.streamed)]
    weights = TieredWeights(units, streamed, reader, store, placement.ring_size, staging, tracer,
                            slot_bytes=placement.staging_bytes, host=host,
                            sources=[placement.source(i) for i in range(len(units))], cpu_units=placement.cpu_units,
                            cpu_max_rows=placement.cpu_max_rows, device=device, cpu_device=cpu_device,
                            expert_store=experts, kv_host=placement.kv_host)
    weights.head_rows = placement.head_rows
    return weights, glob
