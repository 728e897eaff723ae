"""Device.attention_rows: a ragged batch's rows in one device call. The CPU goes row by row (bit-identical
to each row's own attention); CUDA runs a pass of decode rows as one fused SDPA over keys padded to the
longest row, checked here on CPU tensors against the per-row path and a float64 reference, with every
slot's unwritten positions holding NaN (the padding must neither be seen nor poison the sum)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine import attention as attn
from engine.attention import AttnMask, AttnRow, attend_each, sdpa_decode_rows, sdpa_kernel
from engine.cuda.device import CudaDevice
from engine.device import CpuDevice
from stream_sim import SimOps

H, HKV, HD, CTX = 8, 2, 32, 96


def decode_rows(dtype, starts, seed=0):
    """Decode rows (one token each) over KV slots holding `start + 1` written keys, NaN beyond."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, s in enumerate(starts):
        keys = torch.full((HKV, CTX, HD), float("nan"), dtype=dtype)
        vals = torch.full((HKV, CTX, HD), float("nan"), dtype=dtype)
        keys[:, :s + 1] = torch.randn(HKV, s + 1, HD, generator=g).to(dtype)
        vals[:, :s + 1] = torch.randn(HKV, s + 1, HD, generator=g).to(dtype)
        rows.append(AttnRow(i, 1, keys, vals, AttnMask(s)))
    q = torch.randn(len(starts), H, HD, generator=g)
    return q, rows, torch.tensor(starts) + 1


def reference(q, rows) -> np.ndarray:
    """float64 softmax(q k^T / sqrt(hd)) v over each row's written keys, GQA by head groups."""
    out = np.zeros(q.shape)
    for r in rows:
        L = r.mask.start + 1
        for h in range(H):
            k = r.keys[h // (H // HKV), :L].double().numpy()
            v = r.vals[h // (H // HKV), :L].double().numpy()
            s = k @ q[r.offset, h].double().numpy() / math.sqrt(HD)
            p = np.exp(s - s.max())
            out[r.offset, h] = (p / p.sum()) @ v
    return out


def test_cuda_decode_rows_in_one_sdpa(monkeypatch):
    starts = [0, 5, 40, 95, 17]
    q, rows, ends = decode_rows(torch.float16, starts)
    dev = CudaDevice(torch.device("cpu"), SimOps(frozenset({"compute", "copy"})), kernels=None)
    calls = []
    real = attn.F.scaled_dot_product_attention
    monkeypatch.setattr(attn.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = dev.attention_rows(q, rows, ends)
    assert len(calls) == 1 and got.shape == q.shape and got.dtype == torch.float32
    assert not torch.isnan(got).any()
    ref = reference(q.half().float(), rows)
    assert np.abs(got.double().numpy() - ref).max() < 2e-3  # fp16 keys, values and queries
    calls.clear()
    per_row = attend_each(q, rows, dev.attention)
    assert len(calls) == len(rows)
    assert (got - per_row).abs().max() < 2e-3
    # without ends (a pass that is not all decode rows) the device goes row by row
    calls.clear()
    assert torch.equal(dev.attention_rows(q, rows, None), per_row) and len(calls) == len(rows)


def test_padding_is_masked_and_zeroed():
    """A row much shorter than the longest sees only its own keys: its result equals its lone SDPA."""
    q, rows, ends = decode_rows(torch.float32, [2, 60])
    got = sdpa_decode_rows(q, rows, ends, 1 / math.sqrt(HD))
    r = rows[0]
    alone = sdpa_kernel(q[:1], r.keys[:, :3], r.vals[:, :3], None, 1 / math.sqrt(HD))
    assert torch.allclose(got[:1], alone, atol=1e-6) and not torch.isnan(got).any()


def test_cpu_rows_bit_identical_to_each_row():
    q, rows, ends = decode_rows(torch.float32, [3, 30, 7], seed=2)
    dev = CpuDevice(1)
    got = dev.attention_rows(q, rows, ends)
    for r in rows:
        assert torch.equal(got[r.offset:r.offset + 1], dev.attention(q[r.offset:r.offset + 1], r.keys, r.vals, r.mask))
    assert np.abs(got.double().numpy() - reference(q, rows)).max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_single_row_and_mixed_passes_go_row_by_row(dtype):
    q, rows, _ = decode_rows(dtype, [4], seed=3)
    dev = CudaDevice(torch.device("cpu"), SimOps(frozenset({"compute", "copy"})), kernels=None, kv_dtype=dtype)
    assert torch.equal(dev.attention_rows(q, rows, torch.tensor([5])), dev.attention(q, rows[0].keys, rows[0].vals,
                                                                                   rows[0].mask))
