"""The cost model's verification width: wide when the pass is I/O-bound, off when extra rows cost
compute; engine.plan reports it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import plan as plan_cli
from engine.errors import ConfigError
from engine.tiers.config import load_config
from engine.tiers.footprint import describe
from engine.tiers.hardware import ComputeRate, HardwareProfile
from engine.tiers.planner import plan
from engine.tiers.speculation import choose, expected_tokens

GiB = 1 << 30
RTX4090 = str(Path(__file__).resolve().parent.parent / "configs" / "rtx4090-70b.yaml")


def profile(batched_factor: float, resident=64 * GiB) -> HardwareProfile:
    rate = ComputeRate(t1=20e9, batched=batched_factor * 20e9)
    return HardwareProfile(device="cpu", name="test cpu", resident_bytes=resident, host_bytes=0,
                           disk_read_direct=1e9, disk_read_buffered=5e8, disk_latency_s=1e-4,
                           host_to_device=10e9, memcpy=10e9, resident_bandwidth=1e15,
                           compute={f: rate for f in ("F32", "F16", "Q4_K", "Q6_K", "Q8_0")},
                           layer_overhead_s=0.0, token_overhead_s=0.0, source="test")


def test_expected_tokens_chain_formula():
    assert expected_tokens(1, 0.5) == 1.0
    assert expected_tokens(3, 0.5) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(4, 1.0) == 4.0


def test_streamed_pass_verifies_many_tokens_compute_bound_none():
    fp = describe("llama3-8b:Q4_K_M")
    streamed_cfg = load_config({"device": "cpu", "resident_budget": "10%", "slow_tier": "disk"})
    resident_cfg = load_config({"device": "cpu", "resident_budget": "100%"})
    # disk-bound: every row up to the compute/disk crossover is free, so the width is large
    hw = profile(batched_factor=64)
    p = plan(fp, hw, streamed_cfg)
    assert p.predicted.bound == "disk"
    s = choose(fp, hw, streamed_cfg, p, acceptance=0.8)
    assert s.tokens >= 8 and s.tps > 2 * s.plain_tps
    # all resident on a device whose cost grows linearly with rows (batched == t1): off
    hw_linear = profile(batched_factor=1)
    p = plan(fp, hw_linear, resident_cfg)
    assert p.predicted.bound == "compute"
    s = choose(fp, hw_linear, resident_cfg, p, acceptance=0.8)
    assert s.tokens == 1 and s.tps == s.plain_tps
    # a slow drafter makes wide verification pointless even when the pass is I/O-bound
    p = plan(fp, hw, streamed_cfg)
    assert choose(fp, hw, streamed_cfg, p, acceptance=0.8, draft_token_s=10.0).tokens == 1


def test_bad_acceptance_refused():
    fp = describe("smollm2-135m:Q8_0")
    cfg = load_config({"device": "cpu"})
    hw = profile(8)
    with pytest.raises(ConfigError, match="acceptance"):
        choose(fp, hw, cfg, plan(fp, hw, cfg), acceptance=1.5)


def test_engine_plan_reports_speculation(capsys):
    assert plan_cli.main(["--describe", "llama3-70b:Q4_K_M", "--config", RTX4090, "--hybrid", "off",
                          "--acceptance", "0.8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["speculation"]["tokens"] > 4  # every host-tier layer streamed over PCIe: I/O-bound
    assert out["speculation"]["tokens_per_s"] > out["predicted"]["tokens_per_s"]
    assert plan_cli.main(["--describe", "llama3-70b:Q4_K_M", "--config", RTX4090]) == 0
    assert "speculation: verify" in capsys.readouterr().out
