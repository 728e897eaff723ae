"""Expert-level planning of mixture-of-experts models from descriptions, and router profiles."""
from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest

from engine.cpu import INT8_FORMATS
from engine.errors import ConfigError, PlanError
from engine.plan import main as plan_main
from engine.tiers.config import load_config
from engine.tiers.footprint import describe
from engine.tiers.hardware import ComputeRate, default_profile
from engine.tiers.planner import DISK, RESIDENT, Workload, plan
from engine.tiers.planner.experts import lru_hits
from engine.tiers.router_stats import (RouterProfile, find_router_profile, load_router_profile, profile_path,
                                       save_router_profile)


def _cfg(tmp_path, budget: str, **extra):
    lines = ["device: cpu", f"resident_budget: {budget}", "slow_tier: disk",
             "kv_cache:", "  placement: resident", "  max_context: 512"] + [f"{k}: {v}" for k, v in extra.items()]
    p = tmp_path / "cfg.yaml"
    p.write_text("\n".join(lines) + "\n")
    return load_config(str(p))


def test_descriptions_split_layers_into_dense_part_and_experts():
    fp = describe("qwen3-30b-a3b:Q4_K_M")
    lay = fp.layers[0]
    assert lay.n_experts == 128 and fp.spec.n_experts_used == 8
    # one expert = its rows of gate, up (768 x 2048 Q4_K) and down (2048 x 768, Q6_K in this layer)
    assert lay.expert_bytes == 2 * 768 * 2048 // 256 * 144 + 2048 * 768 // 256 * 210
    assert lay.dense_bytes + 128 * lay.expert_bytes == lay.nbytes
    assert {t.role for t in lay.dense_tensors} >= {"attn_q", "ffn_gate_inp", "attn_norm"}
    assert next(t for t in lay.tensors if t.role == "ffn_gate_inp").fmt == "F32"
    mix = describe("mixtral-8x7b:Q4_K_M")
    assert mix.layers[0].n_experts == 8 and mix.spec.n_experts_used == 2
    assert mix.layers[0].expert_bytes == 2 * 14336 * 4096 // 256 * 144 + 4096 * 14336 // 256 * 210


@pytest.mark.parametrize("budget", ["50%", "25%", "10%"])
def test_uniform_routing_keeps_dense_parts_then_the_same_experts_per_layer(tmp_path, budget):
    fp = describe("qwen3-30b-a3b:Q4_K_M")
    p = plan(fp, default_profile("cpu"), _cfg(tmp_path, budget))
    assert p.resident_bytes <= p.resident_budget
    assert all(lp.tier == RESIDENT and "ffn_gate_inp" in lp.resident_roles for lp in p.layers)
    counts = [x.count(RESIDENT) for x in p.experts]
    assert max(counts) - min(counts) <= 1 and 0 < sum(counts) < 48 * 128
    assert all(x.count(RESIDENT) + x.count(DISK) == 128 for x in p.experts)
    assert p.router == "uniform" and p.expert_cache >= 8
    # the bytes a step reads are the routed experts' expected misses, not whole layers
    k_over_e = 8 / 128
    for x in p.experts:
        slow = x.count(DISK) * k_over_e * x.expert_bytes
        assert 0 < x.disk_read <= slow + 1e-6
    per_step = p.streamed_bytes[DISK]
    assert per_step < 48 * 8 * max(x.expert_bytes for x in p.experts)
    assert per_step < fp.layer_bytes / 10
    assert p.predicted.bound_s <= p.predicted.token_s


def test_no_cache_means_reads_equal_the_routed_disk_experts(tmp_path):
    fp = describe("qwen3-30b-a3b:Q4_K_M")
    p = plan(fp, default_profile("cpu"), _cfg(tmp_path, "10%"))
    hits = lru_hits([8 / 128] * 10, 0)
    assert hits == [0.0] * 10
    # reads per layer = P(routed) x (1 - P(cached)) x bytes over the disk experts
    x = p.experts[0]
    q = 8 / 128
    slow_total = sum(y.count(DISK) for y in p.experts)
    h = lru_hits([q] * slow_total, p.expert_cache)[0]
    assert math.isclose(x.disk_read, x.count(DISK) * q * (1 - h) * x.expert_bytes, rel_tol=1e-9)


def test_lru_hits_matches_a_simulated_lru_cache():
    rng = random.Random(0)
    q = [0.5 / (j + 1) for j in range(60)]  # skewed per-step reference probabilities
    slots = 12
    cache: list[int] = []
    hits = [0] * len(q)
    refs = [0] * len(q)
    for _ in range(20000):
        for j, p in enumerate(q):
            if rng.random() < p:
                refs[j] += 1
                if j in cache:
                    hits[j] += 1
                    cache.remove(j)
                elif len(cache) == slots:
                    cache.pop(0)
                cache.append(j)
    model = lru_hits(q, slots)
    total_sim = sum(hits) / sum(refs)
    total_model = sum(m * p for m, p in zip(model, q)) / sum(q)
    assert abs(total_sim - total_model) < 0.05
    assert lru_hits(q, 100) == [1.0] * len(q)


