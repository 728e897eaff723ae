"""The kernels on a real CUDA device (NVRTC cubins loaded with cupy) against gguf-py + float64.
Skipped without one.

Run with: pytest -m gpu tests/test_kernels_gpu.py
"""
from __future__ import annotations

import zlib

import gguf
import numpy as np
import pytest
import torch

from engine.cuda.compile import CODEGEN_FLAGS
from engine.cuda.kernels import FORMATS, KernelLibrary
from quant_data import random_weights

pytestmark = pytest.mark.gpu


def _device_ready() -> str | None:
    try:
        import cupy
    except ImportError:
        return "cupy is not installed"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1 or not torch.cuda.is_available():
            return "no CUDA device"
    except Exception as e:  # no driver
        return f"no CUDA device ({e})"
    return None


_reason = _device_ready()
if _reason:
    pytest.skip(_reason, allow_module_level=True)


@pytest.fixture(scope="module")
def lib() -> KernelLibrary:
    return KernelLibrary()  # cubins from $ENGINE_CACHE_DIR/cuda (scripts/gpu_check.sh compiles them first)


@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_gemv_on_device(lib, fmt, xdtype):
    rng = np.random.default_rng(zlib.crc32(f"{fmt}{xdtype}".encode()))
    n, k = 333, 4096
    raw = random_weights(fmt, n, k, rng)
    wf = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt]).reshape(n, k).astype(np.float64)
    w = torch.from_numpy(raw).cuda()
    stream = torch.cuda.Stream()
    for t in range(1, 9):
        x = torch.randn((t, k), dtype=torch.float32).to(xdtype).cuda()
        y = lib.gemv(x, w, fmt, n, k, stream=stream)
        stream.synchronize()
        xe = x.float().cpu().double().numpy()
        ref, mag = xe @ wf.T, np.abs(xe) @ np.abs(wf).T
        err = np.abs(y.cpu().double().numpy() - ref)
        assert (err <= 1e-5 * mag + 1e-30).all(), (fmt, t, float((err / mag).max()))


@pytest.mark.parametrize("odtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dequant_on_device_bit_exact(lib, fmt, odtype):
    rng = np.random.default_rng(5)
    n, k = 129, 2048
    raw = random_weights(fmt, n, k, rng)
    wf = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt]).reshape(n, k).astype(np.float32)
    out = lib.dequantize(torch.from_numpy(raw).cuda(), fmt, n, k, dtype=odtype)
    torch.cuda.synchronize()
    expect = torch.from_numpy(wf).to(odtype)  # torch's fp32 -> fp16/bf16 is round-to-nearest-even
    assert torch.equal(out.cpu().view(torch.int16), expect.view(torch.int16))


def test_device_matches_reference_path(lib):
    pytest.importorskip("engine.formats")
    rng = np.random.default_rng(1)
    n, k = 64, 1024
    raw = torch.from_numpy(random_weights("Q5_K", n, k, rng)).cuda()
    x = torch.randn((4, k), dtype=torch.float16, device="cuda")
    got = lib.gemv(x, raw, "Q5_K", n, k)
    ref = lib.gemv(x, raw, "Q5_K", n, k, reference=True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)


def test_subnormals_are_not_flushed(lib):
    """Built without flush-to-zero (the gate's flags): bf16 subnormal activations times BF16 weights,
    and BF16 subnormal weights dequantized, keep their value."""
    n, k = 4, 256
    tiny = torch.full((1, k), 2.0**-130, dtype=torch.bfloat16)  # subnormal in bf16 and once widened to fp32
    assert tiny.float()[0, 0].item() == 2.0**-130
    w = torch.full((n, k), 2.0**100, dtype=torch.bfloat16)
    raw = w.view(torch.uint8).reshape(n, 2 * k).cuda()
    y = lib.gemv(tiny.cuda(), raw, "BF16", n, k)
    torch.cuda.synchronize()
    assert torch.equal(y.cpu(), torch.full((1, n), k * 2.0**-30))
    sub = torch.full((n, k), 2.0**-130, dtype=torch.bfloat16)
    out = lib.dequantize(sub.view(torch.uint8).reshape(n, 2 * k).cuda(), "BF16", n, k, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu().view(torch.int16), sub.view(torch.int16))
    assert lib.builds and all("-ftz=false" in b.options and set(CODEGEN_FLAGS) <= set(b.options) for b in lib.builds)


def test_bound_weight_launches(lib):
    rng = np.random.default_rng(9)
    n, k = 70, 512
    raw = torch.from_numpy(random_weights("Q4_K", n, k, rng)).cuda()
    bound = lib.bind(raw, "Q4_K", n, k)
    x = torch.randn((3, k), dtype=torch.float16, device="cuda")
    got = lib.gemv(x, bound)
    ref = lib.gemv(x, raw, "Q4_K", n, k, reference=True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
    deq = lib.dequantize(bound, dtype=torch.float16)
    torch.testing.assert_close(deq.float(), lib.dequantize(raw, "Q4_K", n, k, reference=True).float(), rtol=0, atol=0)
