"""The GGUF parser against gguf-py's GGUFReader (the reference), and the per-layer byte runs."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader

from engine.defaults import default_model_path
from engine.gguf_file import GGUFFile, coalesce
from engine.spec import ModelSpec
from tiny_llama import TinyConfig, write_tiny_llama


def paths(tmp_path):
    yield default_model_path()
    yield write_tiny_llama(tmp_path / "t.gguf", TinyConfig(fmt=(QT.Q4_K, QT.Q5_1, QT.F16), rope_freqs=True, tied=False))


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return np.float32(a) == np.float32(b)
    return a == b


@pytest.mark.parametrize("which", [0, 1])
def test_matches_gguf_reader(tmp_path, which):
    path = list(paths(tmp_path))[which]
    ours, ref = GGUFFile(path), GGUFReader(str(path))
    ref_meta = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.metadata) == set(ref_meta)
    for k, v in ref_meta.items():
        got = ours.metadata[k]
        if isinstance(v, list):
            assert len(got) == len(v) and all(_same(x, y) for x, y in zip(got, v)), k
        else:
            assert _same(got, v), k
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.offset == t.data_offset and mine.nbytes == t.n_bytes
        assert mine.shape == tuple(reversed(t.shape.tolist())) and mine.fmt.ggml_type == int(t.tensor_type)
        assert bytes(ours.view(mine)[:64].numpy()) == bytes(np.asarray(t.data).view(np.uint8).reshape(-1)[:64])


def test_smollm2_layer_runs_are_one_contiguous_run_each():
    f = GGUFFile(default_model_path())
    spec = ModelSpec.from_gguf(f)
    assert (spec.n_layers, spec.dim, spec.n_heads, spec.n_kv_heads, spec.ffn_dim, spec.vocab_size) == (
        30, 576, 9, 3, 1536, 49152)
    assert spec.rope_base == 100000.0 and spec.tied_output and not spec.has_rope_freqs
    starts = []
    for i in range(spec.n_layers):
        runs = f.layer_runs(i)
        assert len(runs) == 1 and runs[0][1] == 2_216_448
        starts.append(runs[0][0])
    assert starts != sorted(starts)  # stored in name order: blk.0, blk.1, blk.10, ...
    assert np.argsort(starts).tolist()[:3] == [0, 1, 10]


def test_coalesce():
    assert coalesce([(100, 10), (0, 50), (50, 20), (200, 5)]) == ((0, 70), (100, 10), (200, 5))
    assert coalesce([(0, 10), (12, 4)], max_gap=2) == ((0, 16),)
    assert coalesce([(0, 10), (13, 4)], max_gap=2) == ((0, 10), (13, 4))
    assert coalesce([(0, 10), (2, 3)]) == ((0, 10),)
