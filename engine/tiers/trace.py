"""Chrome/Perfetto trace of reads, copies and compute spans (`--trace out.json`)."""
from __future__ import annotations

import json
import os
import threading
import time


class Tracer:
    """Collects complete ('X') events; thread-safe; written once at close."""

    def __init__(self, path: str):
        self.path = path
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self.pid = os.getpid()

    def now(self) -> float:
        return time.perf_counter()

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
