"""engine.cpu's opt-in 8-bit-activation path (engine/cpu/q8_path.h) vs numpy float64 on gguf-py
dequantized weights: its error bound, its bit-identity with the portable build, the formats without the
path, and the setting end to end (bit-identity across threads, batch sizes and linear_many:
tests/test_cpu_kernels.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from engine import cpu
from engine.cpu.build import BuildSpec, build
from engine.cpu.launcher import INT8_FORMATS, ISA_FLAGS, Kernels
from engine.errors import KernelError
from test_cpu_kernels import TOL, make_weight, reference, run, shape_for

INT8 = sorted(INT8_FORMATS)


def run8(x: np.ndarray, raw: np.ndarray, fmt: str, n: int, k: int, kernels=None, activations="int8") -> np.ndarray:
    return run(x, raw, fmt, n, k, kernels, activations=activations)


def rounding_bound(x: np.ndarray, raw: np.ndarray, fmt: str, n: int, k: int) -> np.ndarray:
    """(T, N): sum over 256-blocks b of 0.5 sx_b * sum_{i in b} |w_i|, sx_b = amax_b / 127: what
    rounding x to x8 = rint(x / sx_b) can move each output, at most."""
    w = np.abs(dequantize(raw, QT[fmt]).astype(np.float64).reshape(n, k // 256, 256)).sum(-1)  # (N, B)
    sx = np.abs(x.astype(np.float64)).reshape(x.shape[0], k // 256, 256).max(-1) / 127  # (T, B)
    return 0.5 * sx @ w.T


def test_int8_formats():
    assert INT8_FORMATS == {"Q4_K", "Q5_K", "Q6_K"} and INT8_FORMATS <= cpu.INT16_FORMATS
    assert cpu.ACTIVATIONS == {"int16": 0, "int8": 2}


@pytest.mark.parametrize("fmt", INT8)
def test_int8_error_is_within_the_rounding_bound(fmt):
    """|y - ref| <= 0.5 sx_b sum|w| summed over blocks (+ fp32 accumulation); measured relative to
    the largest |ref|: ~0.4-1.3e-2 (about 300x the int16 path's)."""
    rng = np.random.default_rng(sum(map(ord, fmt)) + 8)
    n, k = 37, 1024
    raw = make_weight(fmt, n, k, rng)
    rels = []
    for t in (1, 2, 3, 5, 37):
        x = rng.standard_normal((t, k)).astype(np.float32)
        y = run8(x, raw, fmt, n, k)
        ref, scale = reference(x, raw, fmt, n, k)
        err = np.abs(y - ref)
        assert (err <= rounding_bound(x, raw, fmt, n, k) * (1 + 1e-3) + TOL * scale).all(), f"{fmt} T={t}"
        rels.append(err.max() / np.abs(ref).max())
        # the path is really taken: int16 activations give different (closer) bits
        y16 = run8(x, raw, fmt, n, k, activations="int16")
        assert not np.array_equal(y, y16) and np.abs(y16 - ref).max() < err.max()
    assert 1e-3 < max(rels) < 3e-2, rels


def test_int8_quantizes_each_block_on_its_own_scale():
    """Tiny activations next to huge ones keep their own block's precision; a non-finite activation
    gives NaN, an all-zero row zero."""
    rng = np.random.default_rng(6)
    for fmt in INT8:
        n, k = 9, 512
        raw = make_weight(fmt, n, k, rng)
        x = rng.standard_normal((1, k)).astype(np.float32)
        x[0, :256] *= 1e-6
        x[0, 256:] *= 1e4
        for part in (slice(0, 256), slice(256, 512)):
            xh = np.zeros_like(x)
            xh[0, part] = x[0, part]
            ref, scale = reference(xh, raw, fmt, n, k)
            assert (np.abs(run8(xh, raw, fmt, n, k) - ref) <= rounding_bound(xh, raw, fmt, n, k) * 1.001 + TOL * scale).all()
        assert not run8(np.zeros((1, k), np.float32), raw, fmt, n, k).any()
        for bad_value in (np.inf, np.nan):
            bad = x.copy()
            bad[0, 300] = bad_value
            assert np.isnan(run8(bad, raw, fmt, n, k)).all()


def test_other_formats_ignore_int8():
    """Formats without an 8-bit path take their default path, bit for bit (so mixed files work)."""
    rng = np.random.default_rng(9)
    for fmt in sorted(cpu.SUPPORTED - INT8_FORMATS):
        n, k = shape_for(fmt)
        raw = make_weight(fmt, n, k, rng)
        for t in (1, 6):
            x = rng.standard_normal((t, k)).astype(np.float32)
            assert np.array_equal(run8(x, raw, fmt, n, k).view(np.uint32),
                                  run8(x, raw, fmt, n, k, activations="int16").view(np.uint32)), fmt


def test_int8_portable_build_is_bit_identical_to_native():
    """Every tiling of both builds (q8_path.h): row tiles (T < 8 and rests), lanes tiles of 8 rows
    (AVX2) and of 16 (AVX-512 VNNI, a last tile of 8..15 rows padded), with rests of each."""
    native = Kernels(build(BuildSpec.default()), 2)
    portable = Kernels(build(BuildSpec.default(ISA_FLAGS["avx2"])), 2)
    rng = np.random.default_rng(4)
    for fmt in INT8:
        n, k = 37, 512
        raw = make_weight(fmt, n, k, rng)
        for t in (1, 2, 3, 6, 8, 9, 13, 16, 17, 24, 37):
            x = rng.standard_normal((t, k)).astype(np.float32)
            assert np.array_equal(run8(x, raw, fmt, n, k, native).view(np.uint32),
                                  run8(x, raw, fmt, n, k, portable).view(np.uint32)), (fmt, t)


def test_int8_blocks_of_rows_of_x_give_the_same_bits():
    """Long rows split x into blocks of rows (q8_path.h: kQ8XBlockBytes of x8, at K = 32768 16 rows a
    block): a batch of 43 rows spans 3 blocks and a tail of tiles of 2 and 1; each row gives the bits
    it gives alone, at 1 and 2 threads."""
    rng = np.random.default_rng(12)
    n, k = 21, 32768
    kern = Kernels(build(BuildSpec.default()), 2)
    for fmt in INT8:
        raw = make_weight(fmt, n, k, rng)
        x = rng.standard_normal((43, k)).astype(np.float32)
        whole = run8(x, raw, fmt, n, k, kern)
        kern.set_num_threads(1)
        assert np.array_equal(whole.view(np.uint32), run8(x, raw, fmt, n, k, kern).view(np.uint32)), fmt
        kern.set_num_threads(2)
        for t in (0, 15, 16, 40, 42):
            assert np.array_equal(run8(x[t:t + 1], raw, fmt, n, k, kern)[0].view(np.uint32), whole[t].view(np.uint32)), (fmt, t)


@pytest.mark.parametrize("bad", ("int4", "INT8", "", None, 8))
def test_activations_value_is_validated(bad):
    x, w = torch.randn(1, 256), torch.zeros(144, dtype=torch.uint8)
    with pytest.raises(KernelError) as e:
        cpu.linear(x, w, "Q4_K", 1, 256, activations=bad)
    assert e.value.field == "activations"
    with pytest.raises(KernelError) as e:
        cpu.linear_many(x, [(w, "Q4_K", 1)], 256, activations=bad)
    assert e.value.field == "activations"


# ---- the setting end to end: config key, device, native decode step, CLI ----

PROMPT = [5, 17, 300, 42, 8, 99, 1]
TOKENS = [250, 3, 77, 400, 12, 9, 33, 120]


@pytest.fixture(scope="module")
def tiny_kquant(tmp_path_factory):
    from gguf import GGMLQuantizationType as Q

    from tiny_llama import TinyConfig, write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("int8") / "t.gguf",
                            TinyConfig(n_heads=8, n_kv_heads=2, fmt=(Q.Q4_K, Q.Q8_0, Q.Q6_K), seed=11))


