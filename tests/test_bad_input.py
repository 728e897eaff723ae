"""Bad model files raise typed errors naming the file and the field; the CLI prints one line."""
from __future__ import annotations

import hashlib
import struct
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter

import engine
from engine.errors import ModelFormatError, TokenizerError, UnsupportedModelError
from tiny_llama import TinyConfig, write_tiny_llama


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("bad") / "good.gguf", TinyConfig(n_layers=1))


def variant(good, tmp_path, edit) -> str:
    data = bytearray(good.read_bytes())
    data = edit(data)
    out = tmp_path / "variant.gguf"
    out.write_bytes(bytes(data))
    return str(out)


def tensor_type_pos(data: bytearray, name: str) -> int:
    """Byte position of the ggml type field of tensor `name` in the header."""
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    return pos + 4 + 8 * n_dims


def load_error(path):
    with pytest.raises(engine.EngineError) as ei:
        engine.load(path)
    return ei.value


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    e = load_error(p)
    assert type(e) is ModelFormatError and e.field == "magic" and str(p) in str(e)


def test_tiny_and_missing_files(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"GGUF")
    assert isinstance(load_error(p), ModelFormatError)
    e = load_error(tmp_path / "absent.gguf")
    assert isinstance(e, ModelFormatError) and "absent.gguf" in str(e)


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.9])
def test_truncated_file(good, tmp_path, keep):
    path = variant(good, tmp_path, lambda d: d[:int(len(d) * keep)])
    e = load_error(path)
    assert isinstance(e, ModelFormatError) and e.path == path and e.field
    assert "past the end" in str(e) or "truncated" in str(e)


def test_truncated_header(good, tmp_path):
    e = load_error(variant(good, tmp_path, lambda d: d[:2000]))
    assert "truncated" in str(e) and e.field  # names the metadata key being read


def test_unknown_tensor_type(good, tmp_path):
    def edit(d):
        struct.pack_into("<I", d, tensor_type_pos(d, "blk.0.attn_q.weight"), 97)
        return d

    e = load_error(variant(good, tmp_path, edit))
    assert isinstance(e, UnsupportedModelError) and e.field == "blk.0.attn_q.weight" and "97" in str(e)


def test_known_but_unsupported_type(tmp_path):
    p = write_tiny_llama(tmp_path / "iq2xxs.gguf", TinyConfig(n_layers=1, fmt=(QT.Q8_0,)))
    d = bytearray(p.read_bytes())
    struct.pack_into("<I", d, tensor_type_pos(d, "blk.0.attn_q.weight"), int(QT.IQ2_XXS))
    p.write_bytes(bytes(d))
    e = load_error(p)
    assert isinstance(e, UnsupportedModelError) and e.field == "blk.0.attn_q.weight"


def test_shape_metadata_mismatch(good, tmp_path):
    def edit(d):  # claim a wider model than the tensors are
        key = b"llama.feed_forward_length"
        pos = d.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4
        struct.pack_into("<I", d, pos, 1024)
        return d

    e = load_error(variant(good, tmp_path, edit))
    assert isinstance(e, ModelFormatError) and e.field.startswith("blk.0.ffn_") and "shape" in str(e)


def test_missing_required_metadata(good, tmp_path):
    def edit(d):  # rename the key so it is absent
        key = b"llama.block_count"
        pos = d.index(key)
        d[pos:pos + len(key)] = b"llama.block_xxxxx"
        return d

    e = load_error(variant(good, tmp_path, edit))
    assert isinstance(e, ModelFormatError) and e.field == "llama.block_count"


@pytest.mark.parametrize("arch", ["gpt2", "phi3", "gemma2", "qwen2moe"])
def test_unsupported_architecture(tmp_path, arch):
    p = tmp_path / f"{arch}.gguf"
    w = GGUFWriter(str(p), arch=arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    e = load_error(p)
    assert isinstance(e, UnsupportedModelError) and e.field == "general.architecture" and arch in str(e)
    assert "qwen2" in str(e) and "qwen3" in str(e)  # the message lists what is supported


def test_missing_tokenizer(good, tmp_path):
    def edit(d):
        for key in (b"tokenizer.ggml.tokens", b"tokenizer.ggml.model"):
            pos = d.index(key)
            d[pos:pos + len(key)] = key.replace(b"tokenizer", b"tokenixer")
        return d

    e = load_error(variant(good, tmp_path, edit))
    assert isinstance(e, TokenizerError) and e.field.startswith("tokenizer.ggml")


def test_model_file_is_never_written(good):
    before = hashlib.sha256(good.read_bytes()).hexdigest()
    m = engine.load(good)
    m.logits([1, 2, 3])
    list(m.generate([1, 2], max_tokens=3, temperature=0))
    assert hashlib.sha256(good.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("args", [["--model", "MISSING"], ["--model", "BAD"], ["--max-tokens", "-1", "--model", "GOOD"]])
def test_cli_prints_one_line_and_exits_nonzero(good, tmp_path, args):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 40)
    subst = {"MISSING": str(tmp_path / "nope.gguf"), "BAD": str(bad), "GOOD": str(good)}
    r = subprocess.run([sys.executable, "-m", "engine.generate", "hi", *[subst.get(a, a) for a in args]],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr


def _rename_tensor(d: bytearray, name: str, new: str) -> bytearray:
    key = struct.pack("<Q", len(name)) + name.encode()
    assert len(new) == len(name)
    pos = d.index(key) + 8
    d[pos:pos + len(name)] = new.encode()
    return d


@pytest.mark.parametrize("arch, name, new, field", [
    ("qwen2", "blk.0.attn_k.bias", "blk.0.attn_k.xxxx", "blk.0.attn_k.xxxx"),  # unknown tensor named
    ("qwen2", "blk.0.attn_v.bias", "blk.0.attn_x.bias", "blk.0.attn_x.bias"),
    ("qwen3", "blk.0.attn_k_norm.weight", "blk.0.attn_k_xxxx.weight", "blk.0.attn_k_xxxx.weight"),
])
def test_new_architectures_name_their_bad_tensors(tmp_path, arch, name, new, field):
    p = write_tiny_llama(tmp_path / "a.gguf", TinyConfig(arch=arch, n_layers=1))
    p.write_bytes(bytes(_rename_tensor(bytearray(p.read_bytes()), name, new)))
    e = load_error(p)
    assert isinstance(e, ModelFormatError) and e.field == field and str(p) in str(e)


def test_arch_without_its_tensors_is_named(tmp_path):
    # qwen2's tensors under arch qwen3: the q/k norms qwen3 needs are missing (biases are unexpected)
    p = write_tiny_llama(tmp_path / "a.gguf", TinyConfig(arch="qwen2", n_layers=1))
    p.write_bytes(p.read_bytes().replace(b"qwen2", b"qwen3"))
    e = load_error(p)
    assert isinstance(e, ModelFormatError) and e.field in ("blk.0.attn_q.bias", "blk.0.attn_k_norm.weight")


def test_declared_sliding_window_is_ignored_and_said(tmp_path, caplog):
    from tiny_llama import reference_logits

    p = write_tiny_llama(tmp_path / "swa.gguf", TinyConfig(n_layers=1, sliding_window=4))
    tokens = list(range(3, 15))
    with caplog.at_level("WARNING", logger="engine.spec"):
        m = engine.load(p)
    assert "sliding_window = 4 is ignored" in caplog.text
    ref = reference_logits(p, tokens)  # full attention over all 12 tokens (the reference has no window)
    assert np.abs(m.logits(tokens) - ref).max() / np.abs(ref).max() < 1e-3
