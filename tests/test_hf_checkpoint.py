"""Hugging Face safetensors checkpoints: the same tiny random weights as a GGUF and as an HF directory
give the same logits (quantize=None), both match the float64 reference; quantized conversions match
the reference on their own dequantized weights; the cache is atomic and reused; the HF tokenizer's
ids are the reference; bad checkpoints raise typed errors naming the file and field."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from tokenizers import Tokenizer as RustTokenizer

import engine
from engine.errors import CacheError, ConfigError, ModelFormatError, TokenizerError, UnsupportedModelError
from engine.tiers.footprint import footprint_from_gguf
from tiny_llama import TinyConfig, reference_logits, write_hf_checkpoint, write_tiny_llama

TOKENS = [5, 17, 300, 42, 8, 99, 1, 250, 3, 77, 400, 12]
FLOAT = (QT.F32,)
CASES = {  # name: (GGUF config, checkpoint dtype)
    "llama-untied-f32": (TinyConfig(fmt=FLOAT, embd_fmt=QT.F32, tied=False, seed=11), "F32"),
    "llama-tied-bf16": (TinyConfig(fmt=(QT.BF16,), embd_fmt=QT.BF16, n_heads=8, n_kv_heads=2, seed=12), "BF16"),
    "qwen2-tied-f16": (TinyConfig(arch="qwen2", fmt=(QT.F16,), embd_fmt=QT.F16, seed=13), "F16"),
    "qwen3-untied-f32": (TinyConfig(arch="qwen3", head_dim=48, fmt=FLOAT, embd_fmt=QT.F32, tied=False, seed=14), "F32"),
}


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    cfg, dtype = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    gguf = write_tiny_llama(tmp / "m.gguf", cfg)
    hf = write_hf_checkpoint(gguf, tmp / "hf", dtype=dtype)
    return gguf, hf


def test_checkpoint_equals_its_gguf_and_the_float64_reference(pair):
    gguf, hf = pair
    ref = reference_logits(gguf, TOKENS)
    a = engine.load(gguf).logits(TOKENS)
    m = engine.load(hf, quantize=None)
    b = m.logits(TOKENS)
    np.testing.assert_array_equal(a, b)  # the very same values in the very same formats
    assert rel_err(b, ref) < 1e-3
    import torch  # decode one token at a time after a 5-token prefill

    out = [m.forward(torch.tensor([TOKENS[:5]]), 0)[0]]
    out += [m.forward(torch.tensor([[t]]), pos)[0] for pos, t in enumerate(TOKENS[5:], 5)]
    assert rel_err(torch.cat(out).numpy(), ref) < 1e-3


def test_checkpoint_matches_transformers_float64(pair):
    """transformers' own Llama/Qwen2/Qwen3 classes in float64 on the checkpoint: an independent reference
    for rope style, the Q/K permutation, biases, q/k norms and head size (and a check of the numpy one)."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf, hf = pair
    ref_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float64)
    with torch.no_grad():
        ref = ref_model(torch.tensor([TOKENS])).logits[0].numpy()  # (T, vocab)
    assert rel_err(engine.load(hf, quantize=None).logits(TOKENS), ref) < 1e-3
    assert rel_err(reference_logits(gguf, TOKENS), ref) < 1e-5  # the numpy reference agrees with transformers


@pytest.mark.parametrize("quantize, fmt, bound", [("q8_0", "Q8_0", 0.06), ("q4_k", "Q4_K", 0.5)])
def test_quantized_on_load(pair, tmp_path, quantize, fmt, bound):
    gguf, hf = pair
    m = engine.load(hf, quantize=quantize, cache_dir=tmp_path)
    (cache,) = tmp_path.glob("*.gguf")
    r = GGUFReader(str(cache))
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["blk.0.ffn_down.weight"] == fmt and kinds["blk.0.attn_norm.weight"] == "F32"
    # the planner prices the converted file: its footprint is the quantized bytes, not the checkpoint's
    fp = footprint_from_gguf(m.file, m.spec)
    assert fp.weight_bytes == sum(int(t.n_bytes) for t in r.tensors)
    f32_bytes = 4 * sum(int(np.prod(t.shape)) for t in r.tensors)
    assert fp.weight_bytes < {"Q8_0": 0.3, "Q4_K": 0.2}[fmt] * f32_bytes
    # engine.plan prices a checkpoint directory as the conversion will write it, from headers alone
    from engine.plan import model_footprint

    planned = model_footprint(hf, quantize=quantize)
    assert planned.weight_bytes == fp.weight_bytes
    assert [[(t.role, t.fmt, t.nbytes) for t in l.tensors] for l in planned.layers] == \
           [[(t.role, t.fmt, t.nbytes) for t in l.tensors] for l in fp.layers]
    # exact against float64 on the quantized weights, and close to the unquantized model
    ref_q = reference_logits(cache, TOKENS)
    got = m.logits(TOKENS)
    assert rel_err(got, ref_q) < 1e-3
    assert rel_err(ref_q, reference_logits(gguf, TOKENS)) < bound


