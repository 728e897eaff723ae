"""Sequences, KV slots and ragged passes: each row of a mixed pass equals its single-sequence run (bit
for bit on the CPU), draft trees, truncation, chunked attention, slots owned by one generation, and a
failed pass that leaves every sequence as it was."""
from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

import engine
import engine.model
from engine.attention import AttnMask, attend, matmul_kernel, sdpa_kernel
from engine.errors import EngineError, WeightIOError
from engine.gguf_file import GGUFFile
from engine.model import Model
from engine.spec import ModelSpec
from engine.tiers.runtime import Placement, head_info
from engine.weights import layer_layout
from tiny_llama import TinyConfig, reference_logits, write_tiny_llama

A = [5, 17, 300, 42, 8, 99, 1]
B = [250, 3, 77]
C = [400, 12, 9, 31, 64]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    cfg = TinyConfig(n_heads=8, n_kv_heads=2, fmt=(QT.Q4_K, QT.Q8_0, QT.Q6_K), seed=11)
    return write_tiny_llama(tmp_path_factory.mktemp("seq") / "t.gguf", cfg)


@pytest.fixture(scope="module")
def model(path):
    with engine.load(path, config={"device": "cpu"}) as m:
        yield m


# Passes of other shapes (a tree, prompt chunks) are equal up to rounding only: the Q4_K/Q6_K kernels
# round activations to int16 per block, so a 1e-6 change in attention can move a logit by ~1e-4.
def solo(model, chunks):
    """Logits of one sequence fed `chunks` of tokens one pass each."""
    with model.open_sequence() as seq:
        return [model.step([(seq, c)])[0] for c in chunks]


@pytest.fixture
def python_block(model):
    """The model with the CPU's native decode step off: every pass runs the Python block."""
    dev = model.weights.device_for(0, 1)
    dev.native_step = False
    yield model
    dev.native_step = True


@pytest.mark.parametrize("native", [False, True])
def test_ragged_rows_equal_single_sequences_bit_for_bit(model, native, request):
    """Bit for bit with the Python block; with the native decode step on, a decode token alone takes that
    step and beside prefills the Python block, so what depends on it is equal within rounding."""
    if not native:
        request.getfixturevalue("python_block")

    def same(got, want, exact):
        if exact or not native:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-3)

    a1, b1 = solo(model, [A, [7]]), solo(model, [B, C])
    c1 = solo(model, [C])
    with model.open_sequence() as sa, model.open_sequence() as sb, model.open_sequence() as sc:
        la, lb = model.step([(sa, A), (sb, B)])  # two prefills of different lengths
        assert (sa.pos, sb.pos) == (len(A), len(B))
        la2, lb2, lc = model.step([(sa, [7]), (sb, C), (sc, C)])  # a decode token beside two prefills
        assert la.shape == (len(A), model.spec.vocab_size) and la2.shape == (1, model.spec.vocab_size)
        for got, want in [(la, a1[0]), (lb, b1[0]), (lb2, b1[1]), (lc, c1[0])]:
            same(got, want, exact=True)
        same(la2, a1[1], exact=False)
        last = model.step([(sa, [1, 2]), (sc, [3])], last_only=True)
        assert [t.shape[0] for t in last] == [1, 1]
    same(last[0][0], solo(model, [A, [7], [1, 2]])[2][-1], exact=False)  # sa's KV holds [7] from the mixed pass
    same(last[1][0], solo(model, [C, [3]])[1][-1], exact=False)  # [3] alone is a native decode step


def test_sequence_logits_match_the_float64_reference(model, path):
    ref = reference_logits(path, A + B)
    with model.open_sequence() as seq:
        got = torch.cat(model.step([(seq, A)]) + [model.step([(seq, [t])])[0] for t in B])
    assert np.abs(got.numpy() - ref).max() / np.abs(ref).max() < 1e-3


def test_truncate_then_replay_is_identical(model):
    with model.open_sequence() as seq:
        first = model.step([(seq, A + B)])[0]
        seq.truncate(len(A))
        again = model.step([(seq, B)])[0]
        assert torch.equal(again, first[len(A):])
        with pytest.raises(EngineError):
            seq.truncate(seq.pos + 1)


