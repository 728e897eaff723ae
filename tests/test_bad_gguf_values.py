"""Header values and layouts that used to escape as untyped exceptions (or a SIGBUS): each is now a
typed error naming the file and the field, or -- where the file is valid -- loads and computes the
same logits as the original."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.errors import ModelFormatError
from gguf_edit import ARRAY, F32, RAW, STRING, U8, GGUFDoc, Value, decode, encode, relayout
from tiny_llama import TinyConfig, write_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
TOKENS = [5, 17, 300, 42, 8]


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> GGUFDoc:
    path = write_tiny_llama(tmp_path_factory.mktemp("vals") / "good.gguf", TinyConfig(n_layers=1, tied=False))
    return decode(path.read_bytes())


def write(tmp_path, d: GGUFDoc) -> Path:
    p = tmp_path / "variant.gguf"
    p.write_bytes(encode(d))
    return p


def load_error(p: Path) -> engine.EngineError:
    with pytest.raises(engine.EngineError) as ei:
        engine.load(p)
    assert str(p) in str(ei.value)
    return ei.value


@pytest.mark.parametrize("alignment, first", [(1, 1), (2, 2), (1, 3)])
def test_odd_alignment_loads_and_computes_the_same_logits(doc, tmp_path, alignment, first):
    """general.alignment 1 or 2 is a valid power of two: F32 tensors then sit at odd offsets."""
    with engine.load(write(tmp_path, doc)) as m:
        expected = m.logits(TOKENS)
    moved = relayout(doc, alignment, first)
    norm = moved.tensor("output_norm.weight")
    assert norm.offset % 4  # an F32 tensor off its natural alignment
    with engine.load(write(tmp_path, moved)) as m:
        assert np.array_equal(m.logits(TOKENS), expected)


@pytest.mark.parametrize("key", ["llama.rope.freq_base", "llama.rope.scaling.factor"])
@pytest.mark.parametrize("value", [Value(STRING, "fast"), Value(ARRAY, [Value(F32, 1.0)], F32)])
def test_non_numeric_rope_values(doc, tmp_path, key, value):
    d = doc.copy()
    d.set(key, value)
    if key.endswith("factor"):
        d.set("llama.rope.scaling.type", Value(STRING, "linear"))
    e = load_error(write(tmp_path, d))
    assert type(e) is ModelFormatError and e.field == key and "expected a number" in str(e)


def nested(depth: int) -> Value:
    """[[...[1]...]] `depth` arrays deep, pre-encoded."""
    return Value(ARRAY, struct.pack("<IQ", ARRAY, 1) * (depth - 1) + struct.pack("<IQB", U8, 1, 1), RAW)


def test_nested_arrays_are_bounded(doc, tmp_path):
    d = doc.copy()
    d.set("test.nested", nested(2))  # arrays of arrays: valid GGUF, loads
    engine.load(write(tmp_path, d)).close()
    d.set("test.nested", nested(5000))  # used to be a RecursionError
    e = load_error(write(tmp_path, d))
    assert type(e) is ModelFormatError and e.field.startswith("test.nested[0]") and "nested" in str(e)


def test_long_names_and_unknown_element_types(doc, tmp_path):
    d = doc.copy()
    d.set("k" * 5000, Value(U8, 1))
    e = load_error(write(tmp_path, d))
    assert type(e) is ModelFormatError and "5000 bytes" in str(e) and len(str(e)) < 500
    d = doc.copy()
    d.set("test.odd", Value(ARRAY, [], 99))
    assert "unknown array element type 99" in str(load_error(write(tmp_path, d)))


def test_one_dimensional_output_head(doc, tmp_path):
    d = doc.copy()
    out = d.tensor("output.weight")
    out.dims = [out.dims[0] * out.dims[1]]  # same bytes, one dimension (used to be an IndexError in the planner)
    e = load_error(write(tmp_path, d))
    assert type(e) is ModelFormatError and e.field == "output.weight" and "does not match" in str(e)


def test_directory_as_model(tmp_path):
    # a directory is read as a Hugging Face checkpoint: without config.json it is refused naming that file
    e = load_error(tmp_path)
    assert type(e) is ModelFormatError and e.field == "config.json" and str(tmp_path / "config.json") in str(e)
    r = subprocess.run([sys.executable, "-m", "engine.generate", "hi", "--model", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip() == f"error: {e}"


@pytest.mark.parametrize("flag", ["--ctx", "--threads"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_cli_refuses_zero_like_negatives(tmp_path, flag, value):
    model = write_tiny_llama(tmp_path / "m.gguf", TinyConfig(n_layers=1))
    r = subprocess.run([sys.executable, "-m", "engine.generate", "hi", "--model", str(model), flag, value],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip() == f"error: field '{flag}': must be >= 1, got {value}"
    with pytest.raises(engine.EngineError, match="field 'n_ctx'"):
        engine.load(model, n_ctx=int(value))


def test_invalid_utf8_on_stdin_is_blamed_on_stdin(tmp_path):
    model = write_tiny_llama(tmp_path / "m.gguf", TinyConfig(n_layers=1))
    r = subprocess.run([sys.executable, "-m", "engine.generate", "-", "--model", str(model)],
                       input=b"caf\xe9\n", capture_output=True, timeout=120, cwd=ROOT)
    err = r.stderr.decode()
    assert r.returncode == 1 and err.strip() == ("error: field 'prompt': standard input is not UTF-8 text "
                                                 "(byte 0xe9 at offset 3)"), err
    assert str(model) not in err


def test_file_truncated_under_the_embedding_lookup_is_a_typed_error(tmp_path):
    """The embedding rows of a non-resident embedding used to be read from the memory map: truncating
    the file mid-generation killed the process with SIGBUS (exit 135). Run in a child so a regression
    cannot take pytest down; after the file is restored, the same greedy text comes back."""
    src = write_tiny_llama(tmp_path / "src.gguf", TinyConfig(n_layers=2))
    path = tmp_path / "victim.gguf"
    shutil.copy(src, path)
    code = textwrap.dedent(f"""
        import os, shutil
        from engine.errors import WeightIOError
        from engine.gguf_file import GGUFFile
        from engine.model import Model
        from engine.spec import ModelSpec
        from engine.tiers.runtime import Placement, head_info
        from engine.weights import layer_layout
        path, src = {str(path)!r}, {str(src)!r}
        f = GGUFFile(path)
        spec = ModelSpec.from_gguf(f)
        lays = [layer_layout(f, spec, i) for i in range(spec.n_layers)]
        m = Model.load(path, placement=Placement.uniform(lays, head_info(f, spec), stream=True, ring_size=1))
        clean = "".join(m.generate([5, 17, 300], max_tokens=8, temperature=0, stop=()))
        embd = f.tensor("token_embd.weight")
        gen = m.generate([5, 17, 300], max_tokens=50, temperature=0, stop=())
        next(gen, None)
        os.truncate(path, embd.offset + 1000)  # the embedding rows are gone, mid-generation
        try:
            for _ in gen:
                pass
            print("no error")
        except WeightIOError as e:
            print("typed:", e)
        shutil.copy(src, path)
        print("same:", "".join(m.generate([5, 17, 300], max_tokens=8, temperature=0, stop=())) == clean)
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "typed:" in r.stdout and "truncated" in r.stdout and str(path) in r.stdout, r.stdout
    assert "same: True" in r.stdout, r.stdout