def logits_of(path, activations: str, native: bool = True) -> torch.Tensor:
    """(len(PROMPT) + len(TOKENS), vocab): a prefill pass, then one decode pass per token."""
    import engine

    with engine.load(path, config={"device": "cpu", "cpu_activations": activations}) as m:
        dev = m.weights.device_for(0, 1)
        assert dev.activations == activations
        with m.open_sequence() as seq:
            pre = m.step([(seq, PROMPT)])[0]
            dev.native_step = native
            dec = torch.cat([m.step([(seq, [t])])[0] for t in TOKENS])
        if native:
            assert all(lay.mode == cpu.ACTIVATIONS[activations] for _, lay in dev._decode_layers.values())
        return torch.cat([pre, dec])


def test_int8_model_logits(tiny_kquant):
    """A tiny random Q4_K/Q8_0/Q6_K llama: int8 logits against the default (int16) ones, relative to the
    largest logit: measured 4.5e-2 here (2e-2..1.4e-1 over seeds 0-5 of this config: random tiny models
    amplify every rounding, the int16 path's 1e-5 per product shows as 1e-4..6e-4); greedy tokens agree
    (teacher-forced) on 14 of 15 positions, and wherever the default's top-2 margin exceeds twice that
    error. The native decode step takes the same path as the Python block (measured 5e-4 apart: an
    activation's 8-bit rounding flips with the small ops' last bits)."""
    a, b = logits_of(tiny_kquant, "int16"), logits_of(tiny_kquant, "int8")
    scale = a.abs().max()
    err = ((b - a).abs().max() / scale).item()
    assert 1e-4 < err < 1e-1, err
    assert (a.argmax(-1) == b.argmax(-1)).sum() >= len(a) - 2
    top2 = a.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err * scale
    assert clear.sum() >= 3 and torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])
    py = logits_of(tiny_kquant, "int8", native=False)
    assert ((py - b).abs().max() / scale).item() < 3e-3


