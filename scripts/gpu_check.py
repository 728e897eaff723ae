#!/usr/bin/env python3
"""The steps of scripts/gpu_check.sh (one prepared run on one CUDA GPU). Each step writes its own
file under OUT; `record` adds a step's outcome to OUT/summary.json, so every step is accounted for,
whether it passed, failed or ran out of time. A step that cannot do its work raises: the error is
recorded, never skipped silently.

    python scripts/gpu_check.py STEP OUT [--dry-run]
    STEP: env | warm | memcheck | parity | decode | bench | record NAME RC SECONDS LIMIT | finish

--dry-run runs the same steps on the CPU with tiny models (what CI checks: the files appear and every
step is recorded); the GPU-only steps then record why they could not run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))

# The files a run leaves in OUT (the device tool brings back at most 8).
FILES = ("summary.json", "steps.log", "pytest_gpu.log", "sanitizer.log", "parity.json", "decode.json",
         "trace70b.json", "bench.json")
# in order of what a short run must not lose: pytest -m gpu (the longest) gets what is left at the end
STEPS = ("setup", "env", "warm", "memcheck", "parity", "decode", "bench", "pytest")
# decode: each model in each placement; "hybrid" plans with the h100 preset's host-CPU rates (an
# uncalibrated CUDA profile has none, so its planner never computes a layer on the CPU)
DECODE_MODES = {
    "resident": {},
    "streamed": {"resident_budget": "30%", "host_budget": "16GiB", "hybrid_compute": "off"},
    "hybrid": {"resident_budget": "30%", "host_budget": "16GiB", "hybrid_compute": "auto", "hardware": "h100"},
}

# Llama-3-70B block shapes (dim 8192, FFN 28672, 64 query / 8 KV heads of 128).
LLAMA70B = dict(dim=8192, ffn=28672, n_heads=64, n_kv_heads=8)
# SmolLM2-135M shapes (dim 576, FFN 1536, 9 / 3 heads of 64, 30 blocks, vocab 49152), Q4_1 like the bundled GGUF.
SMOLLM2 = dict(n_layers=30, dim=576, ffn=1536, n_heads=9, n_kv_heads=3, vocab=49152, ctx=2048, rope_base=100000.0,
               block_fmt="Q4_1", embd_fmt="Q8_0", output_fmt="Q8_0")


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _version(module: str):
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "installed")
    except Exception as e:  # noqa: BLE001 - recorded, not raised
        return f"unavailable: {type(e).__name__}: {e}"


def _run(cmd: list[str], timeout: float = 30) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {e}"


# ---------------------------------------------------------------------------------------------
# env
# ---------------------------------------------------------------------------------------------
def step_env(out: Path, dry: bool) -> dict:
    import torch

    from engine.cuda.compile import find_nvrtc

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cupy": _version("cupy"),
           "gguf": _version("gguf"), "kvikio": _version("kvikio"), "pynvml": _version("pynvml"),
           "nvidia_smi": _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,pcie.link.gen.max,"
                               "pcie.link.width.max,clocks.max.sm,clocks.max.mem", "--format=csv,noheader"]),
           "nvcc": _run(["nvcc", "--version"]).splitlines()[-1:] or None,
           "compute_sanitizer": shutil.which("compute-sanitizer")}
    lib = find_nvrtc()
    env["nvrtc"] = {"path": lib.path, "version": lib.version} if lib else "not found"
    env["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "capability": f"sm_{p.major}{p.minor}", "memory_bytes": p.total_memory,
                      "multiprocessors": p.multi_processor_count}
        try:
            import cupy

            env["cupy_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            env["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
        except Exception as e:  # noqa: BLE001
            env["cupy_error"] = f"{type(e).__name__}: {e}"
    summary = _load_summary(out)
    summary["environment"] = env
    write_json(out / "summary.json", summary)
    print(json.dumps(env, indent=1, default=str))
    if not dry and not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
    return env


# ---------------------------------------------------------------------------------------------
# warm: every kernel module for this GPU, compiled in parallel into the run's cubin cache
# ---------------------------------------------------------------------------------------------
def device_arch(dry: bool) -> str:
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return f"sm_{major}{minor}"
    if dry:
        return "sm_89"
    raise RuntimeError("no CUDA device")


def step_warm(out: Path, dry: bool) -> dict:
    from engine.cuda.compile import compile_source, formats_define
    from engine.cuda.kernels import FORMATS, KERNEL_DIR, SOURCES

    arch = device_arch(dry)
    fmts = [FORMATS["Q8_0"]] if dry else list(FORMATS.values())
    jobs = [(s, f) for f in fmts for s in (("dequant.cu",) if dry else SOURCES)]
    t0 = time.perf_counter()

    def build(job):
        source, fmt = job
        b = compile_source(source, arch, KERNEL_DIR, defines=(formats_define(((fmt.tag, fmt.traits),)),))
        return {"source": source, "format": fmt.name, "cached": b.cached, "cubin": b.path.name}

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:  # NVRTC runs outside the GIL
        built = list(pool.map(build, jobs))
    result = {"arch": arch, "modules": len(built), "seconds": round(time.perf_counter() - t0, 2), "builds": built}
    print(json.dumps(result))
    return result


# ---------------------------------------------------------------------------------------------
# memcheck target: one GEMV (and one dequantize) per format, checked against float64; run by the
# shell under compute-sanitizer --tool memcheck
# ---------------------------------------------------------------------------------------------
def step_memcheck(out: Path, dry: bool) -> dict:
    import numpy as np
    import torch

    from engine.cuda.kernels import FORMATS, KernelLibrary
    from quant_data import dequantized, random_weights

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: nothing for compute-sanitizer to check")
    lib = KernelLibrary()
    rng = np.random.default_rng(3)
    failures, done = [], []
    for fmt in FORMATS.values():
        n, k = 67, 2 * max(256, fmt.k_multiple)  # odd n: a half-empty last block
        raw = random_weights(fmt.name, n, k, rng)
        wf = dequantized(fmt.name, raw, n, k).astype(np.float64)
        w = torch.from_numpy(raw).cuda()
        x = torch.randn((3, k), dtype=torch.float16, device="cuda")
        y = lib.gemv(x, w, fmt.name, n, k)
        d = lib.dequantize(w, fmt.name, n, k, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        xe = x.double().cpu().numpy()
        err = np.abs(y.double().cpu().numpy() - xe @ wf.T).max() / max(1e-30, np.abs(xe) @ np.abs(wf).T).max()
        if not err < 1e-5:
            failures.append(f"{fmt.name} gemv relative error {err:.2e}")
        if not torch.equal(d.cpu().view(torch.int16), torch.from_numpy(wf.astype(np.float32)).bfloat16().view(torch.int16)):
            failures.append(f"{fmt.name} dequantize differs from gguf-py")
        done.append(fmt.name)
    print(json.dumps({"formats": done, "failures": failures}))
    if failures:
        raise RuntimeError("; ".join(failures))
    return {"formats": done}


# ---------------------------------------------------------------------------------------------
# parity: CPU vs CUDA greedy tokens and logits
# ---------------------------------------------------------------------------------------------
def greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens through the decode path (one token per pass, KV cache kept)."""
    return run_greedy(model, prompt, n)[2]


