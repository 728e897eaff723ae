"""ctypes binding of the compiled qlinear library: argument checks, then one C call.

ctypes releases the GIL for the duration of the call, so Python I/O threads keep running.
"""
from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import KernelError
from .build import BuildSpec, build, load_library

FORMAT_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                "IQ4_NL", "IQ4_XS")
# Formats with an integer path: activations quantized to int16 per block of the weights' scales
# (256 elements for the K-quants and IQ4_XS, 32 for the legacy formats and IQ4_NL).
INT16_FORMATS = frozenset({"Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                           "IQ4_NL"})
# How the integer paths round x (the `mode` argument of ql_linear / ql_linear_many): "int16", the
# default (relative error ~1e-5), or "int8": formats in INT8_FORMATS round x to int8 per 256 elements,
# as llama.cpp does (engine/cpu/q8_path.h; ~1e-2 relative on logits, faster); the others as "int16".
ACTIVATIONS = {"int16": 0, "int8": 2}
INT8_FORMATS = frozenset({"Q4_K", "Q5_K", "Q6_K"})
_EXACT_MODE = 1  # the fp32 path
ABI_VERSION = 7
# Rows per group of a matrix whose rows are interleaved (row_at in qlinear.cpp: the resident store's
# layout for the formats of INTERLEAVE_FORMATS when ql_row_interleave asks for it); 1 = the file's rows.
ROW_GROUP = 4


@dataclass(frozen=True, slots=True)
class FormatInfo:
    type_id: int  # GGML type number, as in GGUF tensor infos
    block: int  # elements per block; K must be a multiple of it
    nbytes: int  # bytes per block

    def row_nbytes(self, k: int) -> int:
        return k // self.block * self.nbytes


FORMATS: dict[str, FormatInfo] = {
    name: FormatInfo(int(GGMLQuantizationType[name]), *GGML_QUANT_SIZES[GGMLQuantizationType[name]])
    for name in FORMAT_NAMES
}

# The formats whose rows can be interleaved: those with the integer path on 256-element super-blocks.
INTERLEAVE_FORMATS = frozenset(f for f in INT16_FORMATS if FORMATS[f].block == 256)

_vp, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
MAX_MANY = 16  # matrices per linear_many call (kMaxParts in qlinear.cpp)
_RETURN_CODES = {1: "format unknown to the library", 2: "shape rejected by the library",
                 3: "out of memory for the kernels' scratch buffers"}
MAX_THREADS = 1024


class Kernels:
    """One loaded library plus its thread pool."""

    def __init__(self, lib_path: Path, threads: int):
        lib = load_library(lib_path)
        for name, res, args in (
            ("ql_abi_version", _int, ()),
            ("ql_isa", _int, ()),
            ("ql_format_info", _int, (_int, ctypes.POINTER(_int), ctypes.POINTER(_int))),
            ("ql_row_interleave", _int, (_int, _int)),
            ("ql_pool_new", _vp, (_int,)),
            ("ql_pool_free", None, (_vp,)),
            ("ql_pool_set_threads", None, (_vp, _int)),
            ("ql_pool_threads", _int, (_vp,)),
            ("ql_linear", _int, (_vp, _int, _int, _vp, _vp, _vp, _i64, _i64, _i64)),
            ("ql_linear_many", _int, (_vp, _int, ctypes.POINTER(_int), _int, _vp, ctypes.POINTER(_vp),
                                      ctypes.POINTER(_vp), _i64, ctypes.POINTER(_i64), _i64)),
            ("ql_decode_block", _int, (_vp, _vp, _i64, _vp, _vp, _vp, _vp, _vp, _vp)),
            ("ql_decode_layer_size", _int, ()),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        if lib.ql_abi_version() != ABI_VERSION:
            raise KernelError(f"{lib_path}: ABI version {lib.ql_abi_version()}, expected {ABI_VERSION}")
        for name, info in FORMATS.items():
            block, nbytes = _int(), _int()
            if not lib.ql_format_info(info.type_id, ctypes.byref(block), ctypes.byref(nbytes)) \
                    or (block.value, nbytes.value) != (info.block, info.nbytes):
                raise KernelError(f"{lib_path}: format {name} layout disagrees with gguf "
                                  f"({block.value}, {nbytes.value}) != ({info.block}, {info.nbytes})")
        if (got := lib.ql_row_interleave(FORMATS["Q4_K"].type_id, ACTIVATIONS["int8"])) not in (1, ROW_GROUP):
            raise KernelError(f"{lib_path}: rows interleaved by {got}, expected {ROW_GROUP} (ROW_GROUP) or 1")
        if lib.ql_decode_layer_size() != ctypes.sizeof(DecodeLayer):
            raise KernelError(f"{lib_path}: DecodeLayer is {lib.ql_decode_layer_size()} bytes, expected "
                              f"{ctypes.sizeof(DecodeLayer)}")
        self._lib = lib
        self._call = lib.ql_linear
        self._decode = lib.ql_decode_block
        self._many = lib.ql_linear_many
        self.isa = "avx512" if lib.ql_isa() == 512 else "portable"
        self._pool = lib.ql_pool_new(1)
        if not self._pool:
            raise KernelError("out of memory creating the kernel thread pool")
        self.set_num_threads(threads)

    def __del__(self):
        pool, self._pool = getattr(self, "_pool", None), None
        if pool:
            self._lib.ql_pool_free(pool)

    @property
    def num_threads(self) -> int:
        return self._lib.ql_pool_threads(self._pool)

    def set_num_threads(self, n: int) -> None:
        """Threads per call, the calling thread included (n - 1 pool workers)."""
        if type(n) is not int or not 1 <= n <= MAX_THREADS:
            raise KernelError(f"thread count must be an int in [1, {MAX_THREADS}], got {n!r}", field="n")
        self._lib.ql_pool_set_threads(self._pool, n)

    def row_interleave(self, fmt: str, activations: str = "int16") -> int:
        """Rows per group in which a resident `fmt` matrix computed by this build with these activations is
        best laid out (ROW_GROUP, or 1 for the file's plain rows; ql_row_interleave)."""
        info = FORMATS.get(fmt)
        return self._lib.ql_row_interleave(info.type_id, activations_mode(activations)) if info else 1

    def linear(self, x: torch.Tensor, w: torch.Tensor, fmt: str, n: int, k: int,
               out: torch.Tensor | None = None, exact: bool = False, activations: str = "int16",
               interleave: int = 1) -> torch.Tensor:
        """out (T, N) = x (T, K) @ W^T. Formats in INT16_FORMATS round x to int16 per block
        (256 or 32 elements; relative error ~1e-5) unless `exact`, which takes the fp32 path (slower);
        activations="int8" rounds x to int8 for INT8_FORMATS (see ACTIVATIONS). `interleave`: W's rows
        are plain (1) or interleaved in groups of ROW_GROUP (engine.weights.interleave_rows)."""
        mode = _EXACT_MODE if exact else activations_mode(activations)
        info, t, out = _checked(x, w, fmt, n, k, out)
        if t:
            rc = self._call(self._pool, type_word(info, fmt, n, interleave), mode, x.data_ptr(), w.data_ptr(),
                            out.data_ptr(), t, n, k)
            if rc:
                raise KernelError(f"{fmt} ({n}, {k}) x ({t}, {k}): {_RETURN_CODES.get(rc, f'error code {rc}')}")
        return out

    def linear_many(self, x: torch.Tensor, mats, k: int, exact: bool = False,
                    activations: str = "int16") -> list[torch.Tensor]:
        """[x @ W_i^T for (W_i, fmt_i, n_i) or (W_i, fmt_i, n_i, interleave_i) in mats]: matrices sharing
        x (T, K) (q/k/v, gate/up) in one call and one pool job. Each output is bit-identical to linear() of
        that matrix alone."""
        mode = _EXACT_MODE if exact else activations_mode(activations)
        count = len(mats)
        if not 0 < count <= MAX_MANY:
            raise KernelError(f"expected 1 to {MAX_MANY} matrices, got {count}", field="mats")
        outs, types, ws, ns = [], (_int * count)(), (_vp * count)(), (_i64 * count)()
        for i, (w, fmt, n, *il) in enumerate(mats):
            info, t, out = _checked(x, w, fmt, n, k, None)
            outs.append(out)
            types[i], ws[i], ns[i] = type_word(info, fmt, n, *il), w.data_ptr(), n
        if t:
            po = (_vp * count)(*(o.data_ptr() for o in outs))
            rc = self._many(self._pool, count, types, mode, x.data_ptr(), ws, po, t, ns, k)
            if rc:
                shapes = ", ".join(f"{m[1]} ({m[2]}, {k})" for m in mats)
                raise KernelError(f"{shapes} x ({t}, {k}): {_RETURN_CODES.get(rc, f'error code {rc}')}")
        return outs


    def decode_block(self, layer: "DecodeLayer", x: torch.Tensor, out: torch.Tensor, rot: torch.Tensor,
                     keys, vals, starts) -> None:
        """One block for R rows of one decode token each (engine/cpu/decode_step.h): x, out (R, dim)
        fp32, rot (R, rope_dim / 2) complex64, keys/vals ctypes arrays of the rows' KV slot addresses,
        starts a ctypes int64 array of the tokens each slot holds. The caller (CpuDevice.decode_block)
        has checked every shape, dtype and address against `layer`."""
        rc = self._decode(self._pool, ctypes.addressof(layer), x.shape[0], x.data_ptr(), out.data_ptr(),
                          rot.data_ptr(), keys, vals, starts)
        if rc:
            raise KernelError(f"decode block of {x.shape[0]} row(s): {_RETURN_CODES.get(rc, f'error code {rc}')}")


class DecodeLayer(ctypes.Structure):
    """A layer's constant data for ql_decode_block (the C struct DecodeLayer in decode_step.h)."""

    _fields_ = [("dim", _i64), ("n_heads", _i64), ("n_kv_heads", _i64), ("head_dim", _i64), ("ffn", _i64),
                ("rope_dim", _i64), ("n_ctx", _i64), ("neox", ctypes.c_int32), ("kv_f16", ctypes.c_int32),
                ("eps", ctypes.c_float), ("mode", ctypes.c_int32), ("attn_norm", _vp), ("ffn_norm", _vp),
                ("bias", _vp * 3), ("qk_norm", _vp * 2), ("w", _vp * 7), ("type", ctypes.c_int32 * 7),
                ("pad2_", ctypes.c_int32)]


def activations_mode(activations: str) -> int:
    """The kernels' mode for an ACTIVATIONS name; KernelError naming the field otherwise."""
    mode = ACTIVATIONS.get(activations) if isinstance(activations, str) else None
    if mode is None:
        raise KernelError(f"expected one of {', '.join(ACTIVATIONS)}, got {activations!r}", field="activations")
    return mode


def type_word(info: FormatInfo, fmt: str, n: int, interleave: int = 1) -> int:
    """The kernels' `type` argument for a matrix: its GGML type id, plus ROW_GROUP << 8 when its rows are
    interleaved (qlinear.cpp, ql_linear_many)."""
    if type(interleave) is not int:
        raise KernelError(f"rows interleaved by {interleave!r}: expected an int", field="interleave")
    if interleave == 1:
        return info.type_id
    if interleave != ROW_GROUP or fmt not in INTERLEAVE_FORMATS or n % ROW_GROUP:
        raise KernelError(f"{fmt} ({n} rows): rows interleaved by {interleave!r}; only {sorted(INTERLEAVE_FORMATS)} "
                          f"matrices with a multiple of {ROW_GROUP} rows can be, by {ROW_GROUP}", field="interleave")
    return info.type_id | ROW_GROUP << 8


def _checked(x, w, fmt, n, k, out):
    """(format info, T, out) for valid linear() arguments (out allocated if None), else KernelError."""
    # Hot path (hundreds of calls per token): one fused test of cheap attributes; on any
    # failure, _diagnose() re-checks everything and raises the precise error.
    info = FORMATS.get(fmt)
    try:
        t, kx = x.shape
        ok = (info is not None and type(n) is int and type(k) is int and n > 0 and kx == k > 0
              and k % info.block == 0 and x.dtype is torch.float32 and w.dtype is torch.uint8
              and x.is_cpu and w.is_cpu and x.is_contiguous() and w.is_contiguous()
              and w.numel() == n * (k // info.block) * info.nbytes)
        if ok:
            if out is None:
                out = torch.empty((t, n), dtype=torch.float32)
            else:
                px, pw, po = x.data_ptr(), w.data_ptr(), out.data_ptr()
                end = po + 4 * t * n
                ok = (out.dtype is torch.float32 and out.is_cpu and out.is_contiguous() and out.shape == (t, n)
                      and (t == 0 or ((end <= px or px + 4 * t * k <= po) and (end <= pw or pw + w.numel() <= po))))
    except (AttributeError, TypeError, ValueError):
        ok = False
    if not ok:
        _diagnose(x, w, fmt, n, k, out)
        raise KernelError(f"invalid arguments for {fmt} ({n}, {k})")  # _diagnose found nothing specific
    return info, t, out


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {tuple(t.shape)} on {t.device}{'' if t.is_contiguous() else ', non-contiguous'}"
    return type(t).__name__


def _diagnose(x, w, fmt, n, k, out) -> None:
    """Raise a KernelError naming the first bad argument of linear()."""
    info = FORMATS.get(fmt) if isinstance(fmt, str) else None
    if info is None:
        raise KernelError(f"unsupported format {fmt!r}; supported: {', '.join(FORMAT_NAMES)}", field="fmt")
    if type(n) is not int or n < 1:
        raise KernelError(f"must be a positive int, got {n!r}", field="n")
    if type(k) is not int or k < 1 or k % info.block:
        raise KernelError(f"must be a positive multiple of {info.block} for {fmt}, got {k!r}", field="k")
    if not (isinstance(x, torch.Tensor) and x.dtype is torch.float32 and x.dim() == 2 and x.shape[1] == k
            and x.is_cpu and x.is_contiguous()):
        raise KernelError(f"expected a contiguous CPU float32 tensor of shape (T, {k}), got {_describe(x)}", field="x")
    if not (isinstance(w, torch.Tensor) and w.dtype is torch.uint8 and w.is_cpu and w.is_contiguous()):
        raise KernelError(f"expected a contiguous CPU uint8 tensor, got {_describe(w)}", field="w")
    need = n * info.row_nbytes(k)
    if w.numel() != need:
        raise KernelError(f"{fmt} ({n}, {k}) needs {need} bytes, got {w.numel()}", field="w")
    if out is not None:
        t = x.shape[0]
        if not (isinstance(out, torch.Tensor) and out.dtype is torch.float32 and out.is_cpu and out.is_contiguous()
                and tuple(out.shape) == (t, n)):
            raise KernelError(f"expected a contiguous CPU float32 tensor of shape ({t}, {n}), got {_describe(out)}",
                              field="out")
        raise KernelError("must not overlap x or w", field="out")


# $ENGINE_CPU_ISA: which flavour of the kernels this process builds and loads. "native" (default):
# -march=native, AVX-512 where the CPU has it; "avx2": the portable path without AVX-512, as an
# AVX2 + FMA CPU builds it (to measure that flavour on an AVX-512 machine).
ISA_FLAGS = {"native": (), "avx2": ("-DQL_PORTABLE", "-mno-avx512f")}


def isa_flags() -> tuple[str, ...]:
    isa = os.environ.get("ENGINE_CPU_ISA", "native")
    if isa not in ISA_FLAGS:
        raise KernelError(f"ENGINE_CPU_ISA={isa!r}: expected one of {', '.join(ISA_FLAGS)}", field="ENGINE_CPU_ISA")
    return ISA_FLAGS[isa]


@functools.cache
def _load() -> Kernels | KernelError:
    try:
        return Kernels(build(BuildSpec.default(isa_flags())), torch.get_num_threads())
    except KernelError as exc:
        return exc


def default_kernels() -> Kernels:
    """The process-wide kernels (built and loaded on first use); raises KernelError if unavailable."""
    got = _load()
    if isinstance(got, KernelError):
        raise got
    return got
