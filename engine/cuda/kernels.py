"""CUDA kernels for GGUF weights: specs, argument validation, launch planning and cupy launchers.

The sources live in the repository's top-level ``kernels/`` directory (``gemv.cu``, ``dequant.cu``).
Everything here except `KernelLibrary`'s device paths is pure Python and runs without a GPU:
argument checking and launch geometry are shared by the cupy launchers and by the CPU shim
(`engine.cuda.cpu_shim`), so the CPU tests exercise the same plans a GPU launch would use.

Output dtypes: the GEMV writes fp32 (T, N); the dequantize kernels write fp16 or bf16 (N, K).
"""
from __future__ import annotations

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


def _same_device(*descs: tuple[str, TensorDesc]) -> None:
    devices = {d.device for _, d in descs}
    if len(devices) > 1:
        raise KernelError(f"arguments on different devices: {', '.join(f'{n}={d.device}' for n, d in descs)}", field=descs[0][0])


def plan_gemv(fmt_name: str, w: TensorDesc, x: TensorDesc, y: TensorDesc, n: int, k: int) -> LaunchPlan:
    """Checks y (T, n) fp32 = x (T, k) fp16|bf16 @ W(n, k)^T and returns the launch.

    x rows need 16-byte alignment (8 elements), W the format's `weight_align`, y 4 bytes.
    """
    fmt = kernel_format(fmt_name)
    _check_weights(fmt, w, n, k)
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
    _same_device(("w", w), ("x", x), ("out", y))
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
    fmt = kernel_format(fmt_name)
    _check_weights(fmt, w, n, k)
    otype = _DTYPE_TAG.get(out.dtype)
    if otype is None:
        raise KernelError(f"output must be float16 or bfloat16, got {out.dtype}", field="out")
    out_stride = _check_rows(out, "out", n, k, 8)
    if out.data_ptr % 16:
        raise KernelError(f"must be 16-byte aligned (address {out.data_ptr:#x})", field="out")
    _same_device(("w", w), ("out", out))
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


class KernelLibrary:
    """Compiled kernel modules, one per device, built on first use with cupy.RawModule (NVRTC for
    the device's own arch; CuPy caches the binaries on disk).

    Every launch takes an explicit torch stream (default: the current stream of the tensors'
    device); tensors cross into cupy through DLPack on that stream, so no extra synchronisation.
    """

    def __init__(self, source_dir: Path = KERNEL_DIR):
        self._source_dir = Path(source_dir)
        self._modules: dict[tuple[int, str], Any] = {}

    def _function(self, cupy, device_index: int, source: str, kernel: str):
        key = (device_index, source)
        module = self._modules.get(key)
        if module is None:
            code = (self._source_dir / source).read_text()
            module = cupy.RawModule(code=code, options=("--std=c++17", f"-I{self._source_dir}"))
            self._modules[key] = module
        with cupy.cuda.Device(device_index):
            return module.get_function(kernel)

    def _launch(self, source: str, plan: LaunchPlan, tensors: list["torch.Tensor"], stream) -> None:
        import numpy as np
        import torch

        cupy = _import_cupy()
        device = tensors[0].device
        if device.type != "cuda":
            raise KernelError(f"tensors must be on a CUDA device, got {device}", field="w")
        torch_stream = stream if stream is not None else torch.cuda.current_stream(device)
        ext = cupy.cuda.ExternalStream(torch_stream.cuda_stream, device.index)
        with cupy.cuda.Device(device.index), ext:
            # DLPack hands each tensor over ordered on `ext`; cupy has no bfloat16, and the kernels
            # only need the address, so bf16 crosses as int16.
            arrays = [cupy.from_dlpack(t.view(torch.int16) if t.dtype == torch.bfloat16 else t) for t in tensors]
            fn = self._function(cupy, device.index, source, plan.kernel)
            fn(plan.grid, plan.block, (*arrays, *(np.int32(s) for s in plan.scalars)), stream=ext)

    def gemv(
        self,
        x: "torch.Tensor",
        w: "torch.Tensor",
        fmt: str,
        n: int,
        k: int,
        *,
        out: "torch.Tensor | None" = None,
        stream: "torch.cuda.Stream | None" = None,
        reference: bool = False,
    ) -> "torch.Tensor":
        """fp32 (T, n) = x (T, k) @ W^T for raw GGUF bytes W of type `fmt`, T = 1..8."""
        import torch

        if reference:
            y = reference_gemv(x, w, fmt, n, k)
            if out is not None:
                out.copy_(y)
                return out
            return y
        if x.dim() != 2:
            raise KernelError(f"expected a 2-D (T, {k}) tensor, got shape {tuple(x.shape)}", field="x")
        if out is None:
            out = torch.empty((x.shape[0], n), dtype=torch.float32, device=x.device)
        plan = plan_gemv(fmt, TensorDesc.of(w), TensorDesc.of(x), TensorDesc.of(out), n, k)
        self._launch("gemv.cu", plan, [w, x, out], stream)
        return out

    def dequantize(
        self,
        w: "torch.Tensor",
        fmt: str,
        n: int,
        k: int,
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
            y = reference_dequantize(w, fmt, n, k).to(dtype)
            if out is not None:
                out.copy_(y)
                return out
            return y
        if out is None:
            out = torch.empty((n, k), dtype=dtype, device=w.device)
        plan = plan_dequant(fmt, TensorDesc.of(w), TensorDesc.of(out), n, k)
        self._launch("dequant.cu", plan, [w, out], stream)
        return out
