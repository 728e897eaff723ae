"""The CPU resident store's interleaved rows (engine.weights.interleave_rows; row_at in
engine/cpu/qlinear.cpp): the layout against its definition and gguf-py, the kernels' bits on it against
the file's rows (every path and tiling, both builds), bad layouts refused, and a model whose resident
matrices are interleaved against the same model on the file's rows (prefill, the native decode step and
the Python block)."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from engine import cpu
from engine.cpu.build import BuildSpec, build
from engine.cpu.launcher import ISA_FLAGS, Kernels
from engine.errors import KernelError
from engine.formats.registry import FORMATS
from engine.weights import QWeight, interleave_rows
from test_cpu_kernels import make_weight

G = cpu.ROW_GROUP
IL = sorted(cpu.INTERLEAVE_FORMATS)


def test_interleave_formats():
    """The formats with the integer path on 256-element super-blocks, in groups of 4 rows."""
    assert cpu.INTERLEAVE_FORMATS == {"Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"} and G == 4


def interleaved(raw: np.ndarray, fmt: str, n: int, k: int, chunk_bytes: int = 16 << 20) -> torch.Tensor:
    data = torch.from_numpy(raw.reshape(-1).copy())
    interleave_rows(data, FORMATS[fmt], (n, k), G, chunk_bytes=chunk_bytes)
    return data


@pytest.mark.parametrize("fmt", IL)
def test_layout_is_block_major_within_groups(fmt):
    """Group g holds block 0 of its rows 0..3, then block 1 of them, ...; a QWeight over it dequantizes
    (whole and by rows) to gguf-py's values of the file's rows."""
    rng = np.random.default_rng(3)
    n, k = 12, 768
    raw = make_weight(fmt, n, k, rng)  # (n, row bytes)
    kb, nb = FORMATS[fmt].type_size, k // 256
    got = interleaved(raw, fmt, n, k, chunk_bytes=1).numpy()  # one group at a time
    for r in range(n):
        for b in range(nb):
            at = (r // G) * G * nb * kb + (b * G + r % G) * kb
            assert np.array_equal(got[at:at + kb], raw[r, b * kb:(b + 1) * kb]), (r, b)
    w = QWeight("w", FORMATS[fmt], (n, k), torch.from_numpy(got), G)
    ref = dequantize(raw, QT[fmt]).reshape(n, k)
    assert np.array_equal(w.plain().numpy(), raw)
    assert np.array_equal(w.dequantize().numpy(), ref)
    ids = torch.tensor([11, 0, 5, 5, 2])
    assert np.array_equal(w.rows(ids).numpy(), ref[ids.numpy()])


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_kernels_give_the_same_bits_on_interleaved_rows(isa):
    """44 rows (5 work items of 8, the last of 4): T = 1 tiles of 4 and 8 rows (Q6_K, Q3_K) and their
    rests, T = 2..3 tiles of 2, the panels (int16), the lanes and row tiles (8-bit), the fp32 path
    (exact: a work item copied out plain); linear and linear_many mixing both layouts."""
    kern = Kernels(build(BuildSpec.default(ISA_FLAGS[isa])), 2)
    rng = np.random.default_rng(7)
    n, k = 44, 512
    for fmt in IL:
        raw = make_weight(fmt, n, k, rng)
        plain, inter = torch.from_numpy(raw.reshape(-1).copy()), interleaved(raw, fmt, n, k)
        for t in (1, 2, 3, 4, 7, 8, 16, 17, 33):
            x = torch.from_numpy(rng.standard_normal((t, k)).astype(np.float32))
            for kw in ({"activations": "int16"}, {"activations": "int8"}, {"exact": True}):
                a = kern.linear(x, plain, fmt, n, k, **kw)
                b = kern.linear(x, inter, fmt, n, k, interleave=G, **kw)
                c, d = kern.linear_many(x, [(plain, fmt, n), (inter, fmt, n, G)], k, **kw)
                for y in (b, c, d):
                    assert torch.equal(a.view(torch.int32), y.view(torch.int32)), (fmt, t, kw)


def test_which_matrices_are_interleaved():
    """The policy (ql_row_interleave, CpuDevice.row_interleave): the 8-bit path's formats with 8-bit
    activations on AVX-512 builds, matrices and stacked experts; never with int16 activations, on the AVX2
    build, for a format without the 8-bit path, a vector, or rows (an expert's) not a multiple of the group."""
    from engine.device import CpuDevice
    from engine.gguf_file import TensorInfo

    native, avx2 = cpu.default_kernels(), Kernels(build(BuildSpec.default(ISA_FLAGS["avx2"])), 1)
    on = G if native.isa == "avx512" else 1
    for fmt in IL:
        assert native.row_interleave(fmt, "int8") == (on if fmt in cpu.INT8_FORMATS else 1), fmt
        assert native.row_interleave(fmt, "int16") == 1 and avx2.row_interleave(fmt, "int8") == 1, fmt
    assert native.row_interleave("Q8_0", "int8") == 1 and native.row_interleave("nope", "int8") == 1

    def info(fmt: str, shape: tuple[int, ...]) -> TensorInfo:
        return TensorInfo("t", FORMATS[fmt], shape, 0, FORMATS[fmt].nbytes(shape))

    dev8, dev16 = CpuDevice(1, activations="int8"), CpuDevice(1, activations="int16")
    assert dev8.row_interleave(info("Q4_K", (8, 256))) == on and dev16.row_interleave(info("Q4_K", (8, 256))) == 1
    assert dev8.row_interleave(info("Q3_K", (8, 256))) == 1 and dev8.row_interleave(info("Q4_K", (6, 256))) == 1
    assert dev8.row_interleave(info("Q4_K", (2, 8, 256))) == on  # stacked experts: each expert's 8 rows
    assert dev8.row_interleave(info("Q4_K", (4, 6, 256))) == 1 and dev8.row_interleave(info("F32", (8,))) == 1


@pytest.mark.parametrize("fmt, n, il", [("Q4_K", 4, 2), ("Q4_K", 6, 4), ("Q8_0", 4, 4), ("F32", 4, 4),
                                        ("Q4_K", 4, 0), ("Q4_K", 4, True)])
def test_bad_layouts_are_refused(fmt, n, il):
    k = 256
    w = torch.zeros(n * FORMATS[fmt].row_nbytes(k), dtype=torch.uint8)
    x = torch.randn(1, k)
    with pytest.raises(KernelError) as e:
        cpu.linear(x, w, fmt, n, k, interleave=il)
    assert e.value.field == "interleave"
    with pytest.raises(KernelError) as e:
        cpu.linear_many(x, [(w, fmt, n, il)], k)
    assert e.value.field == "interleave"


def test_the_library_refuses_bad_type_words():
    """Past the Python checks, ql_linear itself: an unknown group size or a format without the integer
    path is an unknown type (1), rows not a multiple of the group a bad shape (2)."""
    kern = cpu.default_kernels()
    k = 256
    x, out = torch.randn(1, k), torch.empty(1, 8)
    w = torch.zeros(8 * 210, dtype=torch.uint8)

    def call(type_word: int, n: int) -> int:
        return kern._call(kern._pool, type_word, 0, x.data_ptr(), w.data_ptr(), out.data_ptr(), 1, n, k)

    q6, q8 = cpu.FORMATS["Q6_K"].type_id, cpu.FORMATS["Q8_0"].type_id
    assert call(q6 | G << 8, 8) == 0 and call(q6, 8) == 0
    assert call(q6 | 2 << 8, 8) == 1 and call(q6 | 8 << 8, 8) == 1 and call(q8 | G << 8, 4) == 1
    assert call(q6 | G << 8, 6) == 2
    assert ctypes.sizeof(ctypes.c_int) == 4


@pytest.fixture(scope="module")
def tiny_kquant(tmp_path_factory):
    from tiny_llama import TinyConfig, write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("interleave") / "t.gguf",
                            TinyConfig(n_heads=8, n_kv_heads=2, fmt=(QT.Q4_K, QT.Q8_0, QT.Q6_K), seed=5))


