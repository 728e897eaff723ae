"""The CUDA runtime adapter (engine.cuda.device / nvml / kvikio_io).

CPU part (no marker): stream/event ordering of CudaStaging under a stream simulator that runs the
copy and compute streams in adversarial orders (and catches the staging with any fence removed),
CudaDevice.linear's dispatch and numerics on the CPU-built .cu kernels, the CPU fallbacks without
torch CUDA / cupy / kvikio / pynvml, and hardware profiles from fake NVML values.
`-m gpu` part: the same checks on a real device (skipped without one).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from engine.cuda import device as cuda_device_mod
from engine.cuda import kvikio_io, nvml
from engine.cuda.cpu_shim import CpuBuildSpec, CpuKernels, PendingBuild, ShimLibrary
from engine.cuda.device import CudaDevice, cuda_unavailable_reason, linear_path
from engine.cuda.staging import CudaStaging, TorchCudaOps
from engine.device import CpuDevice, select_device
from engine.errors import KernelError, WeightIOError
from engine.formats import FORMATS as QFORMATS
from engine.gguf_file import GGUFFile, TensorInfo
from engine.model import Model
from engine.spec import ModelSpec
from engine.tiers.hardware import (
    ComputeRate,
    HardwareProfile,
    default_profile,
    load_profile,
    save_profile,
)
from engine.tiers.io import FileReader, ReadPlan, aligned_empty, open_reader
from engine.tiers.runtime import Placement, head_info
from engine.tiers.staging import HostStaging, staging_for
from engine.weights import QWeight, layer_layout
from stream_sim import POLICIES, SimOps, sim_staging

GiB = 1 << 30


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """CpuDevice pins torch to one thread; give the rest of the session its setting back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def pattern(n: int, nbytes: int) -> torch.Tensor:
    return ((torch.arange(nbytes) * 7 + 31 * n + 1) % 251 + 1).to(torch.uint8)


def run_ring(staging, launch, finish, units: int = 7, k: int = 2, nbytes: int = 4096) -> dict[int, torch.Tensor]:
    """The scheduler's use of a Staging: k host/device slots, unit n's file bytes = pattern(n). Each
    unit's 'kernel' (issued through `launch` on the compute stream) snapshots the bytes it was given."""
    host = [staging.alloc_host(nbytes, 64) for _ in range(k)]
    dev = [staging.alloc_device(nbytes) for _ in range(k)]
    seen: dict[int, torch.Tensor] = {}
    for n in range(k):
        host[n].copy_(pattern(n, nbytes))  # the reads of the first k units
    for n in range(units):
        s = n % k
        h = staging.upload(host[s], dev[s], nbytes)
        staging.wait(h)
        launch(lambda n=n, data=h.data: seen.__setitem__(n, data.clone()))
        staging.release(h)
        if n + k < units:
            staging.wait_host_free(h)  # the copy has read the pinned slot
            host[s].copy_(pattern(n + k, nbytes))  # the reader refills the slot
    finish()
    return seen


def ring_errors(seen: dict[int, torch.Tensor], units: int = 7, nbytes: int = 4096) -> list[int]:
    return [n for n in range(units) if not torch.equal(seen[n].cpu(), pattern(n, nbytes))]


@pytest.mark.parametrize("policy", list(POLICIES))
def test_cuda_staging_ring_ordering(policy):
    staging, ops = sim_staging(policy)
    seen = run_ring(staging, lambda fn: ops.enqueue(ops.streams["compute"], fn), ops.finish)
    assert ring_errors(seen) == []


@pytest.mark.parametrize("drop", ["compute_wait", "copy_wait", "host_sync"])
def test_ring_test_catches_a_missing_fence(drop):
    """Each fence is needed: without the compute wait a kernel reads the slot before the copy lands;
    without the copy wait the next upload overwrites bytes a kernel has yet to read; without the host
    sync the reader refills the pinned slot before the copy has read it."""
    failing = []
    for policy in POLICIES:
        staging, ops = sim_staging(policy, drop)
        seen = run_ring(staging, lambda fn, ops=ops: ops.enqueue(ops.streams["compute"], fn), ops.finish)
        if ring_errors(seen):
            failing.append(policy)
    assert failing, f"no schedule exposes a staging without {drop}"


def test_host_staging_runs_the_same_ring_without_copies():
    st = HostStaging()
    seen = run_ring(st, lambda fn: fn(), lambda: None)
    assert ring_errors(seen) == []
    host = st.alloc_host(1000, 4096)
    assert host.numel() == 1000 and host.data_ptr() % 4096 == 0
    assert st.alloc_device(1000).numel() == 0
    up = st.upload(host, st.alloc_device(1000), 600)
    assert up.data.data_ptr() == host.data_ptr() and up.data.numel() == 600
    assert st.to_resident(host) is host
    assert isinstance(staging_for(CpuDevice(1)), HostStaging)


def test_to_resident_is_complete_on_return():
    src = pattern(3, 5000)
    staging, _ = sim_staging("lazy")
    assert torch.equal(staging.to_resident(src), src)
    broken, _ = sim_staging("lazy", drop="host_sync")
    assert not torch.equal(broken.to_resident(src), src)


@pytest.mark.parametrize("make", [lambda: HostStaging(), lambda: sim_staging("lazy")[0]], ids=["host", "cuda-sim"])
def test_staging_argument_errors(make):
    st = make()
    with pytest.raises(KernelError) as e:
        st.alloc_host(-1)
    assert e.value.field == "nbytes"
    with pytest.raises(KernelError) as e:
        st.alloc_host(100, align=48)
    assert e.value.field == "align"
    host, dev = st.alloc_host(256, 64), st.alloc_device(256)
    with pytest.raises(KernelError) as e:
        st.upload(host, dev, 257)
    assert e.value.field == "host"
    with pytest.raises(KernelError) as e:
        st.upload(host.view(torch.int8), dev, 16)
    assert e.value.field == "host"