def compare(ref_logits, got_logits, ref_ids, got_ids, tie: float) -> dict:
    """Teacher-forced logits (T, vocab) of the same tokens, and free-running greedy ids."""
    import numpy as np

    diff = np.abs(got_logits.astype(np.float64) - ref_logits)
    top2 = np.sort(ref_logits, axis=-1)[:, -2:]
    near_tie = (top2[:, 1] - top2[:, 0]) < tie
    agree = (got_logits.argmax(-1) == ref_logits.argmax(-1)) | near_tie
    first = next((i for i, (a, b) in enumerate(zip(ref_ids, got_ids)) if a != b), None)
    return {"max_abs_logit_error": float(diff.max()), "max_rel_logit_error": float(diff.max() / np.abs(ref_logits).max()),
            "argmax_agree": float(agree.mean()), "near_ties": int(near_tie.sum()), "greedy_equal": ref_ids == got_ids,
            "first_greedy_mismatch": first, "greedy_ids": got_ids}


def parity_models(work: Path, dry: bool) -> list[tuple[str, Path, str]]:
    """(name, GGUF path, the weights budget that makes it stream)."""
    from gguf import GGMLQuantizationType as QT

    from make_synthetic_model import SyntheticConfig, write_synthetic_model
    from tiny_llama import TinyConfig, write_tiny_llama

    tiny = {"tiny-q8_0": TinyConfig(),
            "tiny-kquants": TinyConfig(fmt=(QT.Q4_K, QT.Q5_K, QT.Q6_K), embd_fmt=QT.Q6_K, tied=False),
            "tiny-legacy": TinyConfig(fmt=(QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1), rope_freqs=True)}
    models = [(name, write_tiny_llama(work / f"{name}.gguf", cfg), "60%") for name, cfg in tiny.items()]
    smol = SyntheticConfig(**{**SMOLLM2, **({"n_layers": 2} if dry else {})})
    models.append(("smollm2-shaped", write_synthetic_model(work / "smollm2-shaped.gguf", smol), "40%"))
    return models


