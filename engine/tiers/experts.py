"""Routed experts as units of their own: the expert cache and the reads of exactly the selected experts.

An MoE layer's experts live per expert in the resident store, the host store or the model file (the plan's
ExpertPlacement). `ExpertStore.routed(i, ids)` -- behind TieredWeights.experts -- hands the model the
experts its router selected: resident ones (and, on the CPU, host-tier ones) are views of their store;
the others come through the expert cache, `slots` buffers of one expert each (a host buffer the reader
fills; on a GPU also a device buffer the host bytes are uploaded to), kept in LRU order across layers and
passes. A miss reads only that expert's three slices (the reader's ReadPlan of their byte runs).

Order of work in a pass over layer i: `routed()` counts hits and misses and issues the reads of every
missing expert that has a free (or evictable) slot, all at once; the mapping it returns binds lazily: the
model takes the experts in `ids` order, and taking one waits for its bytes (reading them now if no slot
was free before) and lets the previous one's slot be reused, so a pass routing more experts to a layer
than the cache holds still runs. `hint(i + 1, guess)` issues reads for a later layer's likely experts into
free or least-recently-used slots without ever blocking; a wrong guess only costs its reads.

A read that fails is forgotten (its slot freed) and tried once more when needed; a second failure raises
WeightIOError and leaves the cache consistent, so the next pass reads the expert again.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from ..gguf_file import TensorInfo, coalesce
from ..weights import ExpertWeights, Layout, QWeight, View, plain_rows

RESIDENT, HOST, DISK = "resident", "host", "disk"


def region_name(i: int, e: int) -> str:
    """The host-store region (and trace label) of expert e of block i."""
    return f"blk.{i}.expert.{e}"


@dataclass(slots=True)
class ExpertStats:
    """Counters of the expert cache since load (or the last reset): lookups of non-resident experts that
    were cached (hits, a finished or running hinted read included) or not (misses); bytes the reader read
    for experts (alignment included), of which `hint_bytes` for hints; tokens routed through the first MoE
    layer (per-token figures divide by it)."""

    hits: int = 0
    misses: int = 0
    read_bytes: int = 0
    hint_bytes: int = 0
    hinted_used: int = 0
    tokens: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 1.0

    def snapshot(self) -> "ExpertStats":
        return dataclasses.replace(self)

    def since(self, old: "ExpertStats") -> "ExpertStats":
        """The counts accumulated after `old` (a snapshot)."""
        return ExpertStats(*(getattr(self, f.name) - getattr(old, f.name) for f in dataclasses.fields(self)))

    def line(self) -> str:
        per = self.read_bytes / self.tokens / 2**20 if self.tokens else 0.0
        return f"experts: cache hit {100 * self.hit_rate:.0f}%, {per:.1f} MiB read/token"


@dataclass(slots=True)
class _Entry:
    """What a cache slot holds: expert `key`, its read (None when done) and its upload (None until made)."""

    key: tuple[int, int]
    slot: int
    ticket: object = None
    upload: object = None
    hinted: bool = False
    bound: ExpertWeights | None = None


@dataclass(slots=True)
class _Pass:
    """The experts of the layer being computed: pinned slots, and the ones still waiting for a slot."""

    layer: int = -1
    ids: tuple = ()
    pinned: set = field(default_factory=set)
    waiting: list = field(default_factory=list)
    taken: _Entry | None = None


class ExpertStore:
    def __init__(self, slices: Mapping[tuple[int, int], tuple[TensorInfo, ...]], tiers: Mapping[tuple[int, int], str],
                 resident, host, reader, staging, slots: int, slot_bytes: int = 0, tracer=None):
        """slices[(i, e)]: expert e of block i as its (gate, up, down) TensorInfos (engine.weights.expert_slice);
        tiers[(i, e)]: where it lives; `resident`/`host`: the stores holding the resident / host-tier ones."""
        self.slices, self.tiers, self.reader, self.staging, self.tracer = slices, dict(tiers), reader, staging, tracer
        self.layers = sorted({i for i, _ in slices})
        self.slices_layers = frozenset(self.layers)
        self.stats = ExpertStats()
        self._file_changed = getattr(reader, "file_changed", lambda: False)
        self._fixed: dict[tuple[int, int], ExpertWeights] = {}
        for key, ts in slices.items():
            t = self.tiers[key]
            if t == RESIDENT:
                self._fixed[key] = _bind(ts, resident.view, resident.layout)
            elif t == HOST and not staging.separate:  # the CPU computes from the host store in place
                self._fixed[key] = _bind(ts, lambda info, key=key: host.view(region_name(*key), info))
        self.host = host
        moving = [k for k in slices if k not in self._fixed]
        self.plans = {k: (host.plans[region_name(*k)] if self.tiers[k] == HOST else
                          reader.plan(coalesce([(t.offset, t.nbytes) for t in slices[k]]))) for k in moving}
        need = max((p.size for p in self.plans.values()), default=0)
        self.slot_bytes = -(-max(slot_bytes, need) // reader.align) * reader.align if moving else 0
        self.n_slots = min(slots, len(moving)) if moving else 0
        if moving and self.n_slots < 1:
            self.n_slots = 1
        disk = any(self.tiers[k] == DISK for k in moving)
        self.arena = staging.alloc_host(self.n_slots * self.slot_bytes if disk else 0, reader.align)
        self.host_slots = [self.arena[s * self.slot_bytes:(s + 1) * self.slot_bytes] if disk else None
                           for s in range(self.n_slots)]
        self.dev_slots = [staging.alloc_device(self.slot_bytes) for _ in range(self.n_slots)]
        self.outbound: list = [None] * self.n_slots  # the last upload out of each host slot
        self.lru: OrderedDict[tuple[int, int], _Entry] = OrderedDict()  # least recently used first
        self.free = list(range(self.n_slots - 1, -1, -1))
        self.cur = _Pass()

    @property
    def wants_hints(self) -> bool:
        return self.n_slots > 0

    @property
    def cache_bytes(self) -> int:
        return self.arena.numel() + sum(d.numel() for d in self.dev_slots)

    # -- the pass ---------------------------------------------------------------------------------------
    def routed(self, i: int, ids: Sequence[int], rows: int | None) -> Mapping[int, ExpertWeights]:
        self._end_pass()
        if i == self.layers[0]:
            self.stats.tokens += rows or 1
            if self._file_changed():  # the file changed under the model: nothing cached stays
                self.clear()
        self.cur = _Pass(i, tuple(ids))
        hits = misses = 0
        for e in ids:
            key = (i, e)
            if key in self._fixed:
                continue
            ent = self.lru.get(key)
            if ent is not None:
                hits += 1
                self.stats.hinted_used += ent.hinted
                ent.hinted = False
                self.lru.move_to_end(key)
                self.cur.pinned.add(key)
            else:
                misses += 1
                self.cur.waiting.append(key)
        self.stats.hits += hits
        self.stats.misses += misses
        if self.tracer and (hits or misses):
            t = self.tracer.now()
            st = self.stats
            self.tracer.span(f"experts blk.{i}", t, t, args={"hits": hits, "misses": misses,
                                                              "hit_rate_so_far": round(st.hit_rate, 4),
                                                              "read_bytes_so_far": st.read_bytes})
        self._issue_waiting()
        return _Routed(self, i, tuple(ids))

    def take(self, i: int, e: int) -> ExpertWeights:
        key = (i, e)
        got = self._fixed.get(key)
        if got is not None:
            return got
        prev, self.cur.taken = self.cur.taken, None
        if prev is not None:  # the model has issued that expert's compute: its slot may be reused
            self.staging.release(prev.upload)
            self.cur.pinned.discard(prev.key)
            self._issue_waiting()
        ent = self.lru.get(key)
        if ent is None:  # no slot was free when the pass began: take one now
            if key in self.cur.waiting:
                self.cur.waiting.remove(key)
            ent = self._start(key, block=True)
            if ent is None:
                self._steal()
                ent = self._start(key, block=True)
            self.cur.pinned.add(key)
        tr = self.tracer
        t0 = tr.now() if tr else 0.0
        try:
            self._ready(ent)
        except Exception:  # a failed read (perhaps an old hint): once more, then the error stands
            self._drop(ent)
            ent = self._start(key, block=True)  # the drop freed a slot
            self.cur.pinned.add(key)
            try:
                self._ready(ent)
            except BaseException:
                self._drop(ent)
                raise
        except BaseException:  # Ctrl-C: the read may still be writing; forget the slot's contents
            self._drop(ent, wait=True)
            raise
        if tr:
            tr.span(f"wait expert {e} of blk.{i}", t0, tr.now())
        self.cur.taken = ent
        if ent.bound is None:
            data, plan = ent.upload.data, self.plans[key]
            ent.bound = _bind(self.slices[key], lambda t: data[(p := plan.where(t.offset)):p + t.nbytes])
        return ent.bound

    def hint(self, i: int, ids: Sequence[int]) -> None:
        """Start reads of block i's likely experts into free or least recently used, unpinned, idle slots.
        Guesses not yet used hold at most n_slots - len(ids) slots, so the pass that comes before block i
        (the model may hint before asking for its own experts) keeps as many slots for what it needs."""
        room = self.n_slots - len(ids) - sum(1 for ent in self.lru.values() if ent.hinted)
        for e in ids:
            key = (i, e)
            if key in self._fixed or key in self.lru or key not in self.slices:
                continue
            if room <= 0:
                return
            room -= 1
            ent = self._start(key, block=False)
            if ent is None:
                return
            ent.hinted = True
            self.stats.hint_bytes += self._nbytes(key)

    def clear(self) -> None:
        """Forget every cached expert (waiting for reads in flight)."""
        self._end_pass()
        for ent in list(self.lru.values()):
            self._drop(ent, wait=True)

    def close(self) -> None:
        for ent in self.lru.values():
            if ent.ticket is not None:
                ent.ticket.cancel()

    # -- slots ------------------------------------------------------------------------------------------
    def _end_pass(self) -> None:
        if self.cur.taken is not None:
            self.staging.release(self.cur.taken.upload)
        self.cur = _Pass()

    def _issue_waiting(self) -> None:
        while self.cur.waiting:
            ent = self._start(self.cur.waiting[0], block=False)
            if ent is None:
                return
            self.cur.waiting.pop(0)
            self.cur.pinned.add(ent.key)

    def _steal(self) -> None:
        """Every slot is pinned by this pass (more experts than slots, none taken yet): give up the slot of
        the pinned expert the model will take last; it is brought back when taken."""
        order = {e: n for n, e in enumerate(self.cur.ids)}
        key = max(self.cur.pinned, key=lambda k: order.get(k[1], -1))
        self._drop(self.lru[key], wait=True)
        self.cur.waiting.append(key)

    def _victim(self, block: bool) -> int | None:
        """A slot to reuse: a free one, else the least recently used unpinned entry's (idle, unless block)."""
        if self.free:
            return self.free.pop()
        for key, ent in self.lru.items():
            if key in self.cur.pinned:
                continue
            if ent.ticket is not None and not ent.ticket.done():
                if not block:
                    continue
            self._drop(ent, wait=True)
            return self.free.pop()
        return None

    def _start(self, key: tuple[int, int], block: bool) -> _Entry | None:
        """Bring `key` into a slot: issue its read (disk) or its upload (host tier on a GPU)."""
        s = self._victim(block)
        if s is None:
            return None
        st, plan = self.staging, self.plans[key]
        ent = _Entry(key, s)
        if self.tiers[key] == DISK:
            out = self.outbound[s]
            if out is not None and not st.host_free(out):
                st.wait_host_free(out)
            ent.ticket = self.reader.submit(plan, self.host_slots[s], region_name(*key))
            self.stats.read_bytes += self._nbytes(key)
        else:  # host tier on a separate device: one copy, ordered after the slot's last release
            ent.upload = st.upload(self.host.region(region_name(*key)), self.dev_slots[s], plan.size)
        self.lru[key] = ent
        return ent

    def _ready(self, ent: _Entry) -> None:
        """The entry's bytes are where the kernels read them (the compute stream waits for the copy)."""
        if ent.ticket is not None:
            ent.ticket.wait()
            ent.ticket = None
        if ent.upload is None:
            s = ent.slot
            ent.upload = self.outbound[s] = self.staging.upload(self.host_slots[s], self.dev_slots[s],
                                                                self.plans[ent.key].size)
        self.staging.wait(ent.upload)

    def _drop(self, ent: _Entry, wait: bool = False) -> None:
        if ent.ticket is not None and wait:
            try:
                ent.ticket.wait()
            except BaseException:
                pass
        if self.lru.get(ent.key) is ent:
            del self.lru[ent.key]
            self.free.append(ent.slot)
        self.cur.pinned.discard(ent.key)

    def _nbytes(self, key: tuple[int, int]) -> int:
        return sum(n for _, n, _, _ in self.plans[key].spans)


def _bind(ts: Sequence[TensorInfo], view: View, layout: Layout = plain_rows) -> ExpertWeights:
    return ExpertWeights(*(QWeight.of(t, view(t), layout(t)) for t in ts))


class _Routed(Mapping):
    """The experts of one layer's pass, bound when taken (in `ids` order, one at a time)."""

    def __init__(self, store: ExpertStore, i: int, ids: tuple[int, ...]):
        self.store, self.i, self.ids = store, i, ids

    def __getitem__(self, e: int) -> ExpertWeights:
        if e not in self.ids:
            raise KeyError(e)
        return self.store.take(self.i, e)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

