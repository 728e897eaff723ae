"""The placement search: candidate placements that fit the budgets, their predicted times, and the
Plan built from the chosen one."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ...errors import PlanError
from ..config import AUTO, TierConfig
from ..footprint import GROUPS, ModelFootprint, TensorFootprint
from ..hardware import ComputeRate, HardwareProfile
from ..io import kvikio_available
from ..units import DIRECT_IO_ALIGN, READ_CHUNK, format_size
from .contract import (
    AUTO_HOST_FRACTION,
    AUTO_IO_THREADS,
    AUTO_RESIDENT_FRACTION,
    DEFAULT_CONTEXT,
    DISK,
    DISK_QUEUE_SATURATION,
    HOST,
    LINK_DISK,
    LINK_H2D,
    RESIDENT,
    RING_CHOICES,
    LayerPlacement,
    Plan,
    Prediction,
    Workload,
    workspace_bytes,
)
from .simulation import _one_pass, _steady_state

_SPLITS = {"layer": GROUPS, "ffn": ("ffn",), "attn": ("attn",)}  # what a streamed layer streams
HANDOVER_S = 20e-6  # assumed: activations change device (a few KiB copied, one stream sync)
MAX_CPU_ROWS = 256  # hybrid: the largest pass the planner lets the CPU compute

# -- internal model of one candidate -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Unit:
    """A streamable unit: one layer, or the output head (layer None)."""

    name: str
    layer: int | None
    groups: Mapping[str, tuple[TensorFootprint, ...]]  # group -> tensors ("head" for the output head)
    decode_s: float  # compute per decode step (KV reads excluded: they depend on the KV tier)
    prefill_s: float
    cpu_decode_s: float | None = None  # the same step on the host CPU (hybrid; None: no CPU rates)

    def bytes_of(self, groups) -> int:
        return sum(t.nbytes for g in groups for t in self.groups[g])

    def slack(self, groups) -> int:
        return 2 * DIRECT_IO_ALIGN * sum(len(self.groups[g]) for g in groups)

    @property
    def nbytes(self) -> int:
        return self.bytes_of(self.groups)


@dataclass(frozen=True, slots=True)
class _Layout:
    """The units of one split mode: layers 0..L-1, then the output head in row chunks no larger than
    a streamed layer (a streamed head never needs bigger staging buffers than the layers)."""

    split: str
    units: tuple[_Unit, ...]
    n_layers: int
    chunk_rows: int  # head rows per chunk

    @property
    def head(self) -> range:
        return range(self.n_layers, len(self.units))


@dataclass(frozen=True, slots=True)
class _Candidate:
    split: str
    streamed: Mapping[int, frozenset[str]]  # unit index -> streamed groups (absent: resident)
    source: Mapping[int, str]  # unit index -> HOST | DISK, for streamed units
    ring: int
    embedding_tier: str
    kv_tier: str
    staging_bytes: int
    resident_bytes: int
    host_bytes: int
    moved_bytes: int  # loaded per decode step
    cpu: frozenset[int] = frozenset()  # hybrid: units computed on the CPU at decode (host tier, whole)


class _Planner:
    def __init__(self, fp: ModelFootprint, hw: HardwareProfile, cfg: TierConfig, work: Workload):
        self.fp, self.hw, self.cfg, self.work = fp, hw, cfg, work
        self.notes: list[str] = []
        self.device = hw.device
        if cfg.device != AUTO and cfg.device != hw.device:
            raise PlanError(f"the config asks for device {cfg.device} but the hardware profile "
                            f"({hw.name}) is for {hw.device}", path=cfg.source, field="device")
        self.cuda = self.device == "cuda"
        self.io_backend = cfg.io_backend if cfg.io_backend != AUTO else self._auto_io_backend()
        self.disk_bw = hw.disk_read(self.io_backend)
        self.slow = cfg.slow_tier == "disk"
        # hybrid compute: host-tier units may compute on the host CPU in small passes (CUDA, CPU rates known)
        self.hybrid = self.cuda and cfg.hybrid_compute != "off" and bool(hw.host_compute)
        if self.cuda and cfg.hybrid_compute != "off" and not hw.host_compute:
            self.notes.append("hybrid compute off: the hardware profile has no host CPU rates "
                              "(calibrate the CPU: python -m engine.calibrate)")
        if cfg.cpu_activations == "int8" and (self.hybrid or not self.cuda) \
                and not (hw.host_compute_int8 if self.cuda else hw.compute_int8):
            self.notes.append("cpu_activations int8: the hardware profile has no 8-bit-activation rates, so CPU "
                              "compute is priced at the int16 ones (calibrate: python -m engine.calibrate)")
        self._kv_setup()
        self.workspace = workspace_bytes(fp, work.batch, work.prompt_tokens, self.kv_context)
        self.small = sum(t.nbytes for t in fp.small)
        self._budgets()
        self._layouts: dict[str, _Layout] = {}
        if cfg.staging_buffers is not None or cfg.prefetch_depth is not None:
            ring = cfg.staging_buffers if cfg.staging_buffers is not None else cfg.prefetch_depth + 1
            self.rings = (ring,)
        else:
            self.rings = RING_CHOICES
        depth = cfg.prefetch_depth
        if depth is not None and cfg.staging_buffers is not None and cfg.staging_buffers > depth + 1:
            self.notes.append(f"staging_buffers {cfg.staging_buffers} > prefetch_depth + 1: "
                              f"only {depth + 1} buffers are ever in use")

    # -- setup ----------------------------------------------------------------------------------------
    def rate(self, fmt: str) -> ComputeRate:
        """The computing device's kernel rate for a format, under the config's cpu_activations."""
        return self.hw.rate(fmt, self.cfg.cpu_activations)

    def host_rate(self, fmt: str) -> ComputeRate:
        """The host CPU's kernel rate for a format (hybrid), under the config's cpu_activations."""
        return self.hw.host_rate(fmt, self.cfg.cpu_activations)

    def _auto_io_backend(self) -> str:
        """What `auto` opens (engine.tiers.io.open_reader): kvikio on CUDA where it is installed, else
        O_DIRECT reads (on CUDA bounced through pinned host buffers). Model.load plans with the backend
        of the reader that really opened (kvikio in compat mode reads like posix)."""
        return "kvikio" if self.cuda and kvikio_available() else "odirect"

    def _kv_setup(self) -> None:
        cfg, spec, work = self.cfg.kv_cache, self.fp.spec, self.work
        ctx = cfg.max_context
        if ctx is None:
            ctx = min(spec.context_length, max(DEFAULT_CONTEXT, work.context))
        if work.context > ctx:
            raise PlanError(f"the workload needs {work.context} tokens of context "
                            f"({work.prompt_tokens} prompt + {work.gen_tokens} generated) but it is {ctx}",
                            path=self.cfg.source, field="kv_cache.max_context")
        if ctx > spec.context_length:
            self.notes.append(f"kv_cache.max_context {ctx} exceeds the model's trained context "
                              f"{spec.context_length}")
        dtype = cfg.dtype if cfg.dtype != AUTO else ("f16" if self.cuda else "f32")
        self.kv_context, self.kv_dtype = ctx, dtype
        self.kv_bytes = 2 * spec.n_layers * work.batch * spec.kv_dim * ctx * (2 if dtype == "f16" else 4)
        if not self.cuda:
            if cfg.placement == HOST:
                self.notes.append("kv_cache.placement host means RAM, which on CPU is the resident tier")
            self.kv_tiers = (RESIDENT,)
        else:
            self.kv_tiers = (RESIDENT, HOST) if cfg.placement == AUTO else (cfg.placement,)

    def _budgets(self) -> None:
        cfg, hw = self.cfg, self.hw
        rb = cfg.resident_budget
        if rb.fraction is not None:
            # a weights budget: the KV cache (when resident) and the workspace come on top of it
            self.resident_weights_fraction = rb.fraction
            self.resident_budget = int(rb.fraction * self.fp.weight_bytes) + self.workspace
        elif rb.nbytes is not None:
            self.resident_weights_fraction = None
            self.resident_budget = rb.nbytes
        else:
            self.resident_weights_fraction = None
            self.resident_budget = int(AUTO_RESIDENT_FRACTION[self.device] * hw.resident_bytes)
        if self.resident_budget > hw.resident_bytes:
            msg = (f"resident_budget {format_size(self.resident_budget)} exceeds the "
                   f"{format_size(hw.resident_bytes)} of {hw.name}")
            if self.cuda:
                raise PlanError(msg, path=cfg.source, field="resident_budget")
            self.notes.append(msg + " (available RAM right now)")
        if not self.cuda:
            if not cfg.host_budget.auto:
                self.notes.append("host_budget is ignored on CPU: RAM is the resident tier")
            self.host_budget = 0
        else:
            hb = cfg.host_budget
            self.host_budget = hb.nbytes if hb.nbytes is not None else int(AUTO_HOST_FRACTION * hw.host_bytes)
            if self.host_budget > hw.host_bytes:
                raise PlanError(f"host_budget {format_size(self.host_budget)} exceeds the "
                                f"{format_size(hw.host_bytes)} of RAM in the profile ({hw.name})",
                                path=cfg.source, field="host_budget")

    def kv_resident(self, kv_tier: str) -> int:
        """Resident-tier bytes of the KV cache (a percentage budget already excludes it)."""
        if kv_tier != RESIDENT:
            return 0
        return 0 if self.resident_weights_fraction is not None else self.kv_bytes

    def layout(self, split: str) -> _Layout:
        got = self._layouts.get(split)
        if got is None:
            got = self._layouts[split] = self._build_layout(split)
        return got

    def _build_layout(self, split: str) -> _Layout:
        hw, b = self.hw, self.work.batch
        rows = b * self.work.prompt_tokens

        def cost(tensors, tokens: int) -> float:
            return sum(self.rate(t.fmt).seconds(t.nbytes, tokens) for t in tensors)

        def cpu_cost(tensors) -> float | None:
            if not self.hybrid:
                return None
            return sum(self.host_rate(t.fmt).seconds(t.nbytes, b) for t in tensors) + hw.host_layer_overhead_s

        units = []
        for lay in self.fp.layers:
            groups = {g: lay.group_tensors(g) for g in GROUPS}
            units.append(_Unit(f"layer {lay.index}", lay.index, MappingProxyType(groups),
                               cost(lay.tensors, b) + hw.layer_overhead_s,
                               cost(lay.tensors, rows) + hw.layer_overhead_s, cpu_cost(lay.tensors)))
        head = self.fp.head
        vocab, row_bytes = head.shape[0], head.nbytes // head.shape[0]
        target = max((u.bytes_of(_SPLITS[split]) for u in units), default=head.nbytes)
        chunk_rows = max(1, min(vocab, target // row_bytes))
        for first in range(0, vocab, chunk_rows):
            n = min(chunk_rows, vocab - first)
            part = TensorFootprint(head.role, head.fmt, (n, head.shape[1]), n * row_bytes)
            # the head projects the last position of each sequence only, in the prompt pass too
            c = cost((part,), b) + hw.layer_overhead_s
            units.append(_Unit(f"the output head rows {first}-{first + n - 1}", None,
                               MappingProxyType({"head": (part,)}), c, c, cpu_cost((part,))))
        return _Layout(split, tuple(units), len(self.fp.layers), chunk_rows)

    def lookahead(self, ring: int) -> int:
        """Loads that may be in flight or waiting, counting the one being computed on."""
        depth = self.cfg.prefetch_depth
        return ring if depth is None else min(ring, depth + 1)

    # -- link model -----------------------------------------------------------------------------------
    def stages(self, source: str, nbytes: int, ring: int) -> tuple[tuple[str, float], ...]:
        if source == HOST:
            return ((LINK_H2D, nbytes / self.hw.host_to_device),)
        disk = (LINK_DISK, nbytes / self.disk_bw_at(ring, nbytes))
        if self.cuda and self.io_backend != "kvikio":
            return (disk, (LINK_H2D, nbytes / self.hw.host_to_device))
        return (disk,)

    def disk_bw_at(self, ring: int, nbytes: int) -> float:
        """Disk bandwidth with the read requests this ring keeps in flight: the reader splits a load into
        READ_CHUNK requests over its threads, and the loads ahead of the computing one are in flight.
        Calibration measures with several requests in flight; a single outstanding one got about half
        (SmolLM2, 2 MiB loads, cpu-tight, measured with Python reader threads into 4 KiB pages: 15-21
        tok/s with 1 load ahead vs 25-32 with 3-5; not re-measured since the native reader)."""
        requests = max(1, self.lookahead(ring) - 1) * -(-nbytes // READ_CHUNK)
        in_flight = min(self.cfg.io_threads or AUTO_IO_THREADS, requests)
        return self.disk_bw * min(1.0, in_flight / DISK_QUEUE_SATURATION)

    @property
    def host_staging(self) -> bool:
        return self.cuda and self.io_backend != "kvikio"

    def lookup_s(self, tier: str, rows: int) -> float:
        """Embedding rows for one step from `tier`."""
        row = self.fp.embedding.nbytes // self.fp.spec.vocab_size
        if tier == RESIDENT:
            return 0.0
        if tier == HOST:
            return rows * row / self.hw.host_to_device + self.hw.layer_overhead_s
        return rows * (self.hw.disk_latency_s + row / self.disk_bw)

    def kv_read_s(self, kv_tier: str, on_cpu: bool = False) -> float:
        """Per layer per decode step: read the cached keys and values at the mean context. A KV cache in
        host RAM (a layer computed on the CPU, or kv_tier host) is read there by the CPU, which computes
        that layer's attention beside it; a GPU-computed layer then hands q/k/v over and the result back."""
        s, w = self.fp.spec, self.work
        mean_ctx = w.prompt_tokens + w.gen_tokens / 2
        nbytes = 2 * w.batch * mean_ctx * s.kv_dim * (2 if self.kv_dtype == "f16" else 4)
        if on_cpu:
            return nbytes / self.hw.host_bandwidth
        if kv_tier == HOST:
            return nbytes / self.hw.host_bandwidth + 2 * HANDOVER_S
        return nbytes / self.hw.resident_bandwidth

    # -- candidates -----------------------------------------------------------------------------------
    def candidates(self) -> Iterator[_Candidate]:
        seen = set()
        head_options = (False, True) if (self.slow or self.cuda) else (False,)
        if self.fp.output is None:
            emb_options = (None,)  # tied: the embedding is the head and lives where it does
        else:
            emb_options = (RESIDENT, *((HOST,) if self.cuda else ()), *((DISK,) if self.slow else ()))
        for kv_tier in self.kv_tiers:
            for split in _SPLITS:
                for head_streamed in head_options:
                    for emb in emb_options:
                        for ring in self.rings:
                            cand = self._candidate(kv_tier, split, head_streamed, emb, ring)
                            if cand is None:
                                continue
                            for c in (cand, self.with_hybrid(cand) if self.hybrid else None):
                                if c is None:
                                    continue
                                key = (tuple(sorted(c.streamed.items())), tuple(sorted(c.source.items())),
                                       c.ring if c.streamed else 0, c.embedding_tier, c.kv_tier, c.cpu)
                                if key not in seen:
                                    seen.add(key)
                                    yield c

    def _candidate(self, kv_tier: str, split: str, head_streamed: bool, emb: str | None, ring: int
                   ) -> _Candidate | None:
        lay = self.layout(split)
        units, L = lay.units, lay.n_layers
        groups = _SPLITS[split]
        emb_res = self.fp.embedding.nbytes if emb == RESIDENT else 0
        fixed = self.small + self.kv_resident(kv_tier) + self.workspace + emb_res
        all_bytes = sum(u.nbytes for u in units)
        max_stream = max((u.bytes_of(groups) for u in units[:L]), default=0)

        def staging(streamed: Mapping[int, frozenset[str]]) -> int:
            if not streamed:
                return 0
            need = max(units[i].bytes_of(g) + units[i].slack(g) for i, g in streamed.items())
            return -(-need // DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN

        def resident(streamed: Mapping[int, frozenset[str]]) -> int:
            off = sum(units[i].bytes_of(g) for i, g in streamed.items())
            return fixed + all_bytes - off + ring * staging(streamed)

        head_part = {i: frozenset(units[i].groups) for i in lay.head} if head_streamed else {}
        deficit = resident(head_part) - self.resident_budget
        n0 = 0 if deficit <= 0 or not max_stream else min(L, deficit // max_stream)
        streamed = None
        for n in range(n0, L + 1):
            trial = {i: frozenset(groups) for i in _spread(n, L)} | head_part
            if resident(trial) <= self.resident_budget:
                streamed = trial
                break
        if streamed is None:
            return None
        # spend what is left on whole attention/FFN tensor groups of streamed layers (partial residency);
        # repeat while that shrinks the staging buffers and so frees more
        changed = True
        while changed:
            changed = False
            left = self.resident_budget - resident(streamed)
            for i in sorted(k for k in streamed if k < L):
                keep = set(streamed[i])
                for g in sorted(keep, key=lambda g: -units[i].bytes_of((g,))):
                    size = units[i].bytes_of((g,))
                    if size <= left:
                        keep.discard(g)
                        left -= size
                        changed = True
                if keep:
                    streamed[i] = frozenset(keep)
                else:
                    del streamed[i]
        return self._sources(lay, streamed, staging(streamed), resident(streamed), ring, emb, kv_tier)

    def _sources(self, lay: _Layout, streamed: dict[int, frozenset[str]], stage: int, res_bytes: int, ring: int,
                 emb: str | None, kv_tier: str) -> _Candidate | None:
        """Decide where each streamed unit is loaded from: host while the host budget lasts, else disk.
        The head's chunks move together (key -1 below)."""
        units, L = lay.units, lay.n_layers
        head_streamed = lay.n_layers in streamed
        order = sorted(i for i in streamed if i < L) + ([-1] if head_streamed else [])
        sizes = {i: units[i].bytes_of(streamed[i]) for i in order if i >= 0}
        if head_streamed:
            sizes[-1] = self.fp.head.nbytes
        host_fixed = (self.kv_bytes if kv_tier == HOST else 0) + (self.fp.embedding.nbytes if emb == HOST else 0)
        for n_disk in range(len(order) + 1):
            if not self.cuda and n_disk < len(order):
                continue  # no host tier on CPU: every streamed unit comes from disk
            if n_disk and not self.slow:
                return None
            disk = {order[j] for j in _spread(n_disk, len(order))}
            host = host_fixed + sum(sizes[i] for i in order if i not in disk)
            if disk and self.host_staging:
                host += ring * stage
            if host <= self.host_budget:
                tier = {i: (DISK if i in disk else HOST) for i in order}
                source = {i: tier[i if i < L else -1] for i in streamed}
                emb_tier = emb if emb is not None else tier.get(-1, RESIDENT)  # tied: lives with the head
                return _Candidate(split=lay.split, streamed=MappingProxyType(streamed),
                                  source=MappingProxyType(source), ring=ring if streamed else 0,
                                  embedding_tier=emb_tier, kv_tier=kv_tier, staging_bytes=stage,
                                  resident_bytes=res_bytes, host_bytes=host, moved_bytes=sum(sizes.values()))
        return None

    # -- prediction -----------------------------------------------------------------------------------
    def predict(self, c: _Candidate) -> Prediction:
        b = self.work.batch
        kv_s = self.kv_read_s(c.kv_tier)
        seq_decode, seq_prefill, on_cpu = [], [], []
        for i, u in enumerate(self.layout(c.split).units):
            stages = self.stages(c.source[i], u.bytes_of(c.streamed[i]), c.ring) if i in c.streamed else ()
            if i in c.cpu:  # computes where its bytes are: no load at decode
                extra = self.kv_read_s(c.kv_tier, on_cpu=True) if u.layer is not None else 0.0
                seq_decode.append((u.cpu_decode_s + extra, ()))
            else:
                seq_decode.append((u.decode_s + (kv_s if u.layer is not None else 0.0), stages))
            on_cpu.append(i in c.cpu)
            # host KV: the prompt's attention runs on the CPU too (q/k/v over and back once per layer)
            handover = 2 * HANDOVER_S if c.kv_tier == HOST and u.layer is not None else 0.0
            seq_prefill.append((u.prefill_s + handover, stages))
        # activations change device at every CPU<->GPU boundary of the decode order (the step starts
        # and ends on the GPU: embedding rows in, sampling out)
        edges = [False, *on_cpu, False]
        handovers = sum(x != y for x, y in zip(edges, edges[1:]))
        start = self.hw.token_overhead_s + self.lookup_s(c.embedding_tier, b) + handovers * HANDOVER_S
        lookahead = self.lookahead(c.ring)
        token_s = _steady_state(seq_decode, lookahead, start)
        prefill_s = _one_pass(seq_prefill, lookahead, self.lookup_s(c.embedding_tier, b * self.work.prompt_tokens))
        compute_s = start + sum(cs for cs, _ in seq_decode)
        cpu_s = sum(cs for (cs, _), cpu in zip(seq_decode, on_cpu) if cpu)
        links: dict[str, float] = {}
        for _, stages in seq_decode:
            for link, dur in stages:
                links[link] = links.get(link, 0.0) + dur
        bound, bound_s = "compute", compute_s
        for link, busy in links.items():
            if busy > bound_s:
                bound, bound_s = link, busy
        return Prediction(token_s, compute_s, MappingProxyType(links), bound_s, bound, prefill_s,
                          prefill_s + self.work.gen_tokens * token_s, b, cpu_s)

    # -- hybrid compute ---------------------------------------------------------------------------------
    def cpu_max_rows(self, c: _Candidate) -> int:
        """The largest pass (rows) in which the CPU computes c's CPU units no slower than streaming them
        over PCIe; at most MAX_CPU_ROWS."""
        units = self.layout(c.split).units
        tensors = [t for i in c.cpu for g in units[i].groups.values() for t in g]
        nbytes = sum(t.nbytes for t in tensors)
        rows = 0
        while rows < MAX_CPU_ROWS and sum(self.host_rate(t.fmt).seconds(t.nbytes, rows + 1) for t in tensors) \
                <= nbytes / self.hw.host_to_device:
            rows += 1
        return rows

    def with_hybrid(self, c: _Candidate) -> _Candidate | None:
        """c with the host-tier units (whole layers; the head's chunks as one) that should compute on the
        CPU at decode: the count that minimises the predicted step, spread evenly so the PCIe copies of
        the GPU's units overlap the CPU's work. None if no CPU share beats streaming everything."""
        lay = self.layout(c.split)
        L = lay.n_layers
        items = [(i,) for i in sorted(c.streamed) if i < L and c.source[i] == HOST
                 and c.streamed[i] == frozenset(lay.units[i].groups)]
        head = tuple(i for i in lay.head if c.source.get(i) == HOST)
        if head:
            items.append(head)
        if not items:
            return None
        kv_layer = self.kv_bytes // self.fp.spec.n_layers

        def variant(n: int) -> _Candidate | None:
            cpu = frozenset(i for j in _spread(n, len(items)) for i in items[j])
            n_layers = sum(1 for i in cpu if i < L)
            moved = n_layers * kv_layer if c.kv_tier == RESIDENT else 0  # their KV lives in host RAM
            if c.host_bytes + moved > self.host_budget:
                return None
            res = c.resident_bytes - (moved if self.resident_weights_fraction is None else 0)
            return dataclasses.replace(c, cpu=cpu, host_bytes=c.host_bytes + moved, resident_bytes=res)

        # coarse: the analytic bound of every count; fine: simulate the best few
        scored = []
        for n in range(1, len(items) + 1):
            v = variant(n)
            if v is not None and self.cpu_max_rows(v) >= self.work.batch:
                scored.append((self.predict_bound(v), n, v))
        scored.sort(key=lambda x: (x[0], x[1]))
        best = None
        for _, _, v in scored[:3]:
            pred = self.predict(v)
            if best is None or pred.token_s < best[0]:
                best = (pred.token_s, v)
        if best is None or best[0] >= self.predict(c).token_s * (1 - 1e-3):
            return None
        return best[1]

    def predict_bound(self, c: _Candidate) -> float:
        """max(compute, every link's busy time) per decode step: cheap, for ranking hybrid splits."""
        units = self.layout(c.split).units
        compute, links = 0.0, {}
        for i, u in enumerate(units):
            if i in c.cpu:
                compute += u.cpu_decode_s + HANDOVER_S * 2
            else:
                compute += u.decode_s
                if i in c.streamed:
                    for link, dur in self.stages(c.source[i], u.bytes_of(c.streamed[i]), c.ring):
                        links[link] = links.get(link, 0.0) + dur
        return max(compute, *links.values()) if links else compute

    # -- result ---------------------------------------------------------------------------------------
    def build(self, c: _Candidate, pred: Prediction) -> Plan:
        fp, lay = self.fp, self.layout(c.split)
        layers = []
        for i, lf in enumerate(fp.layers):
            roles = frozenset(t.role for t in lf.tensors)
            if i in c.streamed:
                moved = frozenset(t.role for g in c.streamed[i] for t in lf.group_tensors(g))
                layers.append(LayerPlacement(i, c.source[i], roles - moved, moved,
                                             lay.units[i].bytes_of(c.streamed[i]), i in c.cpu))
            else:
                layers.append(LayerPlacement(i, RESIDENT, roles, frozenset(), 0))
        output_tier = c.source.get(lay.n_layers, RESIDENT)
        res_weights = (fp.layer_bytes - sum(p.streamed_bytes for p in layers) + self.small
                       + (fp.head.nbytes if output_tier == RESIDENT else 0)
                       + (fp.embedding.nbytes if fp.output is not None and c.embedding_tier == RESIDENT else 0))
        host_weights = (sum(p.streamed_bytes for p in layers if p.tier == HOST)
                        + (fp.head.nbytes if output_tier == HOST else 0)
                        + (fp.embedding.nbytes if fp.output is not None and c.embedding_tier == HOST else 0))
        resident_bytes = c.resident_bytes
        resident_budget = self.resident_budget
        n_cpu = sum(1 for i in c.cpu if i < lay.n_layers)
        if self.resident_weights_fraction is not None and c.kv_tier == RESIDENT:
            resident_bytes += self.kv_bytes - n_cpu * (self.kv_bytes // fp.spec.n_layers)
            resident_budget += self.kv_bytes
        notes = list(self.notes)
        if self.cuda and self.cfg.io_backend == AUTO and self.io_backend != "kvikio" and DISK in c.source.values():
            notes.append("io_backend auto: kvikio is not installed, disk loads bounce through pinned host "
                         "buffers (O_DIRECT)")
        cpu_rows = self.cpu_max_rows(c) if c.cpu else 0
        if c.cpu:
            gpu = self.predict(dataclasses.replace(c, cpu=frozenset()))
            rate = self.host_rate(fp.head.fmt)
            notes.append(f"hybrid: {n_cpu} host-tier layers{' and the head' if lay.n_layers in c.cpu else ''} "
                         f"compute on the CPU (its kernels {rate.t1 / 1e9:.0f} GB/s vs PCIe "
                         f"{self.hw.host_to_device / 1e9:.1f} GB/s) in passes of <= {cpu_rows} rows; larger "
                         f"passes (prefill, batches) stream them to the GPU. Streaming every host-tier unit "
                         f"instead: {gpu.tokens_per_s:.3g} tokens/s")
        return Plan(
            model=fp.source, hardware=f"{self.hw.name} [{self.hw.source}]", device=self.device, workload=self.work,
            layers=tuple(layers), embedding_tier=c.embedding_tier, output_tier=output_tier, kv_tier=c.kv_tier,
            kv_bytes=self.kv_bytes, kv_context=self.kv_context, kv_dtype=self.kv_dtype, ring_size=c.ring,
            prefetch_depth=max(0, self.lookahead(c.ring) - 1),
            staging_bytes=c.staging_bytes, host_staging=self.host_staging and DISK in c.source.values(),
            resident_bytes=resident_bytes, host_bytes=c.host_bytes, resident_budget=resident_budget,
            host_budget=self.host_budget, resident_weight_bytes=res_weights, host_weight_bytes=host_weights,
            workspace_bytes=self.workspace, io_backend=self.io_backend,
            io_threads=self.cfg.io_threads or AUTO_IO_THREADS, compute_threads=self.cfg.compute_threads,
            output_bytes=fp.head.nbytes,
            output_chunk_rows=lay.chunk_rows if output_tier != RESIDENT else fp.head.shape[0],
            output_chunks=len(lay.head) if output_tier != RESIDENT else 1, predicted=pred, notes=tuple(notes),
            output_cpu_decode=lay.n_layers in c.cpu, cpu_max_rows=cpu_rows)

    # -- infeasible -----------------------------------------------------------------------------------
    def explain(self) -> PlanError:
        """Why no candidate fits, naming what is needed and what the budget leaves."""
        src = self.cfg.source
        kv_res = min(self.kv_resident(t) for t in self.kv_tiers)
        fixed = self.small + kv_res + self.workspace
        budget = self.resident_budget
        kv_note = f"the KV cache ({format_size(kv_res)}, {self.kv_context} tokens, batch {self.work.batch}), " \
            if kv_res else ""
        after = f"after {kv_note}the workspace ({format_size(self.workspace)}) and norms ({format_size(self.small)})"
        if fixed > budget:
            return PlanError(f"{kv_note}the workspace ({format_size(self.workspace)}) and norms need "
                             f"{format_size(fixed)} of the resident tier; the budget is {format_size(budget)}",
                             path=src, field="resident_budget")
        can_stream = self.slow or (self.cuda and self.host_budget > 0)
        if not can_stream:
            total = fixed + self.fp.weight_bytes - self.small
            why = "slow_tier is none" if not self.slow else "there is no host tier"
            return PlanError(f"everything must be resident ({why}): the model needs {format_size(total)} "
                             f"but the resident budget is {format_size(budget)}", path=src, field="resident_budget")
        ring = min(self.rings)
        biggest = max(self.layout("layer").units, key=lambda u: u.nbytes + u.slack(u.groups))
        need = biggest.nbytes + biggest.slack(biggest.groups)
        need = -(-need // DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN
        left = budget - fixed
        times = (f"{ring} x " if ring > 1 else "") + format_size(need)
        if ring * need > left:
            return PlanError(f"{biggest.name} needs {times} of staging; the resident budget "
                             f"({format_size(budget)}) leaves {format_size(left)} {after}",
                             path=src, field="resident_budget")
        if self.cuda:
            host_left = self.host_budget - min((self.kv_bytes if t == HOST else 0) for t in self.kv_tiers)
            if self.host_staging and self.slow and ring * need > host_left:
                return PlanError(f"disk streaming bounces through {times} of pinned host "
                                 f"staging; the host budget leaves {format_size(host_left)}",
                                 path=src, field="host_budget")
            return PlanError(f"the weights ({format_size(self.fp.weight_bytes)}) do not fit the resident "
                             f"({format_size(budget)}) and host ({format_size(self.host_budget)}) budgets and "
                             f"slow_tier is {self.cfg.slow_tier}", path=src, field="host_budget")
        return PlanError(f"no placement fits the resident budget {format_size(budget)}", path=src,
                         field="resident_budget")


def _spread(n: int, total: int) -> list[int]:
    """n indices out of range(total), evenly spaced (Bresenham), the last one included."""
    if n <= 0:
        return []
    return [i for i in range(total) if (i + 1) * n // total != i * n // total]