def step_parity(out: Path, dry: bool, work: Path) -> dict:
    import numpy as np

    from engine.model import Model

    device = "cpu" if dry else "cuda"
    n_prompt, n_new = 12, (4 if dry else 16)
    report = {"device": device + (" (dry run: CPU against CPU)" if dry else ""), "tie_threshold": 0.05,
              "models": {}}
    failures = []
    for name, path, budget in parity_models(work, dry):
        entry = report["models"][name] = {}
        modes = {"resident": {"device": device}, "streamed": {"device": device, "resident_budget": budget}}
        try:
            with Model.load(path, {"device": "cpu"}) as cpu:
                vocab = cpu.spec.vocab_size
                prompt = [int(t) for t in np.random.default_rng(7).integers(0, vocab, n_prompt)]
                ref_ids = greedy(cpu, prompt, n_new)
                ref_logits = cpu.logits(prompt + ref_ids).astype(np.float64)
            entry["cpu_greedy_ids"] = ref_ids
        except Exception as e:  # noqa: BLE001 - recorded
            entry["error"] = f"CPU reference: {type(e).__name__}: {e}"
            failures.append(f"{name}: {entry['error']}")
            continue
        for mode, cfg in modes.items():
            try:
                t0 = time.perf_counter()
                with Model.load(path, cfg) as m:
                    got_ids = greedy(m, prompt, n_new)
                    got_logits = np.asarray(m.logits(prompt + ref_ids))
                    plan = m.plan_summary()
                r = compare(ref_logits, got_logits, ref_ids, got_ids, report["tie_threshold"])
                r.update(plan=plan, seconds=round(time.perf_counter() - t0, 2))
                entry[mode] = r
                if r["argmax_agree"] < 1.0 or r["max_rel_logit_error"] > 5e-2:
                    failures.append(f"{name} {mode}: argmax agreement {r['argmax_agree']:.3f}, "
                                    f"max relative logit error {r['max_rel_logit_error']:.2e}")
            except Exception as e:  # noqa: BLE001 - recorded, and the step fails
                entry[mode] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
                failures.append(f"{name} {mode}: {type(e).__name__}: {e}")
    report["failures"] = failures
    write_json(out / "parity.json", report)
    if failures:
        raise RuntimeError(f"{len(failures)} parity failures: {failures[0]}")
    return report


# ---------------------------------------------------------------------------------------------
# decode: tok/s of a SmolLM2-shaped model and 4 Llama-70B-shaped blocks, resident, streamed, hybrid
# ---------------------------------------------------------------------------------------------
def trace_summary(path: Path) -> dict:
    """Per span kind (first word of the name): count and total ms; and how much of the non-compute
    time (reads, uploads, waits) overlapped compute spans."""
    events = [e for e in json.loads(path.read_text()).get("traceEvents", []) if e.get("ph") == "X"]
    kinds: dict[str, dict] = {}
    for e in events:
        k = kinds.setdefault(e["name"].split()[0], {"count": 0, "ms": 0.0})
        k["count"] += 1
        k["ms"] += e.get("dur", 0) / 1e3
    compute = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e["name"].startswith("compute"))
    moved = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events
             if e["name"].split()[0] in ("read", "upload", "copy", "h2d")]
    total = sum(b - a for a, b in moved)
    inside = sum(max(0.0, min(b, d) - max(a, c)) for a, b in moved for c, d in compute)
    return {"spans": kinds, "transfer_ms": total / 1e3,
            "transfer_overlapping_compute": (inside / total) if total else None}


