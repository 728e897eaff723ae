"""Continuous batching: one scheduler thread owns the model and runs passes for every active
generation at once -- prompt chunks of new requests beside decode steps (and draft verification) of
running ones -- admitting requests as slots free up. Other threads submit requests and read their
events; cancelling a request (a client that went away) frees its slot at the next pass.

`generate()` runs one generation in the caller's thread on the same code path.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from ..errors import EngineError
from ..sampling import SamplingParams
from ..tiers.units import PREFILL_TOKENS
from .decode import Decode, Usage
from .slots import Slots


def run_round(slots: Slots, decodes: Sequence[Decode], prompt_tokens: int = PREFILL_TOKENS) -> list[str]:
    """One pass over the weights for every decode -> the text each produced. Each row asks for the
    logits it samples from (a prompt chunk: its last token's; a verification: its drafts' and the
    token before them), so prompt chunks and draft verifications share a pass. Prompt chunks take at
    most `prompt_tokens` of the pass in all (the planner's workspace is sized for PREFILL_TOKENS rows),
    in the decodes' order; a prompt left without any waits for the next pass (its text is "")."""
    budget, rows = prompt_tokens, []
    for d in decodes:
        if not d.prefilling:
            rows.append((d, d.feed()))
        elif budget > 0:
            feed = d.feed(budget)
            budget -= len(feed[0])
            rows.append((d, feed))
    outs = slots.step([(d.seq, ids) for d, (ids, _, _) in rows], [w for _, (_, w, _) in rows],
                      [tree for _, (_, _, tree) in rows])
    texts = {id(d): d.take(o) for (d, _), o in zip(rows, outs)}
    return [texts.get(id(d), "") for d in decodes]


def check_prompt(ids: Sequence[int], n_ctx: int) -> None:
    if not ids:
        raise EngineError("the prompt is empty (no tokens)", field="prompt")
    if len(ids) >= n_ctx:
        raise EngineError(f"prompt of {len(ids)} tokens does not fit the context of {n_ctx}", field="prompt")


def generate(model, ids: list[int], params: SamplingParams, max_tokens: int, *, drafter=None, depth=1,
             stats=None, usage: Usage | None = None) -> Iterator[str]:
    """Text pieces of one generation, run in this thread; `stats` (a GenerationStats) and `usage` (passes,
    drafts kept) are filled in."""
    slots = Slots(model)
    check_prompt(ids, slots.n_ctx)
    seq = slots.open()
    d = Decode(slots, seq, list(ids), params, max_tokens, model.tokenizer, drafter, depth,
               usage=usage if usage is not None else Usage())
    t0 = time.perf_counter()
    first = True
    try:
        while not d.done:
            text = run_round(slots, [d])[0]
            if first and seq.pos >= len(ids):
                t1, first = time.perf_counter(), False
            if text:
                yield text
    finally:
        d.close()
        seq.close()
        if stats is not None:
            end = time.perf_counter()
            t1 = end if first else t1
            stats.prompt_tokens, stats.prompt_s = d.usage.prefill_tokens, t1 - t0
            stats.decode_tokens, stats.decode_s = d.usage.completion_tokens, end - t1
            stats.finish_reason = d.finish_reason or ""


@dataclass(slots=True)
class Event:
    text: str = ""
    finish_reason: str | None = None  # set on the last event
    usage: Usage | None = None
    error: Exception | None = None


class Handle:
    """A submitted request: iterate it for its events; cancel() frees its slot."""

    def __init__(self, ids: list[int], params: SamplingParams, max_tokens: int):
        self.ids, self.params, self.max_tokens = ids, params, max_tokens
        self.events: queue.Queue[Event] = queue.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[Event]:
        while True:
            ev = self.events.get()
            yield ev
            if ev.finish_reason is not None or ev.error is not None:
                return


class Batcher:
    """The scheduler thread. `max_batch` generations share each pass; more wait for a free slot."""

    def __init__(self, model, *, drafter=None, depth=1, max_batch: int = 8, prefill_chunk: int = PREFILL_TOKENS):
        """depth: tokens verified per pass, or the cost model's PassCosts (see Decode); prefill_chunk: the
        most prompt tokens one pass feeds, over all requests (memory stays within the plan's workspace)."""
        if max_batch < 1 or prefill_chunk < 1 or (isinstance(depth, int) and depth < 1):
            raise EngineError("max_batch, depth and prefill_chunk must be >= 1", field="batcher")
        self.model, self.slots = model, Slots(model)
        self.drafter, self.depth = drafter, depth
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.passes = 0  # passes run (tests and stats)
        self.max_rows = 0  # the most generations one pass served
        self.cancelled = 0  # generations ended because their client went away
        self._waiting: list[Handle] = []
        self._active: list[tuple[Handle, Decode]] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="engine-batcher", daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        return len(self._active)

    def submit(self, ids: list[int], params: SamplingParams, max_tokens: int) -> Handle:
        """Queue a generation; raises EngineError at once for a prompt that cannot run."""
        check_prompt(ids, self.slots.n_ctx)
        h = Handle(list(ids), params, max_tokens)
        with self._cond:
            if self._closing:
                raise EngineError("the server is shutting down", field="request")
            self._waiting.append(h)
            self._cond.notify()
        return h

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _finish(self, h: Handle, d: Decode | None, ev: Event) -> None:
        if d is not None:
            d.close()
            d.seq.close()
        h.events.put(ev)

    def _admit(self) -> None:
        with self._cond:
            while not self._closing and not self._waiting and not self._active:
                self._cond.wait()
            while self._waiting and len(self._active) < self.max_batch:
                h = self._waiting.pop(0)
                if h.cancelled.is_set():
                    continue
                try:
                    d = Decode(self.slots, self.slots.open(), h.ids, h.params, h.max_tokens, self.model.tokenizer,
                               self.drafter, self.depth, self.prefill_chunk)
                except Exception as e:  # no slot or a bad request: this request fails, the rest go on
                    self._finish(h, None, Event(error=e))
                    continue
                self._active.append((h, d))

    def _loop(self) -> None:
        while True:
            self._admit()
            if self._closing:
                for h, d in self._active:
                    self._finish(h, d, Event(error=EngineError("the server is shutting down")))
                for h in self._waiting:
                    self._finish(h, None, Event(error=EngineError("the server is shutting down")))
                return
            live = []
            for h, d in self._active:
                if h.cancelled.is_set():
                    self.cancelled += 1
                    self._finish(h, d, Event(finish_reason="cancelled", usage=d.usage))
                elif d.done:  # max_tokens 0
                    self._finish(h, d, Event(finish_reason=d.finish_reason, usage=d.usage))
                else:
                    live.append((h, d))
            self._active = live
            if not live:
                continue
            try:
                texts = run_round(self.slots, [d for _, d in live], self.prefill_chunk)
            except Exception as e:  # the pass failed: its generations end with the error, the model stays usable
                for h, d in live:
                    self._finish(h, d, Event(error=e))
                self._active = []
                continue
            self.passes += 1
            self.max_rows = max(self.max_rows, len(live))
            still = []
            for (h, d), text in zip(live, texts):
                if d.done:
                    self._finish(h, d, Event(text, d.finish_reason, d.usage))
                else:
                    if text:
                        h.events.put(Event(text))
                    still.append((h, d))
            with self._cond:
                self._active = still
