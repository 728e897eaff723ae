"""The planner: a pure function from (footprint, hardware profile, tier config, workload) to a Plan.

Tiers. "resident": the compute device's memory (VRAM on CUDA, RAM within `resident_budget` on CPU).
"host": pinned RAM beside a GPU; on CPU it does not exist as a separate tier (the CPU computes
straight from RAM, so a host copy *is* resident) and host_budget is ignored. "disk": byte ranges
read from the model file itself (O_DIRECT unless io_backend is posix).

Execution model the prediction assumes (and the scheduler implements): per decode step the units
run in order -- embedding lookup, layers 0..L-1, output head. A unit with streamed bytes is loaded
into one of `ring_size` staging buffers; a load may start as soon as a buffer is free (the unit that
used it `ring_size` loads earlier has finished computing), and loads continue across the step
boundary (weights do not depend on the token). Each link (disk, host->device) serves one load at a
time in order. Resident units cost compute only. The predicted step time comes from simulating this
pipeline to its steady state; it can never beat max(total compute, busy time of the busiest link).

Placement search: for each way of splitting a streamed layer (whole layer / FFN only with attention
resident / attention only), each output head and embedding placement, each KV placement and each
ring size, stream the fewest layers that make the budget fit, spread evenly between resident ones
(so the copy queue works while resident layers compute), then spend what budget is left keeping
whole attention/FFN tensors of streamed layers resident. The candidate with the lowest predicted
workload time wins, with two kinds of tie (see `ranked`): among candidates within 3% of the fastest
that all stream small loads through the ring, the deepest pipeline (most staging bytes ahead);
otherwise, within 0.1%, the one moving fewer bytes per step, then the one using less of the
resident tier.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterator, Mapping, Sequence

from ..errors import ConfigError, PlanError
from .config import AUTO, TierConfig
from .footprint import GROUPS, ModelFootprint, TensorFootprint
from .hardware import HardwareProfile
from .units import DIRECT_IO_ALIGN, READ_CHUNK, format_seconds, format_size

RESIDENT, HOST, DISK = "resident", "host", "disk"
TIERS = (RESIDENT, HOST, DISK)
LINK_DISK, LINK_H2D = "disk", "host->device"
DEFAULT_CONTEXT = 4096  # auto kv_cache.max_context (capped by the model, raised to fit the workload)
RING_CHOICES = (1, 2, 3, 4, 6, 8)
DISK_QUEUE_SATURATION = 2  # read requests in flight for the calibrated (multi-reader) bandwidth
AUTO_IO_THREADS = 4
AUTO_RESIDENT_FRACTION = {"cpu": 0.8, "cuda": 0.9}  # of available RAM / of VRAM
AUTO_HOST_FRACTION = 0.5  # of available RAM, pinned beside a GPU
_SPLITS = {"layer": GROUPS, "ffn": ("ffn",), "attn": ("attn",)}  # what a streamed layer streams
_NEAR = 0.03  # predicted times this close to the fastest are ties for pipeline depth (see ranked)
_TIE = 1e-3  # relative time difference treated as a tie otherwise


@dataclass(frozen=True, slots=True)
class Workload:
    batch: int = 1
    prompt_tokens: int = 128
    gen_tokens: int = 128

    def __post_init__(self):
        for name, low in (("batch", 1), ("prompt_tokens", 1), ("gen_tokens", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"must be an integer >= {low}, got {v!r}", field=f"workload.{name}")

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.gen_tokens


@dataclass(frozen=True, slots=True)
class LayerPlacement:
    index: int
    tier: str  # "resident", or where its streamed tensors come from: "host" | "disk"
    resident_roles: frozenset[str]  # kept resident even when the layer streams (partial residency)
    streamed_roles: frozenset[str]
    streamed_bytes: int  # per decode step
    cpu_decode: bool = False  # hybrid: computed on the CPU over the host tier in passes of <= cpu_max_rows rows


@dataclass(frozen=True, slots=True)
class Prediction:
    token_s: float  # steady-state decode step (one token for each of `batch` sequences)
    compute_s: float  # device busy time per step: kernels, per-layer overheads, attention, lookup
    transfer_s: Mapping[str, float]  # busy seconds per step of each link ("disk", "host->device")
    bound_s: float  # max(compute_s, every link's busy time): no schedule beats it
    bound: str  # the resource that sets bound_s: "compute" or a link name
    prefill_s: float  # one pass over the prompt
    total_s: float  # prefill + gen_tokens decode steps
    batch: int

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.token_s

    def to_json(self) -> dict:
        return {"token_s": self.token_s, "tokens_per_s": self.tokens_per_s, "compute_s": self.compute_s,
                "transfer_s": dict(self.transfer_s), "bound_s": self.bound_s, "bound": self.bound,
                "prefill_s": self.prefill_s, "total_s": self.total_s, "batch": self.batch}


@dataclass(frozen=True, slots=True)
class Plan:
    """Where everything lives, and the contract the scheduler runs to meet the prediction:

    * Units run in order: layers 0..L-1, then the output head. A layer's `streamed_roles` tensors (its
      `resident_roles` stay resident) are loaded per step into one staging buffer; a streamed head is
      loaded as `output_chunks` row ranges of `output_chunk_rows` rows, each its own load.
    * `ring_size` buffers of `staging_bytes` each (alignment slack included); at most
      `prefetch_depth` + 1 loads hold buffers at once, the computing one included; a buffer is reused
      as soon as the unit in it has been computed, and loading runs on into the next step.
    * embedding_tier "disk": rows are read from the model file per token; "host": from pinned RAM.
    * On CPU there is no host tier; "disk" loads read the model file (O_DIRECT unless io_backend posix).
    """

    model: str
    hardware: str
    device: str
    workload: Workload
    layers: tuple[LayerPlacement, ...]
    embedding_tier: str  # rows are looked up per token: host or disk costs a small read per token
    output_tier: str  # the output head; equals embedding_tier when tied
    kv_tier: str
    kv_bytes: int
    kv_context: int
    kv_dtype: str
    ring_size: int  # staging buffers (0 when nothing streams)
    prefetch_depth: int  # loads in flight ahead of the computing unit
    staging_bytes: int  # per buffer, including O_DIRECT alignment slack
    host_staging: bool  # disk loads on CUDA bounce through ring_size pinned host buffers
    resident_bytes: int  # planned use of the resident tier (weights + staging + KV + workspace)
    host_bytes: int
    resident_budget: int
    host_budget: int
    resident_weight_bytes: int
    host_weight_bytes: int
    workspace_bytes: int
    io_backend: str
    io_threads: int
    compute_threads: int | None  # None: all cores
    output_bytes: int  # the output head (the embedding matrix when tied)
    output_chunk_rows: int  # a streamed head is loaded and applied in row chunks of this many rows
    output_chunks: int
    predicted: Prediction
    notes: tuple[str, ...] = ()
    output_cpu_decode: bool = False  # hybrid: the head's chunks computed on the CPU at small passes
    cpu_max_rows: int = 0  # hybrid: passes of at most this many rows compute cpu_decode units on the CPU

    @property
    def streamed_bytes(self) -> Mapping[str, int]:
        """Bytes loaded per decode step from each tier (layers and output head)."""
        out = {HOST: 0, DISK: 0}
        for p in self.layers:
            if p.streamed_bytes:
                out[p.tier] += p.streamed_bytes
        if self.output_tier != RESIDENT:
            out[self.output_tier] += self.output_bytes
        return MappingProxyType(out)

    def table(self) -> str:
        return _render(self)

    def to_json(self) -> dict:
        return {
            "model": self.model, "hardware": self.hardware, "device": self.device,
            "workload": {"batch": self.workload.batch, "prompt_tokens": self.workload.prompt_tokens,
                         "gen_tokens": self.workload.gen_tokens},
            "layers": [{"index": p.index, "tier": p.tier, "resident_roles": sorted(p.resident_roles),
                        "streamed_roles": sorted(p.streamed_roles), "streamed_bytes": p.streamed_bytes}
                       for p in self.layers],
            "embedding_tier": self.embedding_tier,
            "output": {"tier": self.output_tier, "bytes": self.output_bytes, "chunks": self.output_chunks,
                       "chunk_rows": self.output_chunk_rows},
            "kv": {"tier": self.kv_tier, "bytes": self.kv_bytes, "context": self.kv_context, "dtype": self.kv_dtype},
            "staging": {"ring_size": self.ring_size, "prefetch_depth": self.prefetch_depth,
                        "bytes_per_buffer": self.staging_bytes, "host_staging": self.host_staging},
            "memory": {"resident_bytes": self.resident_bytes, "resident_budget": self.resident_budget,
                       "resident_weight_bytes": self.resident_weight_bytes, "host_bytes": self.host_bytes,
                       "host_budget": self.host_budget, "host_weight_bytes": self.host_weight_bytes,
                       "workspace_bytes": self.workspace_bytes},
            "streamed_bytes_per_step": dict(self.streamed_bytes),
            "io": {"backend": self.io_backend, "threads": self.io_threads},
            "compute_threads": self.compute_threads,
            "predicted": self.predicted.to_json(),
            "notes": list(self.notes),
        }


def workspace_bytes(fp: ModelFootprint, batch: int, tokens: int, context: int) -> int:
    """Estimated activation memory of the largest step (the prompt pass, last-token logits only):
    residual, norm, q/k/v, attention output, gate/up/act rows in fp32, one layer's attention
    scores, and the logits."""
    s = fp.spec
    rows = batch * tokens
    per_row = 3 * s.dim + s.q_dim + 2 * s.kv_dim + s.q_dim + 3 * s.ffn_dim
    scores = batch * s.n_heads * tokens * context
    return 4 * (rows * per_row + scores + batch * s.vocab_size)


# -- internal model of one candidate -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Unit:
    """A streamable unit: one layer, or the output head (layer None)."""

    name: str
    layer: int | None
    groups: Mapping[str, tuple[TensorFootprint, ...]]  # group -> tensors ("head" for the output head)
    decode_s: float  # compute per decode step (KV reads excluded: they depend on the KV tier)
    prefill_s: float

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


class _Planner:
    def __init__(self, fp: ModelFootprint, hw: HardwareProfile, cfg: TierConfig, work: Workload):
        self.fp, self.hw, self.cfg, self.work = fp, hw, cfg, work
        self.notes: list[str] = []
        self.device = hw.device
        if cfg.device != AUTO and cfg.device != hw.device:
            raise PlanError(f"the config asks for device {cfg.device} but the hardware profile "
                            f"({hw.name}) is for {hw.device}", path=cfg.source, field="device")
        self.cuda = self.device == "cuda"
        self.io_backend = cfg.io_backend if cfg.io_backend != AUTO else ("kvikio" if self.cuda else "odirect")
        self.disk_bw = hw.disk_read(self.io_backend)
        self.slow = cfg.slow_tier == "disk"
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
            return sum(hw.rate(t.fmt).seconds(t.nbytes, tokens) for t in tensors)

        units = []
        for lay in self.fp.layers:
            groups = {g: lay.group_tensors(g) for g in GROUPS}
            units.append(_Unit(f"layer {lay.index}", lay.index, MappingProxyType(groups),
                               cost(lay.tensors, b) + hw.layer_overhead_s,
                               cost(lay.tensors, rows) + hw.layer_overhead_s))
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
                               MappingProxyType({"head": (part,)}), c, c))
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

    def kv_read_s(self, kv_tier: str) -> float:
        """Per layer per decode step: read the cached keys and values at the mean context."""
        s, w = self.fp.spec, self.work
        mean_ctx = w.prompt_tokens + w.gen_tokens / 2
        nbytes = 2 * w.batch * mean_ctx * s.kv_dim * (2 if self.kv_dtype == "f16" else 4)
        bw = self.hw.resident_bandwidth if kv_tier == RESIDENT else self.hw.host_to_device
        return nbytes / bw

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
                            key = (tuple(sorted(cand.streamed.items())), tuple(sorted(cand.source.items())),
                                   cand.ring if cand.streamed else 0, cand.embedding_tier, cand.kv_tier)
                            if key not in seen:
                                seen.add(key)
                                yield cand

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
        for n_disk in range(0, len(order) + 1):
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
        seq_decode, seq_prefill = [], []
        for i, u in enumerate(self.layout(c.split).units):
            stages = self.stages(c.source[i], u.bytes_of(c.streamed[i]), c.ring) if i in c.streamed else ()
            extra = kv_s if u.layer is not None else 0.0
            seq_decode.append((u.decode_s + extra, stages))
            seq_prefill.append((u.prefill_s, stages))
        start = self.hw.token_overhead_s + self.lookup_s(c.embedding_tier, b)
        lookahead = self.lookahead(c.ring)
        token_s = _steady_state(seq_decode, lookahead, start)
        prefill_s = _one_pass(seq_prefill, lookahead, self.lookup_s(c.embedding_tier, b * self.work.prompt_tokens))
        compute_s = start + sum(cs for cs, _ in seq_decode)
        links: dict[str, float] = {}
        for _, stages in seq_decode:
            for link, dur in stages:
                links[link] = links.get(link, 0.0) + dur
        bound, bound_s = "compute", compute_s
        for link, busy in links.items():
            if busy > bound_s:
                bound, bound_s = link, busy
        return Prediction(token_s, compute_s, MappingProxyType(links), bound_s, bound, prefill_s,
                          prefill_s + self.work.gen_tokens * token_s, b)

    # -- result ---------------------------------------------------------------------------------------
    def build(self, c: _Candidate, pred: Prediction) -> Plan:
        fp, lay = self.fp, self.layout(c.split)
        layers = []
        for i, lf in enumerate(fp.layers):
            roles = frozenset(t.role for t in lf.tensors)
            if i in c.streamed:
                moved = frozenset(t.role for g in c.streamed[i] for t in lf.group_tensors(g))
                layers.append(LayerPlacement(i, c.source[i], roles - moved, moved,
                                             lay.units[i].bytes_of(c.streamed[i])))
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
        if self.resident_weights_fraction is not None and c.kv_tier == RESIDENT:
            resident_bytes += self.kv_bytes
            resident_budget += self.kv_bytes
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
            output_chunks=len(lay.head) if output_tier != RESIDENT else 1, predicted=pred, notes=tuple(self.notes))

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


def _simulate(seq, lookahead: int, start_s: float, steps: int) -> list[float]:
    """Compute end time of each step. seq: per unit (compute seconds, load stages ((link, seconds), ...))."""
    link_free: dict[str, float] = {}
    done: list[float] = []  # compute end of each streamed unit, in load order
    t, ends = 0.0, []
    for _ in range(steps):
        t += start_s
        for compute, stages in seq:
            if stages:
                m = len(done)
                ready = done[m - lookahead] if m >= lookahead else 0.0
                for link, dur in stages:
                    ready = max(ready, link_free.get(link, 0.0)) + dur
                    link_free[link] = ready
                t = max(t, ready)
            t += compute
            if stages:
                done.append(t)
        ends.append(t)
    return ends


def _steady_state(seq, lookahead: int, start_s: float) -> float:
    n_streamed = sum(1 for _, s in seq if s)
    if not n_streamed:
        return start_s + sum(c for c, _ in seq)
    warm = 3 + math.ceil(2 * lookahead / n_streamed)
    measure = 4
    ends = _simulate(seq, lookahead, start_s, warm + measure)
    return (ends[-1] - ends[-1 - measure]) / measure


def _one_pass(seq, lookahead: int, start_s: float) -> float:
    return _simulate(seq, max(1, lookahead), start_s, 1)[0]


def plan(fp: ModelFootprint, hw: HardwareProfile, cfg: TierConfig, work: Workload = Workload()) -> Plan:
    """The placement with the lowest predicted time for `work`. Pure: reads no weights, allocates nothing.
    Raises PlanError (saying what is needed) when no placement fits the budgets."""
    return ranked(fp, hw, cfg, work, 1)[0]


def ranked(fp: ModelFootprint, hw: HardwareProfile, cfg: TierConfig, work: Workload = Workload(),
           n: int = 2) -> list[Plan]:
    """The planner's n best placements, best first (fewer when fewer fit): `plan()` is the first; the
    others let a benchmark check the ranking against measurements. Raises PlanError like plan().

    Placements predicted within _NEAR of the fastest are ties the cost model cannot separate. If they
    all stream loads smaller than DISK_QUEUE_SATURATION read requests through the staging ring, the
    one with more staging bytes ahead of the computing unit comes first: paired runs of SmolLM2
    (bench_tiers --runner-up) found that one up to 10% faster at 50% and 33% budgets, because
    compute-bound stretches fill a shallow ring and idle the disk. Otherwise the faster prediction
    wins, where _TIE apart counts as equal, and between equals fewer bytes moved per step (robust to
    a cost model that is off), then sparing the resident tier."""
    p = _Planner(fp, hw, cfg, work)
    left = [(cand, p.predict(cand)) for cand in p.candidates()]
    if not left:
        raise p.explain()
    fastest = min(pred.total_s for _, pred in left)
    near = [cp for cp in left if cp[1].total_s <= fastest * (1 + _NEAR)]
    # depth matters where one load in flight does not saturate the disk (disk_bw_at): small loads
    by_depth = all(c.streamed and c.staging_bytes < DISK_QUEUE_SATURATION * READ_CHUNK for c, _ in near)
    ahead = {id(c): (p.lookahead(c.ring) - 1) * c.staging_bytes for c, _ in near} if by_depth else {}

    def better(a: tuple[_Candidate, Prediction], b: tuple[_Candidate, Prediction]) -> bool:
        da, db = ahead.get(id(a[0])), ahead.get(id(b[0]))
        if da is not None and db is not None and da != db:
            return da > db
        return _better(*a, *b)

    out = []
    while left and len(out) < n:
        best = left[0]
        for cp in left[1:]:
            if better(cp, best):
                best = cp
        left.remove(best)
        out.append(p.build(*best))
    return out


def _better(c: _Candidate, pred: Prediction, c0: _Candidate, pred0: Prediction) -> bool:
    if pred.total_s < pred0.total_s * (1 - _TIE):
        return True
    if pred.total_s > pred0.total_s * (1 + _TIE):
        return False
    # equal predicted time: prefer fewer bytes moved per step (robust to a cost model that is off),
    # then sparing the scarce resident tier, then the (slightly) faster one
    if c.moved_bytes != c0.moved_bytes:
        return c.moved_bytes < c0.moved_bytes
    if c.resident_bytes != c0.resident_bytes:
        return c.resident_bytes < c0.resident_bytes
    return pred.total_s < pred0.total_s


def evaluate(fp: ModelFootprint, hw: HardwareProfile, cfg: TierConfig, layers: Sequence[LayerPlacement], *,
             output_tier: str = RESIDENT, embedding_tier: str = RESIDENT, kv_tier: str = RESIDENT,
             ring_size: int = 2, work: Workload = Workload()) -> Prediction:
    """The cost model's prediction for a placement chosen by hand (budgets are not checked): lets a
    caller compare the planner's choice with an alternative, or a measurement with its prediction."""
    p = _Planner(fp, hw, cfg, work)
    if len(layers) != len(fp.layers):
        raise PlanError(f"{len(layers)} placements for {len(fp.layers)} layers", field="layers")
    lay_out = p.layout("layer")
    streamed, source = {}, {}
    for lp, lay in zip(layers, fp.layers):
        if lp.tier not in TIERS:
            raise PlanError(f"tier must be one of {', '.join(TIERS)}, got {lp.tier!r}", field=f"layers[{lp.index}]")
        groups = frozenset(g for g in GROUPS if any(t.role in lp.streamed_roles for t in lay.group_tensors(g)))
        if lp.tier != RESIDENT and groups:
            streamed[lp.index], source[lp.index] = groups, lp.tier
    if output_tier != RESIDENT:
        for i in lay_out.head:
            streamed[i], source[i] = frozenset(lay_out.units[i].groups), output_tier
    cand = _Candidate("layer", streamed, source, ring_size if streamed else 0, embedding_tier, kv_tier, 0, 0, 0, 0)
    return p.predict(cand)


