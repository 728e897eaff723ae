"""GPU facts for the tier planner, as engine.tiers.hardware.HardwareProfile objects.

Two sources:
  * NVML (nvidia-ml-py): GPU name, free/total VRAM, PCIe link generation and width, memory bus width
    and clock -> `gpu_info`, and `profile_from_info` turns them into predicted planner defaults;
  * measurements on the device: pinned and pageable host->device copies, device-memory bandwidth,
    the GEMV / dequantize+matmul kernels per format, launch overheads -> `measure_gpu`, and
    `calibrate_gpu` (what `python -m engine.calibrate` calls on a GPU machine) builds the profile.

pynvml, cupy and torch.cuda are used lazily. Without nvidia-ml-py or its library, `gpu_info` returns
None with one log line; the measurements raise KernelError without a usable device.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..tiers.hardware import ComputeRate, HardwareProfile, default_profile
from .kernels import FORMATS

log = logging.getLogger("engine.cuda")

# Bytes per second per lane and direction after line encoding (8b/10b to gen 2, 128b/130b for gens 3-5,
# FLIT 242/256 for gen 6).
PCIE_LANE_BYTES: Mapping[int, float] = {
    1: 2.5e9 * 8 / 10 / 8, 2: 5e9 * 8 / 10 / 8, 3: 8e9 * 128 / 130 / 8, 4: 16e9 * 128 / 130 / 8,
    5: 32e9 * 128 / 130 / 8, 6: 64e9 * 242 / 256 / 8,
}
# Assumed efficiencies for predictions from NVML facts (the same as engine.tiers.hardware's GPU presets).
H2D_EFFICIENCY = 0.8  # pinned copies vs the link
GEMV_EFFICIENCY = 0.7  # quantized GEMV vs peak memory bandwidth
RESIDENT_EFFICIENCY = 0.8  # streaming reads vs peak memory bandwidth

GEMV_K = 4096  # columns of the calibration matrices
BATCH_T = 32  # activation rows for the dequantize + matmul rate


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """What NVML reports about one GPU; None where the device does not support the query."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    pcie_gen: int | None  # the best generation device and slot both support
    pcie_width: int | None
    pcie_gen_now: int | None  # the current link (an idle GPU trains it down to save power)
    pcie_width_now: int | None
    mem_bus_bits: int | None
    mem_clock_mhz: int | None  # maximum memory clock
    driver: str | None

    @property
    def pcie_bytes_per_s(self) -> float | None:
        """Link bandwidth per direction at the maximum generation and width."""
        if self.pcie_gen not in PCIE_LANE_BYTES or not self.pcie_width:
            return None
        return PCIE_LANE_BYTES[self.pcie_gen] * self.pcie_width

    @property
    def peak_memory_bytes_per_s(self) -> float | None:
        """Datasheet device-memory bandwidth: two transfers per reported clock over the bus."""
        if not self.mem_bus_bits or not self.mem_clock_mhz:
            return None
        return 2 * self.mem_clock_mhz * 1e6 * self.mem_bus_bits / 8


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_handle(pynvml, index: int):
    """NVML numbers GPUs by PCI bus, CUDA (by default) fastest first, and CUDA_VISIBLE_DEVICES
    renumbers them: find cuda:index by its PCI address when torch can tell it."""
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(index)
            bus = f"{p.pci_domain_id:08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0"
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus)
    except (AttributeError, RuntimeError, AssertionError):  # older torch: no PCI ids
        pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def gpu_info(index: int = 0) -> GpuInfo | None:
    """NVML facts about cuda:`index`, or None (with one log line) without nvidia-ml-py, its library
    or the GPU."""
    try:
        import pynvml
    except ImportError:
        log.info("nvidia-ml-py is not installed: no NVML GPU facts (pip install 'engine[cuda12]')")
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        log.info("NVML is unavailable (%s): no GPU facts", e)
        return None
    try:
        h = _nvml_handle(pynvml, index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)

        def optional(fn: Callable, *args):
            try:
                return fn(*args)
            except pynvml.NVMLError:  # NotSupported on some boards, virtual GPUs
                return None

        driver = optional(pynvml.nvmlSystemGetDriverVersion)
        return GpuInfo(
            index=index, name=_text(pynvml.nvmlDeviceGetName(h)), total_bytes=int(mem.total), free_bytes=int(mem.free),
            pcie_gen=optional(pynvml.nvmlDeviceGetMaxPcieLinkGeneration, h),
            pcie_width=optional(pynvml.nvmlDeviceGetMaxPcieLinkWidth, h),
            pcie_gen_now=optional(pynvml.nvmlDeviceGetCurrPcieLinkGeneration, h),
            pcie_width_now=optional(pynvml.nvmlDeviceGetCurrPcieLinkWidth, h),
            mem_bus_bits=optional(pynvml.nvmlDeviceGetMemoryBusWidth, h),
            mem_clock_mhz=optional(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_MEM),
            driver=_text(driver) if driver is not None else None,
        )
    except pynvml.NVMLError as e:
        log.warning("NVML cannot query GPU %d (%s): no GPU facts", index, e)
        return None
    finally:
        pynvml.nvmlShutdown()


