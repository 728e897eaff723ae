"""The streaming scheduler: the weight provider the model pulls layers from.

Resident units are bound once over the resident store. Streamed units cycle through a ring of k
preallocated staging buffers: while unit n computes, units n+1..n+k-1 are being read; releasing a
unit hands its buffer to the unit k steps ahead (wrapping into the next token, so the first layers
of the next token load while the last ones compute). Waits are per buffer (a ticket per read),
never a global sync; the hot loop allocates no buffers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import PlanError
from ..gguf_file import TensorInfo, coalesce
from .io import FileReader, ReadPlan, Ticket


@dataclass(frozen=True, slots=True)
class Unit:
    """A group of tensors loaded together (a block, or the output head) and how to bind them."""

    name: str
    tensors: tuple[TensorInfo, ...]
    bind: Callable[[Callable[[TensorInfo], torch.Tensor]], Any]


class ResidentStore:
    """Tensors copied into owned memory at load (read through the same reader, O_DIRECT when possible)."""

    def __init__(self, reader: FileReader, tensors: Sequence[TensorInfo], staging, label: str = "resident weights"):
        runs = coalesce([(t.offset, t.nbytes) for t in tensors])
        self.plan: ReadPlan = reader.plan(runs)
        self.buf = staging.alloc_host(self.plan.size, reader.align) if tensors else torch.empty(0, dtype=torch.uint8)
        if tensors:
            reader.submit(self.plan, self.buf, label).wait()
            self.buf = staging.to_resident(self.buf)  # CPU: the same buffer; CUDA: a device copy
        self._views = {t.name: self.buf[(p := self.plan.where(t.offset)):p + t.nbytes] for t in tensors}

    @property
    def nbytes(self) -> int:
        return self.plan.size

    def view(self, t: TensorInfo) -> torch.Tensor:
        return self._views[t.name]

    def __contains__(self, t: TensorInfo) -> bool:
        return t.name in self._views


class TieredWeights:
    """Weight provider over a plan. `layer(i)` blocks until unit i's bytes are ready."""

    def __init__(self, units: Sequence[Unit], streamed: Sequence[frozenset[str]], reader: FileReader,
                 resident: ResidentStore, ring_size: int, staging, tracer=None, slot_bytes: int = 0):
        """streamed[i]: names of unit i's tensors that stream (empty = fully resident). `staging`: the
        device's hooks that move a filled host buffer to where the kernels read (engine.cuda.device)."""
        self.units, self.reader, self.resident, self.tracer = list(units), reader, resident, tracer
        self.staging = staging
        self._bound: dict[tuple[int, int], Any] = {}
        self.seq = [i for i, s in enumerate(streamed) if s]  # streamed units in forward order
        self.plans = {i: reader.plan(coalesce([(t.offset, t.nbytes) for t in units[i].tensors if t.name in streamed[i]]))
                      for i in self.seq}
        self.streamed_names = {i: streamed[i] for i in self.seq}
        self.fixed = {i: u.bind(resident.view) for i, u in enumerate(units) if not streamed[i]}
        m = len(self.seq)
        self.k = min(ring_size, m)
        need = max((p.size for p in self.plans.values()), default=0)
        if slot_bytes and need > slot_bytes:
            raise PlanError(f"unit {units[max(self.plans, key=lambda i: self.plans[i].size)].name} needs {need} bytes "
                            f"of staging; the plan gives {slot_bytes} per buffer")
        self.slot_bytes = -(-(slot_bytes or need) // reader.align) * reader.align
        # one allocation sliced into the k buffers: its whole 2 MiB pages are huge pages (aligned_empty),
        # which O_DIRECT fills at ~2x the speed of 4 KiB pages
        self.arena = staging.alloc_host(self.k * self.slot_bytes, reader.align)
        self.slots = [self.arena[s * self.slot_bytes:(s + 1) * self.slot_bytes] for s in range(self.k)]
        self.dev_slots = [staging.alloc_device(self.slot_bytes) for _ in range(self.k)]
        self.tickets: list[Ticket | None] = [None] * self.k
        self.uploads: list[Any] = [None] * self.k
        self.cyclic = m > self.k  # else every streamed unit keeps its own buffer: read once
        self.cur = 0  # occurrence number of the next streamed unit to consume
        self._stale = False  # a wait failed or was interrupted: the ring must be re-read before use
        self._t_ready = 0.0
        self.head_rows: tuple[tuple[int, int], ...] = ()  # row ranges of the head units (after the blocks)
        for n in range(self.k):
            self._issue(n)

    @property
    def staging_bytes(self) -> int:
        return self.arena.numel()

    def _issue(self, n: int) -> None:
        i, slot = self.seq[n % len(self.seq)], n % self.k
        self.tickets[slot] = self.reader.submit(self.plans[i], self.slots[slot], self.units[i].name)

    def _wait(self, ticket: Ticket) -> None:
        """Wait for one ticket; a failure (or Ctrl-C) marks the ring stale so the next layer() re-reads it."""
        try:
            ticket.wait()
        except BaseException:
            self._stale = True
            raise

    def drain(self) -> None:
        """Wait until no read is in flight (benchmarks time whole tokens this way); re-raises a failure."""
        for t in self.tickets:
            if t is not None:
                self._wait(t)

    def _resync(self, i: int) -> None:
        """A forward pass was interrupted or a read failed: drain in-flight reads (every chunk of every
        ticket has finished writing when wait() returns or raises) and restart the cycle at unit i."""
        for t in self.tickets:
            if t is not None:
                try:
                    t.wait()
                except Exception:  # the failure was already reported to the interrupted pass
                    pass
        pos = self.seq.index(i)
        self.cur = pos
        self._stale = False
        for n in range(pos, pos + self.k):
            self._issue(n)

    def layer(self, i: int):
        got = self.fixed.get(i)
        if got is not None:
            if self.tracer:
                self._t_ready = self.tracer.now()
            return got
        m = len(self.seq)
        if self._stale or self.seq[self.cur % m] != i:
            self._resync(i)
        slot = self.cur % self.k
        tr = self.tracer
        t0 = tr.now() if tr else 0.0
        self._wait(self.tickets[slot])
        up = self.uploads[slot] = self.staging.upload(self.slots[slot], self.dev_slots[slot], self.plans[i].size)
        self.staging.wait(up)
        if tr:
            t1 = tr.now()
            tr.span(f"wait {self.units[i].name}", t0, t1)
            self._t_ready = t1
        key = (slot, i)
        w = self._bound.get(key)
        if w is None:
            buf, plan, names = up.data, self.plans[i], self.streamed_names[i]

            def view(t: TensorInfo) -> torch.Tensor:
                if t.name in names:
                    p = plan.where(t.offset)
                    return buf[p:p + t.nbytes]
                return self.resident.view(t)

            w = self._bound[key] = self.units[i].bind(view)
        return w

    def release(self, i: int) -> None:
        tr = self.tracer
        if tr:
            tr.span(f"compute {self.units[i].name}", self._t_ready, tr.now())
        if i in self.fixed:
            return
        n = self.cur
        self.staging.release(self.uploads[n % self.k])
        self.cur += 1
        if self.cyclic:
            self._issue(n + self.k)

    def close(self) -> None:
        for t in self.tickets:
            if t is not None:
                t.cancel()
