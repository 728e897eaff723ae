"""engine.cuda.kernels without a GPU: argument validation, launch geometry, the no-cupy error and
the torch reference path."""
from __future__ import annotations

import dataclasses
import importlib.util

import gguf
import numpy as np
import pytest
import torch

from engine.cuda.kernels import (
    FORMATS,
    GEMV_MAX_WARPS,
    KernelLibrary,
    TensorDesc,
    gemv_kernel_name,
    plan_dequant,
    plan_gemv,
)
from engine.errors import KernelError

N, K = 5, 512


def desc(shape, dtype, *, ptr=0x10000, strides=None, device="cuda:0") -> TensorDesc:
    if strides is None:
        strides, acc = [], 1
        for s in reversed(shape):
            strides.insert(0, acc)
            acc *= s
    return TensorDesc(tuple(shape), tuple(strides), dtype, ptr, device)


def w_desc(fmt="Q4_K", n=N, k=K, **kw):
    return desc((n, FORMATS[fmt].row_nbytes(k)), "uint8", **kw)


def test_plan_gemv_geometry():
    plan = plan_gemv("Q4_K", w_desc(), desc((3, K), "float16"), desc((3, N), "float32"), N, K)
    assert plan.kernel == "gemv_q4_k_f16_t3"
    assert plan.grid == (3, 1, 1)  # ceil(5 / 2 rows per block)
    assert plan.block == (32, 1, 1)  # 16 chunks of 32 weights -> one warp
    assert plan.scalars == (N, K, K, N)
    big = plan_gemv("Q8_0", w_desc("Q8_0", 7, 8192), desc((1, 8192), "bfloat16"), desc((1, 7), "float32"), 7, 8192)
    assert big.kernel == "gemv_q8_0_bf16_t1" and big.block == (32, GEMV_MAX_WARPS, 1) and big.grid == (4, 1, 1)


def test_plan_gemv_strided_rows():
    x = desc((2, K), "float16", strides=(K + 64, 1))
    y = desc((2, N), "float32", strides=(N + 1, 1))
    assert plan_gemv("F16", w_desc("F16"), x, y, N, K).scalars == (N, K, K + 64, N + 1)


@pytest.mark.parametrize(("change", "field", "message"), [
    (dict(fmt="IQ2_XXS"), "fmt", "no CUDA kernel"),
    (dict(k=500), "k", "multiple of 256"),
    (dict(n=0), "n", "must be in"),
    (dict(w=w_desc(n=N + 1)), "w", "needs"),
    (dict(w=desc((N, 288), "int8")), "w", "uint8"),
    (dict(w=w_desc(ptr=0x10008)), "w", "16-byte aligned"),
    (dict(w=desc((N, 288), "uint8", strides=(576, 1))), "w", "contiguous"),
    (dict(x=desc((2, K), "float32")), "x", "float16 or bfloat16"),
    (dict(x=desc((9, K), "float16"), y=desc((9, N), "float32")), "x", "1..8"),
    (dict(x=desc((2, K - 8), "float16")), "x", "shape"),
    (dict(x=desc((2, K), "float16", strides=(K + 4, 1))), "x", "multiple of 8"),
    (dict(x=desc((2, K), "float16", strides=(1, 2))), "x", "contiguous"),
    (dict(x=desc((2, K), "float16", ptr=0x10008)), "x", "16-byte aligned"),
    (dict(x=desc((K,), "float16")), "x", "2-D"),
    (dict(y=desc((2, N), "float16")), "out", "float32"),
    (dict(y=desc((2, N + 1), "float32")), "out", "shape"),
    (dict(y=desc((2, N), "float32", device="cuda:1")), "w", "different devices"),
])
def test_plan_gemv_rejects_bad_arguments(change, field, message):
    args = dict(fmt="Q4_K", w=w_desc(), x=desc((2, K), "float16"), y=desc((2, N), "float32"), n=N, k=K)
    args.update(change)
    with pytest.raises(KernelError, match=message) as info:
        plan_gemv(args["fmt"], args["w"], args["x"], args["y"], args["n"], args["k"])
    assert info.value.field == field


