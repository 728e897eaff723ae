"""Compile gate: every kernel source builds with nvcc for sm_80/86/89/90 with warnings as errors,
0 spills, no stack frame, registers within budget (scripts/check_kernels.py)."""
from __future__ import annotations

import importlib.util
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from engine.cuda import compile as compile_mod
from engine.cuda import kernels as kernels_mod
from engine.cuda.compile import CODEGEN_FLAGS, formats_define, nvrtc_options
from engine.cuda.kernels import ARCHS, FORMATS, KERNEL_DIR, SOURCES, KernelLibrary, expected_kernels, register_budget
from engine.errors import KernelError

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_kernels.py"
_spec = importlib.util.spec_from_file_location("check_kernels", _SCRIPT)
check_kernels = importlib.util.module_from_spec(_spec)
sys.modules["check_kernels"] = check_kernels  # dataclasses look their module up while building
_spec.loader.exec_module(check_kernels)

_PTXAS_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'gemv_q4_k_f16_t1' for 'sm_80'
ptxas info    : Function properties for gemv_q4_k_f16_t1
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 84 registers, used 1 barriers, 64 bytes smem, 392 bytes cmem[0]
ptxas info    : Compiling entry function 'gemv_q6_k_bf16_t8' for 'sm_90'
ptxas info    : Function properties for gemv_q6_k_bf16_t8
    200 bytes stack frame, 196 bytes spill stores, 196 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 256 bytes smem, 392 bytes cmem[0]
ptxas info    : Compiling entry function 'dequant_q8_0_f16' for 'sm_86'
ptxas info    : Function properties for dequant_q8_0_f16
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 28 registers, used 0 barriers, 392 bytes cmem[0]
"""


def test_parser_reads_ptxas_report_and_flags_violations():
    reports = {r.kernel: r for r in check_kernels.parse_ptxas(_PTXAS_SAMPLE, "gemv.cu")}
    assert set(reports) == {"gemv_q4_k_f16_t1", "gemv_q6_k_bf16_t8", "dequant_q8_0_f16"}
    ok, spilling, stack = reports["gemv_q4_k_f16_t1"], reports["gemv_q6_k_bf16_t8"], reports["dequant_q8_0_f16"]
    assert (ok.arch, ok.registers, ok.smem_bytes, ok.problems) == ("sm_80", 84, 64, [])
    assert spilling.arch == "sm_90" and spilling.spill_stores == 196
    assert any("spills" in p for p in spilling.problems) and any("budget" in p for p in spilling.problems)
    assert stack.problems == ["stack frame 16 bytes"]


def test_register_budget_table_covers_every_entry_point():
    for source in SOURCES:
        for name in expected_kernels(source):
            assert 32 <= register_budget(name) <= 255
    assert register_budget("gemv_q4_0_f16_t4") == FORMATS["Q4_0"].reg_budget[0]
    assert register_budget("gemv_q4_0_bf16_t5") == FORMATS["Q4_0"].reg_budget[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH: the CUDA compile gate cannot run")
def test_compile_gate_all_archs():
    result = check_kernels.run_gate(ARCHS, jobs=2)
    assert result["failures"] == [] and result["ok"]
    if check_kernels.find_nvrtc() is not None:  # the cupy.RawModule compiler accepts the sources too
        assert all(r["ok"] for r in result["nvrtc"].values()) and set(result["nvrtc"]) == set(SOURCES)
    n_kernels = sum(len(expected_kernels(s)) for s in SOURCES)
    assert len(result["kernels"]) == n_kernels * len(ARCHS)
    assert {r["arch"] for r in result["kernels"]} == set(ARCHS)
    assert all(r["spill_stores"] == r["spill_loads"] == 0 for r in result["kernels"])


# ---------------------------------------------------------------------------------------------
# The run-time build (engine.cuda.compile): the gate's flags, no toolkit headers, a disk cache
# ---------------------------------------------------------------------------------------------
_INCLUDE = re.compile(r'^\s*#\s*include\s*(\S+)', re.M)


def test_kernel_sources_include_only_their_own_files():
    """No CUDA toolkit header (cuda_fp16.h, cuda_bf16.h, ...): a pip-only NVRTC compiles them."""
    for path in sorted(KERNEL_DIR.glob("*.cu*")):
        for name in _INCLUDE.findall(path.read_text()):
            assert name.startswith('"'), f"{path.name} includes the system header {name}"
            assert (KERNEL_DIR / name.strip('"')).is_file(), f"{path.name} includes {name}, not a kernel file"
    common = (KERNEL_DIR / "common.cuh").read_text()
    cuda_branch = common[common.index("#if defined(__CUDACC__)"):common.index("#else")]
    assert "#include" not in cuda_branch  # only the CPU build includes the shim


class FakeNvrtc:
    """Records what the engine asks NVRTC for; returns a dummy cubin."""

    path, version = "fake-libnvrtc", (13, 0)

    def __init__(self):
        self.calls: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []

    def supported_archs(self):
        return (75, 80, 86, 89, 90, 100, 120)

    def compile(self, name, files, options):
        self.calls.append((name, tuple(files), tuple(options)))
        return b"\x7fELF fake cubin " + name.encode(), ""


class FakeCupy(types.ModuleType):
    """cupy as far as KernelLibrary's module loading goes: one sm_86 device."""

    def __init__(self, cc: str = "86"):
        super().__init__("cupy")
        self.loaded: list[str] = []
        self.functions: list[str] = []
        fake = self

        class Device:
            compute_capability = cc

            def __init__(self, index):
                self.index = index

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class Module:
            def __init__(self, path):
                self.path = path

            def get_function(self, name):
                fake.functions.append(name)
                return (self.path, name)

        def raw_module(*, path):
            fake.loaded.append(path)
            return Module(path)

        self.RawModule = raw_module
        self.cuda = types.SimpleNamespace(Device=Device, runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))


