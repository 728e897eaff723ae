"""The planner's contract: the workload it plans for, the Plan it returns, and the prediction in it."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ...errors import ConfigError
from ..footprint import ModelFootprint
from ..units import PREFILL_TOKENS, SCORE_BYTES

RESIDENT, HOST, DISK = "resident", "host", "disk"
TIERS = (RESIDENT, HOST, DISK)
LINK_DISK, LINK_H2D = "disk", "host->device"
DEFAULT_CONTEXT = 4096  # auto kv_cache.max_context (capped by the model, raised to fit the workload)
RING_CHOICES = (1, 2, 3, 4, 6, 8)
DISK_QUEUE_SATURATION = 2  # read requests in flight for the calibrated (multi-reader) bandwidth
AUTO_IO_THREADS = 4
AUTO_RESIDENT_FRACTION = {"cpu": 0.8, "cuda": 0.9}  # of available RAM / of VRAM
AUTO_HOST_FRACTION = 0.5  # of available RAM, pinned beside a GPU


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
class ExpertPlacement:
    """Where each routed expert of one MoE layer lives (the layer's dense part is its LayerPlacement).
    tiers[e]: RESIDENT | HOST | DISK; frequency[e]: the share of tokens the router sends to expert e
    (router statistics, or k/E uniform); expert_bytes: one expert's rows of the three stacked tensors;
    host_read / disk_read: the predicted bytes per decode step moved from each tier for this layer's routed
    experts that are neither resident nor in the expert cache."""

    layer: int
    tiers: tuple[str, ...]
    frequency: tuple[float, ...]
    expert_bytes: int
    host_read: float = 0.0
    disk_read: float = 0.0

    @property
    def read_bytes(self) -> float:
        return self.host_read + self.disk_read

    def count(self, tier: str) -> int:
        return sum(1 for t in self.tiers if t == tier)

    def hottest(self, tier: str, n: int = 3) -> list[int]:
        """The n most frequently routed experts in `tier`, hottest first."""
        ids = [e for e, t in enumerate(self.tiers) if t == tier]
        return sorted(ids, key=lambda e: (-self.frequency[e], e))[:n]


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
    cpu_s: float = 0.0  # hybrid: the host CPU's share of compute_s

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.token_s

    def to_json(self) -> dict:
        return {"token_s": self.token_s, "tokens_per_s": self.tokens_per_s, "compute_s": self.compute_s,
                "transfer_s": dict(self.transfer_s), "bound_s": self.bound_s, "bound": self.bound,
                "prefill_s": self.prefill_s, "total_s": self.total_s, "batch": self.batch, "cpu_s": self.cpu_s}


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
    * kv_tier "host" (CUDA): every layer's KV cache lives in host RAM and its attention runs on the CPU
      beside it (q/k/v go over, the result comes back); hybrid CPU-decoded layers keep theirs there too.
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
    # mixture of experts: per MoE layer where each expert lives; an expert cache of `expert_cache` slots of
    # `expert_slot_bytes` (resident tier) holds recently routed non-resident experts; `router` says where
    # the routing frequencies came from (a router profile's path, or "uniform")
    experts: tuple[ExpertPlacement, ...] = ()
    expert_cache: int = 0
    expert_slot_bytes: int = 0
    router: str = ""

    @property
    def kv_host_bytes(self) -> int:
        """KV cache bytes in host RAM: all of it (kv_tier host), else the CPU-decoded layers' share."""
        if self.kv_tier == HOST:
            return self.kv_bytes
        return sum(lp.cpu_decode for lp in self.layers) * (self.kv_bytes // max(1, len(self.layers)))

    @property
    def streamed_bytes(self) -> Mapping[str, int]:
        """Bytes loaded per decode step from each tier (layers and output head); units the CPU computes
        at decode (hybrid) are not loaded then."""
        out = {HOST: 0, DISK: 0}
        for p in self.layers:
            if p.streamed_bytes and not p.cpu_decode:
                out[p.tier] += p.streamed_bytes
        if self.output_tier != RESIDENT and not self.output_cpu_decode:
            out[self.output_tier] += self.output_bytes
        for x in self.experts:  # routed experts: the expected misses of the expert cache
            out[HOST] += round(x.host_read)
            out[DISK] += round(x.disk_read)
        return MappingProxyType(out)

    def table(self) -> str:
        from .rendering import render

        return render(self)

    def to_json(self) -> dict:
        return {
            "model": self.model, "hardware": self.hardware, "device": self.device,
            "workload": {"batch": self.workload.batch, "prompt_tokens": self.workload.prompt_tokens,
                         "gen_tokens": self.workload.gen_tokens},
            "layers": [{"index": p.index, "tier": p.tier, "resident_roles": sorted(p.resident_roles),
                        "streamed_roles": sorted(p.streamed_roles), "streamed_bytes": p.streamed_bytes,
                        "decode_device": "cpu" if p.cpu_decode else self.device}
                       for p in self.layers],
            "embedding_tier": self.embedding_tier,
            "output": {"tier": self.output_tier, "bytes": self.output_bytes, "chunks": self.output_chunks,
                       "chunk_rows": self.output_chunk_rows,
                       "decode_device": "cpu" if self.output_cpu_decode else self.device},
            "hybrid": {"cpu_max_rows": self.cpu_max_rows},
            "kv": {"tier": self.kv_tier, "bytes": self.kv_bytes, "host_bytes": self.kv_host_bytes, "context": self.kv_context, "dtype": self.kv_dtype},
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
            **({"experts": {"router": self.router, "cache_slots": self.expert_cache,
                            "slot_bytes": self.expert_slot_bytes,
                            "layers": [{"layer": x.layer, "expert_bytes": x.expert_bytes,
                                        "read_bytes_per_step": x.read_bytes,
                                        **{t: [e for e, te in enumerate(x.tiers) if te == t] for t in TIERS}}
                                       for x in self.experts]}} if self.experts else {}),
        }


def workspace_bytes(fp: ModelFootprint, batch: int, tokens: int, context: int) -> int:
    """Activation memory of the largest pass (a prompt fed in passes of at most PREFILL_TOKENS tokens
    per sequence, last-token logits only): residual, norm, q/k/v, attention output, gate/up/act rows
    in fp32, the largest attention chunk's scores and probabilities (engine.attention bounds each by
    SCORE_BYTES), and the logits."""
    s = fp.spec
    rows = batch * min(tokens, PREFILL_TOKENS)
    per_row = 3 * s.dim + s.q_dim + 2 * s.kv_dim + s.q_dim + 3 * s.ffn_dim
    scores = min(4 * s.n_heads * min(tokens, PREFILL_TOKENS) * context, max(SCORE_BYTES, 4 * s.n_heads * context))
    return 4 * (rows * per_row + batch * s.vocab_size) + 2 * scores