def test_cpu_activations_config_key(tmp_path, tiny_kquant):
    import engine
    from engine.errors import ConfigError
    from engine.tiers.config import load_config

    assert load_config(None).cpu_activations == "int16"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("device: cpu\ncpu_activations: int8\n")
    assert load_config(cfg).cpu_activations == "int8"
    for bad in ("int4", "INT8", 8, "", ["int8"]):
        with pytest.raises(ConfigError) as e:
            load_config({"cpu_activations": bad})
        assert e.value.field == "cpu_activations"
    with engine.load(tiny_kquant, config=cfg, cpu_activations="int16") as m:  # load's option overrides the config
        assert m.weights.device_for(0, 1).activations == "int16" and m.config.cpu_activations == "int16"
    with pytest.raises(ConfigError) as e:
        engine.load(tiny_kquant, cpu_activations="int4")
    assert e.value.field == "cpu_activations"
    from engine.device import CpuDevice

    with pytest.raises(KernelError) as e:
        CpuDevice(1, activations="int4")
    assert e.value.field == "activations"


def test_cli_flag(tiny_kquant):
    import json
    import subprocess
    import sys

    base = [sys.executable, "-m", "engine.generate", "hi", "--model", str(tiny_kquant), "--max-tokens", "4",
            "--temperature", "0", "--threads", "1", "--json"]
    r = subprocess.run(base + ["--cpu-activations", "int8"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["decode_tokens"] == 4
    r = subprocess.run(base + ["--cpu-activations", "int4"], capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "cpu_activations" in lines[0]


def test_draft_model_follows_the_target(tiny_kquant):
    """A draft GGUF loaded for speculation takes the target's cpu_activations unless told otherwise."""
    import engine
    from engine.serving.speculative import drafter_for

    with engine.load(tiny_kquant, config={"device": "cpu", "cpu_activations": "int8"}) as target:
        for options, want in (({}, "int8"), ({"cpu_activations": "int16"}, "int16")):
            drafter = drafter_for(target, str(tiny_kquant), **options)
            try:
                assert drafter.model.weights.device_for(0, 1).activations == want
            finally:
                drafter.shutdown()
