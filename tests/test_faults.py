"""Fault injection on every kind of streamed unit -- the first block, a middle block, the first and the
last chunk of the output head (here the tied embedding, whose rows the embedding lookup also reads) --
with both readers: an I/O error, a short read, the file truncated under the model, the unit's bytes
overwritten. The faulted generation ends in a typed WeightIOError (or, for overwritten bytes, other
numbers); once the fault is cleared, the next generation is bit-identical to a clean run."""
from __future__ import annotations

import errno
import shutil

import numpy as np
import pytest

import engine.tiers.io
from engine.errors import WeightIOError
from engine.gguf_file import GGUFFile
from engine.model import Model
from engine.spec import ModelSpec
from engine.tiers.io import SHORT_READ
from engine.tiers.runtime import Placement, head_info
from engine.weights import layer_layout
from tiny_llama import TinyConfig, write_tiny_llama

PROMPT = [5, 17, 300, 42]
TARGETS = {"first block": "blk.0", "middle block": "blk.1", "first head chunk": "output[0:",
           "last head chunk": "output[378:"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("faults") / "src.gguf", TinyConfig(n_layers=3))


@pytest.fixture(params=["native", "python"])
def reader_kind(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(engine.tiers.io, "_native_library", lambda: None)
    return request.param


def open_model(path) -> Model:
    f = GGUFFile(path)
    spec = ModelSpec.from_gguf(f)
    lays = [layer_layout(f, spec, i) for i in range(spec.n_layers)]
    place = Placement.uniform(lays, head_info(f, spec), stream=True, ring_size=2, head_chunks=3)
    return Model.load(path, placement=place)


def run_clean(m: Model) -> tuple[np.ndarray, list[int]]:
    text = "".join(m.generate(PROMPT, max_tokens=8, temperature=0, stop=()))
    return m.logits(PROMPT), m.tokenize(text, add_special=False)


def unit_span(m: Model, prefix: str) -> tuple[int, int]:
    """(first file offset, end) of the streamed unit whose name starts with `prefix`."""
    w = m.weights
    i = next(i for i in w.seq if w.units[i].name.startswith(prefix))
    spans = w.plans[i].spans
    return spans[0][0], spans[-1][0] + spans[-1][1]


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("fault", ["eio", "short read", "truncated", "overwritten"])
def test_fault_then_recovery_is_bit_identical(source, tmp_path, reader_kind, target, fault):
    path = tmp_path / "model.gguf"
    shutil.copy(source, path)
    original = path.read_bytes()
    with open_model(path) as m:
        assert m.reader.native == (reader_kind == "native")
        clean_logits, clean_tokens = run_clean(m)
        lo, hi = unit_span(m, TARGETS[target])
        gen = m.generate(PROMPT, max_tokens=20, temperature=0, stop=())
        next(gen)  # the fault arrives mid-generation
        if fault == "eio":
            m.reader.inject_fault(lo, errno.EIO, end=hi)
        elif fault == "short read":
            m.reader.inject_fault(lo, SHORT_READ, end=hi)
        elif fault == "truncated":
            with open(path, "r+b") as fh:
                fh.truncate(lo + (hi - lo) // 2)
        else:
            with open(path, "r+b") as fh:
                fh.seek(lo)
                fh.write(b"\0" * (min(hi, len(original)) - lo))
        if fault == "overwritten":
            list(gen)  # zeroed weights are valid numbers: the pass computes other ones
            assert not np.array_equal(m.logits(PROMPT), clean_logits)
        else:
            with pytest.raises(WeightIOError) as ei:
                list(gen)
            msg = str(ei.value)
            assert str(path) in msg and ("truncated" in msg if fault in ("truncated", "short read")
                                         else "Input/output error" in msg), msg
        # clear the fault
        m.reader.inject_fault(None)
        path.write_bytes(original)
        logits, tokens = run_clean(m)
        assert tokens == clean_tokens
        assert np.array_equal(logits, clean_logits)
