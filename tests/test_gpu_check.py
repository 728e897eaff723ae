"""scripts/gpu_check.sh's structure, on the CPU: `--dry-run` runs every step with tiny models on the
CPU; it must leave its files (no more than the device tool brings back) and record every step, the
GPU-only ones as failed with their reason (nothing is skipped silently)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cuda.compile import find_nvrtc

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "scripts"))
from gpu_check import FILES, STEPS  # noqa: E402


def run(out: Path, budget: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    if budget is not None:
        env["GPU_CHECK_BUDGET_S"] = str(budget)
    return subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run", "--wheels", str(out.parent / "none")],
                          capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    proc = run(out)
    return out, proc, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_dry_run_leaves_its_files_and_records_every_step(dry_run):
    out, proc, summary = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(FILES) and len(files) <= 8, proc.stdout[-3000:]
    assert [s["name"] for s in summary["steps"]] == list(STEPS)
    status = {s["name"]: s for s in summary["steps"]}
    for name in ("setup", "env", "parity", "decode"):
        assert status[name]["status"] == "ok", status[name]
    # GPU-only steps fail with their reason (pytest: no gpu test ran); the run as a whole is not ok
    assert status["pytest"]["status"] == "failed" and "skipped" in status["pytest"]["result"]
    assert status["memcheck"]["status"] == "failed" and "no CUDA device" in status["memcheck"]["error"]
    assert status["bench"]["status"] == "failed" and "cannot benchmark" in status["bench"]["error"]
    if find_nvrtc() is not None:
        assert status["warm"]["status"] == "ok"
    else:
        assert status["warm"]["status"] == "failed" and "libnvrtc" in status["warm"]["error"]
    assert summary["ok"] is False and proc.returncode == 1 and summary["dry_run"] is True
    env = summary["environment"]
    assert env["cuda_available"] is False and {"torch", "cupy", "nvidia_smi", "nvrtc"} <= set(env)


@pytest.mark.slow
def test_dry_run_parity_and_streaming_reports(dry_run):
    out, _, _ = dry_run
    parity = json.loads((out / "parity.json").read_text())
    assert set(parity["models"]) == {"tiny-q8_0", "tiny-kquants", "tiny-legacy", "smollm2-shaped"}
    for name, entry in parity["models"].items():
        for mode in ("resident", "streamed"):
            r = entry[mode]
            # CPU against CPU: every placement computes the same logits, bit for bit
            assert r["greedy_equal"] and r["max_abs_logit_error"] == 0.0 and r["argmax_agree"] == 1.0, (name, mode, r)
        assert "streamed" in entry["streamed"]["plan"]
    decode = json.loads((out / "decode.json").read_text())
    runs = decode["runs"]
    assert set(runs) == {f"{m}/{mode}" for m in ("llama70b-4blocks", "smollm2-shaped")
                         for mode in ("resident", "streamed", "hybrid")}
    for model in ("llama70b-4blocks", "smollm2-shaped"):
        assert "needs a CUDA device" in runs[f"{model}/hybrid"]["not_run"]  # recorded, not silently dropped
        res, stream = runs[f"{model}/resident"], runs[f"{model}/streamed"]
        assert res["tokens_per_s"] > 0 and res["bytes_per_token"] == 0 and res["decode_tokens"] == 3, res
        assert stream["tokens_per_s"] > 0 and stream["bytes_per_token"] > 0 and stream["achieved_stream_gbs"] > 0
        assert stream["predicted"]["tokens_per_s"] > 0 and "streamed" in stream["plan_summary"]
    spans = runs["llama70b-4blocks/streamed"]["trace"]["spans"]
    assert spans["compute"]["count"] > 0 and spans["read"]["count"] > 0
    trace = json.loads((out / "trace70b.json").read_text())
    assert any(e.get("name", "").startswith("compute") for e in trace["traceEvents"])


def test_a_spent_budget_still_records_every_step(tmp_path):
    out = tmp_path / "out"
    proc = run(out, budget=3)
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == list(STEPS)
    assert all(s["status"] in ("timeout", "ok") for s in summary["steps"]) and proc.returncode == 1
    assert any("budget" in s.get("error", "") for s in summary["steps"])