def test_tree_pass_scores_every_branch_and_keep_path_continues_it(model):
    # a draft tree after A: 0 -> 1 -> 3 and 0 -> 2 (two children of node 0), 4 a second root
    tokens, parents = [11, 12, 13, 14, 15], [-1, 0, 0, 1, -1]
    with model.open_sequence() as seq:
        model.step([(seq, A)])
        tree = model.step([(seq, tokens)], trees=[parents])[0]
        for node, path in [(1, [11, 12]), (3, [11, 12, 14]), (2, [11, 13]), (4, [15])]:
            want = solo(model, [A + path])[0][-1]
            torch.testing.assert_close(tree[node], want, rtol=0, atol=1e-3)
        sibling = solo(model, [A + [11, 12, 13]])[0][-1]  # as if node 2 saw its sibling 1: far off
        assert (tree[2] - sibling).abs().max() > 0.05
        seq.keep_path([0, 1, 3])
        assert seq.pos == len(A) + 3
        nxt = model.step([(seq, [16])])[0][-1]
        torch.testing.assert_close(nxt, solo(model, [A + [11, 12, 14, 16]])[0][-1], rtol=0, atol=1e-3)
        with pytest.raises(EngineError, match="tree pass"):
            seq.keep_path([0])
        model.step([(seq, [1, 2])], trees=[[-1, 0]])
        with pytest.raises(EngineError, match="not a path"):
            seq.keep_path([1])
    with model.open_sequence() as seq, pytest.raises(EngineError, match="parent"):
        model.step([(seq, [1, 2])], trees=[[-1, 1]])


def test_per_row_outputs_equal_the_full_logits(model):
    """want[i]: only row i's last want[i] positions go through the output head, each equal to the same
    row's logits from a pass that computes every position (the head is batch-invariant on the CPU)."""
    with model.open_sequence() as sa, model.open_sequence() as sb, model.open_sequence() as sc:
        full = model.step([(sa, A), (sb, B), (sc, C)])
    with model.open_sequence() as sa, model.open_sequence() as sb, model.open_sequence() as sc:
        got = model.step([(sa, A), (sb, B), (sc, C)], want=[1, 3, 2])
        assert (sa.pos, sb.pos, sc.pos) == (len(A), len(B), len(C))
    assert [g.shape[0] for g in got] == [1, 3, 2]
    for g, f, n in zip(got, full, [1, 3, 2]):
        assert torch.equal(g, f[-n:])
    with model.open_sequence() as s:  # one row, several outputs (a draft verification)
        (one,) = model.step([(s, A)], want=[3])
    assert torch.equal(one, full[0][-3:])


def test_pass_errors_are_typed_and_change_nothing(model, path):
    with model.open_sequence() as s, engine.load(path, config={"device": "cpu"}) as other:
        model.step([(s, A)])
        for rows, match in [([], "at least one row"), ([(s, [])], "no tokens"), ([(s, [1]), (s, [2])], "only once"),
                            ([(s, [model.spec.vocab_size])], "token id"), ([(s, [1] * model.n_ctx)], "context"),
                            ([(other.open_sequence(), [1])], "not a sequence of this model")]:
            with pytest.raises(EngineError, match=match):
                model.step(rows)
            assert s.pos == len(A)
        for want in ([0], [2], [1, 1], [True]):  # 1..T outputs per row, one count per row
            with pytest.raises(EngineError) as e:
                model.step([(s, [1])], want=want)
            assert e.value.field == "want" and s.pos == len(A)
    with pytest.raises(EngineError, match="closed"):
        model.step([(s, [1])])