def test_cuda_staging_checks_the_device_buffer():
    st, _ = sim_staging("lazy")
    host = st.alloc_host(8192)
    assert host.data_ptr() % 4096 == 0 and host.numel() == 8192
    with pytest.raises(KernelError) as e:
        st.upload(host, torch.empty(8192, dtype=torch.uint8, device="meta"), 100)
    assert e.value.field == "dev"
    with pytest.raises(KernelError) as e:
        st.upload(host, st.alloc_device(64), 100)
    assert e.value.field == "dev"


# =============================================================================================
# CudaDevice.linear on the CPU-built kernels
# =============================================================================================
SHIM_FORMATS = "GK_FORMATS(X)=X(q4_1, FmtQ4_1) X(q6_k, FmtQ6_K)"


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> ShimLibrary:
    """KernelLibrary (binding, checks, launch plans) with launches run by the g++-built .cu kernels."""
    out = tmp_path_factory.mktemp("cuda_runtime_shim")
    builds = [PendingBuild(CpuBuildSpec(src, defines=(SHIM_FORMATS,), opt="-O1"), out) for src in ("gemv.cu", "dequant.cu")]
    return ShimLibrary(*(CpuKernels(b.wait()) for b in builds))


def shim_device(shim: ShimLibrary, **options) -> CudaDevice:
    ops = SimOps(frozenset({"compute", "copy"}))
    return CudaDevice(torch.device("cpu"), ops, shim, **options)


