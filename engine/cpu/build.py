"""Compile a C++ source (qlinear.cpp, the kernels; tiers/preadq.cpp, the reader) into a shared library
on first use, cached per (source, flags, compiler, CPU).

The cache lives under $ENGINE_CACHE_DIR (default ~/.cache/engine)/cpu. A build writes to a temporary
file in the same directory and renames it into place, so concurrent processes never see a partial
library; the loser of a race simply overwrites an identical file.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import KernelError

SOURCE = Path(__file__).with_name("qlinear.cpp")
BASE_FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-pthread",
              "-fvisibility=hidden", "-fno-math-errno", "-ffp-contract=fast", "-DNDEBUG")


@dataclass(frozen=True, slots=True)
class BuildSpec:
    compiler: str
    flags: tuple[str, ...] = BASE_FLAGS
    source: Path = SOURCE

    @staticmethod
    def default(extra_flags: tuple[str, ...] = (), source: Path = SOURCE) -> "BuildSpec":
        return BuildSpec(compiler=os.environ.get("CXX", "g++"), flags=BASE_FLAGS + tuple(extra_flags), source=source)


def cache_dir() -> Path:
    root = os.environ.get("ENGINE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "engine")
    return Path(root) / "cpu"


def _cpu_flags() -> str:
    """-march=native depends on the host CPU: key the cache on its feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compiler_version(compiler: str) -> str:
    try:
        res = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelError(f"C++ compiler {compiler!r} is not usable: {exc}") from exc
    if res.returncode != 0:
        raise KernelError(f"C++ compiler {compiler!r} --version failed: {res.stderr.strip()[:500]}")
    return res.stdout


def _local_includes(source: Path) -> list[bytes]:
    """The bytes of the files a source pulls in with #include "name" (beside it), so that an edit to
    one of them rebuilds the library."""
    names = re.findall(rb'^#include "([^"]+)"', source.read_bytes(), flags=re.M)
    return [(source.parent / n.decode()).read_bytes() for n in names]


def library_path(spec: BuildSpec) -> Path:
    h = hashlib.sha256()
    for part in (spec.source.read_bytes(), *_local_includes(spec.source), "\0".join(spec.flags).encode(),
                 _compiler_version(spec.compiler).encode(), _cpu_flags().encode()):
        h.update(hashlib.sha256(part).digest())
    return cache_dir() / f"{spec.source.stem}-{h.hexdigest()[:20]}.so"


FIX_COMPILER = "install a C++20 compiler (e.g. `apt-get install g++`) or point CXX at one"
FIX_CACHE = "set ENGINE_CACHE_DIR to a writable directory on a file system that allows executables (not noexec)"


def build(spec: BuildSpec) -> Path:
    """Return the path of the compiled library, compiling it if it is not cached yet. Every failure is
    a KernelError carrying the compiler's message and the fix."""
    if shutil.which(spec.compiler) is None:
        raise KernelError(f"C++ compiler {spec.compiler!r} not found; {FIX_COMPILER}", field="CXX")
    target = library_path(spec)
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    except OSError as exc:
        raise KernelError(f"cannot write the compiled {spec.source.name} to {target.parent}: {exc.strerror}; "
                          f"{FIX_CACHE}", field="ENGINE_CACHE_DIR") from None
    os.close(fd)
    try:
        try:
            res = subprocess.run([spec.compiler, *spec.flags, str(spec.source), "-o", tmp],
                                 capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KernelError(f"compiling {spec.source.name} failed: {exc}; {FIX_COMPILER}") from exc
        if res.returncode != 0:
            raise KernelError(f"compiling {spec.source.name} failed (compiler {spec.compiler}; {FIX_COMPILER}):\n"
                              f"{res.stderr.strip()[-4000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_library(path: Path) -> ctypes.CDLL:
    """dlopen a built library; a refusal (noexec mount, wrong architecture) is a KernelError with the fix."""
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelError(f"loading {path} failed: {exc}; {FIX_CACHE}", field="ENGINE_CACHE_DIR") from None


SLOW_FALLBACK_ENV = "ENGINE_SLOW_FALLBACK"


def slow_fallback_allowed() -> bool:
    """The explicit opt-in to run without a native library (torch dequantize + matmul, Python reader
    threads): ENGINE_SLOW_FALLBACK=1. Without it a failed build is an error."""
    return os.environ.get(SLOW_FALLBACK_ENV, "") == "1"