def test_chunked_prefill_and_attention_chunks_change_nothing_but_memory(model, monkeypatch):
    whole = model.logits(A + B + C)
    monkeypatch.setattr(engine.model, "PREFILL_TOKENS", 4)
    np.testing.assert_allclose(model.logits(A + B + C), whole, rtol=0, atol=1e-3)
    g = torch.Generator().manual_seed(0)
    T, H, Hkv, hd, start = 9, 8, 2, 16, 6
    q = torch.randn(T, H, hd, generator=g)
    keys, vals = torch.randn(Hkv, start + T + 3, hd, generator=g), torch.randn(Hkv, start + T + 3, hd, generator=g)
    tree = torch.tensor([[j <= t and (t - j) % 2 == 0 for j in range(T)] for t in range(T)])
    for mask in (AttnMask(start), AttnMask(start, tree)):
        one = attend(q, keys, vals, mask, lambda *a: matmul_kernel(*a, 0.25))
        # reference: explicit per-head softmax over the visible keys, in float64
        vis = torch.ones(T, start + T, dtype=torch.bool)
        vis[:, start:] = torch.ones(T, T, dtype=torch.bool).tril() if mask.tree is None else tree
        kk = keys[:, :start + T].double().repeat_interleave(H // Hkv, 0)  # (H, L, hd)
        vv = vals[:, :start + T].double().repeat_interleave(H // Hkv, 0)
        s = torch.einsum("thd,hld->htl", q.double(), kk) * 0.25
        ref = torch.einsum("htl,hld->thd", s.masked_fill(~vis, float("-inf")).softmax(-1), vv)
        torch.testing.assert_close(one.double(), ref, rtol=0, atol=1e-5)
        for budget in (1, 4 * H * (start + T) * 2):  # one query per chunk, two queries per chunk
            chunked = attend(q, keys, vals, mask, lambda *a: matmul_kernel(*a, 0.25), score_bytes=budget)
            torch.testing.assert_close(chunked, one, rtol=0, atol=1e-6)
        sd = attend(q, keys, vals, mask, lambda *a: sdpa_kernel(*a, 0.25), score_bytes=4 * H * (start + T) * 3)
        torch.testing.assert_close(sd, one, rtol=0, atol=1e-5)


def test_two_generations_on_one_model_do_not_share_a_cache(model):
    p1, p2 = A[:4], C[:3]
    solo1 = "".join(model.generate(p1, max_tokens=10, temperature=0, stop=()))
    solo2 = "".join(model.generate(p2, max_tokens=10, temperature=0, stop=()))
    gens = [model.generate(p, max_tokens=10, temperature=0, stop=()) for p in (p1, p2)]
    outs: list[list[str]] = [[], []]
    live = [0, 1]
    while live:  # interleaved piece by piece
        for i in list(live):
            piece = next(gens[i], None)
            if piece is None:
                live.remove(i)
            else:
                outs[i].append(piece)
    assert ["".join(o) for o in outs] == [solo1, solo2]
    assert not model.sequences  # both slots were freed


def test_kv_cache_dtype_key_is_honoured(path):
    ref = reference_logits(path, A)
    for name, dtype, tol in [("f32", torch.float32, 1e-3), ("f16", torch.float16, 5e-3)]:
        with engine.load(path, config={"device": "cpu", "kv_cache": {"dtype": name}}) as m:
            with m.open_sequence() as seq:
                assert {t.dtype for t in seq.keys + seq.vals} == {dtype}
                got = m.step([(seq, A)])[0].numpy()
            assert np.abs(got - ref).max() / np.abs(ref).max() < tol, name


def test_read_fault_mid_generation_rolls_back_and_the_next_generation_is_clean(tmp_path):
    path = write_tiny_llama(tmp_path / "f.gguf", TinyConfig(n_layers=3))
    f = GGUFFile(path)
    spec = ModelSpec.from_gguf(f)
    lays = [layer_layout(f, spec, i) for i in range(spec.n_layers)]
    placement = Placement.uniform(lays, head_info(f, spec), stream=True, ring_size=1)
    with Model.load(path, placement=placement) as m:
        clean = "".join(m.generate(A[:3], max_tokens=12, temperature=0, stop=()))
        gen = m.generate(A[:3], max_tokens=12, temperature=0, stop=())
        next(gen)
        m.reader.inject_fault(f.tensor("blk.1.attn_norm.weight").offset - 4096, errno.EIO)
        with pytest.raises(WeightIOError):
            list(gen)
        assert not m.sequences  # the failed generation's slot was freed
        with m.open_sequence() as seq:  # a failed pass leaves the sequence as it was
            with pytest.raises(WeightIOError):
                m.step([(seq, A)])
            assert seq.pos == 0
            m.reader.inject_fault(None)
            assert torch.equal(m.step([(seq, A)])[0], solo(m, [A])[0])
        assert "".join(m.generate(A[:3], max_tokens=12, temperature=0, stop=())) == clean