def test_a_router_profile_makes_the_hottest_experts_resident(tmp_path):
    fp = describe("qwen3-30b-a3b:Q4_K_M")
    rng = random.Random(1)
    freq = []
    for _ in range(48):
        w = [1 / (r + 1) ** 0.8 for r in range(128)]  # Zipf 0.8: the hottest < 1
        rng.shuffle(w)
        freq.append([8 * x / sum(w) for x in w])
    prof = RouterProfile("x.gguf", 128, 8, 1000, tuple(tuple(r) for r in freq), "prof.json")
    cfg = _cfg(tmp_path, "10%")
    p = plan(fp, default_profile("cpu"), cfg, Workload(), prof)
    uniform = plan(fp, default_profile("cpu"), cfg)
    assert p.router == "prof.json"
    allres = [(x.frequency[e], x.tiers[e]) for x in p.experts for e in range(128)]
    coldest_res = min(f for f, t in allres if t == RESIDENT)
    hottest_disk = max(f for f, t in allres if t == DISK)
    assert coldest_res >= hottest_disk
    assert p.streamed_bytes[DISK] < uniform.streamed_bytes[DISK]
    # a profile for another model is refused, naming what differs
    other = RouterProfile.uniform(47, 128, 8)
    with pytest.raises(ConfigError, match="47"):
        plan(fp, default_profile("cpu"), cfg, Workload(), other)


def test_everything_fits_means_no_cache_and_no_reads(tmp_path):
    p = plan(describe("qwen3-30b-a3b:Q4_K_M"), default_profile("cpu"), _cfg(tmp_path, "100%"))
    assert all(x.count(RESIDENT) == 128 and x.read_bytes == 0 for x in p.experts)
    assert p.expert_cache == 0 and p.streamed_bytes[DISK] == 0


@pytest.mark.parametrize("budget", ["100%", "25%"])
def test_expert_plans_price_cpu_activations(tmp_path, budget):
    """cpu_activations int8 prices the experts and dense parts at the profile's int8 rates: the same
    prediction as int16 on a profile whose int16 rates are those int8 ones, faster than int16."""
    fp = describe("qwen3-30b-a3b:Q4_K_M")
    hw = default_profile("cpu")
    fast = {f: ComputeRate(3 * r.t1, 3 * r.batched) for f, r in hw.compute.items() if f in INT8_FORMATS}
    hw8 = dataclasses.replace(hw, compute_int8=fast)
    cfg = _cfg(tmp_path, budget)
    p16, p8 = plan(fp, hw8, cfg), plan(fp, hw8, _cfg(tmp_path, budget, cpu_activations="int8"))
    same = plan(fp, dataclasses.replace(hw, compute={**hw.compute, **fast}), cfg)
    assert p8.experts == same.experts and p8.predicted == same.predicted
    assert p8.predicted.compute_s < p16.predicted.compute_s / 2
    assert p16.predicted == plan(fp, hw, cfg).predicted


def test_budget_below_the_dense_parts_is_a_plan_error(tmp_path):
    with pytest.raises(PlanError, match="dense part") as e:
        plan(describe("qwen3-30b-a3b:Q4_K_M"), default_profile("cpu"), _cfg(tmp_path, "1%"))
    assert e.value.field == "resident_budget"


def test_plan_cli_explains_experts(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("device: cpu\nresident_budget: 25%\nslow_tier: disk\n")
    assert plan_main(["--describe", "qwen3-30b-a3b:Q4_K_M", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "expert cache (LRU, resident)" in out and "hottest resident" in out and "uniform routing" in out
    assert plan_main(["--describe", "mixtral-8x7b:Q4_K_M", "--config", str(cfg), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["experts"]["layers"]) == 32
    assert sorted(d["experts"]["layers"][0]["resident"] + d["experts"]["layers"][0]["disk"]) == list(range(8))
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "router-statistics", "version": 1}')
    assert plan_main(["--describe", "qwen3-30b-a3b:Q4_K_M", "--moe-profile", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "bad.json" in err


def test_router_profile_round_trip_and_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    prof = RouterProfile.from_counts("m.gguf", [[3, 1, 0, 2], [1, 1, 2, 2]], 2, 3)
    assert prof.frequency[0] == (1.0, 1 / 3, 0.0, 2 / 3)
    path = save_router_profile(prof, profile_path("/somewhere/m.gguf"))
    assert path.parent.parent == tmp_path
    back = find_router_profile("/elsewhere/m.gguf")
    assert back.frequency == prof.frequency and back.tokens == 3 and back.source == str(path)
    assert find_router_profile("/x/other.gguf") is None


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(version=99), "version"),
    (lambda d: d.update(kind="hardware"), "kind"),
    (lambda d: d.pop("tokens"), "tokens"),
    (lambda d: d.update(n_experts_used=9), "n_experts_used"),
    (lambda d: d["frequency"][1].append(0.0), "frequency[1]"),
    (lambda d: d["frequency"][0].__setitem__(0, "hot"), "frequency[0][0]"),
    (lambda d: d["frequency"][0].__setitem__(0, 0.9), "frequency[0]"),  # no longer sums to k
    (lambda d: d.update(frequency=[]), "frequency"),
    (lambda d: d.update(frequency="x"), "frequency"),
])
def test_malformed_router_profiles_are_typed_errors(tmp_path, edit, field):
    d = RouterProfile.from_counts("m.gguf", [[2, 1, 1, 0], [1, 1, 1, 1]], 2, 2).to_json()
    edit(d)
    p = tmp_path / "p.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        load_router_profile(p)
    assert e.value.field == field and str(p) in str(e.value)
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_router_profile(p)


def test_speculative_pass_costs_count_the_experts_more_rows_route_to(tmp_path):
    from engine.tiers.speculation import pass_costs

    fp = describe("qwen3-30b-a3b:Q4_K_M")
    hw = default_profile("cpu")
    cfg = _cfg(tmp_path, "10%")
    p = plan(fp, hw, cfg)
    costs = pass_costs(fp, hw, cfg, p, max_tokens=4).pass_s
    assert math.isclose(costs[0], p.predicted.token_s, rel_tol=1e-9)
    assert costs[0] < costs[1] < costs[2] < costs[3]  # more rows, more distinct routed experts to read
    assert costs[3] < 4 * costs[0]  # but shared experts and dense parts are paid once
