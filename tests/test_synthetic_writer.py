"""engine.synthetic, the writer of the tiny test models and the benchmarks' synthetic ones, read back with
gguf-py (the reference reader): the declared metadata and tensors, the scales of random quantized blocks,
refused layouts, and no file left behind when writing fails."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, dequantize

from engine.synthetic import Layout, random_quantized, write_gguf

VOCAB = {"model": "gpt2", "tokens": [chr(0x41 + i) for i in range(40)], "types": [1] * 40, "bos": 0, "eos": 1,
         "eot": 2}


def small(**kw) -> Layout:
    base = dict(arch="qwen3moe", n_layers=2, dim=256, n_heads=4, n_kv_heads=2, ffn=512, vocab=40, ctx=64,
                rope_base=1e6, eps=1e-6, head_dim=64, n_experts=4, n_experts_used=2, expert_ffn=256, tied=False,
                embd_fmt=QT.Q8_0, block_fmts=(QT.Q4_K, QT.Q6_K), output_fmt=QT.Q6_K)
    return Layout(**(base | kw))


def fill(_: int, t) -> np.ndarray:
    rng = np.random.default_rng(0)
    if t.fmt == QT.F32:
        return np.ones(t.shape, np.float32)
    return random_quantized(rng, t.rows, t.fmt, lambda n, fields: [np.full(n, 1e-3)] * fields)


def test_file_holds_the_layout(tmp_path):
    lay = small()
    path = write_gguf(tmp_path / "m.gguf", lay, VOCAB, fill, name="synthetic test")
    r = GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items()}
    assert meta["general.architecture"] == "qwen3moe" and meta["general.name"] == "synthetic test"
    assert (meta["qwen3moe.block_count"], meta["qwen3moe.attention.head_count_kv"], meta["qwen3moe.expert_count"],
            meta["qwen3moe.expert_used_count"], meta["qwen3moe.expert_feed_forward_length"],
            meta["qwen3moe.attention.key_length"], meta["qwen3moe.rope.dimension_count"]) == (2, 2, 4, 2, 256, 64, 64)
    assert meta["tokenizer.ggml.eot_token_id"] == 2 and meta["qwen3moe.vocab_size"] == 40
    specs = lay.tensors()
    got = [(t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist()))) for t in r.tensors]
    assert got == [(t.name, t.fmt, t.shape) for t in specs]
    names = {t.name for t in specs}
    assert {"blk.1.attn_q_norm.weight", "blk.1.ffn_gate_inp.weight", "blk.1.ffn_down_exps.weight",
            "output.weight"} <= names and "blk.0.ffn_gate.weight" not in names
    # block matrices cycle through block_fmts in file order
    assert [t.fmt for t in specs if t.kind == "matrix" and t.name.startswith("blk.")][:7] == [QT.Q4_K, QT.Q6_K] * 3 + [QT.Q4_K]
    assert not (tmp_path / "m.gguf.tmp").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("fmt", [QT.Q4_K, QT.Q6_K, QT.Q2_K, QT.Q8_0, QT.Q4_1, QT.IQ4_XS])
def test_random_quantized_sets_every_scale(fmt):
    """Scales of 0 decode to all-zero weights (every fp16 field was set); small scales to small weights."""
    rng = np.random.default_rng(1)
    zero = random_quantized(rng, (4, 512), fmt, lambda n, fields: [np.zeros(n)] * fields)
    assert (dequantize(zero, fmt) == 0).all()
    w = dequantize(random_quantized(rng, (4, 512), fmt, lambda n, fields: [np.full(n, 1e-4)] * fields), fmt)
    assert w.shape == (4, 512) and np.isfinite(w).all() and 0 < np.abs(w).max() < 1.0


def test_refused_layouts_name_the_field():
    with pytest.raises(ValueError, match="blk.0.attn_q.weight: row length 320 is not a multiple of the Q4_K"):
        small(dim=320, head_dim=None, n_heads=5, n_kv_heads=5)
    with pytest.raises(ValueError, match="arch must be one of"):
        small(arch="gemma")
    with pytest.raises(ValueError, match="qwen3moe needs experts"):
        small(n_experts=0)
    with pytest.raises(ValueError, match="n_experts_used must be in 1..4"):
        small(n_experts_used=5)


def test_failed_write_leaves_nothing(tmp_path):
    def broken(index: int, t) -> np.ndarray:
        if index == 5:
            raise RuntimeError("disk on fire")
        return fill(index, t)

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_gguf(tmp_path / "m.gguf", small(), VOCAB, broken)
    assert list(tmp_path.iterdir()) == []
