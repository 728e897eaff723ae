"""Build the CUDA kernel sources with g++ against kernels/cpu_shim/cuda_cpu.h and run them via ctypes.

This executes the very text nvcc compiles, with the launch geometry from `engine.cuda.kernels`'
planners, so a CPU run checks kernel logic, indexing, tails, warp shuffles and barriers without a GPU.
It is a verification tool (slow: one fiber per CUDA thread), not a compute backend.
"""
from __future__ import annotations

import ctypes
import dataclasses
import enum
import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import KernelError
from .kernels import KERNEL_DIR, BoundWeight, KernelLibrary, LaunchPlan, TensorDesc, kernel_format, plan_dequant, plan_gemv

CXX = os.environ.get("CXX", "g++")
_BASE_FLAGS = ("-std=c++20", "-fPIC", "-shared", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror")
_SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g")


class Policy(enum.IntEnum):
    """Fiber scheduling order inside a block (see cuda_cpu.h)."""

    FORWARD = 0
    REVERSE = 1
    RANDOM = 2


@dataclass(frozen=True, slots=True)
class CpuBuildSpec:
    """One g++ build of a kernel source file."""

    source: str  # file name in kernels/, e.g. "gemv.cu"
    defines: tuple[str, ...] = ()  # -D values, e.g. "GK_BUG_NO_SYNC" or "GK_FORMATS(X)=X(q4_k, FmtQ4_K)"
    sanitize: bool = False  # AddressSanitizer + UndefinedBehaviorSanitizer (misaligned vector loads)
    opt: str = "-O1"

    def command(self, out: Path, kernel_dir: Path = KERNEL_DIR) -> list[str]:
        flags = [*_BASE_FLAGS, self.opt, f"-I{kernel_dir}", *(f"-D{d}" for d in self.defines)]
        if self.sanitize:
            flags += _SANITIZE_FLAGS
        return [CXX, *flags, "-x", "c++", str(kernel_dir / self.source), "-o", str(out)]

    def output_name(self, kernel_dir: Path = KERNEL_DIR) -> str:
        """Content-addressed: sources, headers and flags."""
        h = hashlib.sha256(" ".join(self.command(Path("x"), kernel_dir)).encode())
        for p in sorted(kernel_dir.rglob("*")):
            if p.suffix in (".cu", ".cuh", ".h"):
                h.update(p.name.encode() + p.read_bytes())
        return f"{Path(self.source).stem}-{h.hexdigest()[:16]}.so"


class PendingBuild:
    """A g++ build running in the background (builds are slow: start several, then wait)."""

    def __init__(self, spec: CpuBuildSpec, out_dir: Path, kernel_dir: Path = KERNEL_DIR):
        self.spec = spec
        self.path = Path(out_dir) / spec.output_name(kernel_dir)
        self._proc = None
        if not self.path.exists():
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            self._tmp = tmp
            self._proc = subprocess.Popen(
                spec.command(tmp, kernel_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )

    def wait(self) -> Path:
        if self._proc is not None:
            out, _ = self._proc.communicate()
            if self._proc.returncode != 0:
                raise KernelError(f"g++ build of {self.spec.source} {self.spec.defines} failed:\n{out[-4000:]}")
            os.replace(self._tmp, self.path)
            self._proc = None
        return self.path


def build(spec: CpuBuildSpec, out_dir: Path, kernel_dir: Path = KERNEL_DIR) -> Path:
    return PendingBuild(spec, out_dir, kernel_dir).wait()


def exported_kernels(so_path: Path) -> list[str]:
    """Names of the kernel entry points (gemv_*, dequant_*) a built library exports."""
    out = subprocess.run(["nm", "-D", "--defined-only", str(so_path)], check=True, capture_output=True, text=True).stdout
    names = (line.split()[-1] for line in out.splitlines() if line.strip())
    return sorted(n for n in names if n.startswith(("gemv_", "dequant_")))


class _LaunchConfig(ctypes.Structure):  # cuda_cpu::LaunchConfig
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("policy", ctypes.c_int),
        ("seed", ctypes.c_uint),
        ("workers", ctypes.c_int),
    ]


def aligned_empty(shape: tuple[int, ...], dtype, align: int = 64, pad_bytes: int = 0) -> np.ndarray:
    """An uninitialised array whose data starts on an `align`-byte boundary, with `pad_bytes` of
    accessible slack after it (for guard checks)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align + pad_bytes, dtype=np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


class CpuKernels:
    """ctypes handle on one CPU-built kernel library (gemv.cu or dequant.cu)."""

    def __init__(self, so_path: Path):
        self.path = Path(so_path)
        self._lib = ctypes.CDLL(str(self.path))
        self._lib.cuda_cpu_last_error.restype = ctypes.c_char_p

    def _kernel_ptr(self, name: str) -> int:
        try:
            return ctypes.cast(getattr(self._lib, name), ctypes.c_void_p).value
        except AttributeError:
            raise KernelError(f"{self.path.name} has no kernel {name}", field="fmt") from None

    def launch(self, launcher: str, plan: LaunchPlan, pointers: list[int], *, policy: Policy, seed: int, workers: int) -> None:
        cfg = _LaunchConfig((ctypes.c_uint * 3)(*plan.grid), (ctypes.c_uint * 3)(*plan.block), int(policy), seed, workers)
        args = [ctypes.c_void_p(p) for p in pointers] + [ctypes.c_int(s) for s in plan.scalars]
        fn = getattr(self._lib, launcher)
        fn.restype = ctypes.c_int
        rc = fn(ctypes.c_void_p(self._kernel_ptr(plan.kernel)), ctypes.byref(cfg), *args)
        if rc != 0:
            raise KernelError(f"{plan.kernel}: {self._lib.cuda_cpu_last_error().decode()}")

    def gemv(
        self,
        w: np.ndarray,
        x: np.ndarray,
        fmt: str,
        n: int,
        k: int,
        *,
        xtype: str = "f16",
        out: np.ndarray | None = None,
        policy: Policy = Policy.FORWARD,
        seed: int = 0,
        workers: int = 1,
    ) -> np.ndarray:
        """fp32 (T, n) = x @ W^T. x holds fp16 values (xtype "f16") or bf16 bit patterns as uint16."""
        if out is None:
            out = aligned_empty((x.shape[0], n), np.float32)
        xdesc = dataclasses.replace(TensorDesc.of(x), dtype={"f16": "float16", "bf16": "bfloat16"}[xtype])
        plan = plan_gemv(fmt, TensorDesc.of(w), xdesc, TensorDesc.of(out), n, k)
        self.launch("cuda_cpu_launch_gemv", plan, [w.ctypes.data, x.ctypes.data, out.ctypes.data],
                    policy=policy, seed=seed, workers=workers)
        return out

    def dequantize(
        self,
        w: np.ndarray,
        fmt: str,
        n: int,
        k: int,
        *,
        otype: str = "f16",
        out: np.ndarray | None = None,
        max_blocks: int | None = None,
        policy: Policy = Policy.FORWARD,
        seed: int = 0,
        workers: int = 1,
    ) -> np.ndarray:
        """(n, k) fp16 values (otype "f16") or bf16 bit patterns as uint16 (otype "bf16")."""
        if out is None:
            out = aligned_empty((n, k), np.float16 if otype == "f16" else np.uint16)
        odesc = dataclasses.replace(TensorDesc.of(out), dtype={"f16": "float16", "bf16": "bfloat16"}[otype])
        kwargs = {} if max_blocks is None else {"max_blocks": max_blocks}
        plan = plan_dequant(fmt, TensorDesc.of(w), odesc, n, k, **kwargs)
        self.launch("cuda_cpu_launch_dequant", plan, [w.ctypes.data, out.ctypes.data],
                    policy=policy, seed=seed, workers=workers)
        return out


class ShimLibrary(KernelLibrary):
    """A KernelLibrary whose launches run the g++-built kernels on CPU tensors (tests): weight binding,
    argument checks and launch plans are KernelLibrary's own, only the launch itself differs.
    `prepared` records every prepare() call, `calls` the kind of every launch ("gemv" | "dequant")
    and `binds` every weight check bind() ran (cache misses)."""

    def __init__(self, gemv: CpuKernels, dequant: CpuKernels):
        super().__init__()
        self._libs = {"gemv.cu": (gemv, "cuda_cpu_launch_gemv"), "dequant.cu": (dequant, "cuda_cpu_launch_dequant")}
        self.prepared: list[tuple[int, tuple[str, ...]]] = []
        self.calls: list[str] = []
        self.binds: list[BoundWeight] = []

    def prepare(self, device_index: int, fmts) -> None:
        names = tuple(dict.fromkeys(kernel_format(f).name for f in fmts))
        self.prepared.append((device_index, names))

    def bind(self, w, fmt: str, n: int, k: int) -> BoundWeight:
        before = len(self._bound)
        bw = super().bind(w, fmt, n, k)
        if len(self._bound) != before:
            self.binds.append(bw)
        return bw

    def _launch(self, source: str, bw: BoundWeight, plan: LaunchPlan, pointers: tuple[int, ...], device, stream) -> None:
        lib, launcher = self._libs[source]
        self.calls.append(source.removesuffix(".cu"))
        lib.launch(launcher, plan, list(pointers), policy=Policy.FORWARD, seed=0, workers=1)