@pytest.fixture
def fake_cuda(monkeypatch, tmp_path):
    """(FakeNvrtc, FakeCupy, cache dir) wired into engine.cuda."""
    fake_nvrtc, fake_cupy = FakeNvrtc(), FakeCupy()
    monkeypatch.setattr(compile_mod, "nvrtc", lambda: fake_nvrtc)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    kernels_mod._import_cupy.cache_clear()
    yield fake_nvrtc, fake_cupy, tmp_path / "cubins"
    kernels_mod._import_cupy.cache_clear()


def test_runtime_compiles_with_the_gates_flags_and_no_include_path(fake_cuda):
    fake_nvrtc, fake_cupy, cache = fake_cuda
    lib = KernelLibrary(cache=cache)
    lib.prepare(0, ["Q4_K", "Q6_K", "Q4_K"])
    assert [(name, opts) for name, _, opts in fake_nvrtc.calls] == [
        (source, nvrtc_options("sm_86", (formats_define(((fmt.tag, fmt.traits),)),)))
        for fmt in (FORMATS["Q4_K"], FORMATS["Q6_K"]) for source in SOURCES
    ]
    for name, files, opts in fake_nvrtc.calls:
        assert "-ftz=false" in opts and not any(o.startswith(("-ftz=true", "--ftz=true")) for o in opts)
        assert set(CODEGEN_FLAGS) <= set(opts) and set(CODEGEN_FLAGS) <= set(check_kernels.NVCC_FLAGS)
        assert not any(o.startswith(("-I", "--include-path")) for o in opts)  # headers come in memory
        assert {"common.cuh", "quant_formats.cuh", name} <= set(files)
    assert len(fake_cupy.loaded) == 4 and all(Path(p).parent == cache for p in fake_cupy.loaded)
    assert [b.cached for b in lib.builds] == [False] * 4


def test_cubins_are_cached_on_disk_per_arch_and_source(fake_cuda, monkeypatch, tmp_path):
    fake_nvrtc, fake_cupy, cache = fake_cuda
    KernelLibrary(cache=cache).prepare(0, ["Q8_0"])
    assert len(fake_nvrtc.calls) == 2
    again = KernelLibrary(cache=cache)  # a new process: the cubins come from disk
    again.prepare(0, ["Q8_0"])
    assert len(fake_nvrtc.calls) == 2 and all(b.cached for b in again.builds)
    fn = again._function(0, "gemv.cu", FORMATS["Q8_0"], "gemv_q8_0_f16_t3")
    assert again._function(0, "gemv.cu", FORMATS["Q8_0"], "gemv_q8_0_f16_t3") is fn
    assert fake_cupy.functions == ["gemv_q8_0_f16_t3"]  # looked up once
    # another arch compiles anew
    monkeypatch.setitem(sys.modules, "cupy", FakeCupy("90"))
    kernels_mod._import_cupy.cache_clear()
    KernelLibrary(cache=cache).prepare(0, ["Q8_0"])
    assert len(fake_nvrtc.calls) == 4 and "--gpu-architecture=sm_90" in fake_nvrtc.calls[-1][2]
    # an edited kernel file compiles anew
    edited = tmp_path / "kernels"
    shutil.copytree(KERNEL_DIR, edited)
    (edited / "common.cuh").write_text((edited / "common.cuh").read_text() + "\n// edit\n")
    KernelLibrary(edited, cache=cache).prepare(0, ["Q8_0"])
    assert len(fake_nvrtc.calls) == 6
    assert len(list(cache.glob("*.cubin"))) == 6 and not list(cache.glob("*.tmp"))