# -- rendering ------------------------------------------------------------------------------------------
_SYMBOL = {RESIDENT: "R", HOST: "H", DISK: "D"}


def _render(p: Plan) -> str:
    w, pr = p.workload, p.predicted
    dev_mem = "VRAM" if p.device == "cuda" else "RAM"
    lines = [f"plan: {p.model} on {p.hardware}",
             f"workload: batch {w.batch}, prompt {w.prompt_tokens} tokens, generate {w.gen_tokens} tokens"]
    kv_res = p.kv_bytes if p.kv_tier == RESIDENT else 0
    lines.append(f"resident ({dev_mem}): {format_size(p.resident_bytes)} of {format_size(p.resident_budget)} "
                 f"= weights {format_size(p.resident_weight_bytes)} + staging {p.ring_size} x "
                 f"{format_size(p.staging_bytes)} + KV {format_size(kv_res)} + workspace "
                 f"{format_size(p.workspace_bytes)}")
    if p.device == "cuda":
        bounce = p.ring_size * p.staging_bytes if p.host_staging else 0
        kv_host = p.kv_bytes if p.kv_tier == HOST else 0
        lines.append(f"host (pinned RAM): {format_size(p.host_bytes)} of {format_size(p.host_budget)} = weights "
                     f"{format_size(p.host_weight_bytes)} + disk bounce buffers {format_size(bounce)} + KV "
                     f"{format_size(kv_host)}")
    head = f" in {p.output_chunks} chunks of {p.output_chunk_rows} rows" if p.output_chunks > 1 else ""
    lines.append(f"KV cache: {p.kv_tier}, {format_size(p.kv_bytes)} ({p.kv_context} tokens x batch {w.batch}, "
                 f"{p.kv_dtype}); embedding: {p.embedding_tier}; output head: {p.output_tier}{head}")
    if p.ring_size:
        lines.append(f"staging: ring of {p.ring_size} x {format_size(p.staging_bytes)}, prefetch depth "
                     f"{p.prefetch_depth}; io {p.io_backend}, {p.io_threads} threads")
    lines.append("layer map (R resident, H host, D disk; lower case = partly resident):")
    lines.append("  " + "".join(_SYMBOL[lp.tier].lower() if lp.tier != RESIDENT and lp.resident_roles
                                else _SYMBOL[lp.tier] for lp in p.layers))
    lines.append(f"  {'tier':<9} {'resident part':<14} {'streamed/step':<22} layers")
    for (tier, kept), group in _groups(p.layers).items():
        per = sum(lp.streamed_bytes for lp in group)
        per = f"{format_size(per)} ({len(group)} layer{'s' if len(group) > 1 else ''})" if per else "-"
        lines.append(f"  {tier:<9} {kept:<14} {per:<22} {_ranges([lp.index for lp in group])}")
    streamed = ", ".join(f"{t} {format_size(n)}" for t, n in p.streamed_bytes.items() if n) or "none"
    links = ", ".join(f"{k} {format_seconds(v)}" for k, v in pr.transfer_s.items()) or "no transfers"
    lines.append(f"streamed per step: {streamed}")
    lines.append(f"predicted per step: compute {format_seconds(pr.compute_s)}; {links}; bound "
                 f"{format_seconds(pr.bound_s)} ({pr.bound}); pipeline {format_seconds(pr.token_s)} -> "
                 f"{pr.tokens_per_s:.3g} tokens/s")
    lines.append(f"predicted workload: prefill {format_seconds(pr.prefill_s)} + {w.gen_tokens} steps = "
                 f"{format_seconds(pr.total_s)}")
    lines.extend(f"note: {n}" for n in p.notes)
    return "\n".join(lines)


def _groups(layers: Sequence[LayerPlacement]) -> dict[tuple[str, str], list[LayerPlacement]]:
    """Layers grouped by (tier, which part stays resident), in first-seen order."""
    out: dict[tuple[str, str], list[LayerPlacement]] = {}
    for lp in layers:
        if not lp.streamed_roles:
            kept = "all"
        else:
            kept = ", ".join(g for g in GROUPS if any(r.startswith(g + "_") for r in lp.resident_roles)) or "none"
        out.setdefault((lp.tier, kept), []).append(lp)
    return out


def _ranges(idx: Sequence[int]) -> str:
    """[0, 2, 4, 6, 9, 10] -> "0..6 step 2, 9, 10" (arithmetic runs of three or more are folded)."""
    parts, i = [], 0
    while i < len(idx):
        j = i + 1
        if j < len(idx):
            step = idx[j] - idx[i]
            while j + 1 < len(idx) and idx[j + 1] - idx[j] == step:
                j += 1
        if j - i >= 2:
            parts.append(f"{idx[i]}-{idx[j]}" if step == 1 else f"{idx[i]}..{idx[j]} step {step}")
            i = j + 1
        else:
            parts.append(str(idx[i]))
            i += 1
    return ", ".join(parts)
