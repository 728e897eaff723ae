"""Mixture-of-experts blocks (Mixtral = llama + experts, qwen3moe): tiny random GGUFs against the float64
numpy reference of tests/tiny_llama.py (its own routing code), in prefill, decode and ragged batches, at
several placements (the result never depends on where the experts live); the model's expert traffic
(grouped by expert, one request per block and pass); the typed errors of inconsistent MoE files."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

import engine
from engine.errors import ModelFormatError, UnsupportedModelError
from engine.gguf_file import GGUFFile
from engine.model import Model
from engine.spec import ModelSpec
from engine.tiers.runtime import Placement, head_info
from engine.weights import expected_layer_shapes, expert_slice, layer_layout
from gguf_edit import STRING, U32, Value, decode, encode
from tiny_llama import TinyConfig, reference_logits, write_tiny_llama

# tiny MoE models in a few formats (dims multiples of 256 so K-quants fit); qwen3moe's head size (64) is
# not dim / heads (32): it comes from key_length
MOE_MODELS = {
    "mixtral-q8_0-q4_k": TinyConfig(n_experts=4, n_experts_used=2, ffn=256, fmt=(QT.Q8_0, QT.Q4_K), seed=41),
    "mixtral-q6_k-q5_0": TinyConfig(n_layers=3, n_experts=6, n_experts_used=2, ffn=256, fmt=(QT.Q6_K, QT.Q5_0),
                                    tied=False, seed=42),
    "qwen3moe-q8_0-q6_k": TinyConfig(arch="qwen3moe", n_heads=8, head_dim=64, n_experts=8, n_experts_used=3,
                                     expert_ffn=256, fmt=(QT.Q8_0, QT.Q6_K), rope_base=1e6, seed=43),
    "qwen3moe-q4_k-q5_k": TinyConfig(arch="qwen3moe", n_heads=8, head_dim=64, n_experts=16, n_experts_used=4,
                                     expert_ffn=256, fmt=(QT.Q4_K, QT.Q5_K), rope_base=1e6, seed=44),
}
A = [1, 17, 300, 42, 8, 99, 250, 3]
B = [77, 5, 410, 12]


def rel_err(got, ref) -> float:
    return float(np.abs(np.asarray(got, dtype=np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=sorted(MOE_MODELS))
def moe_path(request, tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("moe") / f"{request.param}.gguf", MOE_MODELS[request.param])


def placements(path):
    """All resident; every block streamed from disk through a ring of 1 and of 2 buffers; every block in
    the host tier; the FFN (router and experts) of block 0 streamed while its attention stays resident."""
    f = GGUFFile(path)
    spec = ModelSpec.from_gguf(f)
    lays = [layer_layout(f, spec, i) for i in range(spec.n_layers)]
    head = head_info(f, spec)
    yield "resident", Placement.uniform(lays, head, stream=False)
    yield "disk-ring1", Placement.uniform(lays, head, stream=True, ring_size=1)
    yield "disk-ring2", Placement.uniform(lays, head, stream=True, ring_size=2)
    yield "host", Placement.uniform(lays, head, stream=True, source="host")
    ffn0 = [frozenset(t.name for r, t in lay.tensors if i == 0 and r.startswith("ffn_")) for i, lay in enumerate(lays)]
    yield "ffn0-streamed", Placement(tuple(ffn0) + (frozenset(),), ((0, head.shape[0]),), "resident", 1)


def test_spec_reads_the_experts(moe_path):
    spec = ModelSpec.from_gguf(GGUFFile(moe_path))
    cfg = MOE_MODELS[moe_path.stem]
    assert spec.moe and (spec.n_experts, spec.n_experts_used) == (cfg.n_experts, cfg.n_experts_used)
    assert spec.expert_ffn_dim == (cfg.expert_ffn or cfg.ffn)
    assert spec.architecture == ("qwen3moe" if cfg.arch == "qwen3moe" else "llama")
    shapes = expected_layer_shapes(spec)
    assert "ffn_gate" not in shapes and shapes["ffn_gate_inp"] == (cfg.n_experts, cfg.dim)


def test_expert_slice_is_the_experts_bytes(moe_path):
    """expert_slice(info, e) locates exactly expert e's rows: dequantized, they are the e-th matrix of the
    stacked tensor as gguf-py reads it."""
    from gguf import GGUFReader, dequantize

    f = GGUFFile(moe_path)
    r = {t.name: t for t in GGUFReader(str(moe_path)).tensors}
    for role in ("ffn_gate_exps", "ffn_down_exps"):
        info = f.tensor(f"blk.1.{role}.weight")
        full = dequantize(r[info.name].data, r[info.name].tensor_type).reshape(info.shape)  # (E, N, K)
        for e in (0, info.shape[0] - 1):
            t = expert_slice(info, e)
            got = t.fmt.dequantize(f.view(t), t.shape).numpy()
            np.testing.assert_array_equal(got, full[e])
    with pytest.raises(ModelFormatError, match="outside"):
        expert_slice(info, info.shape[0])


def test_prefill_matches_the_reference_at_every_placement(moe_path):
    ref = reference_logits(moe_path, A + B)
    first = None
    for name, placement in placements(moe_path):
        with Model.load(moe_path, placement=placement) as m:
            got = m.logits(A + B)
        assert rel_err(got, ref) < 1e-3, name
        if first is None:
            first = got
        else:  # where the experts live changes nothing, to the bit
            assert np.array_equal(got, first), name


def test_decode_and_ragged_batches(moe_path):
    ref = reference_logits(moe_path, A + B)
    with engine.load(moe_path, config={"device": "cpu"}) as m:
        with m.open_sequence() as seq:  # prefill A, then B one token at a time
            got = torch.cat(m.step([(seq, A)]) + [m.step([(seq, [t])])[0] for t in B])
        assert rel_err(got.numpy(), ref) < 1e-3

        def solo(chunks):
            with m.open_sequence() as s:
                return [m.step([(s, c)])[0] for c in chunks]

        a1, b1 = solo([A, [7]]), solo([B, A])
        with m.open_sequence() as sa, m.open_sequence() as sb:
            la, lb = m.step([(sa, A), (sb, B)])  # two prefills, experts shared across rows
            la2, lb2 = m.step([(sa, [7]), (sb, A)])  # a decode token beside a prefill
        for got, want in [(la, a1[0]), (la2, a1[1]), (lb, b1[0]), (lb2, b1[1])]:
            assert torch.equal(got, want)


def test_wrong_routing_normalisation_is_caught(moe_path):
    """The comparison can fail: unnormalised routing weights (on either side) move the logits far past the bound."""
    ref = reference_logits(moe_path, A)
    assert rel_err(reference_logits(moe_path, A, renormalise=False), ref) > 1e-2
    with engine.load(moe_path, config={"device": "cpu"}) as m:
        m.net.spec = dataclasses.replace(m.spec, expert_weights_norm=False)
        assert rel_err(m.logits(A), ref) > 1e-2


class Spy:
    """Wraps a provider: records experts() requests and hint_experts() calls."""

    def __init__(self, inner, hints: bool):
        self.inner, self.wants_hints = inner, hints
        self.requests, self.hints = [], []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def experts(self, i, ids, rows):
        self.requests.append((i, list(ids), rows))
        return self.inner.experts(i, ids, rows)

    def hint_experts(self, i, ids):
        self.hints.append((i, list(ids)))


@pytest.mark.parametrize("hints", [False, True])
def test_experts_are_requested_once_per_block_and_pass(hints, tmp_path):
    cfg = MOE_MODELS["qwen3moe-q8_0-q6_k"]
    path = write_tiny_llama(tmp_path / "q.gguf", cfg)
    with Model.load(path, config={"device": "cpu"}) as m:
        want = m.logits(A)
        spy = m.weights = Spy(m.weights, hints)
        got = m.logits(A)
        assert np.array_equal(got, want)  # hints never change a result
        assert [i for i, _, _ in spy.requests] == list(range(cfg.n_layers))
        for _, ids, rows in spy.requests:  # sorted, unique, the batch's rows
            assert ids == sorted(set(ids)) and len(ids) <= cfg.n_experts and rows == len(A)
        if hints:  # layer i+1's experts predicted from layer i's output, for every later block
            assert [i for i, _ in spy.hints] == list(range(1, cfg.n_layers))
            assert all(ids == sorted(set(ids)) and 0 < len(ids) <= cfg.n_experts for _, ids in spy.hints)
        else:
            assert spy.hints == []


# -- bad input -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_moe(tmp_path_factory):
    cfg = TinyConfig(arch="qwen3moe", n_layers=2, n_heads=8, head_dim=64, n_experts=4, n_experts_used=2,
                     expert_ffn=256, seed=45)
    return write_tiny_llama(tmp_path_factory.mktemp("moebad") / "good.gguf", cfg)


def edited(good, tmp_path, edit):
    doc = decode(good.read_bytes())
    edit(doc)
    out = tmp_path / "bad.gguf"
    out.write_bytes(encode(doc))
    return out


def set_u32(key, v):
    return lambda doc: doc.set(key, Value(U32, v))


def drop(name):
    def edit(doc):
        doc.tensors = [t for t in doc.tensors if t.name != name]
    return edit


def without(key):
    return lambda doc: doc.kvs.remove(next(kv for kv in doc.kvs if kv[0] == key))


def rename(name, new):
    def edit(doc):
        next(t for t in doc.tensors if t.name == name).name = new
    return edit


def router_of(n):  # claim the router of block 1 has n experts (its bytes stay)
    def edit(doc):
        next(t for t in doc.tensors if t.name == "blk.1.ffn_gate_inp.weight").dims[1] = n
    return edit


BAD = [  # (edit, error type, field the error names, words of the message)
    (set_u32("qwen3moe.expert_used_count", 5), ModelFormatError, "qwen3moe.expert_used_count", "more than the 4"),
    (set_u32("qwen3moe.expert_used_count", 0), ModelFormatError, "qwen3moe.expert_used_count", "at least 1"),
    (set_u32("qwen3moe.expert_count", 6), ModelFormatError, "blk.0.ffn_gate_exps.weight", "expert_count = 6"),
    (set_u32("qwen3moe.expert_feed_forward_length", 512), ModelFormatError, "blk.0.ffn_gate_exps.weight",
     "expert_feed_forward_length = 512"),
    (router_of(3), ModelFormatError, "blk.1.ffn_gate_inp.weight", "expert_count = 4"),
    (drop("blk.1.ffn_up_exps.weight"), ModelFormatError, "blk.1.ffn_up_exps.weight", "missing"),
    (drop("blk.0.ffn_gate_inp.weight"), ModelFormatError, "blk.0.ffn_gate_inp.weight", "missing"),
    (without("qwen3moe.expert_count"), ModelFormatError, "qwen3moe.expert_count", "needs experts"),
    (set_u32("qwen3moe.expert_gating_func", 2), UnsupportedModelError, "qwen3moe.expert_gating_func", "gating"),
    (lambda doc: doc.set("qwen3moe.expert_count", Value(STRING, "4")), ModelFormatError, "qwen3moe.expert_count",
     "expected int"),
    (rename("blk.0.ffn_up_exps.weight", "blk.0.ffn_up.3.weight"), UnsupportedModelError, "blk.0.ffn_up.3.weight",
     "legacy Mixtral layout"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_inconsistent_moe_files_are_typed_errors(small_moe, tmp_path, case):
    edit, kind, field, words = BAD[case]
    bad = edited(small_moe, tmp_path, edit)
    with pytest.raises(kind) as ei:
        engine.load(bad)
    assert ei.value.field == field and str(bad) in str(ei.value) and words in str(ei.value)


@pytest.mark.parametrize("edit", [without("qwen3moe.feed_forward_length"),  # optional in an MoE file
                                  # absent: llama.cpp's fallback, feed_forward_length / expert_used_count
                                  lambda doc: (without("qwen3moe.expert_feed_forward_length")(doc),
                                               set_u32("qwen3moe.feed_forward_length", 512)(doc))])
def test_optional_widths_as_llama_cpp_reads_them(small_moe, tmp_path, edit):
    bad = edited(small_moe, tmp_path, edit)
    with engine.load(small_moe) as m, engine.load(bad) as m2:
        assert m2.spec.expert_ffn_dim == 256
        assert np.array_equal(m.logits(A), m2.logits(A))


def test_dense_llama_with_experts_per_token_but_no_experts(tmp_path):
    good = write_tiny_llama(tmp_path / "d.gguf", TinyConfig(n_layers=1))
    bad = edited(good, tmp_path, lambda doc: doc.kvs.append(("llama.expert_used_count", Value(U32, 2))))
    with pytest.raises(ModelFormatError) as ei:
        engine.load(bad)
    assert ei.value.field == "llama.expert_used_count"


@pytest.mark.parametrize("case", [0, 4, 5])
def test_cli_names_the_bad_moe_field_in_one_line(small_moe, tmp_path, case):
    edit, _, field, _ = BAD[case]
    bad = edited(small_moe, tmp_path, edit)
    for cli in (["engine.generate", "hi", "--model", str(bad)], ["engine.plan", "--model", str(bad)]):
        r = subprocess.run([sys.executable, "-m", *cli], capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (cli, r.stderr)
        assert field in lines[0] and "Traceback" not in r.stderr


# -- transformers' own implementations as a second reference ------------------------------------------------
def hf_moe_model(path):
    """MixtralForCausalLM / Qwen3MoeForCausalLM in float64 holding the GGUF's weights as gguf-py dequantizes
    them (llama's Q/K rows un-permuted; the experts fused as transformers 5 stores them: gate_up (E, 2Fe, dim))."""
    import transformers
    from gguf import GGUFReader, dequantize

    from tiny_llama import _unpermute

    r = GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items()}
    arch = meta["general.architecture"]
    m = lambda key: meta[f"{arch}.{key}"]
    W = {t.name: torch.from_numpy(dequantize(t.data, t.tensor_type).astype(np.float64).reshape(
        tuple(int(d) for d in reversed(t.shape.tolist())))) for t in r.tensors}
    nh, nkv, L = m("attention.head_count"), m("attention.head_count_kv"), m("block_count")
    common = dict(vocab_size=W["token_embd.weight"].shape[0], hidden_size=m("embedding_length"), num_hidden_layers=L,
                  num_attention_heads=nh, num_key_value_heads=nkv, rms_norm_eps=m("attention.layer_norm_rms_epsilon"),
                  max_position_embeddings=m("context_length"), tie_word_embeddings="output.weight" not in W,
                  num_experts_per_tok=m("expert_used_count"), rope_theta=m("rope.freq_base"),
                  experts_implementation="eager", attn_implementation="eager")  # float64 runs only eagerly
    if arch == "llama":
        cfg = transformers.MixtralConfig(intermediate_size=m("feed_forward_length"), num_local_experts=m("expert_count"),
                                         sliding_window=None, **common)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3MoeConfig(intermediate_size=m("feed_forward_length"), num_experts=m("expert_count"),
                                          moe_intermediate_size=m("expert_feed_forward_length"),
                                          head_dim=m("attention.key_length"), norm_topk_prob=True, **common)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    sd = {"model.embed_tokens.weight": W["token_embd.weight"], "model.norm.weight": W["output_norm.weight"],
          "lm_head.weight": W.get("output.weight", W["token_embd.weight"])}
    for i in range(L):
        p, q = f"blk.{i}.", f"model.layers.{i}."
        wq, wk = W[p + "attn_q.weight"], W[p + "attn_k.weight"]
        if arch == "llama":  # GGUF stores llama's Q/K permuted for adjacent-pair rope
            wq, wk = (torch.from_numpy(_unpermute(w.numpy(), n)) for w, n in ((wq, nh), (wk, nkv)))
        sd |= {q + "self_attn.q_proj.weight": wq, q + "self_attn.k_proj.weight": wk,
               q + "self_attn.v_proj.weight": W[p + "attn_v.weight"], q + "self_attn.o_proj.weight": W[p + "attn_output.weight"],
               q + "input_layernorm.weight": W[p + "attn_norm.weight"],
               q + "post_attention_layernorm.weight": W[p + "ffn_norm.weight"],
               q + "mlp.gate.weight": W[p + "ffn_gate_inp.weight"],
               q + "mlp.experts.gate_up_proj": torch.cat([W[p + "ffn_gate_exps.weight"], W[p + "ffn_up_exps.weight"]], 1),
               q + "mlp.experts.down_proj": W[p + "ffn_down_exps.weight"]}
        if arch == "qwen3moe":
            sd |= {q + "self_attn.q_norm.weight": W[p + "attn_q_norm.weight"],
                   q + "self_attn.k_norm.weight": W[p + "attn_k_norm.weight"]}
    model = model.to(torch.float64)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    return model.eval()


@pytest.mark.parametrize("name", ["mixtral-q6_k-q5_0", "qwen3moe-q4_k-q5_k"])
def test_transformers_agrees_with_the_reference_and_the_engine(name, tmp_path):
    pytest.importorskip("transformers")
    path = write_tiny_llama(tmp_path / f"{name}.gguf", MOE_MODELS[name])
    with torch.no_grad():
        hf = hf_moe_model(path)(torch.tensor([A + B])).logits[0].numpy()  # (T, vocab) float64
    ref = reference_logits(path, A + B)
    assert rel_err(hf, ref) < 1e-6  # transformers' routing, rope and experts are the reference's
    with engine.load(path, config={"device": "cpu"}) as m:
        assert rel_err(m.logits(A + B), hf) < 1e-3