PROMPT = [5, 17, 300, 42, 8, 99, 1]
TOKENS = [250, 3, 77, 400, 12]


def model_logits(path, group: int, monkeypatch, activations: str) -> tuple[set, torch.Tensor]:
    """(the resident matrices' (format, interleave) pairs, logits of a prefill and of one decode pass per
    token through the native decode step, then through the Python block) with the CPU device asking for
    `group` rows per group."""
    import engine

    monkeypatch.setattr(cpu, "row_interleave", lambda fmt, activations="int16": group)
    with engine.load(path, config={"device": "cpu", "cpu_activations": activations}) as m:
        layer = m.weights.fixed[0]
        mats = [getattr(layer, f) for f in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                            "ffn_down")]
        seen = {(w.fmt.name, w.interleave) for w in mats}
        dev = m.weights.device_for(0, 1)
        out = []
        for native in (True, False):
            dev.native_step = native
            with m.open_sequence() as seq:
                out.append(m.step([(seq, PROMPT)])[0])
                out += [m.step([(seq, [t])])[0] for t in TOKENS]
        assert dev._decode_layers  # the native step ran
        return seen, torch.cat(out)


@pytest.mark.parametrize("activations", ["int16", "int8"])
def test_model_on_interleaved_rows_matches_the_files_rows(tiny_kquant, monkeypatch, activations):
    seen_plain, plain = model_logits(tiny_kquant, 1, monkeypatch, activations)
    seen, inter = model_logits(tiny_kquant, G, monkeypatch, activations)
    assert {il for _, il in seen_plain} == {1}
    assert ("Q4_K", G) in seen and all(il == (G if f in cpu.INTERLEAVE_FORMATS else 1) for f, il in seen)
    assert torch.equal(plain, inter)


