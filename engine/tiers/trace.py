"""Chrome/Perfetto trace of reads, copies and compute spans (`--trace out.json`)."""
from __future__ import annotations

import json
import os
import threading
import time

LANE_BASE = 1 << 20  # track ids of lanes (above any small id, below real thread idents)


class Tracer:
    """Collects complete ('X') events; thread-safe; written once at close."""

    def __init__(self, path: str):
        self.path = path
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._lanes: dict[str, list[float]] = {}  # per prefix: when each of its tracks is free again
        self._lane_ids: dict[tuple[str, int], int] = {}
        self._t0 = time.perf_counter()
        self.pid = os.getpid()

    def now(self) -> float:
        return time.perf_counter()

    def lane(self, prefix: str, start: float, end: float) -> int:
        """A track for a span that may overlap others of its kind (concurrent reads): the first track
        named `prefix N` that is free at `start`, so every track holds non-overlapping spans, which is
        what Perfetto draws. Tracks are numbered after LANE_BASE and named with metadata events."""
        with self._lock:
            ends = self._lanes.setdefault(prefix, [])
            for n, free_at in enumerate(ends):
                if free_at <= start:
                    ends[n] = end
                    return self._lane_ids[(prefix, n)]
            n = len(ends)
            ends.append(end)
            tid = self._lane_ids[(prefix, n)] = LANE_BASE + len(self._lane_ids)
            self.events.append({"name": "thread_name", "ph": "M", "pid": self.pid, "tid": tid,
                                "args": {"name": f"{prefix} {n}"}})
            return tid

    def span(self, name: str, start: float, end: float, tid: int | None = None, args: dict | None = None) -> None:
        ev = {"name": name, "ph": "X", "pid": self.pid, "tid": tid if tid is not None else threading.get_ident(),
              "ts": (start - self._t0) * 1e6, "dur": (end - start) * 1e6}
        if args:
            ev["args"] = args
        with self._lock:
            self.events.append(ev)

    def write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"traceEvents": self.events, "displayTimeUnit": "ms"}, fh)
        os.replace(tmp, self.path)
