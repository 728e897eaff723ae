"""ctypes binding of the compiled qlinear library: argument checks, then one C call (GIL released)."""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import KernelError

FORMAT_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
ABI_VERSION = 2


@dataclass(frozen=True, slots=True)
class FormatInfo:
    type_id: int  # GGML type number, as in GGUF tensor infos
    block: int  # elements per block
    nbytes: int  # bytes per block

    def row_nbytes(self, k: int) -> int:
        return k // self.block * self.nbytes


FORMATS: dict[str, FormatInfo] = {
    name: FormatInfo(int(GGMLQuantizationType[name]), *GGML_QUANT_SIZES[GGMLQuantizationType[name]])
    for name in FORMAT_NAMES
}

_vp, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


class Kernels:
    """One loaded library plus the thread count its calls use (threads come from OpenMP)."""

    def __init__(self, lib_path: Path, threads: int):
        lib = ctypes.CDLL(str(lib_path))
        for name, res, args in (
            ("ql_abi_version", _int, ()),
            ("ql_isa", _int, ()),
            ("ql_format_info", _int, (_int, ctypes.POINTER(_int), ctypes.POINTER(_int))),
            ("ql_linear", _int, (_int, _int, _vp, _vp, _vp, _i64, _i64, _i64)),
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
        self._call = lib.ql_linear
        self.isa = "avx512" if lib.ql_isa() == 512 else "portable"
        self.num_threads = 1
        self.set_num_threads(threads)

    def set_num_threads(self, n: int) -> None:
        if type(n) is not int or n < 1:
            raise KernelError(f"thread count must be a positive int, got {n!r}", field="n")
        self.num_threads = n

    def linear(self, x: torch.Tensor, w: torch.Tensor, fmt: str, n: int, k: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
        info = FORMATS.get(fmt)
        if info is None:
            raise KernelError(f"unsupported format {fmt!r}; supported: {', '.join(FORMAT_NAMES)}", field="fmt")
        if type(n) is not int or n < 1:
            raise KernelError(f"must be a positive int, got {n!r}", field="n")
        if type(k) is not int or k < 1 or k % info.block or (info.block > 1 and k % 32):
            raise KernelError(f"must be a positive multiple of {max(info.block, 32) if info.block > 1 else 1} "
                              f"for {fmt}, got {k!r}", field="k")
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k:
            raise KernelError(f"expected a float32 tensor of shape (T, {k}), got "
                              f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}", field="x")
        if x.device.type != "cpu" or not x.is_contiguous():
            raise KernelError("must be a contiguous CPU tensor", field="x")
        if not isinstance(w, torch.Tensor) or w.dtype != torch.uint8 or w.device.type != "cpu" \
                or not w.is_contiguous():
            raise KernelError(f"expected a contiguous CPU uint8 tensor, got "
                              f"{getattr(w, 'dtype', type(w).__name__)}", field="w")
        need = n * info.row_nbytes(k)
        if w.numel() != need:
            raise KernelError(f"{fmt} ({n}, {k}) needs {need} bytes, got {w.numel()}", field="w")
        t = x.shape[0]
        if out is None:
            out = torch.empty((t, n), dtype=torch.float32)
        else:
            if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or tuple(out.shape) != (t, n) \
                    or out.device.type != "cpu" or not out.is_contiguous():
                raise KernelError(f"expected a contiguous CPU float32 tensor of shape ({t}, {n}), got "
                                  f"{getattr(out, 'dtype', type(out).__name__)} "
                                  f"{tuple(getattr(out, 'shape', ()))}", field="out")
            span = _span(out)
            if t and (_overlaps(span, _span(x)) or _overlaps(span, _span(w))):
                raise KernelError("must not overlap x or w", field="out")
        if t:
            rc = self._call(self.num_threads, info.type_id, x.data_ptr(), w.data_ptr(), out.data_ptr(), t, n, k)
            if rc:
                raise KernelError(f"kernel rejected {fmt} ({n}, {k}) x ({t}, {k}) (code {rc})")
        return out


_lock = threading.Lock()
_state: dict[str, Kernels | KernelError] = {}


def default_kernels() -> Kernels:
    """The process-wide kernels (built and loaded on first use); raises KernelError if unavailable."""
    got = _state.get("kernels")
    if got is None:
        with _lock:
            got = _state.get("kernels")
            if got is None:
                from .build import BuildSpec, build

                try:
                    got = Kernels(build(BuildSpec.default()), torch.get_num_threads())
                except KernelError as exc:
                    got = exc
                except OSError as exc:
                    got = KernelError(f"loading the CPU kernel library failed: {exc}")
                _state["kernels"] = got
    if isinstance(got, KernelError):
        raise got
    return got
