"""Hardware profiles: the bandwidths and kernel throughputs the planner's cost model runs on.

Three sources, each labelled in `HardwareProfile.source`:
  * "calibrated ..."  -- measured on this machine by `python -m engine.calibrate` (cached JSON);
  * "default ..."     -- conservative built-in numbers, used when nothing was calibrated;
  * "preset ..."      -- GPU presets (rtx3090, rtx4090, h100) derived from datasheet numbers with
                         assumed efficiencies. They were never measured here (there is no GPU on the
                         build machine): plans made with them are predictions, not measurements.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType

from ..cpu.launcher import ACTIVATIONS, INT8_FORMATS
from ..errors import ConfigError
from ..formats import FORMATS

GiB = 1 << 30
CACHE_ENV = "ENGINE_CACHE_DIR"


@dataclass(frozen=True, slots=True)
class ComputeRate:
    """Throughput of the linear kernels for one weight format.

    t1: weight bytes per second at T=1 (memory-bound GEMV). batched: token x weight-bytes per second
    at many tokens (compute-bound). A (T, K) x (N, K) product over `nbytes` of weights takes
    max(nbytes / t1, T * nbytes / batched).
    """

    t1: float
    batched: float

    def __post_init__(self):
        if not (self.t1 > 0 and self.batched > 0):
            raise ConfigError(f"compute rates must be positive, got t1={self.t1!r} batched={self.batched!r}",
                              field="compute")

    def seconds(self, nbytes: int, tokens: int) -> float:
        return max(nbytes / self.t1, tokens * nbytes / self.batched)


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    device: str  # "cpu" | "cuda"
    name: str
    resident_bytes: int  # memory of the compute device (VRAM; RAM available on CPU)
    host_bytes: int  # RAM available for the host tier (0 on CPU: RAM is the resident tier)
    disk_read_direct: float  # B/s, O_DIRECT (or GPUDirect via kvikio) sequential reads of MiB runs
    disk_read_buffered: float  # B/s through the page cache (cold)
    disk_latency_s: float  # one small random read (an embedding row)
    host_to_device: float  # B/s host -> device copies (pinned); equals memcpy on CPU
    memcpy: float  # B/s RAM -> RAM
    resident_bandwidth: float  # B/s streaming reads of resident memory (KV cache in attention)
    compute: Mapping[str, ComputeRate]  # format name -> linear kernel throughput
    layer_overhead_s: float  # fixed per layer per step: launches, norms, rope, small ops
    token_overhead_s: float  # fixed per decode step: sampling, embedding, bookkeeping
    source: str = "default"
    measurements: Mapping[str, object] = field(default_factory=dict, compare=False)
    # the host CPU beside a GPU (hybrid compute; empty: unknown, so nothing computes on the CPU): its
    # linear kernels per format, per-layer overhead, and RAM read bandwidth (attention over host KV)
    host_compute: Mapping[str, ComputeRate] = field(default_factory=dict)
    host_layer_overhead_s: float = 0.0
    host_bandwidth: float = 0.0
    # the same CPU's kernels with 8-bit activations (config cpu_activations: int8), for the formats that
    # have that path (engine.cpu.INT8_FORMATS); empty: not measured, priced at the int16 rates above.
    # compute_int8 is a CPU profile's own; on a CUDA profile the host CPU's go in host_compute_int8
    compute_int8: Mapping[str, ComputeRate] = field(default_factory=dict)
    host_compute_int8: Mapping[str, ComputeRate] = field(default_factory=dict)

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"hardware profile device must be cpu or cuda, got {self.device!r}", field="device")
        for name in ("disk_read_direct", "disk_read_buffered", "host_to_device", "memcpy", "resident_bandwidth"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"must be a positive bandwidth in bytes/s, got {v!r}", field=name)
        if not self.compute:
            raise ConfigError("needs at least one format's compute rate", field="compute")
        for name, known in (("compute", FORMATS), ("host_compute", FORMATS), ("compute_int8", INT8_FORMATS),
                            ("host_compute_int8", INT8_FORMATS)):
            unknown = [f for f in getattr(self, name) if f not in known]
            if unknown:
                what = "unknown formats" if known is FORMATS else "formats without an 8-bit-activation path"
                raise ConfigError(f"{what} {unknown} (known: {', '.join(sorted(known))})", field=name)
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        if self.compute_int8 and self.device != "cpu":
            raise ConfigError("a CUDA profile's compute is the GPU's, whose kernels do not take cpu_activations "
                              "(the host CPU's int8 rates go in host_compute_int8)", field="compute_int8")
        if self.host_compute_int8 and not self.host_compute:
            raise ConfigError("needs host_compute (the same CPU's int16 rates)", field="host_compute_int8")
        if self.host_compute and not self.host_bandwidth > 0:
            raise ConfigError(f"must be a positive bandwidth in bytes/s with host_compute, got {self.host_bandwidth!r}",
                              field="host_bandwidth")
        object.__setattr__(self, "measurements", MappingProxyType(dict(self.measurements)))

    def rate(self, fmt: str, activations: str = "int16") -> ComputeRate:
        """The computing device's rate for a format; a format that was not measured gets the slowest
        measured one. On a CPU, `activations` (the config's cpu_activations) "int8" takes the 8-bit rate
        where one was measured; a CUDA device's kernels do not take it."""
        return _pick(self.compute, self.compute_int8, fmt, activations)

    def host_rate(self, fmt: str, activations: str = "int16") -> ComputeRate | None:
        """The host CPU's rate for a format, as `rate` picks it; None if the host CPU is unknown."""
        return _pick(self.host_compute, self.host_compute_int8, fmt, activations) if self.host_compute else None

    def disk_read(self, io_backend: str) -> float:
        """Bandwidth of the slow tier for a config's io_backend (posix = buffered, others = direct)."""
        return self.disk_read_buffered if io_backend == "posix" else self.disk_read_direct

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["compute"] = {k: asdict(v) for k, v in self.compute.items()}
        for name in ("host_compute", "compute_int8", "host_compute_int8"):
            d[name] = {k: asdict(v) for k, v in getattr(self, name).items()}
        d["measurements"] = dict(self.measurements)
        return d

    @classmethod
    def from_json(cls, data: Mapping, *, path: str | None = None) -> HardwareProfile:
        try:
            d = dict(data)
            d["compute"] = {k: ComputeRate(**v) for k, v in d["compute"].items()}
            for name in ("host_compute", "compute_int8", "host_compute_int8"):  # absent in older profiles
                d[name] = {k: ComputeRate(**v) for k, v in d.get(name, {}).items()}
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(str(e).split(": ", 1)[-1], path=path, field=e.field) from None
        except (KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"not a hardware profile ({type(e).__name__}: {e})", path=path) from None


def _pick(rates: Mapping[str, ComputeRate], int8: Mapping[str, ComputeRate], fmt: str,
          activations: str) -> ComputeRate:
    """A format's rate under `activations`: the int8 one where it was measured (only INT8_FORMATS have
    that path: the others run as with int16), else the default one, else the slowest measured."""
    if activations not in ACTIVATIONS:
        raise ConfigError(f"must be one of {', '.join(ACTIVATIONS)}, got {activations!r}", field="cpu_activations")
    got = (int8.get(fmt) if activations == "int8" else None) or rates.get(fmt)
    return got or min(rates.values(), key=lambda r: r.t1)


def cache_dir() -> Path:
    """Where calibrate writes profiles: $ENGINE_CACHE_DIR, else ~/.cache/engine."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "engine"


def profile_path(device: str) -> Path:
    return cache_dir() / f"hardware-{device}.json"


def detect_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _available_ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 8 * GiB


def _uniform_compute(t1: float, batched: float) -> dict[str, ComputeRate]:
    return {name: ComputeRate(t1, batched) for name in FORMATS}


def default_profile(device: str = "cpu") -> HardwareProfile:
    """Conservative numbers for an uncalibrated machine (a slow SATA-class disk, one slow core's worth
    of kernel throughput); real machines are faster, so plans made with this err on the slow side."""
    if device == "cpu":
        return HardwareProfile(
            device="cpu", name=f"cpu ({os.cpu_count()} threads)", resident_bytes=_available_ram(), host_bytes=0,
            disk_read_direct=0.4e9, disk_read_buffered=0.3e9, disk_latency_s=300e-6,
            host_to_device=2e9, memcpy=2e9, resident_bandwidth=4e9,
            compute=_uniform_compute(1e9, 4e9), layer_overhead_s=300e-6, token_overhead_s=2e-3,
            source="default (conservative, not calibrated: run python -m engine.calibrate)")
    if device == "cuda":
        vram = 8 * GiB
        name = "cuda (no GPU detected: assumed 8 GiB, PCIe 3.0 x16)"
        try:
            import torch

            if torch.cuda.is_available():
                props = torch.cuda.get_device_properties(0)
                vram, name = int(props.total_memory), f"cuda {props.name}"
        except ImportError:
            pass
        return HardwareProfile(
            device="cuda", name=name, resident_bytes=vram, host_bytes=_available_ram(),
            disk_read_direct=1.5e9, disk_read_buffered=1.0e9, disk_latency_s=100e-6,
            host_to_device=10e9, memcpy=5e9, resident_bandwidth=250e9,
            compute=_uniform_compute(150e9, 5e12), layer_overhead_s=150e-6, token_overhead_s=2e-3,
            source="default (conservative assumption for an unknown GPU, predicted)")
    raise ConfigError(f"no default profile for device {device!r} (cpu, cuda)", field="device")


def _gpu_preset(name: str, vram_gib: float, mem_bw: float, pcie: float, dense_flops: float,
                host_gib: float, nvme: float, ram_bw: float, cpu_ops: float) -> Callable[[], HardwareProfile]:
    """A datasheet-derived GPU profile. Assumed efficiencies (not measured): quantized GEMV at 70% of
    the memory bandwidth, dequant matmul at 40% of dense fp16 tensor throughput, pinned host->device
    at 80% of the PCIe link, NVMe at its sequential-read rating. The host CPU (hybrid compute): its
    quantized GEMV at 70% of the RAM's peak bandwidth (llama.cpp-class kernels reach 75-93%), batched
    at 40% of `cpu_ops` multiply-adds/s, 80 us per layer (norms, rope, attention, two activation
    hand-overs)."""

    def make() -> HardwareProfile:
        compute, host = {}, {}
        for fmt_name, fmt in FORMATS.items():
            bytes_per_weight = fmt.type_size / fmt.block_size
            compute[fmt_name] = ComputeRate(t1=0.7 * mem_bw, batched=0.4 * dense_flops / 2 * bytes_per_weight)
            host[fmt_name] = ComputeRate(t1=0.7 * ram_bw, batched=0.4 * cpu_ops * bytes_per_weight)
        return HardwareProfile(
            device="cuda", name=name, resident_bytes=int(vram_gib * GiB), host_bytes=int(host_gib * GiB),
            disk_read_direct=nvme, disk_read_buffered=0.7 * nvme, disk_latency_s=80e-6,
            host_to_device=0.8 * pcie, memcpy=20e9, resident_bandwidth=0.8 * mem_bw,
            compute=compute, layer_overhead_s=60e-6, token_overhead_s=1e-3,
            source=f"preset {name}: datasheet-derived assumptions, predicted (not measured)",
            host_compute=host, host_layer_overhead_s=80e-6, host_bandwidth=0.8 * ram_bw)

    return make


# name -> profile factory. Datasheet figures: memory bandwidth, PCIe link (per direction), dense fp16
# tensor FLOP/s; host RAM, NVMe, RAM bandwidth and CPU int8 multiply-adds/s are assumptions about a
# typical machine carrying that card: a 3090 desktop with dual-channel DDR4-3200 (51 GB/s) and 8 cores,
# a 4090 desktop with dual-channel DDR5-6000 (96 GB/s) and 16 AVX-512 cores, an H100 server with
# 8-channel DDR5-4800 (307 GB/s).
PRESETS: Mapping[str, Callable[[], HardwareProfile]] = MappingProxyType({
    "rtx3090": _gpu_preset("NVIDIA RTX 3090 (24 GB GDDR6X, PCIe 4.0 x16)", 24, 936e9, 32e9, 71e12, 64, 7e9,
                           51.2e9, 0.5e12),
    "rtx4090": _gpu_preset("NVIDIA RTX 4090 (24 GB GDDR6X, PCIe 4.0 x16)", 24, 1008e9, 32e9, 165e12, 64, 7e9,
                           96e9, 1e12),
    "h100": _gpu_preset("NVIDIA H100 SXM (80 GB HBM3, PCIe 5.0 x16)", 80, 3350e9, 64e9, 990e12, 512, 12e9,
                        307e9, 2e12),
})


def load_profile(path: str | os.PathLike | None = None, device: str = "cpu") -> HardwareProfile:
    """The profile at `path`; with no path, the cached calibration for `device`, else the defaults."""
    if path is None:
        cached = profile_path(device)
        if not cached.is_file():
            return default_profile(device)
        path = cached
    path = os.fspath(path)
    return HardwareProfile.from_json(read_json_object(path, "hardware profile"), path=path)


def read_json_object(path: str, what: str) -> Mapping:
    """A JSON object from a profile file; ConfigError naming the file when it is unreadable or not one."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as e:
        raise ConfigError(f"cannot read {what}: {e.strerror}", path=path) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} is not valid JSON: {e.msg} (line {e.lineno})", path=path) from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be a JSON object", path=path)
    return data


def write_json(path: Path, data: object) -> Path:
    """Write a profile atomically (a temporary file renamed over `path`), creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def save_profile(profile: HardwareProfile, path: str | os.PathLike | None = None) -> Path:
    return write_json(Path(path) if path is not None else profile_path(profile.device), profile.to_json())


def resolve_profile(hardware: str, device: str, hardware_path: str | None = None) -> HardwareProfile:
    """The profile a config asks for: a preset name, a JSON path, or auto (cached or defaults for device)."""
    if hardware in PRESETS:
        return PRESETS[hardware]()
    if hardware_path is not None:
        return load_profile(hardware_path)
    return load_profile(None, device)