def test_moe_model_on_interleaved_rows_matches_the_files_rows(tmp_path, monkeypatch):
    """A tiny Mixtral-style llama (4 Q4_K/Q6_K experts a block), 8-bit activations: with whole layers
    resident its stacked expert tensors are interleaved (each expert's rows in groups of 4), with the
    planner's placement its experts are units of their own (2-D slices, interleaved each); both give the
    logits of the file's rows."""
    from tiny_llama import TinyConfig, write_tiny_llama

    from engine.gguf_file import GGUFFile
    from engine.model import Model
    from engine.spec import ModelSpec
    from engine.tiers.runtime import Placement, head_info
    from engine.weights import layer_layout

    path = write_tiny_llama(tmp_path / "moe.gguf", TinyConfig(n_heads=8, n_kv_heads=2, n_experts=4,
                                                              fmt=(QT.Q4_K, QT.Q6_K), seed=3))
    f = GGUFFile(path)
    spec = ModelSpec.from_gguf(f)
    whole = Placement.uniform([layer_layout(f, spec, i) for i in range(spec.n_layers)], head_info(f, spec),
                              stream=False)

    def logits(group: int, placement) -> tuple[object, torch.Tensor]:
        monkeypatch.setattr(cpu, "row_interleave", lambda fmt, activations="int16": group)
        with Model.load(path, placement=placement, cpu_activations="int8") as m:
            experts = m.weights.fixed[0].experts
            seen = experts.interleave if experts is not None else \
                {w.interleave for w in m.weights.experts(0, (0, 1, 2, 3), 1).values() for w in (w.gate, w.up, w.down)}
            with m.open_sequence() as seq:
                out = [m.step([(seq, PROMPT)])[0]] + [m.step([(seq, [t])])[0] for t in TOKENS]
        return seen, torch.cat(out)

    plain = logits(1, whole)
    for placement, expect in ((whole, (G, G, G)), (None, {G})):
        seen, got = logits(G, placement)
        assert seen == expect
        assert torch.equal(plain[1], got)
    assert plain[0] == (1, 1, 1)
