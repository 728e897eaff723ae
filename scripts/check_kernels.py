#!/usr/bin/env python3
"""Compile gate for the CUDA kernels: every kernels/*.cu with nvcc -cubin for each arch in ARCHS,
warnings as errors, then the ptxas report must show, for every entry point,
  0 bytes spill stores / loads, 0 bytes stack frame (no local memory), registers <= budget
(budgets: engine.cuda.kernels.register_budget), and exactly the entry points the launchers expect.

Both compilers get engine.cuda.compile.CODEGEN_FLAGS (notably -ftz=false), the flags the engine
compiles with at run time. When an NVRTC library is found (the nvidia-cuda-nvrtc wheel, or a CUDA
toolkit), each source is also compiled through engine.cuda.compile.compile_source -- the run-time
build itself: NVRTC, the kernel files as in-memory headers and no include path (so no CUDA toolkit
header is needed) -- for NVRTC_ARCH, and its ptxas report is held to the same rules.

Usage: python scripts/check_kernels.py [--json] [--jobs N] [--arch sm_80 ...]
Exit status 0 when everything passes, 1 on a violation, 2 when nvcc is missing.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cuda.compile import CODEGEN_FLAGS, compile_source, find_nvrtc  # noqa: E402
from engine.cuda.kernels import ARCHS, KERNEL_DIR, SOURCES, expected_kernels, register_budget  # noqa: E402
from engine.errors import KernelError  # noqa: E402

NVCC_FLAGS = ("-cubin", "-O3", *CODEGEN_FLAGS, "-Xptxas", "-v", "--Werror", "all-warnings")
NVRTC_ARCH = "sm_89"


@dataclass(frozen=True, slots=True)
class KernelReport:
    source: str
    arch: str
    kernel: str
    registers: int
    budget: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    smem_bytes: int

    @property
    def problems(self) -> list[str]:
        out = []
        if self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores}/{self.spill_loads} bytes")
        if self.stack_bytes:
            out.append(f"stack frame {self.stack_bytes} bytes")
        if self.registers > self.budget:
            out.append(f"{self.registers} registers > budget {self.budget}")
        return out


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def parse_ptxas(text: str, source: str) -> list[KernelReport]:
    """Per-entry-point numbers from `ptxas -v` output (the line order ptxas 12/13 prints)."""
    reports, kernel, arch, props = [], None, None, None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            kernel, arch, props = m.group(1), m.group(2), None
        elif (m := _PROPS.search(line)) and kernel:
            props = tuple(int(g) for g in m.groups())
        elif (m := _USED.search(line)) and kernel and props is not None:
            reports.append(
                KernelReport(source, arch, kernel, int(m.group(1)), register_budget(kernel), props[0], props[1],
                             props[2], int(m.group(2) or 0))
            )
            kernel = None
    return reports


def compile_one(source: str, arch: str, out_dir: Path) -> tuple[str, str, int, str, float]:
    cmd = ["nvcc", *NVCC_FLAGS, f"-arch={arch}", f"-I{KERNEL_DIR}", str(KERNEL_DIR / source),
           "-o", str(out_dir / f"{Path(source).stem}.{arch}.cubin")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return source, arch, proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def nvrtc_compile(source: str, arch: str, cache: Path) -> tuple[bool, str, float]:
    """The run-time build of one whole source (every entry point), with ptxas's report in its log."""
    t0 = time.perf_counter()
    try:
        build = compile_source(source, arch, KERNEL_DIR, verbose=True, cache=cache)
    except KernelError as e:
        return False, str(e), time.perf_counter() - t0
    warnings = [line for line in build.log.splitlines() if "warning" in line.lower()]
    return not warnings, build.log, time.perf_counter() - t0