def test_cache_is_reused_and_atomic(pair, tmp_path, monkeypatch):
    _, hf = pair
    engine.load(hf, cache_dir=tmp_path)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".gguf" and not files[0].name.startswith(".")
    stamp = files[0].stat().st_mtime_ns
    import engine.hf as hf_mod

    monkeypatch.setattr(hf_mod, "write_gguf", lambda *a, **k: pytest.fail("converted again"))
    m = engine.load(hf, cache_dir=tmp_path)
    assert files[0].stat().st_mtime_ns == stamp and m.file.path == str(files[0])
    # an interrupted conversion leaves no file behind
    monkeypatch.undo()
    import engine.hf.checkpoint as ck

    def boom(x, fmt):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "quantize_rows", boom)
    with pytest.raises(KeyboardInterrupt):
        engine.load(hf, quantize="q4_k", cache_dir=tmp_path)
    assert sorted(tmp_path.iterdir()) == files


def test_no_cache_leaves_no_file(pair, tmp_path, monkeypatch):
    import tempfile

    _, hf = pair
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the conversion goes to the temporary directory
    m = engine.load(hf)
    assert list(tmp_path.iterdir()) == []
    assert m.logits(TOKENS[:3]).shape == (3, m.spec.vocab_size)  # the unlinked file stays readable


def test_hf_tokenizer_ids_are_the_reference(pair):
    _, hf = pair
    m = engine.load(hf)
    ref = RustTokenizer.from_file(str(hf / "tokenizer.json"))
    texts = ["Hello world", " 1234567890 3.14", "The quick brown fox, isn't it? 日本語 🎉",
             "<|begin_of_text|>hi<|eot_id|>", "  spaces\n\nnewlines\t"]
    for t in texts:
        assert m.tokenize(t) == ref.encode(t).ids
        assert m.detokenize(m.tokenize(t)) == ref.decode(ref.encode(t).ids, skip_special_tokens=False)
    eos = json.loads((hf / "generation_config.json").read_text())["eos_token_id"]
    assert m.tokenizer.stop_ids == frozenset(eos)
    text = m.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|start_header_id|>user<|end_header_id|>hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
    ids = m.tokenize("The quick 日本語 🎉 fox")
    dec = m.tokenizer.decoder(skip_special=False)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == ref.decode(ids, skip_special_tokens=False)


# -- bad checkpoints ----------------------------------------------------------------------------------------
@pytest.fixture()
def ckpt(tmp_path):
    gguf = write_tiny_llama(tmp_path / "m.gguf", TinyConfig(arch="qwen2", n_layers=1, fmt=FLOAT, embd_fmt=QT.F32))
    return write_hf_checkpoint(gguf, tmp_path / "hf", n_shards=2)


def _error(path, **kw):
    with pytest.raises(engine.EngineError) as ei:
        engine.load(path, **kw)
    return ei.value


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    e = _error(ckpt)
    assert type(e) is ModelFormatError and e.field == "config.json" and str(ckpt / "config.json") in str(e)


def test_missing_shard(ckpt):
    shard = ckpt / "model-00002-of-00002.safetensors"
    shard.unlink()
    e = _error(ckpt)
    assert isinstance(e, ModelFormatError) and e.path == str(shard) and e.field.startswith("model.")


def test_truncated_shard(ckpt):
    shard = ckpt / "model-00001-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 64)
    e = _error(ckpt)
    assert isinstance(e, ModelFormatError) and e.path == str(shard) and e.field == "header"


def test_wrong_tensor_shape(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (ckpt / "config.json").write_text(json.dumps(cfg))
    e = _error(ckpt)
    assert isinstance(e, ModelFormatError) and e.field.startswith("model.layers.0.mlp.") and "shape" in str(e)
    assert e.path.endswith(".safetensors")


def test_unsupported_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "gemma2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    e = _error(ckpt)
    assert isinstance(e, UnsupportedModelError) and e.field == "model_type" and "gemma2" in str(e)


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    e = _error(ckpt)
    assert isinstance(e, TokenizerError) and e.field == "tokenizer.json" and e.path == str(ckpt / "tokenizer.json")


def test_read_only_cache_dir(ckpt, tmp_path):
    cache = tmp_path / "ro"
    cache.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: an immutable directory refuses root too
        subprocess.run(["chattr", "+i", str(cache)], check=True)
    else:
        cache.chmod(0o555)
    try:
        e = _error(ckpt, cache_dir=cache)
        assert isinstance(e, CacheError) and e.field == "cache_dir" and str(cache) in str(e)
        assert list(cache.iterdir()) == []
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(cache)], check=True)
        cache.chmod(0o755)
    e = _error(ckpt, cache_dir=tmp_path / "m.gguf")  # a file, not a directory
    assert isinstance(e, CacheError) and e.field == "cache_dir"


