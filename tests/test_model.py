"""The engine's forward pass vs an independent float64 reference on tiny random GGUFs of every
architecture: llama (adjacent-pair rope), qwen2 (Q/K/V biases, NeoX rope), qwen3 (q/k norms, NeoX
rope, a head size other than dim/heads)."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

import engine
from tiny_llama import TinyConfig, reference_logits, write_tiny_llama

TOKENS = [5, 17, 300, 42, 8, 99, 1, 250, 3, 77, 400, 12]

CONFIGS = {
    "q8_0-tied": TinyConfig(),
    "legacy-mix": TinyConfig(fmt=(QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0), seed=1),
    "kquants-rope_freqs-untied": TinyConfig(fmt=(QT.Q4_K, QT.Q5_K, QT.Q6_K), rope_freqs=True, tied=False,
                                            embd_fmt=QT.Q6_K, seed=2),
    "lowbit-untied": TinyConfig(fmt=(QT.Q2_K, QT.Q3_K, QT.IQ4_NL, QT.IQ4_XS), tied=False, embd_fmt=QT.IQ4_XS, seed=4),
    "float-gqa4": TinyConfig(fmt=(QT.F16, QT.BF16, QT.F32), n_heads=8, n_kv_heads=2, embd_fmt=QT.F16, seed=3),
    "qwen2-bias-untied": TinyConfig(arch="qwen2", fmt=(QT.Q8_0, QT.F16), tied=False, seed=4),
    "qwen2-kquants-tied": TinyConfig(arch="qwen2", fmt=(QT.Q4_K, QT.Q6_K), rope_base=1e6, seed=5),
    "qwen3-qknorm-hd48": TinyConfig(arch="qwen3", head_dim=48, fmt=(QT.Q8_0, QT.BF16), seed=6),
    "qwen3-qknorm-untied-gqa4": TinyConfig(arch="qwen3", head_dim=32, n_heads=8, n_kv_heads=2, tied=False,
                                           fmt=(QT.F32, QT.Q8_0), seed=7),
}


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request, tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("tiny") / f"{request.param}.gguf", CONFIGS[request.param])
    return path, engine.load(path), reference_logits(path, TOKENS)


def test_prefill_matches_float64_reference(tiny):
    _, model, ref = tiny
    got = model.logits(TOKENS)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert rel_err(got, ref) < 1e-3


def test_one_token_decode_matches_reference(tiny):
    _, model, ref = tiny
    import torch

    split = 5
    out = [model.forward(torch.tensor([TOKENS[:split]]), 0)[0]]
    for pos in range(split, len(TOKENS)):
        out.append(model.forward(torch.tensor([[TOKENS[pos]]]), pos)[0])
    got = torch.cat(out).numpy()
    assert rel_err(got, ref) < 1e-3


def test_batch_rows_equal_single_sequences(tiny):
    _, model, _ = tiny
    other = TOKENS[::-1]
    batch = model.logits([TOKENS, other])
    assert batch.shape == (2, len(TOKENS), model.spec.vocab_size)
    np.testing.assert_allclose(batch[0], model.logits(TOKENS), rtol=0, atol=1e-5)
    np.testing.assert_allclose(batch[1], model.logits(other), rtol=0, atol=1e-5)


def test_spec_read_from_metadata(tiny):
    path, model, _ = tiny
    cfg = CONFIGS[path.stem]
    s = model.spec
    assert (s.n_layers, s.dim, s.n_heads, s.n_kv_heads, s.ffn_dim) == (
        cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn)
    assert s.architecture == cfg.arch and s.context_length == cfg.ctx
    assert s.head_dim == (cfg.head_dim or cfg.dim // cfg.n_heads)
    assert s.has_rope_freqs == cfg.rope_freqs and s.tied_output == cfg.tied


def test_greedy_generate_follows_reference_argmax(tmp_path):
    path = write_tiny_llama(tmp_path / "g.gguf", CONFIGS["q8_0-tied"])
    model = engine.load(path)
    prompt = TOKENS[:4]
    text = "".join(model.generate(prompt, max_tokens=6, temperature=0))
    # replay: each generated token is the argmax of the reference over the sequence so far
    seq = list(prompt)
    for _ in range(6):
        nxt = int(np.argmax(reference_logits(path, seq)[-1]))
        if nxt in model.tokenizer.stop_ids:
            break
        seq.append(nxt)
    assert text == model.detokenize(seq[len(prompt):])


def test_context_overflow_is_a_clear_error(tmp_path):
    path = write_tiny_llama(tmp_path / "c.gguf", CONFIGS["q8_0-tied"])
    model = engine.load(path)
    with pytest.raises(engine.EngineError, match="context"):
        model.logits(list(range(model.n_ctx + 1)))
    with pytest.raises(engine.EngineError, match="token id"):
        model.logits([model.spec.vocab_size])


def test_context_beyond_the_trained_one_only_when_asked(tmp_path, caplog):
    """The config's max_context (and the default) stop at the trained context; an explicit n_ctx past
    it is honoured, with a warning naming the file and the metadata key, and positions past the
    trained context compute (rope extrapolates)."""
    import logging

    path = write_tiny_llama(tmp_path / "c.gguf", CONFIGS["q8_0-tied"])  # trained context 128
    with engine.load(path, config={"device": "cpu", "kv_cache": {"max_context": 1024}}) as m:
        assert m.n_ctx == 128
    with caplog.at_level(logging.WARNING, logger="engine.model"):
        m = engine.load(path, n_ctx=200)
    try:
        assert m.n_ctx == 200
        (line,) = [r.getMessage() for r in caplog.records if "trained context" in r.getMessage()]
        assert str(path) in line and "llama.context_length" in line and "128" in line
        logits = m.logits([(7 * i) % 300 for i in range(150)])
        assert logits.shape == (150, m.spec.vocab_size) and np.isfinite(logits).all()
    finally:
        m.close()