def decode_models(work: Path, dry: bool) -> dict[str, tuple[Path, int]]:
    """name -> (GGUF path, vocab): a SmolLM2-shaped model and 4 Llama-70B-shaped blocks (tiny on the CPU)."""
    from make_synthetic_model import SyntheticConfig, write_synthetic_model

    shape = dict(dim=256, ffn=512, n_heads=4, n_kv_heads=2, vocab=1024) if dry else dict(LLAMA70B)
    models = {"llama70b-4blocks": SyntheticConfig(n_layers=4, **shape),
              "smollm2-shaped": SyntheticConfig(**{**SMOLLM2, **({"n_layers": 2} if dry else {})})}
    out = {}
    for name, cfg in models.items():
        path = work / f"{name}.gguf"
        if not path.exists():  # parity wrote the SmolLM2-shaped one already
            write_synthetic_model(path, cfg)
        out[name] = (path, cfg.vocab)
    return out


def step_decode(out: Path, dry: bool, work: Path) -> dict:
    """Decode tok/s of each model resident, streamed from the host tier (hybrid off) and hybrid (host
    layers computed on the CPU at decode): bytes moved per token, achieved GB/s against the plan's
    prediction; the 70B-shaped streamed run writes the engine trace and its copy/compute overlap."""
    import numpy as np
    import torch

    from engine.model import Model

    sync = torch.cuda.synchronize if torch.cuda.is_available() and not dry else (lambda: None)
    n_prompt, n_new = 8, (3 if dry else 24)
    report, failures = {"device": "cpu (dry run)" if dry else "cuda", "modes": DECODE_MODES, "runs": {}}, []
    for name, (path, vocab) in decode_models(work, dry).items():
        prompt = [int(t) for t in np.random.default_rng(1).integers(0, vocab, n_prompt)]
        for mode, extra in DECODE_MODES.items():
            key = f"{name}/{mode}"
            if dry and mode == "hybrid":
                report["runs"][key] = {"not_run": "hybrid compute needs a CUDA device (the CPU has no host tier)"}
                continue
            config = {"device": "cpu" if dry else "cuda", "kv_cache": {"max_context": 512}, **extra}
            trace = out / "trace70b.json" if (name, mode) == ("llama70b-4blocks", "streamed") else None
            r = report["runs"][key] = {"config": config}
            try:
                t0 = time.perf_counter()
                with Model.load(path, config, trace=str(trace) if trace else None) as m:
                    r["load_s"] = round(time.perf_counter() - t0, 2)
                    r["plan_summary"] = m.plan_summary()
                    plan = m.plan.to_json() if m.plan is not None else {}
                    r["cpu_layers"] = sum(1 for lp in m.plan.layers if lp.cpu_decode) if m.plan else 0
                    r["prefill_s"], times, _ = run_greedy(m, prompt, n_new + 1, sync)
                tok_s = 1.0 / float(np.median(times))
                moved = sum(plan.get("streamed_bytes_per_step", {}).values())
                r.update(decode_tokens=len(times), tokens_per_s=tok_s, token_ms_median=1e3 * float(np.median(times)),
                         token_ms_all=[round(1e3 * t, 3) for t in times], bytes_per_token=moved,
                         achieved_stream_gbs=moved * tok_s / 1e9, predicted=plan.get("predicted"))
                if trace is not None:
                    r["trace"] = trace_summary(trace) if trace.exists() else "no trace written"
                if mode == "hybrid" and not r["cpu_layers"]:
                    failures.append(f"{key}: the plan computes no layer on the CPU ({r['plan_summary']})")
            except Exception as e:  # noqa: BLE001 - recorded, and the step fails
                r.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
                failures.append(f"{key}: {type(e).__name__}: {e}")
            write_json(out / "decode.json", report)
            print(json.dumps({key: {k: v for k, v in r.items() if k not in ("token_ms_all", "traceback")}}, default=str))
    report["failures"] = failures
    write_json(out / "decode.json", report)
    if failures:
        raise RuntimeError(f"{len(failures)} decode failures: {failures[0]}")
    return report


def run_greedy(model, prompt: list[int], n: int, sync=lambda: None) -> tuple[float, list[float], list[int]]:
    """(prefill seconds, seconds of each of the n-1 decode passes, the n greedy ids): the first id
    comes from the prompt pass, each later one from a one-token pass with the KV cache kept; a pass
    is timed until its id is on the host. Uses the sequence API where the model has it."""
    import torch

    seq_api = hasattr(model, "open_sequence") and hasattr(model, "prefill")
    seq = model.open_sequence() if seq_api else None
    try:
        t0 = time.perf_counter()
        if seq_api:
            logits = model.prefill(seq, prompt)
        else:
            logits = model.forward(torch.tensor([prompt]), 0, last_only=True)[0, -1]
        ids = [int(torch.argmax(logits))]
        sync()
        prefill_s, times = time.perf_counter() - t0, []
        while len(ids) < n:
            t0 = time.perf_counter()
            if seq_api:
                logits = model.step([(seq, [ids[-1]])], last_only=True)[0][-1]
            else:
                logits = model.forward(torch.tensor([[ids[-1]]]), len(prompt) + len(ids) - 1, last_only=True)[0, -1]
            ids.append(int(torch.argmax(logits)))
            sync()
            times.append(time.perf_counter() - t0)
        return prefill_s, times, ids
    finally:
        if seq is not None:
            seq.close()