def _with_host(host: HardwareProfile | None) -> dict:
    """The host-side fields of a GPU profile, from a CPU profile (calibrated or default)."""
    host = host or default_profile("cpu")
    return {"host_bytes": host.resident_bytes, "disk_read_direct": host.disk_read_direct,
            "disk_read_buffered": host.disk_read_buffered, "disk_latency_s": host.disk_latency_s,
            "memcpy": host.memcpy, "host_compute": host.compute if host.device == "cpu" else host.host_compute,
            "host_compute_int8": host.compute_int8 if host.device == "cpu" else host.host_compute_int8,
            "host_layer_overhead_s": host.layer_overhead_s if host.device == "cpu" else host.host_layer_overhead_s,
            "host_bandwidth": host.resident_bandwidth if host.device == "cpu" else host.host_bandwidth}


def profile_from_info(info: GpuInfo, host: HardwareProfile | None = None) -> HardwareProfile:
    """Predicted planner defaults for the GPU NVML describes: free VRAM as the resident tier, pinned
    copies at H2D_EFFICIENCY of the PCIe link, GEMV and resident reads at fixed fractions of the peak
    memory bandwidth; what NVML cannot give (dense throughput, overheads) stays at default_profile's.
    `host`: a CPU profile for disk, memcpy and RAM (default: default_profile("cpu"))."""
    base = default_profile("cuda")
    changes = {"name": f"cuda {info.name}", "resident_bytes": info.free_bytes, **_with_host(host)}
    link, peak = info.pcie_bytes_per_s, info.peak_memory_bytes_per_s
    if link:
        changes["host_to_device"] = H2D_EFFICIENCY * link
    if peak:
        changes["resident_bandwidth"] = RESIDENT_EFFICIENCY * peak
        changes["compute"] = {f: ComputeRate(GEMV_EFFICIENCY * peak, r.batched) for f, r in base.compute.items()}
    facts = [f"PCIe gen{info.pcie_gen} x{info.pcie_width}" if link else "PCIe link unknown",
             f"{peak / 1e9:.0f} GB/s memory" if peak else "memory bandwidth unknown"]
    changes["source"] = f"nvml {info.name}: {', '.join(facts)}; rates predicted from them (not measured)"
    changes["measurements"] = {"nvml": dataclasses.asdict(info)}
    return dataclasses.replace(base, **changes)


# -- measurements on the device ----------------------------------------------------------------------------
def time_on_stream(fn: Callable[[], object], stream, repeats: int, before: Callable[[], object] | None = None) -> float:
    """Best seconds of `fn` issued to `stream`, timed with CUDA events after one untimed warm-up;
    `before` runs untimed ahead of every call (e.g. an L2 flush)."""
    import torch

    best = math.inf
    torch.cuda.synchronize(stream.device)  # the operands' initialisation, issued to other streams
    with torch.cuda.stream(stream):
        for i in range(repeats + 1):
            if before is not None:
                before()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            if i:
                best = min(best, start.elapsed_time(end) / 1e3)
    return best


def h2d_bandwidth(device, nbytes: int, *, pinned: bool, repeats: int) -> float:
    """B/s of one host->device copy of `nbytes` from pinned or pageable memory."""
    import torch

    host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / time_on_stream(lambda: dev.copy_(host, non_blocking=True), torch.cuda.Stream(device), repeats)