def run_gate(archs=ARCHS, jobs: int = 2) -> dict:
    if shutil.which("nvcc") is None:
        return {"error": "nvcc not found on PATH"}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=jobs) as pool:
        # biggest first so the parallel jobs finish together
        jobs_list = [(s, a) for s in sorted(SOURCES, key=lambda s: s != "gemv.cu") for a in archs]
        nvrtc = find_nvrtc()
        nvrtc_futures = {s: pool.submit(nvrtc_compile, s, NVRTC_ARCH, Path(tmp)) for s in SOURCES} if nvrtc else {}
        results = list(pool.map(lambda sa: compile_one(*sa, Path(tmp)), jobs_list))
        nvrtc_results = {s: f.result() for s, f in nvrtc_futures.items()}
    failures, reports, nvrtc_reports, timings = [], [], [], {}
    for source, (ok, log, seconds) in nvrtc_results.items():
        timings[f"{source}:nvrtc-{NVRTC_ARCH}"] = round(seconds, 2)
        if not ok:
            failures.append(f"{source}: NVRTC compile failed:\n{log[-3000:]}")
            continue
        got = parse_ptxas(log, source)
        nvrtc_reports += got
        if {r.kernel for r in got} != set(expected_kernels(source)):
            failures.append(f"{source} NVRTC: entry points differ from the launchers' table")
    for source, arch, rc, log, seconds in results:
        timings[f"{source}:{arch}"] = round(seconds, 2)
        if rc != 0:
            failures.append(f"{source} {arch}: nvcc failed (rc {rc}):\n{log[-3000:]}")
            continue
        got = parse_ptxas(log, source)
        reports += got
        names = {r.kernel for r in got}
        expected = set(expected_kernels(source))
        if names != expected:
            failures.append(f"{source} {arch}: entry points differ: missing {sorted(expected - names)[:5]}, "
                            f"unexpected {sorted(names - expected)[:5]}")
    for r in reports:
        for p in r.problems:
            failures.append(f"{r.source} {r.arch} {r.kernel}: {p}")
    for r in nvrtc_reports:
        for p in r.problems:
            failures.append(f"{r.source} NVRTC {r.arch} {r.kernel}: {p}")
    return {
        "ok": not failures,
        "failures": failures,
        "archs": list(archs),
        "nvrtc": ({s: {"arch": NVRTC_ARCH, "ok": r[0], "library": nvrtc.path,
                       "version": ".".join(map(str, nvrtc.version))} for s, r in nvrtc_results.items()}
                  or "libnvrtc not found"),
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "compile_seconds": timings,
        "kernels": [asdict(r) for r in reports],
        "nvrtc_kernels": [asdict(r) for r in nvrtc_reports],
    }


def table(result: dict) -> str:
    """One row per kernel: registers per arch / budget, max spill bytes, max stack bytes."""
    rows: dict[str, dict] = {}
    for r in result["kernels"]:
        row = rows.setdefault(r["kernel"], {"budget": r["budget"], "regs": {}, "spill": 0, "stack": 0})
        row["regs"][r["arch"]] = r["registers"]
        row["spill"] = max(row["spill"], r["spill_stores"] + r["spill_loads"])
        row["stack"] = max(row["stack"], r["stack_bytes"])
    archs = result["archs"]
    lines = [f"{'kernel':26s} " + " ".join(f"{a:>6s}" for a in archs) + "  budget  spill  stack"]
    for name in sorted(rows):
        row = rows[name]
        regs = " ".join(f"{row['regs'].get(a, '-'):>6}" for a in archs)
        lines.append(f"{name:26s} {regs}  {row['budget']:>6}  {row['spill']:>5}  {row['stack']:>5}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the full result as JSON")
    ap.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes (default 2)")
    ap.add_argument("--arch", action="append", choices=ARCHS, help="limit to these archs (repeatable)")
    args = ap.parse_args(argv)
    result = run_gate(tuple(args.arch or ARCHS), args.jobs)
    if "error" in result:
        print(json.dumps(result) if args.json else result["error"])
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(table(result))
        print(f"\n{len(result['kernels'])} kernel builds, {len(result['archs'])} archs, "
              f"wall {result['wall_seconds']} s; per file/arch: {result['compile_seconds']}")
        for f in result["failures"]:
            print("FAIL:", f)
        print("PASS" if result["ok"] else "FAILED")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
