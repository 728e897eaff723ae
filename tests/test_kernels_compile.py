"""Compile gate: every kernel source builds with nvcc for sm_80/86/89/90 with warnings as errors,
0 spills, no stack frame, registers within budget (scripts/check_kernels.py)."""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from engine.cuda.kernels import ARCHS, FORMATS, SOURCES, expected_kernels, register_budget

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