def device_copy_bandwidth(device, nbytes: int, repeats: int) -> float:
    """B/s of device memory traffic (bytes read + bytes written) of a device-to-device copy."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / time_on_stream(lambda: dst.copy_(src), torch.cuda.Stream(device), repeats)


def kernel_rates(dev, matrix_bytes: int, repeats: int) -> dict[str, dict]:
    """Per kernel format: GEMV weight bytes/s at T=1, and token x weight-bytes/s of dequantize + matmul
    at T=BATCH_T, on random weight bytes (the timing does not depend on their values) with L2
    flushed before every timed launch."""
    import torch

    l2 = getattr(torch.cuda.get_device_properties(dev.device), "L2_cache_size", 0)
    flush = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8, device=dev.device)
    return {name: _format_rates(dev, name, matrix_bytes, repeats, flush.zero_) for name in FORMATS}


def _format_rates(dev, fmt: str, matrix_bytes: int, repeats: int, flush: Callable[[], object]) -> dict:
    import torch

    stream, k = dev.compute_stream, GEMV_K
    n = max(1, matrix_bytes // FORMATS[fmt].row_nbytes(k))
    w = torch.randint(0, 256, (n * FORMATS[fmt].row_nbytes(k),), dtype=torch.uint8, device=dev.device)
    x1 = torch.randn((1, k), device=dev.device).to(dev.act_dtype)  # (1, K)
    xb = torch.randn((BATCH_T, k), device=dev.device).to(dev.act_dtype)  # (BATCH_T, K)
    y = torch.empty((1, n), dtype=torch.float32, device=dev.device)

    def gemv():
        dev.kernels.gemv(x1, w, fmt, n, k, out=y, stream=stream)

    def batched():
        wd = dev.kernels.dequantize(w, fmt, n, k, dtype=dev.act_dtype, stream=stream)  # (N, K)
        torch.matmul(xb, wd.T)

    t1 = time_on_stream(gemv, stream, repeats, flush)
    tb = time_on_stream(batched, stream, repeats, flush)
    return {"n": n, "k": k, "weight_bytes": w.numel(), "t1": w.numel() / t1, "batched": BATCH_T * w.numel() / tb,
            "t1_s": t1, f"t{BATCH_T}_s": tb}


def _wall(fn: Callable[[], object], repeats: int) -> float:
    """Best host wall time of fn() including a device synchronisation (launch-bound work)."""
    import torch

    best = math.inf
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def overheads(dev) -> dict[str, float]:
    """Fixed-cost proxies as engine.calibrate measures them on the CPU: per layer, 7 GEMV launches on
    tiny matrices plus a block's small torch ops; per token, softmax and top-k over a 128k vocabulary
    and the host reading one token id."""
    import torch
    import torch.nn.functional as F

    d = dev.device
    fmt = FORMATS["Q8_0"]
    w = torch.zeros(64 * fmt.row_nbytes(256), dtype=torch.uint8, device=d)
    x = torch.randn((1, 256), device=d).to(dev.act_dtype)
    h = torch.randn((1, 1, 512), device=d)
    q, kk = torch.randn((1, 8, 1, 64), device=d), torch.randn((1, 8, 256, 64), device=d)
    logits = torch.randn(128256, device=d)

    def layer():
        with torch.cuda.stream(dev.compute_stream):
            for _ in range(7):
                dev.kernels.gemv(x, w, "Q8_0", 64, 256, stream=dev.compute_stream)
            for _ in range(2):
                F.rms_norm(h, (512,))
            torch.matmul(torch.matmul(q, kk.transpose(-1, -2)).softmax(-1), kk)
            F.silu(h) * h

    def token():
        with torch.cuda.stream(dev.compute_stream):
            torch.topk(logits, 40)
            int(torch.softmax(logits, -1).argmax())

    return {"layer_overhead_s": _wall(layer, 20), "token_overhead_s": _wall(token, 10)}


def measure_gpu(index: int = 0, *, quick: bool = False) -> dict:
    """Everything calibrate needs from cuda:`index`, measured (KernelError without a usable device):
    h2d_pinned / h2d_pageable / device_copy in B/s, per-format kernel rates, overheads, free VRAM."""
    import torch

    from .device import cuda_device

    dev = cuda_device(index)
    nbytes, matrix_bytes, repeats = ((64 << 20, 32 << 20, 3) if quick else (256 << 20, 128 << 20, 5))
    t0 = time.perf_counter()
    free, total = torch.cuda.mem_get_info(dev.device)
    meas = {
        "name": torch.cuda.get_device_name(dev.device), "free_bytes": int(free), "total_bytes": int(total),
        "copy_bytes": nbytes, "h2d_pinned": h2d_bandwidth(dev.device, nbytes, pinned=True, repeats=repeats),
        "h2d_pageable": h2d_bandwidth(dev.device, nbytes, pinned=False, repeats=repeats),
        "device_copy": device_copy_bandwidth(dev.device, nbytes, repeats),
        "kernels": kernel_rates(dev, matrix_bytes, repeats), **overheads(dev),
    }
    meas["seconds"] = time.perf_counter() - t0
    meas["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return meas


def profile_from_measurements(meas: Mapping, info: GpuInfo | None = None,
                              host: HardwareProfile | None = None) -> HardwareProfile:
    """A calibrated GPU profile from `measure_gpu`'s numbers (NVML facts, when given, are kept in
    `measurements`); host-side fields from `host` as in profile_from_info."""
    base = default_profile("cuda")
    compute = {f: ComputeRate(r["t1"], r["batched"]) for f, r in meas["kernels"].items()}
    extra = {"gpu": dict(meas)}
    if info is not None:
        extra["nvml"] = dataclasses.asdict(info)
    return dataclasses.replace(
        base, name=f"cuda {meas['name']}", resident_bytes=int(meas["free_bytes"]), **_with_host(host),
        host_to_device=meas["h2d_pinned"], resident_bandwidth=meas["device_copy"], compute=compute,
        layer_overhead_s=meas["layer_overhead_s"], token_overhead_s=meas["token_overhead_s"],
        source=f"calibrated {meas['date']}", measurements=extra)


def calibrate_gpu(index: int = 0, *, quick: bool = False, host: HardwareProfile | None = None) -> HardwareProfile:
    """The measured profile of cuda:`index` for the planner (save it with
    engine.tiers.hardware.save_profile: it lands in hardware-cuda.json). `host`: the CPU calibration
    for disk, memcpy and RAM. KernelError without a usable device."""
    meas = measure_gpu(index, quick=quick)
    return profile_from_measurements(meas, gpu_info(index), host)

