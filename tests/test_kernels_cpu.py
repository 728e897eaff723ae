"""The CUDA kernel sources, compiled with g++ against kernels/cpu_shim/cuda_cpu.h, run on CPU fibers
and checked against gguf-py + float64 numpy; the shim is shown to catch injected bugs; an
ASan/UBSan build runs in a subprocess.

Tolerances (GEMV, every format): the activations are fp16/bf16 values and the reference uses exactly
those values widened to float64, so the only error left is the kernel's fp32 accumulation (per-group
8-term dots, a per-thread running sum, a 32-lane tree and a cross-warp sum over K <= 4352 terms):
|y - ref| <= 1e-5 * sum_k |w_k x_k| (~170 fp32 ulps of the absolute-value sum). Against fp32
activations before the caller rounds them, the rounding of x adds at most 2^-11 (fp16) or 2^-8
(bf16) of the same sum, which `test_gemv_against_unrounded_activations` checks.
Dequantize: bit-exact with fp16/bf16(gguf dequantize), round to nearest even.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from engine.cuda.cpu_shim import CpuBuildSpec, CpuKernels, PendingBuild, Policy, aligned_empty, exported_kernels
from engine.cuda.kernels import FORMATS, LaunchPlan, expected_kernels
from engine.errors import KernelError
from quant_data import dequantized, random_weights

REPO = Path(__file__).resolve().parents[1]
GEMV_RTOL = {name: 1e-5 for name in FORMATS}  # see module docstring
X_ROUNDING = {"f16": 2.0**-11, "bf16": 2.0**-8}
ONE_FORMAT = "GK_FORMATS(X)=X(q4_k, FmtQ4_K)"  # narrow builds for the bug variants
BUGS = ("GK_BUG_SHFL_LANE", "GK_BUG_NO_SYNC", "GK_BUG_TAIL")

# (T, n, chunks per row, padded strides): chunks decide the warps per block (ceil(chunks/32), max 4;
# 136 chunks also loops twice); odd n leaves a half-empty last block (GEMV_ROWS = 2).
GEMV_CASES = [
    (1, 13, 136, False),
    (2, 7, 24, False),
    (3, 13, 64, True),
    (4, 1, 96, False),
    (5, 13, 136, False),
    (6, 5, 24, True),
    (7, 13, 64, False),
    (8, 7, 96, False),
]


def _specs() -> dict[str, CpuBuildSpec]:
    specs = {
        "gemv": CpuBuildSpec("gemv.cu", opt="-O0"),
        "dequant": CpuBuildSpec("dequant.cu", opt="-O0"),
        "selftest": CpuBuildSpec("cpu_shim/selftest.cu", opt="-O0"),
        "gemv_one": CpuBuildSpec("gemv.cu", defines=(ONE_FORMAT,), opt="-O0"),
        "asan_gemv": CpuBuildSpec("gemv.cu", sanitize=True, opt="-O0"),
        "asan_dequant": CpuBuildSpec("dequant.cu", sanitize=True, opt="-O0"),
        "asan_gemv_tail": CpuBuildSpec("gemv.cu", defines=(ONE_FORMAT, "GK_BUG_TAIL"), sanitize=True, opt="-O0"),
        "dequant_tail": CpuBuildSpec("dequant.cu", defines=("GK_FORMATS(X)=X(q6_k, FmtQ6_K)", "GK_BUG_TAIL"), opt="-O0"),
    }
    for bug in BUGS:
        specs[bug] = CpuBuildSpec("gemv.cu", defines=(ONE_FORMAT, bug), opt="-O0")
    return specs


@pytest.fixture(scope="session")
def builds(tmp_path_factory) -> dict[str, Path]:
    """All CPU builds of the session, compiled concurrently once."""
    out = tmp_path_factory.mktemp("kernels_cpu")
    pending = {name: PendingBuild(spec, out) for name, spec in _specs().items()}
    return {name: p.wait() for name, p in pending.items()}


@pytest.fixture(scope="session")
def gemv_lib(builds) -> CpuKernels:
    return CpuKernels(builds["gemv"])


@pytest.fixture(scope="session")
def dequant_lib(builds) -> CpuKernels:
    return CpuKernels(builds["dequant"])


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def activations(xtype: str, t: int, k: int, stride: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kernel input (t, k) view with row stride `stride`, its exact values as float64, the fp32
    values before rounding)."""
    x32 = rng.standard_normal((t, k)).astype(np.float32)
    buf = aligned_empty((t, stride), np.float16 if xtype == "f16" else np.uint16)
    buf[...] = 0
    x = buf[:, :k]
    if xtype == "f16":
        x[...] = x32.astype(np.float16)
        exact = x.astype(np.float64)
    else:
        bits = gguf.quants.quantize(x32, QT.BF16).view(np.uint16)
        x[...] = bits
        exact = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return x, exact, x32.astype(np.float64)


