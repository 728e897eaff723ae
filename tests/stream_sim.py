"""A stream simulator for the staging and scheduler tests: StreamOps whose streams are deferred
queues, run in adversarial orders (one stream eager, the other only when the host synchronises)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from engine.cuda.staging import CudaStaging, aligned_host_array


@dataclass(frozen=True, slots=True)
class SimEvent:
    stream: SimStream
    index: int  # done once the stream has executed this many operations


@dataclass(frozen=True, slots=True)
class Barrier:
    event: SimEvent


class SimStream:
    def __init__(self, name: str):
        self.name, self.ops, self.done = name, [], 0


class SimOps:
    """Streams run only when forced: those named in `eager` as far as they can after every call, the
    others when the host synchronises on one of their events (or at `finish`). `drop` removes one
    kind of fence, to show the ring test catches a staging that forgets it."""

    device = torch.device("cpu")

    def __init__(self, eager: frozenset[str], drop: str | None = None):
        self.eager, self.drop = eager, drop
        self.streams = {name: SimStream(name) for name in ("compute", "copy")}
        self.pinned: list[tuple[int, int]] = []  # (address, bytes) of every page-locked allocation
        self.device_buffers: list[torch.Tensor] = []  # every "device" allocation
        self.syncs = 0  # host waits on an event
        self.copies: list[tuple[int, int]] = []  # (destination address, bytes) of every copy issued

    def current_stream(self):
        return self.streams["compute"]

    def new_stream(self):
        return self.streams["copy"]

    def use(self, stream):
        return contextlib.nullcontext()

    def pin_host(self, nbytes, align):
        _, view = aligned_host_array(nbytes, align)
        self.pinned.append((view.data_ptr(), view.numel()))
        return view

    def empty_device(self, nbytes):
        t = torch.full((nbytes,), 0xEE, dtype=torch.uint8)  # garbage until written
        self.device_buffers.append(t)
        return t

    def on_device(self, t: torch.Tensor) -> bool:
        """Whether t's bytes lie in a "device" allocation."""
        p = t.data_ptr()
        return any(b.data_ptr() <= p and p + t.numel() <= b.data_ptr() + b.numel() for b in self.device_buffers)

    def copy(self, dst, src, stream):
        self.copies.append((dst.data_ptr(), dst.numel()))
        self.enqueue(stream, lambda: dst.copy_(src))

    def query(self, event):
        return event.stream.done >= event.index

    def record(self, stream):
        return SimEvent(stream, len(stream.ops))

    def wait(self, stream, event):
        if self.drop != f"{stream.name}_wait":
            self.enqueue(stream, Barrier(event))

    def synchronize(self, event):
        self.syncs += 1
        if self.drop != "host_sync":
            self._run_until(event)
            self._pump()

    def enqueue(self, stream, op):
        stream.ops.append(op)
        self._pump()

    def finish(self):
        for s in self.streams.values():
            self._run_until(SimEvent(s, len(s.ops)))

    def _step(self, s: SimStream) -> bool:
        if s.done == len(s.ops):
            return False
        op = s.ops[s.done]
        if isinstance(op, Barrier):
            if op.event.stream.done < op.event.index:
                return False
        else:
            op()
        s.done += 1
        return True

    def _pump(self):
        while any(self._step(self.streams[name]) for name in sorted(self.eager)):
            pass

    def _run_until(self, ev: SimEvent):
        s = ev.stream
        while s.done < ev.index:
            op = s.ops[s.done]
            if isinstance(op, Barrier) and op.event.stream.done < op.event.index:
                self._run_until(op.event)
            self._step(s)


POLICIES = {"copy-eager": frozenset({"copy"}), "compute-eager": frozenset({"compute"}), "lazy": frozenset()}




def sim_staging(policy: str, drop: str | None = None) -> tuple[CudaStaging, SimOps]:
    ops = SimOps(POLICIES[policy], drop)
    return CudaStaging(ops, ops.current_stream(), ops.new_stream(), "sim"), ops
