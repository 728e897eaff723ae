"""The CPU's native decode step (CpuDevice.decode_block, engine/cpu/decode_step.h) against its definition,
the Python Llama block: passes whose rows are single decode tokens run each block in one native call.

Stated tolerance: the native step's logits and the keys/values it writes equal the Python block's within
3e-4 of the largest logit / key, plus one fp16 unit in the last place of a key/value stored as fp16
(measured on these tiny random models: ~5e-7 where every format takes the fp32 path, up to 1.2e-4 where an
integer-path kernel's int16 rounding of an activation flips, and then a stored fp16 key may land one unit
away); the float64 reference stays within 1e-3; rows of a decode batch equal their single-sequence runs bit
for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

import engine
import engine.cpu
from tiny_llama import TinyConfig, reference_logits, write_tiny_llama

PROMPT = [5, 17, 300, 42, 8, 99, 1]
TOKENS = [250, 3, 77, 400, 12, 9]
REL_TOL = 3e-4

CASES = {
    "llama-gqa-kquants": (TinyConfig(n_heads=8, n_kv_heads=2, fmt=(QT.Q4_K, QT.Q8_0, QT.Q6_K), seed=11), "auto"),
    "llama-legacy-f16kv": (TinyConfig(n_heads=4, n_kv_heads=1, fmt=(QT.Q4_1, QT.Q5_0, QT.Q8_0), seed=3), "f16"),
    "qwen2-bias-neox": (TinyConfig(arch="qwen2", fmt=(QT.Q5_K, QT.Q4_0), seed=5), "auto"),
    "qwen3-qknorm-headdim": (TinyConfig(arch="qwen3", head_dim=48, n_heads=8, n_kv_heads=2,
                                        fmt=(QT.F16, QT.Q8_0, QT.IQ4_NL), seed=7), "auto"),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    cfg, kv = CASES[request.param]
    path = write_tiny_llama(tmp_path_factory.mktemp("dstep") / "t.gguf", cfg)
    with engine.load(path, config={"device": "cpu", "kv_cache": {"dtype": kv}}) as m:
        yield path, m, m.weights.device_for(0, 1)


@pytest.fixture
def calls(monkeypatch):
    """Counts the native decode_block calls."""
    n = [0]
    real = engine.cpu.decode_block

    def counted(*a):
        n[0] += 1
        return real(*a)

    monkeypatch.setattr(engine.cpu, "decode_block", counted)
    return n


def decode(m, dev, native: bool, tokens=TOKENS):
    """Prefill PROMPT (the Python block), then decode `tokens` one pass each with the native step on or
    off -> (logits (len(tokens), vocab), keys, vals of the sequence)."""
    dev.native_step = True
    with m.open_sequence() as seq:
        m.step([(seq, PROMPT)])
        dev.native_step = native
        try:
            out = torch.cat([m.step([(seq, [t])])[0] for t in tokens])
        finally:
            dev.native_step = True
        n = seq.pos
        return out, [k[:, :n].float().clone() for k in seq.keys], [v[:, :n].float().clone() for v in seq.vals]


def test_native_step_equals_the_python_block(case, calls):
    _, m, dev = case
    py, pk, pv = decode(m, dev, native=False)
    assert calls[0] == 0
    nat, nk, nv = decode(m, dev, native=True)
    assert calls[0] == m.spec.n_layers * len(TOKENS)  # every decode block took the native step
    scale = py.abs().max()
    assert (nat - py).abs().max() <= REL_TOL * scale
    assert torch.equal(nat.argmax(-1), py.argmax(-1))
    for a, b in zip(nk + nv, pk + pv):  # the keys/values the step wrote into the slot
        assert ((a - b).abs() <= REL_TOL * b.abs().max() + kv_ulp(m, b)).all()


def kv_ulp(m, b: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each stored key/value in the slot's dtype (0 for fp32): a value
    whose int16-rounded inputs differ by a unit may round to the neighbouring fp16 number."""
    if m.weights.device_for(0, 1).kv_dtype != torch.float16:
        return torch.zeros_like(b)
    _, e = torch.frexp(b.abs().clamp_min(2.0 ** -14))
    return torch.ldexp(torch.ones_like(b), e - 11)


def test_native_step_matches_the_float64_reference(case):
    path, m, dev = case
    got, _, _ = decode(m, dev, native=True)
    ref = reference_logits(path, PROMPT + TOKENS)[len(PROMPT):]
    assert np.abs(got.numpy() - ref).max() / np.abs(ref).max() < 1e-3


def test_decode_batch_rows_equal_single_sequences_bit_for_bit(case, calls):
    _, m, dev = case
    solo = []
    for start in (PROMPT, PROMPT[:3], PROMPT[2:]):
        with m.open_sequence() as s:
            m.step([(s, start)])
            solo.append(torch.cat([m.step([(s, [t])])[0] for t in TOKENS[:3]]))
    seqs = [m.open_sequence() for _ in range(3)]
    try:
        for s, start in zip(seqs, (PROMPT, PROMPT[:3], PROMPT[2:])):
            m.step([(s, start)])
        calls[0] = 0
        rows = [m.step([(s, [t]) for s in seqs]) for t in TOKENS[:3]]  # 3 rows of one token, 3 passes
        assert calls[0] == 3 * m.spec.n_layers  # one native call per block for all rows
        for i in range(3):
            assert torch.equal(torch.cat([r[i] for r in rows]), solo[i])
    finally:
        for s in seqs:
            s.close()


def test_prefill_and_disabled_step_run_the_python_block(case, calls):
    _, m, dev = case
    with m.open_sequence() as seq:
        m.step([(seq, PROMPT)])
        assert calls[0] == 0
        dev.native_step = False
        try:
            m.step([(seq, [3])])
        finally:
            dev.native_step = True
        assert calls[0] == 0
        m.step([(seq, [4])])
        assert calls[0] == m.spec.n_layers