def test_plan_dequant_geometry_and_checks():
    plan = plan_dequant("Q6_K", w_desc("Q6_K", 300, 4096), desc((300, 4096), "bfloat16"), 300, 4096)
    assert plan.kernel == "dequant_q6_k_bf16" and plan.block == (256, 1, 1)
    assert plan.grid == (300 * 128 // 256, 1, 1)
    capped = plan_dequant("Q6_K", w_desc("Q6_K", 300, 4096), desc((300, 4096), "float16"), 300, 4096, max_blocks=7)
    assert capped.grid == (7, 1, 1)
    with pytest.raises(KernelError, match="float16 or bfloat16") as info:
        plan_dequant("Q6_K", w_desc("Q6_K"), desc((N, K), "float32"), N, K)
    assert info.value.field == "out"
    with pytest.raises(KernelError, match="16-byte aligned"):
        plan_dequant("Q6_K", w_desc("Q6_K"), desc((N, K), "float16", ptr=0x10002), N, K)


def test_tensor_desc_from_torch_and_numpy():
    t = torch.zeros((4, 16), dtype=torch.bfloat16)[:, :8]
    d = TensorDesc.of(t)
    assert (d.shape, d.strides, d.dtype, d.device) == ((4, 8), (16, 1), "bfloat16", "cpu")
    a = np.zeros((3, 6), np.float32)[:, ::2]
    assert TensorDesc.of(a).strides == (6, 2) and TensorDesc.of(a).dtype == "float32"


def test_kernel_names_are_the_table_names():
    assert gemv_kernel_name("q5_k", "bf16", 7) == "gemv_q5_k_bf16_t7"
    assert all(f.tag == f.name.lower() for f in FORMATS.values())


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed")
def test_launch_without_cupy_raises_clear_error():
    x = torch.zeros((1, K), dtype=torch.float16)
    w = torch.zeros((N, FORMATS["Q4_K"].row_nbytes(K)), dtype=torch.uint8)
    with pytest.raises(KernelError, match="cupy"):
        KernelLibrary().gemv(x, w, "Q4_K", N, K)
    with pytest.raises(KernelError, match="cupy"):
        KernelLibrary().dequantize(w, "Q4_K", N, K)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q6_K", "BF16"])
def test_reference_path_matches_gguf(fmt):
    pytest.importorskip("engine.formats")
    rng = np.random.default_rng(4)
    n, k = 3, 256
    if fmt == "Q6_K":
        raw = rng.integers(0, 256, size=(n, FORMATS[fmt].row_nbytes(k)), dtype=np.uint8)
        raw.reshape(n, -1, 210)[:, :, 208:210] = np.array([0.01], np.float16).view(np.uint8)
    else:
        raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), gguf.GGMLQuantizationType[fmt])
        raw = np.ascontiguousarray(raw.view(np.uint8)).reshape(n, -1)
    wf = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt]).reshape(n, k).astype(np.float64)
    x = torch.from_numpy(rng.standard_normal((2, k)).astype(np.float16))
    lib = KernelLibrary()
    y = lib.gemv(x, torch.from_numpy(raw), fmt, n, k, reference=True)
    assert y.dtype == torch.float32 and y.shape == (2, n)
    np.testing.assert_allclose(y.numpy(), x.numpy().astype(np.float64) @ wf.T, rtol=1e-5, atol=1e-5)
    d = lib.dequantize(torch.from_numpy(raw), fmt, n, k, reference=True)
    assert d.dtype == torch.float16
    np.testing.assert_array_equal(d.numpy(), wf.astype(np.float32).astype(np.float16))


def test_descriptor_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        desc((1,), "uint8").dtype = "int8"  # type: ignore[misc]
