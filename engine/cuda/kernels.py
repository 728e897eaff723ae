"""CUDA kernels for GGUF weights: specs, argument validation, launch planning and cupy launchers.

The sources live in the repository's top-level ``kernels/`` directory (``gemv.cu``, ``dequant.cu``).
Everything here except `KernelLibrary`'s device paths is pure Python and runs without a GPU:
argument checking and launch geometry are shared by the cupy launchers and by the CPU shim
(`engine.cuda.cpu_shim`), so the CPU tests exercise the same plans a GPU launch would use.

Output dtypes: the GEMV writes fp32 (T, N); the dequantize kernels write fp16 or bf16 (N, K).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import KernelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

def _kernel_dir() -> Path:
    """kernels/ of a source checkout, else the copy a wheel installs as engine/_kernels."""
    repo = Path(__file__).resolve().parents[2] / "kernels"
    return repo if repo.is_dir() else Path(__file__).resolve().parents[1] / "_kernels"


KERNEL_DIR = _kernel_dir()
SOURCES = ("gemv.cu", "dequant.cu")
ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")

GEMV_MAX_T = 8  # activation rows per GEMV launch (template instantiations t1..t8)
GEMV_ROWS = 2  # output rows per thread block (GK_GEMV_ROWS in gemv.cu)
GEMV_MAX_WARPS = 4  # GK_GEMV_MAX_WARPS in gemv.cu
DEQUANT_THREADS = 256  # GK_DEQUANT_THREADS in dequant.cu
DEQUANT_MAX_BLOCKS = 65535  # grid cap; the kernel's grid-stride loop covers the rest
HALF_DTYPES = ("f16", "bf16")  # activation / dequant output element types (GK_HALF_TYPES)
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True, slots=True)
class KernelFormat:
    """One GGUF tensor type the kernels handle."""

    name: str  # GGUF type name, e.g. "Q4_K"
    tag: str  # lower-case name in kernel entry points, e.g. "q4_k"
    block_size: int  # weights per GGUF block
    type_size: int  # bytes per GGUF block
    k_multiple: int  # K must be a multiple of this (whole blocks; 8 for F16/BF16)
    chunk: int  # weights one thread handles per step (SUBS chunks per block in quant_formats.cuh)
    weight_align: int  # required alignment of W's base pointer (bytes): widest weight load
    reg_budget: tuple[int, int]  # max registers of gemv kernels for T <= 4 and for T > 4

    def row_nbytes(self, k: int) -> int:
        return k // self.block_size * self.type_size

    @property
    def traits(self) -> str:
        """The traits struct in kernels/quant_formats.cuh, e.g. "FmtQ4_K"."""
        return f"Fmt{self.name}"


def _fmt(name: str, chunk: int, weight_align: int, reg_budget: tuple[int, int]) -> KernelFormat:
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    k_multiple = max(block_size, chunk)
    return KernelFormat(name, name.lower(), block_size, type_size, k_multiple, chunk, weight_align, reg_budget)


# The one table of supported formats (order = GK_FORMATS in kernels/quant_formats.cuh). The register
# budgets are what the compile gate (scripts/check_kernels.py) enforces on every arch in ARCHS,
# set a little above ptxas 13.0's use; dequant kernels have DEQUANT_REG_BUDGET.
FORMATS: dict[str, KernelFormat] = {
    f.name: f
    for f in (
        _fmt("Q4_0", 16, 2, (96, 128)),
        _fmt("Q4_1", 16, 4, (96, 128)),
        _fmt("Q5_0", 16, 2, (96, 128)),
        _fmt("Q5_1", 16, 4, (104, 128)),
        _fmt("Q8_0", 16, 2, (96, 128)),
        _fmt("Q2_K", 32, 4, (112, 136)),
        _fmt("Q3_K", 32, 2, (160, 184)),
        _fmt("Q4_K", 32, 16, (152, 168)),
        _fmt("Q5_K", 32, 16, (152, 168)),
        _fmt("Q6_K", 32, 2, (136, 168)),
        _fmt("IQ4_NL", 16, 2, (96, 120)),
        _fmt("IQ4_XS", 32, 8, (112, 152)),
        _fmt("F16", 8, 16, (72, 104)),
        _fmt("BF16", 8, 16, (72, 104)),
    )
}
DEQUANT_REG_BUDGET = 56


def kernel_format(name: str) -> KernelFormat:
    fmt = FORMATS.get(str(name).upper())
    if fmt is None:
        raise KernelError(f"no CUDA kernel for tensor type {name!r}; supported: {', '.join(FORMATS)}", field="fmt")
    return fmt


def gemv_kernel_name(fmt: str, xtype: str, t: int) -> str:
    return f"gemv_{kernel_format(fmt).tag}_{xtype}_t{t}"


def dequant_kernel_name(fmt: str, otype: str) -> str:
    return f"dequant_{kernel_format(fmt).tag}_{otype}"


def register_budget(kernel: str) -> int:
    """The register limit the compile gate enforces for one entry point."""
    parts = kernel.split("_")
    if parts[0] == "dequant":
        return DEQUANT_REG_BUDGET
    if parts[0] != "gemv":
        raise KeyError(kernel)
    tag, t = "_".join(parts[1:-2]), int(parts[-1][1:])
    fmt = next(f for f in FORMATS.values() if f.tag == tag)
    return fmt.reg_budget[0] if t <= 4 else fmt.reg_budget[1]


def expected_kernels(source: str) -> list[str]:
    """Entry points each source file must export (the compile gate and CPU tests check this)."""
    if source == "gemv.cu":
        return [gemv_kernel_name(f, x, t) for f in FORMATS for x in HALF_DTYPES for t in range(1, GEMV_MAX_T + 1)]
    if source == "dequant.cu":
        return [dequant_kernel_name(f, o) for f in FORMATS for o in HALF_DTYPES]
    raise KeyError(source)


# ---------------------------------------------------------------------------------------------
# Pure validation and planning (no GPU needed)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TensorDesc:
    """What the checks need to know about an argument: shape, strides (elements), dtype, address."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str  # "uint8" | "float16" | "bfloat16" | "float32" | ...
    data_ptr: int
    device: str = "cuda:0"

    @classmethod
    def of(cls, t: Any) -> "TensorDesc":
        """From a torch tensor or a numpy array."""
        if hasattr(t, "data_ptr"):  # torch
            return cls(tuple(t.shape), tuple(t.stride()), str(t.dtype).removeprefix("torch."), t.data_ptr(), str(t.device))
        item = t.dtype.itemsize
        return cls(tuple(t.shape), tuple(s // item for s in t.strides), str(t.dtype), t.ctypes.data, "cpu")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    scalars: tuple[int, ...]  # the int arguments after the pointers, in kernel order


_DTYPE_TAG = {"float16": "f16", "bfloat16": "bf16"}


def _check_int32(value: int, field: str) -> None:
    if not 0 < value <= _INT32_MAX:
        raise KernelError(f"must be in 1..{_INT32_MAX}, got {value}", field=field)


def _check_weights(fmt: KernelFormat, w: TensorDesc, n: int, k: int) -> None:
    _check_int32(n, "n")
    _check_int32(k, "k")
    if k % fmt.k_multiple:
        raise KernelError(f"{fmt.name} needs k to be a multiple of {fmt.k_multiple}, got {k}", field="k")
    if w.dtype != "uint8":
        raise KernelError(f"raw GGUF bytes must be uint8, got {w.dtype}", field="w")
    expected = n * fmt.row_nbytes(k)
    if w.numel != expected or w.shape not in ((n, fmt.row_nbytes(k)), (expected,)):
        raise KernelError(
            f"{fmt.name} ({n}, {k}) needs {expected} bytes shaped ({n}, {fmt.row_nbytes(k)}) or flat; got shape {w.shape}",
            field="w",
        )
    if not _is_contiguous(w):
        raise KernelError("must be contiguous", field="w")
    if w.data_ptr % fmt.weight_align:
        raise KernelError(f"{fmt.name} weights must be {fmt.weight_align}-byte aligned (address {w.data_ptr:#x})", field="w")


@dataclass(frozen=True, slots=True)
class BoundWeight:
    """Raw GGUF bytes checked once as an (n, k) matrix of `fmt` (`bind_weight`): launches with it
    check only the activations and the output."""

    fmt: KernelFormat
    n: int
    k: int
    data_ptr: int
    device: str


def bind_weight(fmt_name: str, w: TensorDesc, n: int, k: int) -> BoundWeight:
    fmt = kernel_format(fmt_name)
    _check_weights(fmt, w, n, k)
    return BoundWeight(fmt, n, k, w.data_ptr, w.device)


def _is_contiguous(d: TensorDesc) -> bool:
    expect = 1
    for size, stride in zip(reversed(d.shape), reversed(d.strides), strict=True):
        if size != 1 and stride != expect:
            return False
        expect *= size
    return True


def _check_rows(d: TensorDesc, field: str, rows: int, cols: int, align_elems: int) -> int:
    """Checks a (rows, cols) matrix with unit column stride; returns its row stride (elements)."""
    if len(d.shape) != 2 or d.shape != (rows, cols):
        raise KernelError(f"expected shape ({rows}, {cols}), got {d.shape}", field=field)
    if d.strides[1] != 1 and cols > 1:
        raise KernelError("rows must be contiguous (last stride 1)", field=field)
    row_stride = d.strides[0] if rows > 1 else cols
    if row_stride < cols or row_stride % align_elems:
        raise KernelError(f"row stride {row_stride} must be >= {cols} and a multiple of {align_elems}", field=field)
    _check_int32(row_stride, field)
    return row_stride


def _same_device(*devices: tuple[str, str]) -> None:
    if len({d for _, d in devices}) > 1:
        raise KernelError(f"arguments on different devices: {', '.join(f'{n}={d}' for n, d in devices)}",
                          field=devices[0][0])


def plan_gemv(fmt_name: str, w: TensorDesc, x: TensorDesc, y: TensorDesc, n: int, k: int) -> LaunchPlan:
    """Checks y (T, n) fp32 = x (T, k) fp16|bf16 @ W(n, k)^T and returns the launch.

    x rows need 16-byte alignment (8 elements), W the format's `weight_align`, y 4 bytes.
    """
    return plan_gemv_bound(bind_weight(fmt_name, w, n, k), x, y)


def plan_gemv_bound(bw: BoundWeight, x: TensorDesc, y: TensorDesc) -> LaunchPlan:
    """`plan_gemv` for a weight already checked by `bind_weight`."""
    fmt, n, k = bw.fmt, bw.n, bw.k
    xtype = _DTYPE_TAG.get(x.dtype)
    if xtype is None:
        raise KernelError(f"activations must be float16 or bfloat16, got {x.dtype}", field="x")
    if len(x.shape) != 2:
        raise KernelError(f"expected a 2-D (T, {k}) tensor, got shape {x.shape}", field="x")
    t = x.shape[0]
    if not 1 <= t <= GEMV_MAX_T:
        raise KernelError(f"T = {t} activation rows; the GEMV takes 1..{GEMV_MAX_T} (dequantize + matmul beyond)", field="x")
    x_stride = _check_rows(x, "x", t, k, 8)
    if x.data_ptr % 16:
        raise KernelError(f"must be 16-byte aligned (address {x.data_ptr:#x})", field="x")
    if y.dtype != "float32":
        raise KernelError(f"output must be float32, got {y.dtype}", field="out")
    y_stride = _check_rows(y, "out", t, n, 1)
    if y.data_ptr % 4:
        raise KernelError("must be 4-byte aligned", field="out")
    _same_device(("w", bw.device), ("x", x.device), ("out", y.device))
    chunks_per_row = k // fmt.chunk
    warps = min(GEMV_MAX_WARPS, max(1, math.ceil(chunks_per_row / 32)))
    return LaunchPlan(
        kernel=gemv_kernel_name(fmt.name, xtype, t),
        grid=(math.ceil(n / GEMV_ROWS), 1, 1),
        block=(32, warps, 1),
        scalars=(n, k, x_stride, y_stride),
    )


def plan_dequant(
    fmt_name: str, w: TensorDesc, out: TensorDesc, n: int, k: int, *, max_blocks: int = DEQUANT_MAX_BLOCKS
) -> LaunchPlan:
    """Checks out (n, k) fp16|bf16 = dequantize(W) and returns the launch."""
    return plan_dequant_bound(bind_weight(fmt_name, w, n, k), out, max_blocks=max_blocks)


def plan_dequant_bound(bw: BoundWeight, out: TensorDesc, *, max_blocks: int = DEQUANT_MAX_BLOCKS) -> LaunchPlan:
    """`plan_dequant` for a weight already checked by `bind_weight`."""
    fmt, n, k = bw.fmt, bw.n, bw.k
    otype = _DTYPE_TAG.get(out.dtype)
    if otype is None:
        raise KernelError(f"output must be float16 or bfloat16, got {out.dtype}", field="out")
    out_stride = _check_rows(out, "out", n, k, 8)
    if out.data_ptr % 16:
        raise KernelError(f"must be 16-byte aligned (address {out.data_ptr:#x})", field="out")
    _same_device(("w", bw.device), ("out", out.device))
    chunks = n * (k // fmt.chunk)
    blocks = max(1, min(max_blocks, math.ceil(chunks / DEQUANT_THREADS)))
    return LaunchPlan(
        kernel=dequant_kernel_name(fmt.name, otype),
        grid=(blocks, 1, 1),
        block=(DEQUANT_THREADS, 1, 1),
        scalars=(n, k, out_stride),
    )


# ---------------------------------------------------------------------------------------------
# Reference path (torch, any device)
# ---------------------------------------------------------------------------------------------
def reference_dequantize(w: "torch.Tensor", fmt_name: str, n: int, k: int) -> "torch.Tensor":
    """fp32 (n, k) from raw GGUF bytes via engine.formats (bit-exact with gguf-py)."""
    from ..formats import format_for

    fmt = kernel_format(fmt_name)
    return format_for(fmt.name).dequantize(w.reshape(-1), (n, k))


def reference_gemv(x: "torch.Tensor", w: "torch.Tensor", fmt_name: str, n: int, k: int) -> "torch.Tensor":
    """fp32 (T, n) = x @ dequantize(W)^T, the oracle for the GEMV kernel."""
    wf = reference_dequantize(w, fmt_name, n, k).float()
    return x.float() @ wf.T


# ---------------------------------------------------------------------------------------------
# cupy launchers
# ---------------------------------------------------------------------------------------------
@functools.cache
def _import_cupy():
    try:
        import cupy  # noqa: PLC0415 - optional, GPU only
    except ImportError as e:
        raise KernelError(
            "CUDA kernels need cupy (pip install 'engine[cuda12]' or 'engine[cuda13]'); "
            "use reference=True or the CPU backend without a GPU"
        ) from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # cupy raises CUDARuntimeError without a driver
        raise KernelError(f"no usable CUDA device: {e}") from e
    if count < 1:
        raise KernelError("no CUDA device")
    return cupy


_BIND_CACHE_MAX = 1 << 14  # distinct (address, shape, format) keys: resident weights and ring slots


class KernelLibrary:
    """The kernels on CUDA devices.

    Modules are built per device arch, one per (source, format), on first use or by `prepare`:
    NVRTC with the compile gate's flags (engine.cuda.compile), cubins cached on disk, loaded with
    cupy.RawModule(path=...) into the device's context. Weights are checked once (`bind`, or a
    cache keyed on everything the check reads: address, shape, strides, dtype, device, format, n, k);
    each launch checks only the activations and the output.

    Every launch takes an explicit torch stream (default: the current stream of the tensors'
    device) and is issued on it, so it is ordered with the caller's torch work; the kernels get raw
    device addresses (the tensors must stay alive until the stream has run them, as with any
    torch kernel).
    """

    def __init__(self, source_dir: Path = KERNEL_DIR, cache: Path | None = None):
        self._source_dir = Path(source_dir)
        self._cache = cache  # cubin directory (default: engine.cuda.compile's)
        self._archs: dict[int, str] = {}
        self._modules: dict[tuple[int, str, str], Any] = {}  # (device, source, format) -> RawModule
        self._functions: dict[tuple[int, str], Any] = {}  # (device, entry point) -> cupy Function
        self._streams: dict[tuple[int, int], Any] = {}  # (device, cudaStream_t) -> cupy ExternalStream
        self._bound: dict[tuple, BoundWeight] = {}
        self.builds: list = []  # engine.cuda.compile.Build of every module loaded (what ran, from where)

    # -- weights ------------------------------------------------------------------------------
    def bind(self, w: "torch.Tensor", fmt: str, n: int, k: int) -> BoundWeight:
        """Checks raw GGUF bytes once; pass the result as `w` to gemv / dequantize."""
        key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype, w.device, fmt, n, k)
        bw = self._bound.get(key)
        if bw is None:
            if len(self._bound) >= _BIND_CACHE_MAX:
                self._bound.clear()
            bw = self._bound[key] = bind_weight(fmt, TensorDesc.of(w), n, k)
        return bw

    def _weight(self, w, fmt, n, k) -> tuple[BoundWeight, int]:
        if isinstance(w, BoundWeight):
            if (fmt, n, k) != (None, None, None) and (kernel_format(fmt), n, k) != (w.fmt, w.n, w.k):
                raise KernelError(f"bound as {w.fmt.name} ({w.n}, {w.k}), called as {fmt} ({n}, {k})", field="w")
            return w, w.data_ptr
        return self.bind(w, fmt, n, k), w.data_ptr()

    # -- modules ------------------------------------------------------------------------------
    def arch(self, device_index: int) -> str:
        arch = self._archs.get(device_index)
        if arch is None:
            cupy = _import_cupy()
            arch = self._archs[device_index] = f"sm_{cupy.cuda.Device(device_index).compute_capability}"
        return arch

    def _module(self, device_index: int, source: str, fmt: KernelFormat):
        key = (device_index, source, fmt.name)
        module = self._modules.get(key)
        if module is None:
            from .compile import compile_source, formats_define

            cupy = _import_cupy()
            build = compile_source(source, self.arch(device_index), self._source_dir,
                                   defines=(formats_define(((fmt.tag, fmt.traits),)),), cache=self._cache)
            with cupy.cuda.Device(device_index):
                module = cupy.RawModule(path=str(build.path))
            self._modules[key] = module
            self.builds.append(build)
        return module

    def prepare(self, device_index: int, fmts) -> None:
        """Builds (or loads from the disk cache) the modules of these formats now, not at first launch."""
        for name in dict.fromkeys(fmts):
            fmt = kernel_format(name)
            for source in SOURCES:
                self._module(device_index, source, fmt)

    def _function(self, device_index: int, source: str, fmt: KernelFormat, kernel: str):
        fn = self._functions.get((device_index, kernel))
        if fn is None:
            cupy = _import_cupy()
            module = self._module(device_index, source, fmt)
            with cupy.cuda.Device(device_index):
                fn = self._functions[(device_index, kernel)] = module.get_function(kernel)
        return fn

    def _launch(self, source: str, bw: BoundWeight, plan: LaunchPlan, pointers: tuple[int, ...],
                device: "torch.device", stream) -> None:
        import numpy as np
        import torch

        cupy = _import_cupy()
        if device.type != "cuda":
            raise KernelError(f"tensors must be on a CUDA device, got {device}", field="w")
        fn = self._function(device.index, source, bw.fmt, plan.kernel)
        handle = (stream if stream is not None else torch.cuda.current_stream(device)).cuda_stream
        ext = self._streams.get((device.index, handle))
        if ext is None:
            ext = self._streams[(device.index, handle)] = cupy.cuda.ExternalStream(handle, device.index)
        args = (*(np.uint64(p) for p in pointers), *(np.int32(s) for s in plan.scalars))
        with cupy.cuda.Device(device.index):
            fn(plan.grid, plan.block, args, stream=ext)

    # -- launches -----------------------------------------------------------------------------
    def gemv(
        self,
        x: "torch.Tensor",
        w: "torch.Tensor | BoundWeight",
        fmt: str | None = None,
        n: int | None = None,
        k: int | None = None,
        *,
        out: "torch.Tensor | None" = None,
        stream: "torch.cuda.Stream | None" = None,
        reference: bool = False,
    ) -> "torch.Tensor":
        """fp32 (T, n) = x (T, k) @ W^T for raw GGUF bytes W of type `fmt`, T = 1..8.
        `w` is the uint8 tensor, or its `bind` handle (then fmt, n, k may be omitted)."""
        import torch

        if reference:
            if isinstance(w, BoundWeight):
                raise KernelError("the reference path needs the weight tensor", field="w")
            y = reference_gemv(x, w, fmt, n, k)
            if out is not None:
                out.copy_(y)
                return out
            return y
        bw, w_ptr = self._weight(w, fmt, n, k)
        if x.dim() != 2:
            raise KernelError(f"expected a 2-D (T, {bw.k}) tensor, got shape {tuple(x.shape)}", field="x")
        if out is None:
            out = torch.empty((x.shape[0], bw.n), dtype=torch.float32, device=x.device)
        plan = plan_gemv_bound(bw, TensorDesc.of(x), TensorDesc.of(out))
        self._launch("gemv.cu", bw, plan, (w_ptr, x.data_ptr(), out.data_ptr()), x.device, stream)
        return out

    def dequantize(
        self,
        w: "torch.Tensor | BoundWeight",
        fmt: str | None = None,
        n: int | None = None,
        k: int | None = None,
        *,
        dtype: "torch.dtype | None" = None,
        out: "torch.Tensor | None" = None,
        stream: "torch.cuda.Stream | None" = None,
        reference: bool = False,
    ) -> "torch.Tensor":
        """(n, k) fp16 (default) or bf16 from raw GGUF bytes, for a following dense matmul."""
        import torch

        dtype = dtype or (out.dtype if out is not None else torch.float16)
        if reference:
            if isinstance(w, BoundWeight):
                raise KernelError("the reference path needs the weight tensor", field="w")
            y = reference_dequantize(w, fmt, n, k).to(dtype)
            if out is not None:
                out.copy_(y)
                return out
            return y
        bw, w_ptr = self._weight(w, fmt, n, k)
        device = torch.device(bw.device)
        if out is None:
            out = torch.empty((bw.n, bw.k), dtype=dtype, device=device)
        plan = plan_dequant_bound(bw, TensorDesc.of(out))
        self._launch("dequant.cu", bw, plan, (w_ptr, out.data_ptr()), device, stream)
        return out