def quantized(fmt: str, n: int, k: int, seed: int, offset: int = 0) -> tuple[QWeight, np.ndarray]:
    """A QWeight whose bytes start `offset` bytes past a 64-byte boundary, and its float64 values."""
    rng = np.random.default_rng(seed)
    qt = gguf.GGMLQuantizationType[fmt]
    if fmt == "Q6_K":  # gguf-py cannot quantize K-quants: random blocks with small finite scales
        raw = rng.integers(0, 256, size=(n, k // 256 * 210), dtype=np.uint8)
        raw.reshape(n, -1, 210)[:, :, 208:210] = (rng.standard_normal((n, k // 256, 1)) * 0.01).astype(np.float16).view(np.uint8)
    elif fmt == "F32":
        raw = rng.standard_normal((n, k)).astype(np.float32).view(np.uint8)
    else:
        raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qt).view(np.uint8)
    values = gguf.quants.dequantize(raw, qt).reshape(n, k).astype(np.float64)
    buf = torch.empty(raw.size + 64 + offset, dtype=torch.uint8)
    start = (-buf.data_ptr()) % 64 + offset
    data = buf[start:start + raw.size]
    data.copy_(torch.from_numpy(raw.reshape(-1)))
    return QWeight(f"blk.0.{fmt}", QFORMATS[fmt], (n, k), data), values


def relative_error(y: torch.Tensor, x64: np.ndarray, w64: np.ndarray) -> float:
    """max |y - x W^T| / (|x| |W|^T): the error scale of a dot product."""
    x2 = x64.reshape(-1, x64.shape[-1])
    err = np.abs(y.reshape(x2.shape[0], -1).double().numpy() - x2 @ w64.T)
    return float((err / (np.abs(x2) @ np.abs(w64).T + 1e-30)).max())


def rounded(x: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return x.to(dtype).double().numpy()


def test_linear_path_by_rows_and_format():
    assert [linear_path(t, "Q4_1") for t in (1, 2, 8)] == ["gemv"] * 3
    assert [linear_path(t, "Q4_K") for t in (9, 64, 512)] == ["dequant"] * 3
    assert linear_path(1, "Q4_1", reference=True) == "reference"
    assert linear_path(1, "F32") == "reference"  # no CUDA kernel for F32 matrices


@pytest.mark.parametrize("fmt", ["Q4_1", "Q6_K"])
def test_cuda_linear_on_shim_kernels(shim, fmt):
    """Rows <= 8 take the fused GEMV (fp32 accumulation: ~1e-7 of the dot-product scale); more rows
    dequantize to fp16 and matmul (fp16 weights and output: < 2e-3)."""
    n, k = 24, 512
    w, w64 = quantized(fmt, n, k, seed=len(fmt))
    dev = shim_device(shim)
    g = torch.Generator().manual_seed(1)
    for shape, path, tol in [((1, k), "gemv", 1e-5), ((3, k), "gemv", 1e-5), ((2, 4, k), "gemv", 1e-5),
                             ((9, k), "dequant", 2e-3), ((3, 5, k), "dequant", 2e-3)]:
        x = torch.randn(shape, generator=g)
        shim.calls.clear()
        y = dev.linear(x, w)
        assert shim.calls == [path], shape
        assert y.shape == (*shape[:-1], n) and y.dtype == torch.float32
        assert relative_error(y, rounded(x, torch.float16), w64) < tol, (shape, path)
        if path == "gemv":  # activations really were rounded to fp16 first
            assert relative_error(y, x.double().numpy(), w64) > 1e-6


def test_cuda_device_reads_the_files_rows_only(shim):
    """The CUDA kernels read plain rows: the device asks the resident store for none other, and a matrix
    interleaved for the CPU (QWeight.interleave) is refused, not computed wrong."""
    w, _ = quantized("Q6_K", 8, 256, seed=4)
    dev = shim_device(shim)
    assert dev.row_interleave(TensorInfo(w.name, w.fmt, w.shape, 0, w.data.numel())) == 1
    with pytest.raises(KernelError, match="interleaved") as e:
        dev.linear(torch.randn(1, 256), dataclasses.replace(w, interleave=4))
    assert e.value.field == "w"


def test_cuda_linear_bf16_and_reference(shim):
    n, k = 16, 256
    w, w64 = quantized("Q4_1", n, k, seed=3)
    x = torch.randn((5, k), generator=torch.Generator().manual_seed(2))
    dev = shim_device(shim, act_dtype=torch.bfloat16)
    shim.calls.clear()
    assert relative_error(dev.linear(x, w), rounded(x, torch.bfloat16), w64) < 1e-5
    assert shim.calls == ["gemv"]
    shim.calls.clear()
    ref = dev.linear(x, w, reference=True)  # engine.formats dequantizer, fp32 activations
    assert shim.calls == [] and relative_error(ref, x.double().numpy(), w64) < 1e-6
    assert relative_error(shim_device(shim, reference=True).linear(x, w), x.double().numpy(), w64) < 1e-6
    f32, f64 = quantized("F32", n, k, seed=4)  # no kernel: the reference path
    assert relative_error(dev.linear(x, f32), x.double().numpy(), f64) < 1e-6 and shim.calls == []


def test_cuda_linear_writes_out(shim):
    w, w64 = quantized("Q4_1", 8, 256, seed=5)
    x = torch.randn((2, 256), generator=torch.Generator().manual_seed(3))
    out = torch.full((2, 8), float("nan"))
    got = shim_device(shim).linear(x, w, out)
    assert got.data_ptr() == out.data_ptr() and relative_error(out, rounded(x, torch.float16), w64) < 1e-5


def test_cuda_linear_argument_errors(shim):
    dev = shim_device(shim)
    w, _ = quantized("Q4_1", 8, 256, seed=6)
    with pytest.raises(KernelError) as e:
        dev.linear(torch.randn(1, 128), w)
    assert e.value.field == "x"
    meta = QWeight(w.name, w.fmt, w.shape, torch.empty(w.data.numel(), dtype=torch.uint8, device="meta"))
    with pytest.raises(KernelError) as e:
        dev.linear(torch.randn(1, 256), meta)
    assert e.value.field == "w" and "not cpu" in str(e.value)
    misaligned, _ = quantized("Q4_1", 8, 256, seed=6, offset=2)  # Q4_1 loads need 4-byte alignment
    with pytest.raises(KernelError) as e:
        dev.linear(torch.randn(1, 256), misaligned)
    assert e.value.field == "w" and "aligned" in str(e.value)
    with pytest.raises(KernelError) as e:
        shim_device(shim, act_dtype=torch.float32)
    assert e.value.field == "act_dtype"


# =============================================================================================
# Device selection without CUDA
# =============================================================================================
def test_auto_falls_back_to_cpu_with_one_log_line(caplog):
    if cuda_unavailable_reason() is None:
        pytest.skip("a usable CUDA device is present")
    with caplog.at_level(logging.INFO, logger="engine"):
        dev = select_device("auto", threads=1)
    assert isinstance(dev, CpuDevice)
    lines = [r for r in caplog.records if r.name.startswith("engine.")]
    assert len(lines) == 1 and "computing on the CPU" in lines[0].getMessage()
    assert isinstance(select_device("cpu", threads=1), CpuDevice)
    for req in ("cuda", "cuda:1", " CUDA "):
        with pytest.raises(KernelError) as e:
            select_device(req)
        assert e.value.field == "device"
    with pytest.raises(KernelError) as e:
        cuda_device_mod.cuda_device(0)
    assert e.value.field == "device"


@pytest.mark.parametrize("req", ["gpu", "cuda:x", "cuda:-1", ""])
def test_unknown_device_names(req):
    with pytest.raises(KernelError) as e:
        select_device(req)
    assert e.value.field == "device" and "expected auto, cpu, cuda or cuda:N" in str(e.value)


def test_unavailable_reasons(monkeypatch):
    assert cuda_unavailable_reason() is not None or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert cuda_unavailable_reason() == "torch finds no CUDA device or driver"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "no device cuda:2" in cuda_unavailable_reason(2)
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    assert "cupy" in cuda_unavailable_reason(0)
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=_no_driver)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert "no usable CUDA device" in cuda_unavailable_reason(0)


def _no_driver():
    raise RuntimeError("cudaErrorInsufficientDriver")


# =============================================================================================
# NVML and hardware profiles
# =============================================================================================
class FakeNVMLError(Exception):
    pass


class FakeLibraryNotFound(FakeNVMLError):
    pass


def fake_pynvml(*, init_error: Exception | None = None, unsupported: tuple[str, ...] = ()):
    calls = {"shutdown": 0}

    def value(name, v):
        def fn(*args):
            if name in unsupported:
                raise FakeNVMLError("Not Supported")
            return v
        return fn

    def init():
        if init_error is not None:
            raise init_error

    m = types.SimpleNamespace(
        NVMLError=FakeNVMLError, NVML_CLOCK_MEM=2, calls=calls,
        nvmlInit=init, nvmlShutdown=lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1),
        nvmlDeviceGetHandleByIndex=lambda i: ("handle", i),
        nvmlDeviceGetHandleByPciBusId=lambda bus: ("bus", bus),
        nvmlDeviceGetName=value("name", b"NVIDIA GeForce RTX 4090"),
        nvmlDeviceGetMemoryInfo=value("mem", types.SimpleNamespace(total=24 * GiB, free=20 * GiB, used=4 * GiB)),
        nvmlDeviceGetMaxPcieLinkGeneration=value("gen", 4),
        nvmlDeviceGetMaxPcieLinkWidth=value("width", 16),
        nvmlDeviceGetCurrPcieLinkGeneration=value("gen_now", 1),
        nvmlDeviceGetCurrPcieLinkWidth=value("width_now", 16),
        nvmlDeviceGetMemoryBusWidth=value("bus", 384),
        nvmlDeviceGetMaxClockInfo=value("clock", 10501),
        nvmlSystemGetDriverVersion=value("driver", "560.35.03"),
    )
    return m


def test_gpu_info_without_nvidia_ml_py(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with caplog.at_level(logging.INFO, logger="engine.cuda"):
        assert nvml.gpu_info() is None
    assert [r.getMessage() for r in caplog.records if r.name == "engine.cuda"] == [
        "nvidia-ml-py is not installed: no NVML GPU facts (pip install 'engine[cuda12]')"]


def test_gpu_info_without_the_nvml_library(monkeypatch, caplog):
    fake = fake_pynvml(init_error=FakeLibraryNotFound("NVML Shared Library Not Found"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with caplog.at_level(logging.INFO, logger="engine.cuda"):
        assert nvml.gpu_info() is None
    lines = [r.getMessage() for r in caplog.records if r.name == "engine.cuda"]
    assert len(lines) == 1 and "NVML Shared Library Not Found" in lines[0]


def test_gpu_info_and_profile_from_fake_nvml(monkeypatch, tmp_path):
    fake = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = nvml.gpu_info(0)
    assert fake.calls["shutdown"] == 1
    assert (info.name, info.total_bytes, info.free_bytes) == ("NVIDIA GeForce RTX 4090", 24 * GiB, 20 * GiB)
    assert (info.pcie_gen, info.pcie_width, info.pcie_gen_now, info.driver) == (4, 16, 1, "560.35.03")
    link = 16e9 * 128 / 130 / 8 * 16  # gen 4: 16 GT/s per lane, 128b/130b, 16 lanes
    peak = 2 * 10501e6 * 384 / 8  # GDDR6X: 2 transfers per reported clock, 384-bit bus
    assert info.pcie_bytes_per_s == pytest.approx(link) and link == pytest.approx(31.5e9, rel=1e-3)
    assert info.peak_memory_bytes_per_s == pytest.approx(peak) and peak == pytest.approx(1008e9, rel=1e-3)

    host8 = {"Q4_K": ComputeRate(3e9, 9e9), "Q6_K": ComputeRate(2e9, 7e9)}  # the CPU's cpu_activations int8 rates
    host = dataclasses.replace(default_profile("cpu"), compute_int8=host8)
    p = nvml.profile_from_info(info, host)
    base = default_profile("cuda")
    assert (p.device, p.name, p.resident_bytes) == ("cuda", "cuda NVIDIA GeForce RTX 4090", 20 * GiB)
    assert p.host_to_device == pytest.approx(0.8 * link)  # the idle link (gen 1) is not what copies get
    assert p.resident_bandwidth == pytest.approx(0.8 * peak)
    assert all(r.t1 == pytest.approx(0.7 * peak) and r.batched == base.compute[f].batched for f, r in p.compute.items())
    assert (p.host_bytes, p.disk_read_direct, p.memcpy) == (host.resident_bytes, host.disk_read_direct, host.memcpy)
    assert (p.host_compute, p.host_compute_int8, p.compute_int8) == (host.compute, host8, {})  # beside the GPU
    assert p.host_rate("Q4_K", "int8") == host8["Q4_K"] and p.host_rate("Q4_K") == host.compute["Q4_K"]
    assert nvml.profile_from_info(info, p).host_compute_int8 == host8  # a GPU profile as the host: its host's
    assert "predicted" in p.source and "gen4 x16" in p.source
    assert load_profile(save_profile(p, tmp_path / "gpu.json")) == p


def test_profile_from_nvml_without_memory_clock(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(unsupported=("bus", "gen", "gen_now")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = nvml.gpu_info(0)
    assert info.mem_bus_bits is None and info.peak_memory_bytes_per_s is None and info.pcie_bytes_per_s is None
    p, base = nvml.profile_from_info(info), default_profile("cuda")
    assert (p.resident_bandwidth, p.host_to_device, p.compute) == (base.resident_bandwidth, base.host_to_device,
                                                                    base.compute)
    assert "memory bandwidth unknown" in p.source and "PCIe link unknown" in p.source


def test_profile_from_measurements(tmp_path):
    meas = {"name": "NVIDIA H100 80GB HBM3", "free_bytes": 79 * GiB, "total_bytes": 80 * GiB,
            "h2d_pinned": 52e9, "h2d_pageable": 11e9, "device_copy": 2.9e12, "date": "2025-01-01T00:00:00",
            "layer_overhead_s": 40e-6, "token_overhead_s": 300e-6,
            "kernels": {"Q4_K": {"t1": 2.1e12, "batched": 90e12}, "Q8_0": {"t1": 2.4e12, "batched": 150e12}}}
    p = nvml.profile_from_measurements(meas, host=default_profile("cpu"))
    assert isinstance(p, HardwareProfile) and p.device == "cuda" and p.source.startswith("calibrated")
    assert (p.resident_bytes, p.host_to_device, p.resident_bandwidth) == (79 * GiB, 52e9, 2.9e12)
    assert (p.compute["Q4_K"].t1, p.compute["Q8_0"].batched) == (2.1e12, 150e12)
    assert p.rate("Q6_K") == p.compute["Q4_K"]  # unmeasured formats get the slowest measured rate
    assert (p.layer_overhead_s, p.token_overhead_s) == (40e-6, 300e-6)
    assert load_profile(save_profile(p, tmp_path / "h100.json")) == p


def test_measure_gpu_needs_a_device():
    if cuda_unavailable_reason() is None:
        pytest.skip("a usable CUDA device is present")
    with pytest.raises(KernelError):
        nvml.measure_gpu(0, quick=True)
    with pytest.raises(KernelError):
        nvml.calibrate_gpu(0, quick=True)


# =============================================================================================
# kvikio reader
# =============================================================================================
class FakeCuFile:
    """kvikio.CuFile over os.pread; reads happen at get(), like an asynchronous pool would."""

    probe_error: str | None = None

    def __init__(self, path, flags="r"):
        self.fd = os.open(path, os.O_RDONLY)

    def pread(self, buf, size=None, file_offset=0, task_size=None):
        if self.probe_error:
            raise RuntimeError(self.probe_error)
        fd = self.fd

        class Future:
            def get(self):
                data = os.pread(fd, size, file_offset)
                buf[:len(data)] = np.frombuffer(data, dtype=np.uint8)
                return len(data)

            def done(self):
                return True

        return Future()

    def close(self):
        os.close(self.fd)


def fake_kvikio(probe_error: str | None = None, compat: bool = True):
    cufile = type("CuFile", (FakeCuFile,), {"probe_error": probe_error})
    return types.SimpleNamespace(CuFile=cufile, defaults=types.SimpleNamespace(is_compat_mode_preferred=lambda: compat))


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(0).integers(0, 256, size=100_003, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return path, data


RUNS = ((100, 5000), (9000, 300), (70_001, 30_002))


def test_kvikio_reader_reads_a_plan_like_file_reader(monkeypatch, data_file):
    path, data = data_file
    fake = fake_kvikio()
    monkeypatch.setitem(sys.modules, "kvikio", fake)
    r = open_reader(path, "kvikio")  # compat mode: the reader takes pinned host buffers
    assert isinstance(r, kvikio_io.KvikioReader)
    assert (r.mode, r.direct, r.align, r.device_reads) == ("compat", False, 4096, False)
    plan = r.plan(RUNS)
    assert plan == ReadPlan.build(RUNS, 4096)
    buf = torch.zeros(plan.size, dtype=torch.uint8)
    ticket = r.submit(plan, buf, "blk.0")
    ticket.wait()
    ticket.wait()  # a second wait (the scheduler's resync) is harmless
    assert ticket.done()
    for off, n in RUNS:
        p = plan.where(off)
        assert np.array_equal(buf[p:p + n].numpy(), data[off:off + n])
    fr = FileReader(str(path), backend="posix")
    ref = torch.zeros(plan.size, dtype=torch.uint8)
    fr.submit(plan, ref, "blk.0").wait()
    fr.close()
    for off, _, dest, need in plan.spans:
        assert torch.equal(buf[dest:dest + need], ref[dest:dest + need])
    with pytest.raises(WeightIOError):
        r.submit(plan, torch.zeros(plan.size - 1, dtype=torch.uint8), "blk.0")
    with pytest.raises(KernelError) as e:
        r.submit(plan, torch.zeros(plan.size, dtype=torch.int16), "blk.0")
    assert e.value.field == "buf"
    r.close()


@pytest.mark.parametrize("compat", [True, False])
def test_kvikio_direct_means_gds_into_device_memory(monkeypatch, data_file, compat):
    """`device_reads` and `direct` (page cache bypassed) hold for every read the reader does: with GDS
    it reads into device memory, bypassing the page cache; in compat mode into pinned host memory
    (POSIX reads); host buffers are never direct, and a reader refuses the other side's buffers."""
    path, _ = data_file
    monkeypatch.setitem(sys.modules, "kvikio", fake_kvikio(compat=compat))
    auto = kvikio_io.KvikioReader(path)
    assert (auto.mode, auto.device_reads, auto.direct) == (("compat", False, False) if compat else ("gds", True, True))
    dev = kvikio_io.KvikioReader(path, device_reads=True)
    host = kvikio_io.KvikioReader(path, device_reads=False)
    assert (dev.direct, host.direct) == (not compat, False)
    plan = dev.plan(RUNS)
    with pytest.raises(KernelError, match="reads into device memory") as e:
        dev.submit(plan, torch.zeros(plan.size, dtype=torch.uint8), "blk.0")
    assert e.value.field == "buf"
    with pytest.raises(KernelError, match="reads into host memory"):
        host.submit(plan, torch.zeros(plan.size, dtype=torch.uint8, device="meta"), "blk.0")
    for r in (auto, dev, host):
        r.close()


@pytest.mark.parametrize(("backend", "device_type", "installed", "expect"), [
    ("auto", "cuda", True, "kvikio"),    # auto picks kvikio on a CUDA device where it is installed
    ("auto", "cuda", False, "file"),     # not installed: the O_DIRECT reader, nothing imported
    ("auto", "cpu", True, "file"),
    ("odirect", "cuda", True, "file"),
    ("posix", "cuda", True, "file"),
    ("kvikio", "cuda", True, "kvikio"),
])
def test_open_reader_auto_choice(monkeypatch, data_file, backend, device_type, installed, expect):
    path, _ = data_file
    from engine.tiers import io as tiers_io

    monkeypatch.setitem(sys.modules, "kvikio", fake_kvikio() if installed else None)
    monkeypatch.setattr(tiers_io, "kvikio_available", lambda: installed)
    r = open_reader(path, backend, threads=1, device_type=device_type)
    try:
        assert isinstance(r, kvikio_io.KvikioReader if expect == "kvikio" else FileReader)
        if backend == "posix":
            assert r.direct is False and r.device_reads is False
    finally:
        r.close()


@pytest.mark.parametrize("installed", [True, False])
def test_planner_auto_io_backend_is_what_open_reader_opens(monkeypatch, installed):
    """io_backend auto on CUDA plans kvikio (disk straight into device slots) only where kvikio is
    installed; otherwise O_DIRECT reads bounced through pinned host buffers, and the plan says so."""
    from engine.tiers.config import load_config
    from engine.tiers.planner import Workload, plan, search
    from engine.tiers.footprint import describe
    from engine.tiers.hardware import PRESETS

    monkeypatch.setattr(search, "kvikio_available", lambda: installed)
    cfg = load_config({"device": "cuda", "resident_budget": "22GiB", "host_budget": "4GiB"})
    p = plan(describe("llama3-70b:Q4_K_M"), PRESETS["rtx4090"](), cfg, Workload(1, 128, 128))
    assert any(lp.tier == "disk" for lp in p.layers)
    assert (p.io_backend, p.host_staging) == (("kvikio", False) if installed else ("odirect", True))
    assert any("kvikio is not installed" in n for n in p.notes) != installed


@pytest.mark.parametrize(("mode", "expect"), [("compat", "posix"), ("gds", "kvikio")])
def test_reader_backend_is_what_a_plan_may_assume(monkeypatch, data_file, mode, expect):
    """kvikio counts as a disk-to-GPU path only when it reads into device memory (GDS); in compat mode
    it reads buffered into host memory like posix. FileReader: O_DIRECT when granted, else posix."""
    from engine.tiers.io import reader_backend

    path, _ = data_file
    monkeypatch.setitem(sys.modules, "kvikio", fake_kvikio(compat=mode == "compat"))
    r = kvikio_io.KvikioReader(path)
    fr = FileReader(str(path), backend="posix")
    try:
        assert (reader_backend(r), reader_backend(fr)) == (expect, "posix")
    finally:
        r.close()
        fr.close()


def test_load_plans_with_the_reader_that_opened(monkeypatch, tmp_path):
    """A CUDA load whose `auto` reader is kvikio in compat mode plans buffered reads bounced through
    pinned host buffers (what the runtime does), not kvikio's disk-to-GPU path."""
    from engine.tiers import io as tiers_io
    from test_device_placement import MetaDevice
    from tiny_llama import TinyConfig, write_tiny_llama

    path = write_tiny_llama(tmp_path / "t.gguf", TinyConfig(n_layers=3))
    monkeypatch.setitem(sys.modules, "kvikio", fake_kvikio(compat=True))
    monkeypatch.setattr(tiers_io, "kvikio_available", lambda: True)
    cfg = {"device": "cuda", "hardware": "rtx4090", "resident_budget": 1_200_000, "host_budget": 1_500_000,
           "kv_cache": {"max_context": 64}}
    with Model.load(path, cfg, n_ctx=64, device=MetaDevice()) as m:
        assert isinstance(m.reader, kvikio_io.KvikioReader) and not m.reader.device_reads
        assert any(lp.tier == "disk" for lp in m.plan.layers)
        assert (m.plan.io_backend, m.plan.host_staging) == ("posix", True)
        assert m.weights.arena.numel() == m.weights.k * m.weights.slot_bytes > 0  # the planned bounce buffers


def test_open_reader_on_the_cpu_path_imports_no_cuda_module(data_file):
    path, _ = data_file
    code = ("import sys; from engine.tiers.io import open_reader; r = open_reader(sys.argv[1]); r.close(); "
            "print(sorted(m for m in sys.modules if m.startswith(('engine.cuda', 'kvikio', 'cupy'))))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "[]"


def test_kvikio_reader_reports_a_truncated_file(monkeypatch, data_file):
    path, _ = data_file
    monkeypatch.setitem(sys.modules, "kvikio", fake_kvikio())
    r = kvikio_io.KvikioReader(path)
    plan = r.plan([(99_000, 4000)])
    ticket = r.submit(plan, torch.zeros(plan.size, dtype=torch.uint8), "blk.7")
    with pytest.raises(WeightIOError) as e:
        ticket.wait()
    assert "blk.7" in str(e.value) and "truncated" in str(e.value) and str(path) in str(e.value)
    r.close()


@pytest.mark.parametrize("kind", ["file", "kvikio"])
def test_readers_share_the_file_checks(monkeypatch, data_file, kind):
    """Both readers honour the whole reader contract the runtime and scheduler use beyond submit():
    `pread` of embedding rows through the page cache, a typed error (never a SIGBUS) once the file
    shrank under them, and `file_changed` true once after the file's size or mtime changed."""
    path, data = data_file
    monkeypatch.setitem(sys.modules, "kvikio", fake_kvikio())
    r = kvikio_io.KvikioReader(path) if kind == "kvikio" else FileReader(str(path), backend="posix")
    try:
        assert r.pread(70_001, 30_002, "token_embd") == data[70_001:100_003].tobytes()
        assert r.file_changed() is False
        with open(path, "r+b") as fh:
            fh.truncate(80_000)
        assert r.file_changed() is True and r.file_changed() is False
        with pytest.raises(WeightIOError) as e:
            r.pread(79_000, 2000, "token_embd")
        assert "token_embd" in str(e.value) and "truncated" in str(e.value) and e.value.path == str(path)
        assert r.pread(0, 100, "token_embd") == data[:100].tobytes()  # what is still there reads as before
    finally:
        r.close()
    with pytest.raises(WeightIOError):  # closed: a typed error, not a read of whatever reuses the descriptor
        r.pread(0, 10, "token_embd")


def test_kvikio_reader_closes_its_descriptors(monkeypatch, data_file):
    path, _ = data_file
    fds = set(os.listdir("/proc/self/fd"))
    monkeypatch.setitem(sys.modules, "kvikio", fake_kvikio())
    kvikio_io.KvikioReader(path).close()
    monkeypatch.setitem(sys.modules, "kvikio", fake_kvikio("libcuda.so.1: cannot open shared object file"))
    with pytest.raises(KernelError):
        kvikio_io.KvikioReader(path)  # the probe failed: nothing left open
    assert set(os.listdir("/proc/self/fd")) == fds


@pytest.mark.parametrize("module", [None, "no-driver"])
def test_kvikio_fallback_to_file_reader(monkeypatch, caplog, data_file, module):
    path, data = data_file
    fake = None if module is None else fake_kvikio("libcuda.so.1: cannot open shared object file")
    monkeypatch.setitem(sys.modules, "kvikio", fake)
    with pytest.raises(KernelError) as e:
        kvikio_io.KvikioReader(path)
    assert e.value.field == "io_backend"
    with caplog.at_level(logging.INFO, logger="engine.io"):
        r = open_reader(path, "kvikio", threads=1, device_type="cuda")
    assert isinstance(r, FileReader)
    lines = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("kvikio unavailable")]
    assert len(lines) == 1 and ("not installed" in lines[0] or "libcuda" in lines[0])
    plan = r.plan(RUNS)
    buf = aligned_empty(plan.size, r.align)  # O_DIRECT (where allowed) needs aligned buffers
    r.submit(plan, buf, "blk.0").wait()
    assert np.array_equal(buf[plan.where(9000):plan.where(9000) + 300].numpy(), data[9000:9300])
    r.close()


# =============================================================================================
# On a CUDA device (pytest -m gpu)
# =============================================================================================
gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_dev():
    reason = cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(f"no usable CUDA device: {reason}")
    return cuda_device_mod.cuda_device(0)


@gpu
@pytest.mark.parametrize("fmt", ["Q4_1", "Q6_K"])
def test_gpu_linear_matches_reference(cuda_dev, fmt):
    n, k = 300, 1024
    w, w64 = quantized(fmt, n, k, seed=11)
    wd = QWeight(w.name, w.fmt, w.shape, cuda_dev.staging.to_resident(w.data))
    g = torch.Generator().manual_seed(4)
    for t, tol in [(1, 1e-4), (5, 1e-4), (8, 1e-4), (9, 4e-3), (40, 4e-3)]:
        x = torch.randn((t, k), generator=g)
        y = cuda_dev.linear(x.cuda(), wd)
        assert y.device.type == "cuda"
        assert relative_error(y.cpu(), rounded(x, torch.float16), w64) < tol, (fmt, t)
        y_host = cuda_dev.linear(x, wd)  # host activations come back to the host
        assert y_host.device.type == "cpu" and torch.equal(y_host, y.cpu())
        ref = cuda_dev.linear(x.cuda(), wd, reference=True)
        assert relative_error(ref.cpu(), x.double().numpy(), w64) < 1e-5


@gpu
@pytest.mark.parametrize("delay", ["compute", "copy"])
def test_gpu_pinned_ring_reuse(cuda_dev, delay):
    """The CPU ring scenario on real streams, with one stream held back by a GPU spin so a missing
    fence would show; the host slots are page-locked."""
    ops = TorchCudaOps(cuda_dev.device)
    spin = 5_000_000  # cycles: a few ms

    class SlowCopy(TorchCudaOps):
        def copy(self, dst, src, stream):
            with torch.cuda.stream(stream):
                torch.cuda._sleep(spin)
            super().copy(dst, src, stream)

    if delay == "copy":
        ops = SlowCopy(cuda_dev.device)
    compute, copy = ops.current_stream(), ops.new_stream()
    staging = CudaStaging(ops, compute, copy, "cuda-test")
    assert staging.alloc_host(4096).is_pinned()

    def launch(fn):
        with torch.cuda.stream(compute):
            if delay == "compute":
                torch.cuda._sleep(spin)
            fn()

    nbytes = 8 << 20
    seen = run_ring(staging, launch, torch.cuda.synchronize, units=7, k=2, nbytes=nbytes)
    assert ring_errors(seen, units=7, nbytes=nbytes) == []


@gpu
def test_gpu_kvikio_reads(cuda_dev, data_file):
    pytest.importorskip("kvikio")
    path, data = data_file
    readers = {into: kvikio_io.KvikioReader(path, device_reads=into == "device") for into in ("host", "device")}
    assert readers["host"].direct is False and readers["device"].direct == (readers["device"].mode == "gds")
    plan = readers["host"].plan(RUNS)
    for buf in (cuda_dev.staging.alloc_host(plan.size), cuda_dev.staging.alloc_device(plan.size)):
        r = readers["device" if buf.is_cuda else "host"]
        buf.zero_()
        torch.cuda.synchronize()  # kvikio writes from its own streams: the zeroing must have landed
        r.submit(plan, buf, "blk.0").wait()
        host = buf.cpu()
        for off, n in RUNS:
            p = plan.where(off)
            assert np.array_equal(host[p:p + n].numpy(), data[off:off + n]), (buf.device, off)
    for r in readers.values():
        r.close()


@gpu
def test_gpu_select_and_nvml(cuda_dev):
    assert isinstance(select_device("auto"), CudaDevice)
    info = nvml.gpu_info(0)
    assert info is not None and 0 < info.free_bytes <= info.total_bytes
    p = nvml.profile_from_info(info)
    assert p.device == "cuda" and p.resident_bytes == info.free_bytes


@gpu
def test_gpu_calibration_numbers_are_positive(cuda_dev):
    p = nvml.calibrate_gpu(0, quick=True)
    assert p.host_to_device > 1e9 and p.resident_bandwidth > p.host_to_device
    assert all(r.t1 > 0 and r.batched > 0 for r in p.compute.values())


def greedy(m, prompt, n=12) -> list[int]:
    """n greedy tokens after prompt, one step per token, argmax on the compute device."""
    with m.open_sequence() as seq:
        logits = m.prefill(seq, prompt)
        out = []
        for _ in range(n):
            out.append(int(logits.argmax()))
            logits = m.step([(seq, [out[-1]])], last_only=True)[0][-1]
    return out


SHIM_MODELS = {  # TinyConfig fields: a dense llama, and a Mixtral-shaped one (4 experts, top 2)
    "dense": dict(seed=21),
    "moe": dict(n_experts=4, n_experts_used=2, ffn=256, router_scale=0.25, seed=22),
}


@pytest.mark.parametrize("kind", sorted(SHIM_MODELS))
def test_shim_cuda_device_generates_the_cpu_greedy_tokens(shim, tmp_path, kind):
    """The whole model on CudaDevice with the .cu kernels executed on the CPU (fp16 activations into
    the GEMV for decode, dequantize + matmul for the 10-token prefill, SDPA over an fp16 KV cache):
    the same greedy tokens as the CPU device, resident and streamed through CudaStaging. The MoE model's
    expert FFN is the same grouped code on both devices."""
    from tiny_llama import TinyConfig, write_tiny_llama

    import engine

    QT = gguf.GGMLQuantizationType
    cfg = TinyConfig(n_layers=2, n_heads=8, n_kv_heads=2, fmt=(QT.Q4_1, QT.Q6_K), embd_fmt=QT.Q6_K, **SHIM_MODELS[kind])
    path = write_tiny_llama(tmp_path / "shim.gguf", cfg)
    prompt = [5, 17, 300, 42, 8, 99, 1, 250, 3, 77]
    f = GGUFFile(path)
    spec = ModelSpec.from_gguf(f)
    assert spec.moe == (kind == "moe")
    lays = [layer_layout(f, spec, i) for i in range(spec.n_layers)]
    with engine.load(path, config={"device": "cpu"}) as m:
        cpu_tokens = greedy(m, prompt)
        cpu_logits = m.logits(prompt)
    for stream in (False, True):
        placement = Placement.uniform(lays, head_info(f, spec), stream=stream, ring_size=2)
        dev = shim_device(shim)
        shim.prepared.clear()
        with Model.load(path, placement=placement, device=dev) as m:
            # the model's matrix formats prepared once, at load (the embedding is looked up, not multiplied)
            assert shim.prepared == [(0, ("Q4_1", "Q6_K"))]
            shim.calls.clear()
            shim.binds.clear()
            assert greedy(m, prompt) == cpu_tokens, stream
            assert {"gemv", "dequant"} <= set(shim.calls)
            # each matrix binding checked once (dense: 7 per block + the head; MoE: the experts routed to;
            # streamed: once per ring slot a unit lands in), whatever the number of passes
            bound = len(shim.binds)
            most = (spec.n_layers * (7 if kind == "dense" else 5 + 3 * spec.n_experts) + 1) * (m.weights.k if stream else 1)
            assert bound == most if kind == "dense" else 0 < bound <= most, (stream, bound, most)
            assert len(shim.calls) > 3 * bound
            greedy(m, prompt, 2)
            # no matrix is ever checked twice (MoE: an expert landing in another cache slot is a new one)
            assert len(shim.binds) == bound or kind == "moe" and stream
            assert len({(b.data_ptr, b.n, b.k, b.fmt) for b in shim.binds}) == len(shim.binds)
            with m.open_sequence() as seq:
                assert {t.dtype for t in seq.keys} == {torch.float16}
            err = np.abs(m.logits(prompt) - cpu_logits).max() / np.abs(cpu_logits).max()
            assert err < 2e-2, err  # fp16 activations, weights and KV against the CPU's fp32


@gpu
def test_gpu_greedy_tokens_match_cpu(cuda_dev):
    import engine
    from engine.defaults import default_model_path

    path = default_model_path()
    prompt = [1, 504, 3458, 282, 4649, 314]
    f = GGUFFile(path)
    spec = ModelSpec.from_gguf(f)
    lays = [layer_layout(f, spec, i) for i in range(spec.n_layers)]
    streamed = Placement.uniform(lays, head_info(f, spec), stream=True, ring_size=2)
    with engine.load(path, config={"device": "cpu"}) as m:
        cpu_tokens = greedy(m, prompt, 16)
    for placement in (None, streamed):  # the planner's placement (all resident here), every unit streamed
        with engine.load(path, config={"device": "cuda"}, placement=placement) as m:
            assert isinstance(m.device, CudaDevice)
            with m.open_sequence() as seq:
                assert {t.device.type for t in seq.keys} == {"cuda"}
            assert greedy(m, prompt, 16) == cpu_tokens, placement
