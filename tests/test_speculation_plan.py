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
from engine.tiers.speculation import PassCosts, choose, expected_tokens

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


def test_expected_tokens_of_a_tree_counts_its_levels():
    """A tree of T-1 drafts in `breadth` nodes per level is (T-1)/breadth levels deep: at the same
    per-level acceptance it yields what a chain of that depth yields."""
    for a in (0.3, 0.8):
        assert expected_tokens(7, a, breadth=3.0) == pytest.approx(expected_tokens(3, a))  # 6 nodes, 2 levels
        assert expected_tokens(7, a, breadth=1.0) == expected_tokens(7, a)
    assert expected_tokens(9, 1.0, breadth=2.0) == 5.0


def test_tree_width_weighs_rows_against_depth():
    """The width is the best rate of E(tokens of a tree of `breadth`)/pass time, within 2%, and no
    narrower width is as good; a tree whose levels are kept no more often than a chain's drafts is
    worth less per pass, so a measured breadth changes the choice."""
    costs = PassCosts(tuple(1.0 + 0.1 * t for t in range(1, 33)))

    def rate(t, a, b):
        return expected_tokens(t, a, b) / costs.pass_s[t - 1]

    for a, b in ((0.8, 1.0), (0.8, 4.0), (0.95, 4.0), (0.5, 2.0), (0.05, 1.0)):
        t = costs.best(a, b)
        assert rate(t, a, b) >= max(rate(u, a, b) for u in range(1, 33)) / 1.02
        assert all(rate(u, a, b) < rate(t, a, b) for u in range(1, t))
    assert costs.best(0.05, 1.0) == 1  # drafts almost never kept: not worth a row
    assert (costs.best(0.8, 1.0), costs.best(0.8, 4.0)) == (6, 8)  # a chain of 5 drafts; a tree of 7 nodes
    assert costs.speculation(0.8, 4.0).tps < costs.speculation(0.8, 1.0).tps


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