def test_options_are_validated(ckpt, tmp_path):
    e = _error(ckpt, quantize="q3_k")
    assert isinstance(e, ConfigError) and e.field == "quantize"
    e = _error(tmp_path / "m.gguf", quantize="q8_0")  # a GGUF is never re-quantized
    assert isinstance(e, ConfigError) and e.field == "quantize"


def test_checkpoint_files_are_never_written(ckpt, tmp_path):
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    engine.load(ckpt, cache_dir=tmp_path).logits(TOKENS[:4])
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_mistral_loads_as_llama_and_its_window_is_ignored(tmp_path, caplog):
    gguf = write_tiny_llama(tmp_path / "m.gguf", TinyConfig(n_layers=1, fmt=FLOAT, embd_fmt=QT.F32, tied=False))
    hf = write_hf_checkpoint(gguf, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(cfg | {"model_type": "mistral", "sliding_window": 4}))
    with caplog.at_level("WARNING", logger="engine.spec"):
        m = engine.load(hf, quantize=None)
    assert m.spec.architecture == "llama" and "sliding_window = 4 is ignored" in caplog.text
    np.testing.assert_array_equal(m.logits(TOKENS), engine.load(gguf).logits(TOKENS))  # full attention


def test_bf16_vectors_become_exact_f32(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    gguf = write_tiny_llama(tmp_path / "m.gguf", TinyConfig(arch="qwen3", n_layers=1, fmt=FLOAT, embd_fmt=QT.F32))
    hf = write_hf_checkpoint(gguf, tmp_path / "hf", n_shards=1)
    (shard,) = hf.glob("*.safetensors")
    tensors = {k: (v.to(torch.bfloat16) if v.ndim == 1 else v) for k, v in load_file(shard).items()}
    save_file(tensors, str(shard))
    (tmp_path / "cache").mkdir()
    m = engine.load(hf, quantize=None, cache_dir=tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("*.gguf")
    r = {t.name: t for t in GGUFReader(str(cache)).tensors}
    norm = r["blk.0.attn_q_norm.weight"]
    assert norm.tensor_type == QT.F32
    np.testing.assert_array_equal(np.asarray(norm.data),
                                  tensors["model.layers.0.self_attn.q_norm.weight"].float().numpy())
    assert rel_err(m.logits(TOKENS), reference_logits(cache, TOKENS)) < 1e-3


def test_cli_loads_a_checkpoint(ckpt, tmp_path):
    import sys

    cmd = [sys.executable, "-m", "engine.generate", "Hello", "--model", str(ckpt), "--max-tokens", "3",
           "--temperature", "0", "--json", "--quantize", "q4_k", "--cache-dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_tokens"] > 0 and len(list(tmp_path.glob("*.q4_k.*.gguf"))) == 1
    r = subprocess.run(cmd[:-4] + ["--quantize", "q4_k", "--model", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path):
    gguf = write_tiny_llama(tmp_path / "m.gguf", TinyConfig(n_layers=1, fmt=FLOAT, embd_fmt=QT.F32))
    hf = write_hf_checkpoint(gguf, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    (hf / "config.json").write_text(json.dumps(cfg | {"rope_scaling": scaling}))
    (tmp_path / "c").mkdir()
    m = engine.load(hf, quantize=None, cache_dir=tmp_path / "c")
    (cache,) = (tmp_path / "c").glob("*.gguf")
    got = {t.name: np.asarray(t.data) for t in GGUFReader(str(cache)).tensors}["rope_freqs.weight"]
    # transformers' llama3 inverse frequencies, written as it computes them; GGUF stores the divisors
    hd, base = cfg["hidden_size"] // cfg["num_attention_heads"], cfg["rope_theta"]
    inv = 1.0 / base ** (np.arange(0, hd, 2) / hd)
    wavelen = 2 * np.pi / inv
    lo_wl, hi_wl = 64 / 1.0, 64 / 4.0
    scaled = np.where(wavelen > lo_wl, inv / 8.0, inv)
    smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
    medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
    scaled = np.where(medium, (1 - smooth) * scaled / 8.0 + smooth * scaled, scaled)
    np.testing.assert_allclose(got, inv / scaled, rtol=1e-6)
    assert len(set(np.round(got, 4))) > 3  # kept, slowed and blended frequencies all occur
    assert m.spec.has_rope_freqs and rel_err(m.logits(TOKENS), reference_logits(cache, TOKENS)) < 1e-3
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (hf / "config.json").write_text(json.dumps(cfg))
    e = _error(hf)
    assert isinstance(e, UnsupportedModelError) and e.field == "rope_scaling" and "yarn" in str(e)


def test_progress_bar_on_stderr(ckpt, capsys):
    engine.load(ckpt, progress=True)
    err = capsys.readouterr().err
    assert "converting [" in err and err.rstrip().endswith("tensors")
    total = err.rstrip().rsplit("/", 1)[1].split()[0]
    assert f"{total}/{total} tensors" in err and f"1/{total} tensors" in err
    engine.load(ckpt, progress=False)
    assert capsys.readouterr().err == ""
