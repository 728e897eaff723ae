"""The streaming scheduler: the weight provider the model pulls layers from.

Stores. Resident units are bound once over the resident store (device memory; on CUDA loaded through
two small pinned bounce buffers, or by GPUDirect reads). Host-tier units live in the host store:
exact-size page-locked RAM read once at load. On the CPU the host store *is* compute memory, so
host-tier units are bound there once, like resident ones (the CPU has no separate host tier).

Ring. Streamed units cycle through k slots (a device buffer each; a pinned host buffer each where
disk units bounce through host memory). While unit n computes, units n+1..n+k-1 are being read and
uploaded: a disk unit's read is issued as soon as its host slot is free (the copy out of it has
finished), its upload as soon as the read has completed and the slot's fence has been recorded
(the unit k steps back was released); a host-tier unit's upload needs only the fence. Completions
are polled at every layer() and release(), which never block the host except layer() waiting for
the bytes it returns. The ring wraps into the next pass, so the first units of the next token load
while the last ones compute. When every streamed unit owns a slot (k >= units), each is read and
uploaded once and stays.

Hybrid compute. Units in `cpu_units` compute on the CPU (over the host store) in passes of at most
`cpu_max_rows` rows and stream to the device otherwise: the ring runs one sequence per phase and
restarts when a pass of the other phase begins.

Experts. An MoE block whose experts are units of their own (Placement.expert_tiers) is a unit of its
dense tensors; `experts(i, ids, rows)` hands out the routed experts from the expert store
(engine.tiers.experts: resident views or the expert cache), `hint_experts` starts reads for a later
block's likely experts. Experts inside a whole-layer unit are slices of that unit's bytes.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import PlanError
from ..gguf_file import TensorInfo, coalesce
from ..weights import Layout, View, interleave_rows, plain_rows
from .io import FileReader, ReadPlan, Ticket
from .staging import Upload

BOUNCE_BYTES = 64 << 20  # pinned bounce buffer for loading the resident store onto a device


@dataclass(frozen=True, slots=True)
class Unit:
    """A group of tensors loaded together (a block, or the output head) and how to bind them: bind(view,
    layout) over where their bytes are and how their rows are laid out (engine.weights View, Layout)."""

    name: str
    tensors: tuple[TensorInfo, ...]
    bind: Callable[[View, Layout], Any]


def _runs(tensors) -> tuple[tuple[int, int], ...]:
    return coalesce([(t.offset, t.nbytes) for t in tensors])


class ResidentStore:
    """Tensors copied into compute-device memory at load, read through the same reader (O_DIRECT when
    possible). On a separate device the bytes pass through two pinned bounce buffers of at most
    `bounce` bytes (or go straight to the device with GPUDirect reads): the whole store is never
    pinned. In host memory (the CPU computes from it) each matrix is then laid out in place as
    `layout(t)` asks (engine.weights.interleave_rows; the device's row_interleave): `layout` says how
    each of its tensors ended up."""

    def __init__(self, reader: FileReader, tensors: Sequence[TensorInfo], staging, label: str = "resident weights",
                 bounce: int = BOUNCE_BYTES, layout: Layout = plain_rows):
        self.plan: ReadPlan = reader.plan(_runs(tensors))
        self._groups: dict[str, int] = {}
        if not tensors:
            self.buf = torch.empty(0, dtype=torch.uint8)
        elif not staging.separate:
            self.buf = staging.alloc_host(self.plan.size, reader.align)
            reader.submit(self.plan, self.buf, label).wait()
            for t in tensors:
                if (g := layout(t)) != 1:
                    at = self.plan.where(t.offset)
                    interleave_rows(self.buf[at:at + t.nbytes], t.fmt, t.shape, g)
                    self._groups[t.name] = g
        else:
            self.buf = staging.alloc_device(self.plan.size)
            if getattr(reader, "device_reads", False):
                reader.submit(self.plan, self.buf, label).wait()
            else:
                _load_through(reader, staging, self.plan, self.buf, label, bounce)
        self._views = {t.name: self.buf[(p := self.plan.where(t.offset)):p + t.nbytes] for t in tensors}

    @property
    def nbytes(self) -> int:
        return self.plan.size

    def view(self, t: TensorInfo) -> torch.Tensor:
        return self._views[t.name]

    def layout(self, t: TensorInfo) -> int:
        return self._groups.get(t.name, 1)

    def __contains__(self, t: TensorInfo) -> bool:
        return t.name in self._views


def _load_through(reader, staging, plan: ReadPlan, dev: torch.Tensor, label: str, bounce: int) -> None:
    """plan's bytes -> dev through two pinned bounce buffers (read one while the other uploads)."""
    parts = plan.pieces(bounce)
    size = max(p.size for _, p in parts)
    hosts = [staging.alloc_host(size, reader.align) for _ in range(min(2, len(parts)))]
    pending: list[Any] = [None] * len(hosts)
    for j, (dest, part) in enumerate(parts):
        s = j % len(hosts)
        if pending[s] is not None:
            staging.wait_host_free(pending[s])
        reader.submit(part, hosts[s], label).wait()
        pending[s] = staging.upload(hosts[s], dev[dest:dest + part.size], part.size)
    for up in pending:
        staging.wait_host_free(up)  # the copies are in stream order: complete on return


class HostStore:
    """The host tier: the bytes of `regions` (name -> tensors, each region a ReadPlan of its own) in
    one exact-size page-locked allocation on CUDA (aligned RAM on the CPU), read once at load."""

    def __init__(self, reader: FileReader, regions: Mapping[str, Sequence[TensorInfo]], staging):
        self.plans = {name: reader.plan(_runs(ts)) for name, ts in regions.items() if ts}
        self.offsets, total = {}, 0
        for name, p in self.plans.items():
            self.offsets[name] = total
            total += -(-p.size // reader.align) * reader.align
        self.buf = staging.alloc_host(total, reader.align) if total else torch.empty(0, dtype=torch.uint8)
        tickets = [reader.submit(p, self.region(name), f"{name} (host tier)") for name, p in self.plans.items()]
        for t in tickets:
            t.wait()

    @property
    def nbytes(self) -> int:
        return self.buf.numel()

    def region(self, name: str) -> torch.Tensor:
        off = self.offsets[name]
        return self.buf[off:off + self.plans[name].size]

    def view(self, name: str, t: TensorInfo) -> torch.Tensor:
        p = self.plans[name].where(t.offset)
        return self.region(name)[p:p + t.nbytes]


class TieredWeights:
    """Weight provider over a plan. `layer(i, rows)` blocks until unit i's bytes are ready where
    `device_for(i, rows)` computes it; `release(i)` after its compute has been issued."""

    def __init__(self, units: Sequence[Unit], streamed: Sequence[frozenset[str]], reader: FileReader,
                 resident: ResidentStore, ring_size: int, staging, tracer=None, slot_bytes: int = 0, *,
                 host: HostStore | None = None, sources: Sequence[str] = (), cpu_units: frozenset[int] = frozenset(),
                 cpu_max_rows: int = 0, device=None, cpu_device=None, expert_store=None,
                 kv_host: bool = False):
        """streamed[i]: names of unit i's tensors that are not in the resident store (empty = fully
        resident); sources[i]: where they come from, "disk" (default) or "host" (the host store, region
        named after the unit). `staging`: the device's hooks (engine.tiers.staging). kv_host: every
        layer's KV cache lives with the CPU device (attention computed there), not only cpu_units'."""
        self.units, self.reader, self.resident, self.tracer = list(units), reader, resident, tracer
        self.expert_store = expert_store  # routed experts as units of their own (engine.tiers.experts)
        # FileReader tells when the file changed under the model (kvikio's reader and test doubles do not)
        self._file_changed = getattr(reader, "file_changed", lambda: False)
        self.staging, self.host, self.device, self.cpu_device = staging, host, device, cpu_device
        self.sources = [(sources[i] if i < len(sources) and sources[i] else "disk") if s else "resident"
                        for i, s in enumerate(streamed)]
        self.streamed_names = {i: s for i, s in enumerate(streamed) if s}
        self.cpu_units = frozenset(cpu_units) if staging.separate else frozenset()
        if any(self.sources[i] != "host" or self.streamed_names[i] != {t.name for t in units[i].tensors}
               for i in self.cpu_units):
            raise PlanError("units computed on the CPU must have every tensor in the host tier", field="cpu_units")
        self.cpu_max_rows = cpu_max_rows
        self.kv_host = kv_host and staging.separate  # without device memory, host RAM is the resident tier
        self.plans = {i: (host.plans[units[i].name] if self.sources[i] == "host" else
                          reader.plan(_runs(t for t in units[i].tensors if t.name in s)))
                      for i, s in self.streamed_names.items()}
        self._bound: dict[tuple[int, int], Any] = {}
        self.fixed = {i: u.bind(resident.view, resident.layout) for i, u in enumerate(units) if not streamed[i]}
        on_host = {i for i in self.streamed_names if self.sources[i] == "host"}
        self.host_bound = {i: self._bind(i, lambda t, i=i: host.view(units[i].name, t)) for i in on_host
                           if not staging.separate or i in self.cpu_units}
        if not staging.separate:  # the CPU computes from the host store itself
            self.fixed.update(self.host_bound)
        ring_all = [i for i in self.streamed_names if i not in self.fixed]
        self.sequences = {False: ring_all, True: [i for i in ring_all if i not in self.cpu_units]}
        longest = max(self.sequences.values(), key=len)
        self.k = min(ring_size, len(longest))
        need = max((self.plans[i].size for i in ring_all), default=0)
        if slot_bytes and need > slot_bytes:
            big = max(ring_all, key=lambda i: self.plans[i].size)
            raise PlanError(f"unit {units[big].name} needs {need} bytes of staging; the plan gives {slot_bytes} "
                            "per buffer")
        self.slot_bytes = -(-(slot_bytes or need) // reader.align) * reader.align if self.k else 0
        self.device_reads = staging.separate and getattr(reader, "device_reads", False)
        bounce = any(self.sources[i] == "disk" for i in ring_all) and not self.device_reads
        # one allocation sliced into the k host slots: whole 2 MiB pages are huge pages, which O_DIRECT
        # fills at ~2x the speed of 4 KiB pages; none when nothing bounces through host memory
        self.arena = staging.alloc_host(self.k * self.slot_bytes if bounce else 0, reader.align)
        self.slots = [self.arena[s * self.slot_bytes:(s + 1) * self.slot_bytes] if bounce else None
                      for s in range(self.k)]
        self.dev_slots = [staging.alloc_device(self.slot_bytes) for _ in range(self.k)]
        self.head_rows: tuple[tuple[int, int], ...] = ()  # row ranges of the head units (after the blocks)
        self._t_ready = 0.0
        # per slot: what its host buffer holds or is being read (unit, ticket) and what its device
        # buffer holds or is being copied (unit, Upload); `held` the occurrence whose compute holds it
        self.host_unit: list[int | None] = [None] * self.k
        self.tickets: list[Ticket | None] = [None] * self.k
        self.dev_unit: list[int | None] = [None] * self.k
        self.uploads: list[Any] = [None] * self.k
        self.waited = [False] * self.k
        self.outbound: list[Any] = [None] * self.k  # the last upload read from the host slot
        self.small = False
        self.seq = self.sequences[False]
        self.cur = 0  # occurrence number of the next streamed unit to consume
        self._held: int | None = None  # occurrence consumed by layer() and not yet released
        self._taken: tuple[int, Any] = (-1, None)  # the unit layer() returned last, for experts()
        self._stale = False  # a wait was interrupted: drain the ring before using it again
        self._pump()

    # -- the provider interface -------------------------------------------------------------------
    def device_for(self, i: int, rows: int):
        """The device that computes unit i in a pass of `rows` rows (batch x tokens)."""
        return self.cpu_device if i in self.cpu_units and rows <= self.cpu_max_rows else self.device

    def kv_device(self, i: int):
        """Where layer i's KV cache lives and its attention runs: host RAM and the CPU for a CPU-decoded
        layer or a host-tier KV cache (kv_host), else the compute device."""
        return self.cpu_device if self.kv_host or i in self.cpu_units else self.device

    @property
    def staging_bytes(self) -> int:
        return self.arena.numel()

    def layer(self, i: int, rows: int | None = None):
        """Unit i bound where device_for(i, rows) computes it; rows None: on the compute device."""
        got = self.fixed.get(i)
        small = rows is not None and rows <= self.cpu_max_rows
        if got is None and small and i in self.cpu_units:
            got = self.host_bound[i]
        if got is not None:
            if self.tracer:
                self._t_ready = self.tracer.now()
            self._taken = (i, got)
            return got
        self._taken = (i, w := self._layer_streamed(i, small))
        return w

    # -- experts of an MoE block ---------------------------------------------------------------------
    @property
    def wants_hints(self) -> bool:
        """Whether hint_experts does anything: experts that are their own units and not all resident."""
        return self.expert_store is not None and self.expert_store.wants_hints

    @property
    def expert_stats(self):
        """The expert cache's counters (engine.tiers.experts.ExpertStats), or None without expert units."""
        return self.expert_store.stats if self.expert_store is not None else None

    def experts(self, i: int, ids: Sequence[int], rows: int | None = None) -> Mapping[int, Any]:
        """ExpertWeights of block i's experts `ids`, bound where device_for(i, rows) computes (called after
        layer(i, rows), before release(i)). Experts that are units of their own come from the expert store
        (resident views, or the expert cache: take them in `ids` order); experts inside a whole-layer unit
        are slices of the bytes layer(i, rows) returned."""
        st = self.expert_store
        if st is not None and i in st.slices_layers:
            return st.routed(i, ids, rows)
        taken, w = self._taken
        if taken != i or getattr(w, "experts", None) is None:
            raise RuntimeError(f"experts({i}) needs layer({i}) of an MoE block first (last taken: {taken})")
        return {e: w.experts.expert(e) for e in ids}

    def hint_experts(self, i: int, ids: Sequence[int]) -> None:
        """A prefetch hint for block i's experts (never blocks, never changes a result): reads of the
        non-resident, uncached ones start now; a no-op for experts inside whole-layer units."""
        if self.expert_store is not None and i in self.expert_store.slices_layers:
            self.expert_store.hint(i, ids)

    def router(self, i: int):
        """(ffn_norm, ffn_gate_inp) of block i when they can be read now without waiting (a resident
        block), for the model's next-layer expert prediction; None otherwise."""
        w = self.fixed.get(i)
        gate = getattr(w, "ffn_gate_inp", None)
        return None if gate is None else (w.ffn_norm, gate)

    def _layer_streamed(self, i: int, small: bool):
        """Unit i out of the ring: wait for its bytes (reading them now if no prefetch did)."""
        if small != self.small and self.sequences[small] != self.seq:
            self._restart(i, small)
        self.small = small
        m = len(self.seq)
        # a new pass over the units (i is the first streamed one) checks, with one fstat, that the file did
        # not change under the model (written or truncated): if it did, nothing read ahead is kept
        changed = i == self.seq[0] and self._file_changed()
        if self._stale or self._held is not None or self.seq[self.cur % m] != i or changed:
            self._restart(i, small)
            if changed:
                for s in range(self.k):
                    self._forget_read(s)
        n, s = self.cur, self.cur % self.k
        tr = self.tracer
        t0 = tr.now() if tr else 0.0
        self._pump()
        if self.dev_unit[s] != i:  # not uploaded yet: its read (or the slot) is what we wait for
            try:
                self._bring(s, i)
            except Exception:  # a failed read (perhaps a prefetch from before a fault cleared): once more
                self._bring(s, i)
        if not self.waited[s]:
            self.staging.wait(self.uploads[s])
            self.waited[s] = True
        self._held = n
        if tr:
            t1 = tr.now()
            tr.span(f"wait {self.units[i].name}", t0, t1)
            self._t_ready = t1
        key = (s, i)
        w = self._bound.get(key)
        if w is None:
            buf, plan = self.uploads[s].data, self.plans[i]
            w = self._bound[key] = self._bind(i, lambda t: buf[(p := plan.where(t.offset)):p + t.nbytes])
        self._pump()
        return w

    def release(self, i: int) -> None:
        tr = self.tracer
        if tr:
            tr.span(f"compute {self.units[i].name}", self._t_ready, tr.now())
        if self._held is None or self.seq[self._held % len(self.seq)] != i:
            return  # a fixed or CPU-computed unit
        s = self._held % self.k
        self.staging.release(self.uploads[s])
        self._held = None
        self.cur += 1
        self._pump()

    def drain(self) -> None:
        """Wait until no read is in flight (benchmarks time whole tokens this way); re-raises a failure."""
        for s in range(self.k):
            self._ready(s, block=True)

    def reload(self) -> None:
        """The ring's buffers were overwritten from outside (a benchmark's raw reads): forget what they
        hold and load again from the unit the ring expects next."""
        self.drain()
        self.host_unit, self.dev_unit = [None] * self.k, [None] * self.k
        if self.seq:
            self._restart(self.seq[self.cur % len(self.seq)], self.small)
        self._pump()

    def close(self) -> None:
        for t in self.tickets:
            if t is not None:
                t.cancel()
        if self.expert_store is not None:
            self.expert_store.close()

    # -- the ring ------------------------------------------------------------------------------------
    def _bind(self, i: int, streamed_view: View):
        names = self.streamed_names.get(i, frozenset())
        return self.units[i].bind(lambda t: streamed_view(t) if t.name in names else self.resident.view(t),
                                  lambda t: 1 if t.name in names else self.resident.layout(t))

    def _pump(self) -> None:
        """Issue what can be issued without blocking, in occurrence order: reads into free host slots
        (or, with GPUDirect, free device slots), then uploads of completed reads and of host-tier bytes
        into released device slots. Occurrences cur..cur+k-1 own their slots: the occurrence k earlier
        in each slot has been released."""
        if not self.k or not self.seq:
            return
        m, in_order = len(self.seq), True
        for n in range(self.cur, self.cur + self.k):
            s, i = n % self.k, self.seq[n % m]
            if self.dev_unit[s] == i:
                continue
            if self.sources[i] == "disk" and not self._start_read(s, i, block=False):
                in_order = False
                continue
            if in_order and not self._finish(s, i, block=False):
                in_order = False  # the copy queue stays in occurrence order

    def _bring(self, s: int, i: int) -> None:
        if self.sources[i] == "disk":
            self._start_read(s, i, block=True)
        self._finish(s, i, block=True)

    def _start_read(self, s: int, i: int, block: bool) -> bool:
        """Unit i's read into slot s is issued (or done); False if the slot is still busy (block=False)."""
        if self.host_unit[s] == i:
            return True
        st = self.staging
        if self.device_reads:  # GPUDirect writes outside the streams' order: the slot must be idle
            if not st.device_free(self.dev_slots[s]):
                if not block:
                    return False
                st.wait_device_free(self.dev_slots[s])
            buf = self.dev_slots[s]
        else:
            out = self.outbound[s]  # the copy out of this host slot must have read it
            if out is not None and not st.host_free(out):
                if not block:
                    return False
                st.wait_host_free(out)
            buf = self.slots[s]
        self.host_unit[s], self.dev_unit[s] = i, None
        self.tickets[s] = self.reader.submit(self.plans[i], buf, self.units[i].name)
        return True

    def _finish(self, s: int, i: int, block: bool) -> bool:
        """Unit i's bytes are (being copied) in slot s's device buffer; False if its read is still
        running (block=False)."""
        st, size = self.staging, self.plans[i].size
        if self.sources[i] == "host":
            up = st.upload(self.host.region(self.units[i].name), self.dev_slots[s], size)
            if self.device_reads:
                self.host_unit[s] = None  # the device slot no longer holds a GPUDirect read
        else:
            if not self._ready(s, block):
                return False
            if self.device_reads:
                up = Upload(self.dev_slots[s][:size])
            else:
                up = self.outbound[s] = st.upload(self.slots[s], self.dev_slots[s], size)
        self.uploads[s], self.dev_unit[s], self.waited[s] = up, i, False
        return True

    def _ready(self, s: int, block: bool) -> bool:
        t = self.tickets[s]
        if t is None:
            return True
        if not block and not t.done():
            return False
        if not block:  # a failed prefetch is raised by the layer() that needs it, never by release()
            try:
                t.wait()
            except Exception:
                return False
            return True
        try:
            t.wait()  # returns or raises only once no chunk of the read is writing into the slot
        except Exception:
            self._forget_read(s)
            raise
        except BaseException:  # Ctrl-C: chunks may still be writing; the next layer() drains them
            self._stale = True
            raise
        return True

    def _forget_read(self, s: int) -> None:
        """A failed read: the slot holds nothing, so the next pass reads it again."""
        self.tickets[s], self.host_unit[s], self.dev_unit[s] = None, None, None

    def _restart(self, i: int, small: bool) -> None:
        """A pass began elsewhere than the ring expected (an interrupted pass, or the other phase of
        hybrid compute): finish or fence what is in flight and restart the cycle at unit i."""
        if self._held is not None:
            self.staging.release(self.uploads[self._held % self.k])
            self._held = None
        for s, t in enumerate(self.tickets):
            if t is not None:
                try:
                    t.wait()
                except Exception:  # the failure was already reported to the interrupted pass
                    self._forget_read(s)
        self._stale = False
        self.small = small
        self.seq = self.sequences[small]
        m = len(self.seq)
        self.cur += (self.seq.index(i) - self.cur) % m  # keeps occurrences increasing: fences stay valid
        # slot s will serve occurrences cur.. again: what it holds stays valid only for the same unit
        for n in range(self.cur, self.cur + self.k):
            s = n % self.k
            if self.dev_unit[s] is not None and self.dev_unit[s] != self.seq[n % m]:
                self.dev_unit[s] = None

    @property
    def cyclic(self) -> bool:
        return len(self.seq) > self.k
