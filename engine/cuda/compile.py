"""Building the kernel sources for a device: NVRTC through ctypes, one set of compiler flags, and an
on-disk cubin cache.

One flag set (`CODEGEN_FLAGS`) serves the run-time compiler (NVRTC, here) and the compile gate
(scripts/check_kernels.py runs nvcc with the same flags and NVRTC through `compile_source`), so
the code that runs is the code the gate checked. Notably `-ftz=false`: cupy.RawModule would append
`-ftz=true` to any options (flushing fp32 subnormals, e.g. small bf16 activations widened to fp32),
which is why the engine does not compile through cupy.

The program sees the kernel files as in-memory headers and no include path: the sources need no
CUDA toolkit headers (kernels/common.cuh has its own fp16/bf16 conversions), so the NVRTC library
of a pip install (the nvidia-cuda-nvrtc wheel) is all it takes.

A module is one source narrowed to the formats a model uses (``-DGK_FORMATS(X)=...``): the first
launch compiles those entry points only, not all of them. Cubins are cached under
$ENGINE_CACHE_DIR/cuda (default ~/.cache/engine/cuda), keyed by the kernel files' contents, the
options, the arch and the NVRTC version; a build is written to a temporary file and renamed.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import KernelError
from ..tiers.hardware import cache_dir

# Code generation flags (nvcc and NVRTC spell them alike). IEEE fp32: subnormals kept (no FTZ),
# correctly rounded division and square root; FMA contraction on (the kernels write __fmul_rn /
# __fadd_rn where ggml's unfused rounding matters).
CODEGEN_FLAGS = ("-std=c++17", "-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-fmad=true")
PTXAS_VERBOSE = "-Xptxas=-v"  # the gate's NVRTC build: ptxas's register / spill report in the log


def kernel_files(kernel_dir: Path) -> dict[str, bytes]:
    """The sources and headers a CUDA build sees (top-level .cu/.cuh; the CPU shim is not one)."""
    return {p.name: p.read_bytes() for p in sorted(Path(kernel_dir).iterdir()) if p.suffix in (".cu", ".cuh")}


def formats_define(tags: tuple[tuple[str, str], ...]) -> str:
    """-D value narrowing GK_FORMATS to (tag, traits) pairs, e.g. (("q4_k", "FmtQ4_K"),)."""
    return "GK_FORMATS(X)=" + " ".join(f"X({tag}, {traits})" for tag, traits in tags)


def nvrtc_options(arch: str, defines: tuple[str, ...] = (), *, verbose: bool = False) -> tuple[str, ...]:
    """The complete NVRTC option list: nothing else is passed (no include path)."""
    if not arch.startswith("sm_") or not arch[3:].isdigit():
        raise KernelError(f"expected an arch like sm_89, got {arch!r}", field="arch")
    return (*CODEGEN_FLAGS, f"--gpu-architecture={arch}", *(f"-D{d}" for d in defines),
            *((PTXAS_VERBOSE,) if verbose else ()))


# ---------------------------------------------------------------------------------------------
# libnvrtc
# ---------------------------------------------------------------------------------------------
def _major(path: str) -> int:
    tail = path.split("libnvrtc.so")[-1].lstrip(".")
    return int(tail.split(".")[0]) if tail[:1].isdigit() else 0


def nvrtc_candidates() -> list[str]:
    """libnvrtc paths: nvidia wheels on sys.path, then the CUDA toolkit (CUDA_HOME, CUDA_PATH, nvcc's
    root, /usr/local/cuda); the .alt builds are skipped."""
    found = []
    for site in sys.path:
        found += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
    nvcc = shutil.which("nvcc")
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             str(Path(nvcc).resolve().parents[1]) if nvcc else None, "/usr/local/cuda"]
    for root in filter(None, roots):
        for sub in ("lib64", "lib"):
            found += sorted(glob.glob(os.path.join(root, sub, "libnvrtc.so*")))
    unique = list(dict.fromkeys(p for p in found if ".alt." not in p))
    return sorted(unique, key=_major, reverse=True)  # newest CUDA first


class Nvrtc:
    """ctypes handle on libnvrtc."""

    def __init__(self, path: str):
        self.path = path
        for builtins in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*"))):
            if ".alt." not in builtins:
                try:  # libnvrtc dlopens its builtins by soname; make the one beside it visible
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    pass
        self._lib = ctypes.CDLL(path)
        self._lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self._lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise KernelError(f"{what} failed: {self._lib.nvrtcGetErrorString(rc).decode()} (NVRTC at {self.path})")

    def supported_archs(self) -> tuple[int, ...]:
        n = ctypes.c_int()
        self._check(self._lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)), "nvrtcGetNumSupportedArchs")
        archs = (ctypes.c_int * n.value)()
        self._check(self._lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
        return tuple(archs)

    def compile(self, name: str, files: dict[str, bytes], options: tuple[str, ...]) -> tuple[bytes | None, str]:
        """(cubin or None on a compile error, log). `files[name]` is the program, the .cuh files its
        headers."""
        lib = self._lib
        headers = [(k, v) for k, v in files.items() if k.endswith(".cuh")]
        contents = (ctypes.c_char_p * len(headers))(*(v for _, v in headers))
        names = (ctypes.c_char_p * len(headers))(*(k.encode() for k, _ in headers))
        prog = ctypes.c_void_p()
        self._check(lib.nvrtcCreateProgram(ctypes.byref(prog), files[name], name.encode(), len(headers), contents,
                                           names), "nvrtcCreateProgram")
        try:
            opts = [o.encode() for o in options]
            rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
            size = ctypes.c_size_t()
            self._check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
            log = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            if rc != 0:
                return None, log.value.decode(errors="replace")
            self._check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            cubin = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
            return cubin.raw, log.value.decode(errors="replace")
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


@functools.cache
def find_nvrtc() -> Nvrtc | None:
    """The newest loadable libnvrtc, or None."""
    for path in nvrtc_candidates():
        try:
            return Nvrtc(path)
        except (OSError, KernelError):
            continue
    return None


def nvrtc() -> Nvrtc:
    lib = find_nvrtc()
    if lib is None:
        raise KernelError("the CUDA kernels are compiled at run time with NVRTC, and no libnvrtc was found: "
                          "pip install 'engine[cuda13]' (or [cuda12]), which brings the nvidia-cuda-nvrtc wheel, "
                          "or set CUDA_HOME to a CUDA toolkit")
    return lib


# ---------------------------------------------------------------------------------------------
# Cached builds
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Build:
    """One compiled module: where its cubin lies and what produced it."""

    path: Path
    source: str
    arch: str
    options: tuple[str, ...]
    cached: bool  # True when the cubin came from the disk cache
    log: str = ""


def build_key(files: dict[str, bytes], source: str, options: tuple[str, ...], version: tuple[int, int]) -> str:
    h = hashlib.sha256(repr((source, options, version)).encode())
    for name, text in files.items():
        h.update(name.encode() + b"\0" + hashlib.sha256(text).digest())
    return h.hexdigest()[:24]


def compile_source(source: str, arch: str, kernel_dir: Path, *, defines: tuple[str, ...] = (),
                   verbose: bool = False, lib: Nvrtc | None = None, cache: Path | None = None) -> Build:
    """The cubin of kernels/`source` for `arch`, from the cache or compiled now (KernelError with
    NVRTC's log on a compile error)."""
    lib = lib or nvrtc()
    number = int(arch[3:]) if arch[3:].isdigit() else -1
    supported = lib.supported_archs()
    if number not in supported:
        raise KernelError(f"NVRTC {lib.version[0]}.{lib.version[1]} cannot compile for {arch} (it supports "
                          f"sm_{min(supported)}..sm_{max(supported)}); install an NVRTC that matches the GPU",
                          field="arch")
    files = kernel_files(kernel_dir)
    if source not in files:
        raise KernelError(f"no kernel source {source} in {kernel_dir}", field="source")
    options = nvrtc_options(arch, defines, verbose=verbose)
    directory = Path(cache) if cache is not None else cache_dir() / "cuda"
    path = directory / f"{Path(source).stem}-{arch}-{build_key(files, source, options, lib.version)}.cubin"
    if path.exists() and not verbose:
        return Build(path, source, arch, options, cached=True)
    cubin, log = lib.compile(source, files, options)
    if cubin is None:
        raise KernelError(f"NVRTC could not compile {source} for {arch}:\n{log[-4000:]}", path=kernel_dir / source)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(cubin)
    os.replace(tmp, path)
    return Build(path, source, arch, options, cached=False, log=log)