def test_unsupported_arch_is_a_clear_error(fake_cuda, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", FakeCupy("70"))
    kernels_mod._import_cupy.cache_clear()
    with pytest.raises(KernelError, match="cannot compile for sm_70"):
        KernelLibrary(cache=fake_cuda[2]).prepare(0, ["Q4_0"])


def test_missing_nvrtc_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(compile_mod, "find_nvrtc", lambda: None)
    with pytest.raises(KernelError, match="nvidia-cuda-nvrtc"):
        compile_mod.compile_source("gemv.cu", "sm_89", KERNEL_DIR)


def test_weights_are_checked_once_per_binding(monkeypatch):
    """The weight checks run once per (address, shape, format); each launch checks x and out only."""
    checks, launches = [], []
    real = kernels_mod._check_weights
    monkeypatch.setattr(kernels_mod, "_check_weights", lambda *a: (checks.append(a[1].data_ptr), real(*a)))
    monkeypatch.setattr(KernelLibrary, "_launch", lambda self, src, bw, plan, ptrs, dev, stream: launches.append(plan))
    lib = KernelLibrary()
    n, k = 6, 256
    w = torch.zeros((n, FORMATS["Q4_K"].row_nbytes(k)), dtype=torch.uint8)
    w2 = torch.zeros_like(w)
    for t in (1, 2, 3, 1):
        lib.gemv(torch.zeros((t, k), dtype=torch.float16), w, "Q4_K", n, k)
    lib.dequantize(w, "Q4_K", n, k)
    assert checks == [w.data_ptr()] and len(launches) == 5
    assert [p.kernel for p in launches[:3]] == ["gemv_q4_k_f16_t1", "gemv_q4_k_f16_t2", "gemv_q4_k_f16_t3"]
    lib.gemv(torch.zeros((1, k), dtype=torch.bfloat16), w2, "Q4_K", n, k)
    assert checks == [w.data_ptr(), w2.data_ptr()]
    bound = lib.bind(w, "Q4_K", n, k)
    lib.gemv(torch.zeros((2, k), dtype=torch.float16), bound)
    assert len(checks) == 2 and launches[-1].scalars == (n, k, k, n)
    with pytest.raises(KernelError, match="bound as Q4_K"):
        lib.gemv(torch.zeros((1, k), dtype=torch.float16), bound, "Q6_K", n, k)
    with pytest.raises(KernelError, match="multiple of 256"):  # a bad weight still fails, once bound or not
        lib.gemv(torch.zeros((1, 128), dtype=torch.float16), w[:, :72].contiguous(), "Q4_K", n, 128)
    with pytest.raises(KernelError, match="shape"):  # activations are checked on every call
        lib.gemv(torch.zeros((1, k + 8), dtype=torch.float16), bound)


@pytest.mark.skipif(compile_mod.find_nvrtc() is None, reason="no libnvrtc (pip install nvidia-cuda-nvrtc)")
def test_nvrtc_compiles_a_narrowed_module_without_include_paths(tmp_path):
    fmt = FORMATS["Q8_0"]
    build = compile_mod.compile_source("dequant.cu", "sm_80", KERNEL_DIR, cache=tmp_path,
                                       defines=(formats_define(((fmt.tag, fmt.traits),)),), verbose=True)
    assert build.path.read_bytes()[:4] == b"\x7fELF" and not build.cached
    got = check_kernels.parse_ptxas(build.log, "dequant.cu")
    assert sorted(r.kernel for r in got) == ["dequant_q8_0_bf16", "dequant_q8_0_f16"]
    assert all(not r.problems for r in got)
    assert not any(o.startswith("-I") for o in build.options)