def place(raw: np.ndarray, pad: int = 0) -> np.ndarray:
    """A 64-byte aligned copy, optionally with `pad` readable bytes after it."""
    w = aligned_empty(raw.shape, np.uint8, pad_bytes=pad)
    w[...] = raw
    return w


def chunk_k(fmt: str, chunks: int) -> int:
    spec = FORMATS[fmt]
    return max(spec.k_multiple, chunks * spec.chunk // spec.k_multiple * spec.k_multiple)


# A NaN with a payload no computation yields (arithmetic on finite inputs or on the garbage past the
# weights makes the default NaN): an unwritten output stays NaN, and a guard word is intact only if no
# store reached it -- a kernel storing a computed NaN there is still caught.
GUARD_BITS = np.uint32(0x7FA5A5A5)


def gemv_errors(lib: CpuKernels, fmt: str, xtype: str, rng, *, policy=Policy.FORWARD, seed=0, workers=1,
                cases=GEMV_CASES) -> list[str]:
    """Runs the GEMV cases; returns what went wrong (empty = all within tolerance, guards intact)."""
    problems = []
    for t, n, chunks, padded in cases:
        k = chunk_k(fmt, chunks)
        raw = random_weights(fmt, n, k, rng)
        wf = dequantized(fmt, raw, n, k).astype(np.float64)
        x, x_exact, _ = activations(xtype, t, k, k + 8 if padded else k, rng)
        y_stride = n + 3 if padded else n
        ybuf = aligned_empty((t + 1, y_stride), np.float32)  # one guard row after the output
        guard = ybuf.view(np.uint32)
        guard[...] = GUARD_BITS
        y = ybuf[:t, :n]
        w = place(raw, pad=4096)  # a tail overrun reads padding, not unmapped memory
        lib.gemv(w, x, fmt, n, k, xtype=xtype, out=y, policy=policy, seed=seed, workers=workers)
        ref = x_exact @ wf.T
        mag = np.abs(x_exact) @ np.abs(wf).T
        err = np.abs(y.astype(np.float64) - ref)
        bad = ~(err <= GEMV_RTOL[fmt] * mag + 1e-30)
        if bad.any():
            problems.append(f"T={t} n={n} k={k}: {int(bad.sum())} outputs off, worst rel {np.nanmax(err / (mag + 1e-30)):.2e}")
        if not (guard[t] == GUARD_BITS).all() or (y_stride > n and not (guard[:t, n:] == GUARD_BITS).all()):
            problems.append(f"T={t} n={n} k={k}: wrote outside the output")
    return problems


# ---------------------------------------------------------------------------------------------
# Correctness of every kernel
# ---------------------------------------------------------------------------------------------
def test_exports_match_launcher_tables(builds):
    assert exported_kernels(builds["gemv"]) == sorted(expected_kernels("gemv.cu"))
    assert exported_kernels(builds["dequant"]) == sorted(expected_kernels("dequant.cu"))


@pytest.mark.parametrize("xtype", ["f16", "bf16"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_gemv_matches_reference(gemv_lib, fmt, xtype):
    rng = np.random.default_rng(zlib.crc32(f"{fmt}/{xtype}".encode()))
    assert gemv_errors(gemv_lib, fmt, xtype, rng) == []


@pytest.mark.parametrize("xtype", ["f16", "bf16"])
def test_gemv_against_unrounded_activations(gemv_lib, xtype):
    """The model-level error: the caller rounds fp32 activations to fp16/bf16."""
    rng = np.random.default_rng(7)
    n, k = 9, 1024
    raw = random_weights("Q4_K", n, k, rng)
    wf = dequantized("Q4_K", raw, n, k).astype(np.float64)
    x, _, x32 = activations(xtype, 4, k, k, rng)
    y = gemv_lib.gemv(place(raw), x, "Q4_K", n, k, xtype=xtype)
    mag = np.abs(x32) @ np.abs(wf).T
    err = np.abs(y - x32 @ wf.T)
    assert (err <= (X_ROUNDING[xtype] + GEMV_RTOL["Q4_K"]) * mag).all()


@pytest.mark.parametrize("otype", ["f16", "bf16"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dequant_bit_exact(dequant_lib, fmt, otype):
    rng = np.random.default_rng(11)
    n = 7
    k = chunk_k(fmt, 136)
    raw = random_weights(fmt, n, k, rng)
    wf = dequantized(fmt, raw, n, k)
    if otype == "f16":
        expect = wf.astype(np.float16).view(np.uint16)
    else:
        expect = gguf.quants.quantize(wf, QT.BF16).view(np.uint16).reshape(n, k)
    for max_blocks in (None, 2):  # 2 blocks of 256 threads: the grid-stride loop runs several times
        obuf = aligned_empty((n + 1, k + 8), np.uint16)
        obuf[...] = 0xFFFF
        out = obuf[:n, :k].view(np.float16) if otype == "f16" else obuf[:n, :k]
        dequant_lib.dequantize(place(raw), fmt, n, k, otype=otype, out=out, max_blocks=max_blocks)
        np.testing.assert_array_equal(obuf[:n, :k], expect)
        assert (obuf[n] == 0xFFFF).all() and (obuf[:, k:] == 0xFFFF).all()


def test_schedules_and_workers_agree_bitwise(gemv_lib):
    """The kernel's arithmetic order does not depend on thread scheduling, so every policy and a
    multi-worker run give the same bits."""
    rng = np.random.default_rng(3)
    n, k = 11, 2048
    raw = place(random_weights("Q5_K", n, k, rng))
    x, _, _ = activations("f16", 5, k, k, rng)
    runs = [gemv_lib.gemv(raw, x, "Q5_K", n, k, policy=p, seed=s, workers=wk)
            for p, s, wk in [(Policy.FORWARD, 0, 1), (Policy.REVERSE, 0, 1), (Policy.RANDOM, 1, 1),
                             (Policy.RANDOM, 2, 2)]]
    for r in runs[1:]:
        np.testing.assert_array_equal(r, runs[0])


# ---------------------------------------------------------------------------------------------
# The shim catches bugs
# ---------------------------------------------------------------------------------------------
BUG_CASES = [(1, 7, 136, False), (8, 5, 64, False)]  # several warps, odd n


def test_bug_harness_passes_the_correct_kernel(builds):
    lib = CpuKernels(builds["gemv_one"])
    for policy in Policy:
        assert gemv_errors(lib, "Q4_K", "f16", np.random.default_rng(5), policy=policy, cases=BUG_CASES) == []


def test_wrong_shuffle_lane_is_caught(builds):
    lib = CpuKernels(builds["GK_BUG_SHFL_LANE"])
    problems = gemv_errors(lib, "Q4_K", "f16", np.random.default_rng(5), cases=BUG_CASES)
    assert len(problems) == len(BUG_CASES), problems


def test_missing_syncthreads_is_caught(builds):
    """Forward scheduling runs warp 0 to the cross-warp sum before the other warps have written
    their partials; without the barrier it reads stale shared memory."""
    lib = CpuKernels(builds["GK_BUG_NO_SYNC"])
    problems = gemv_errors(lib, "Q4_K", "f16", np.random.default_rng(5), policy=Policy.FORWARD, cases=BUG_CASES)
    assert len(problems) == len(BUG_CASES), problems


def test_off_by_one_tail_is_caught(builds):
    lib = CpuKernels(builds["GK_BUG_TAIL"])
    problems = gemv_errors(lib, "Q4_K", "f16", np.random.default_rng(5), cases=BUG_CASES)
    assert any("outside the output" in p for p in problems), problems
    assert len(problems) >= len(BUG_CASES)


def test_dequant_tail_overrun_is_caught(builds):
    lib = CpuKernels(builds["dequant_tail"])
    rng = np.random.default_rng(2)
    n, k = 3, 512
    raw = random_weights("Q6_K", n, k, rng)
    obuf = aligned_empty((n + 1, k), np.float16)
    obuf[...] = np.float16(7.0)
    lib.dequantize(place(raw, pad=4096), "Q6_K", n, k, out=obuf[:n])
    np.testing.assert_array_equal(obuf[:n], dequantized("Q6_K", raw, n, k).astype(np.float16))
    assert not (obuf[n] == np.float16(7.0)).all()  # the overrun wrote into the guard row


# ---------------------------------------------------------------------------------------------
# Shim semantics (kernels/cpu_shim/selftest.cu)
# ---------------------------------------------------------------------------------------------
def _probe(lib: CpuKernels, kernel: str, grid, block, out: np.ndarray, **kw) -> None:
    lib.launch("cuda_cpu_launch_probe", LaunchPlan(kernel, grid, block, ()), [out.ctypes.data],
               policy=kw.get("policy", Policy.FORWARD), seed=kw.get("seed", 0), workers=kw.get("workers", 1))


def _expected_warp_probe(nblocks: int, nt: int) -> np.ndarray:
    """CUDA programming-guide semantics for the probe's warp ops, lanes = linear id % 32."""
    rows = []
    for b in range(nblocks):
        for t in range(nt):
            lane, base = t % 32, t - t % 32

            ballot = sum(1 << ln for ln in range(32) if (base + ln) & 1)
            rows.append([
                b, t,
                base + (lane ^ 1),
                t + 3 if lane + 3 < 32 else t,
                t - 2 if lane % 8 >= 2 else t,
                base + (lane & ~15) + 5,
                ballot, 1, 0,
                base + (lane ^ 16),
            ])
    return np.array(rows, dtype=np.uint32)


@pytest.mark.parametrize("policy", list(Policy))
def test_shim_warp_ops_follow_cuda_semantics_in_3d_blocks(builds, policy):
    lib = CpuKernels(builds["selftest"])
    grid, block = (2, 1, 2), (8, 4, 2)  # 64 threads = 2 warps spanning y and z
    out = np.zeros((4 * 64, 10), np.uint32)
    _probe(lib, "probe_warp", grid, block, out, policy=policy, seed=9)
    np.testing.assert_array_equal(out, _expected_warp_probe(4, 64))


def test_shim_barrier_and_shared_memory(builds):
    lib = CpuKernels(builds["selftest"])
    nt, nb = 96, 3
    for policy in Policy:
        out = np.zeros(nb * nt, np.uint32)
        _probe(lib, "probe_barrier", (nb, 1, 1), (32, 3, 1), out, policy=policy, seed=1, workers=2)
        t = np.arange(nt)
        np.testing.assert_array_equal(out.reshape(nb, nt), ((t + 1) % nt) ** 2 + np.arange(nb)[:, None])


def test_shim_atomics_across_workers(builds):
    lib = CpuKernels(builds["selftest"])
    out = np.zeros(2, np.uint32)
    _probe(lib, "probe_atomics", (5, 2, 1), (64, 1, 1), out, workers=2)
    assert out.tolist() == [640, 639]


@pytest.mark.parametrize(("kernel", "message"), [
    ("probe_divergent_barrier", "deadlock"),
    ("probe_bad_shuffle", "not in mask"),
])
def test_shim_reports_invalid_synchronisation(builds, kernel, message):
    lib = CpuKernels(builds["selftest"])
    out = np.zeros(32, np.uint32)
    with pytest.raises(KernelError, match=message):
        _probe(lib, kernel, (1, 1, 1), (32, 1, 1), out)


# ---------------------------------------------------------------------------------------------
# AddressSanitizer + UBSan (subprocess: libasan must be preloaded before Python starts)
# ---------------------------------------------------------------------------------------------
_ASAN_DRIVER = r"""
import sys, numpy as np
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import tests.test_kernels_cpu as tk
from engine.cuda.cpu_shim import CpuKernels
from engine.cuda.kernels import FORMATS, LaunchPlan
mode, lib_path = sys.argv[2], sys.argv[3]
lib = CpuKernels(lib_path)
rng = np.random.default_rng(0)
def exact(raw):  # an exactly sized malloc'd copy: overruns hit ASan's redzone
    return np.array(raw, dtype=np.uint8, order="C", copy=True)
if mode == "gemv":
    for fmt in FORMATS:
        for xtype in ("f16", "bf16"):
            for t, n in ((1, 5), (8, 3)):
                k = tk.chunk_k(fmt, 40)
                raw = tk.random_weights(fmt, n, k, rng)
                x, xe, _ = tk.activations(xtype, t, k, k, rng)
                y = np.empty((t, n), np.float32)
                lib.gemv(exact(raw), x, fmt, n, k, xtype=xtype, out=y)
                ref = xe @ tk.dequantized(fmt, raw, n, k).astype(np.float64).T
                assert np.allclose(y, ref, rtol=1e-4, atol=1e-3), fmt
elif mode == "dequant":
    for fmt in FORMATS:
        for otype in ("f16", "bf16"):
            n, k = 3, tk.chunk_k(fmt, 40)
            raw = tk.random_weights(fmt, n, k, rng)
            out = np.empty((n, k), np.float16 if otype == "f16" else np.uint16)
            lib.dequantize(exact(raw), fmt, n, k, otype=otype, out=out)
elif mode == "tail":
    n, k = 5, 512
    x, _, _ = tk.activations("f16", 2, k, k, rng)
    lib.gemv(exact(tk.random_weights("Q4_K", n, k, rng)), x, "Q4_K", n, k)
elif mode == "misaligned":  # bypass the planner's alignment check: x off a 16-byte boundary
    n, k = 2, 256
    buf = tk.aligned_empty((1, k + 8), np.float16)
    w = exact(tk.random_weights("Q4_K", n, k, rng))
    y = np.empty((1, n), np.float32)
    plan = LaunchPlan("gemv_q4_k_f16_t1", (1, 1, 1), (32, 1, 1), (n, k, k, n))
    lib.launch("cuda_cpu_launch_gemv", plan, [w.ctypes.data, buf.ctypes.data + 8, y.ctypes.data],
               policy=0, seed=0, workers=1)
print("DRIVER-DONE")
"""


def _run_sanitized(mode: str, lib: Path) -> subprocess.CompletedProcess:
    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1")
    return subprocess.run([sys.executable, "-c", _ASAN_DRIVER, str(REPO), mode, str(lib)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mode", ["gemv", "dequant"])
def test_asan_clean_run_of_every_kernel(builds, mode):
    proc = _run_sanitized(mode, builds[f"asan_{mode}"])
    assert proc.returncode == 0 and "DRIVER-DONE" in proc.stdout, proc.stderr[-3000:]
    assert "ERROR: AddressSanitizer" not in proc.stderr and "runtime error" not in proc.stderr


def test_asan_catches_tail_overrun(builds):
    proc = _run_sanitized("tail", builds["asan_gemv_tail"])
    assert proc.returncode != 0 and "DRIVER-DONE" not in proc.stdout
    assert "heap-buffer-overflow" in proc.stderr, proc.stderr[-3000:]


def test_ubsan_catches_misaligned_vector_load(builds):
    """The planner's 16-byte alignment rule for x is real: a 128-bit load from x + 8 bytes faults on
    a GPU and is undefined behaviour here."""
    proc = _run_sanitized("misaligned", builds["asan_gemv"])
    assert proc.returncode != 0 and "DRIVER-DONE" not in proc.stdout
    assert "misaligned address" in proc.stderr, proc.stderr[-3000:]