# ---------------------------------------------------------------------------------------------
# bench: GEMV GB/s on 70B shapes at T=1..8, pinned vs pageable H2D
# ---------------------------------------------------------------------------------------------
def step_bench(out: Path, dry: bool, work: Path) -> dict:
    py = sys.executable
    runs = {"kernels": [py, str(REPO / "scripts" / "bench_kernels.py"), "--shapes", "70b", "--formats",
                        "Q4_K,Q6_K,Q8_0", "--t", "1,2,3,4,5,6,7,8", "--reps", "10"],
            "pcie": [py, str(REPO / "scripts" / "bench_pcie.py"), "--sizes", "1MiB,16MiB,256MiB", "--reps", "3",
                     "--file-size", "64MiB" if dry else "1GiB", "--dir", str(work)]}
    report, errors = {}, []
    for name, cmd in runs.items():
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        try:
            report[name] = json.loads(p.stdout)
        except json.JSONDecodeError:
            report[name] = {"error": f"rc {p.returncode}", "stderr": p.stderr[-2000:], "stdout": p.stdout[-2000:]}
        if p.returncode != 0 or "error" in report[name]:
            errors.append(f"{name}: {report[name].get('error')}")
    write_json(out / "bench.json", report)
    if errors:
        raise RuntimeError("; ".join(errors))
    return report


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def _load_summary(out: Path) -> dict:
    path = out / "summary.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": []}


def record(out: Path, name: str, rc: int, seconds: float, limit: float) -> None:
    """One step's outcome; the error is the tail of what it wrote to steps.log."""
    summary = _load_summary(out)
    status = "ok" if rc == 0 else ("timeout" if rc in (124, 137) else "failed")
    entry = {"name": name, "status": status, "rc": rc, "seconds": round(seconds, 1), "limit_s": limit}
    if rc != 0:
        log = out / "steps.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        marker = f"=== step {name} ==="
        entry["error"] = text[text.rfind(marker):][-3000:] if marker in text else text[-3000:]
    if name == "pytest":
        log = out / "pytest_gpu.log"
        lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
        entry["result"] = lines[-1] if lines else "no output"
    summary["steps"] = [s for s in summary["steps"] if s["name"] != name] + [entry]
    write_json(out / "summary.json", summary)


def finish(out: Path, dry: bool) -> int:
    summary = _load_summary(out)
    seen = {s["name"] for s in summary["steps"]}
    for name in STEPS:
        if name not in seen:
            summary["steps"].append({"name": name, "status": "not run", "rc": None,
                                     "error": "the run ended before this step (time budget)"})
    summary["dry_run"] = dry
    summary["ok"] = all(s["status"] == "ok" for s in summary["steps"])
    summary["files"] = sorted(p.name for p in out.iterdir() if p.is_file())
    write_json(out / "summary.json", summary)
    for s in summary["steps"]:
        print(f"{s['name']:10s} {s['status']:8s} {s.get('seconds', '-')!s:>6} s  {s.get('result', '')}")
    return 0 if summary["ok"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("env", "warm", "memcheck", "parity", "decode", "bench", "record", "finish"))
    ap.add_argument("out", type=Path)
    ap.add_argument("args", nargs="*", help="record: NAME RC SECONDS LIMIT")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="where models are written (default OUT/../work)")
    a = ap.parse_args(argv)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    if a.step == "record":
        name, rc, seconds, limit = a.args
        record(out, name, int(rc), float(seconds), float(limit))
        return 0
    if a.step == "finish":
        return finish(out, a.dry_run)
    work = a.work or out.parent / f"{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    fn = {"env": step_env, "warm": step_warm, "memcheck": step_memcheck}.get(a.step)
    if fn is not None:
        fn(out, a.dry_run)
    else:
        {"parity": step_parity, "decode": step_decode, "bench": step_bench}[a.step](out, a.dry_run, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
