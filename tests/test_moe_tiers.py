"""Experts as placement units: placements that put routed experts in every tier (resident, host, disk
through an expert cache of various sizes, with and without next-layer prefetch hints) give logits
bit-identical to all-resident on the CPU; a pass reads exactly the bytes of the routed experts that
are neither resident nor cached (counted at the reader against an independent LRU simulation); read
faults stay recoverable; the planner's plan for a real file runs."""
from __future__ import annotations

import dataclasses
import errno
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from engine.errors import WeightIOError
from engine.gguf_file import GGUFFile
from engine.model import Model
from engine.spec import ModelSpec
from engine.tiers.experts import ExpertStore
from engine.tiers.runtime import Placement, head_info
from engine.weights import EXPERT_ROLES, expert_slice, layer_layout
from tiny_llama import TinyConfig, write_tiny_llama

PROMPT = [1, 17, 300, 42, 8, 99, 250, 3]
MODELS = {
    "qwen3moe": TinyConfig(arch="qwen3moe", n_layers=3, n_heads=8, head_dim=64, n_experts=8, n_experts_used=2,
                           expert_ffn=256, fmt=(QT.Q8_0, QT.Q4_K), rope_base=1e6, seed=51, router_scale=0.3),
    "mixtral": TinyConfig(n_layers=2, n_experts=4, n_experts_used=2, ffn=256, fmt=(QT.Q6_K, QT.Q8_0), tied=False,
                          seed=52, router_scale=0.3),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def moe_path(request, tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("moetier") / f"{request.param}.gguf", MODELS[request.param])


def layouts(path):
    f = GGUFFile(path)
    spec = ModelSpec.from_gguf(f)
    return f, spec, [layer_layout(f, spec, i) for i in range(spec.n_layers)]


def placement(path, tier_of, cache: int, stream_dense: bool = False) -> Placement:
    f, spec, lays = layouts(path)
    base = Placement.uniform(lays, head_info(f, spec), stream=stream_dense, ring_size=2)
    tiers = tuple(tuple(tier_of(i, e) for e in range(spec.n_experts)) for i in range(spec.n_layers))
    return dataclasses.replace(base, expert_tiers=tiers, expert_cache=cache)


def run(m: Model, n_decode: int = 4) -> list[np.ndarray]:
    """Prefill then greedy decode steps: the logits of every pass (numpy)."""
    out = []
    with m.open_sequence() as seq:
        logits = m.step([(seq, PROMPT)])[0]
        out.append(logits.numpy().copy())
        for _ in range(n_decode):
            tok = int(logits[-1].argmax())
            logits = m.step([(seq, [tok])])[0]
            out.append(logits.numpy().copy())
    return out


PLACEMENTS = {
    "all disk, cache 1": (lambda i, e: "disk", 1, False),
    "all disk, cache of a pass": (lambda i, e: "disk", 2, False),
    "every tier, cache 3": (lambda i, e: ("resident", "host", "disk")[(i + e) % 3], 3, False),
    "disk, cache holds all": (lambda i, e: "disk", 64, False),
    "dense streamed, experts host/disk": (lambda i, e: "host" if e % 2 else "disk", 2, True),
}


@pytest.fixture(scope="module")
def reference(moe_path):
    with Model.load(moe_path, placement=placement(moe_path, lambda i, e: "resident", 0)) as m:
        return run(m)


@pytest.mark.parametrize("name", list(PLACEMENTS))
@pytest.mark.parametrize("hints", [True, False])
def test_expert_placements_are_bit_identical_to_resident(moe_path, reference, name, hints):
    tier_of, cache, dense = PLACEMENTS[name]
    with Model.load(moe_path, placement=placement(moe_path, tier_of, cache, dense)) as m:
        store = m.weights.expert_store
        assert isinstance(store, ExpertStore)
        if not hints:
            store.hint = lambda i, ids: None
        for _ in range(2):  # a second generation starts from a warm cache
            got = run(m)
            for a, b in zip(got, reference):
                assert np.array_equal(a, b)
        st = m.weights.expert_stats
        assert st.hits + st.misses > 0 and st.tokens == 2 * (len(PROMPT) + 4)
        if cache >= 64:
            assert st.read_bytes <= sum(store._nbytes(k) for k in store.plans) + st.hint_bytes


def test_bytes_read_are_exactly_the_routed_uncached_experts(moe_path, tmp_path):
    """Reads counted at the reader equal the bytes of the routed experts an independent LRU model of the
    cache says are missing, pass by pass."""
    f, spec, lays = layouts(moe_path)
    cache = 3
    resident = {(i, 0) for i in range(spec.n_layers)}  # expert 0 of every layer resident, the rest on disk
    place = placement(moe_path, lambda i, e: "resident" if (i, e) in resident else "disk", cache)
    stacked = {i: {r: t for r, t in lay.tensors if r in EXPERT_ROLES} for i, lay in enumerate(lays)}

    def expert_bytes(i, e):
        return sum(expert_slice(stacked[i][r], e).nbytes for r in EXPERT_ROLES)

    cfg = tmp_path / "posix.yaml"  # buffered reads: no O_DIRECT alignment around the experts' bytes
    cfg.write_text("device: cpu\nio_backend: posix\n")
    with Model.load(moe_path, placement=place, config=str(cfg)) as m:
        assert m.reader.align == 1
        w = m.weights
        w.expert_store.hint = lambda i, ids: None  # reads only on demand
        read = []  # bytes of every read the reader was asked for (the bytes it needed)
        submit = m.reader.submit

        def counting(plan, buf, label):
            read.append((label, sum(need for _, _, _, need in plan.spans)))
            return submit(plan, buf, label)

        m.reader.submit = counting
        requests = []
        orig = w.experts

        def experts(i, ids, rows=None):
            requests.append((i, list(ids)))
            return orig(i, ids, rows)

        w.experts = experts
        lru: OrderedDict = OrderedDict()
        counted = {"hits": 0, "misses": 0}

        def expected_reads() -> int:
            """The cache as an LRU list: a pass's hits become most recent, then its misses are read."""
            n = 0
            for i, ids in requests:
                keys = [(i, e) for e in ids if (i, e) not in resident]
                assert len(keys) <= cache
                for key in keys:
                    if key in lru:
                        lru.move_to_end(key)
                        counted["hits"] += 1
                for key in keys:
                    if key not in lru:
                        counted["misses"] += 1
                        n += expert_bytes(*key)
                        lru[key] = True
                        while len(lru) > cache:
                            lru.popitem(last=False)
            requests.clear()
            return n

        with m.open_sequence() as seq:
            logits = m.step([(seq, PROMPT[:1])])[0]
            assert sum(n for _, n in read) == expected_reads() > 0
            for _ in range(8):
                read.clear()
                logits = m.step([(seq, [int(logits[-1].argmax())])])[0]
                assert all(len(ids) == spec.n_experts_used for _, ids in requests)  # one token: its k experts
                assert sum(n for _, n in read) == expected_reads()
                assert all(".expert." in label for label, _ in read)
        st = w.expert_stats
        assert (st.hits, st.misses) == (counted["hits"], counted["misses"]) and st.misses > 0


def test_read_fault_is_recoverable_and_next_generation_identical(moe_path, reference, tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copy(moe_path, path)
    f, spec, lays = layouts(path)
    info = {r: t for r, t in lays[1].tensors if r in EXPERT_ROLES}
    lo = min(t.offset for t in info.values())
    hi = max(t.offset + t.nbytes for t in info.values())
    with Model.load(path, placement=placement(path, lambda i, e: "disk", 2)) as m:
        m.reader.inject_fault(lo, errno.EIO, end=hi)  # every expert of block 1
        with pytest.raises(WeightIOError) as ei:
            run(m)
        assert str(path) in str(ei.value)
        assert not m.sequences
        m.reader.inject_fault(None)
        for a, b in zip(run(m), reference):
            assert np.array_equal(a, b)


def test_the_planners_expert_plan_runs(moe_path, reference, tmp_path):
    """A budget between the dense part and the whole model: the planner keeps the dense parts and some
    experts resident, streams the rest through the cache; the result is bit-identical."""
    cfg = tmp_path / "c.yaml"
    f, spec, lays = layouts(moe_path)
    cfg.write_text("device: cpu\nresident_budget: 70%\nslow_tier: disk\nio_backend: posix\n"
                   "kv_cache:\n  placement: resident\n  max_context: 64\n")
    with Model.load(moe_path, config=str(cfg), n_ctx=64) as m:
        p = m.plan
        assert p.experts and any(x.count("disk") for x in p.experts)
        assert any(x.count("resident") for x in p.experts)
        store = m.weights.expert_store
        assert store.n_slots == min(p.expert_cache, sum(x.count("disk") for x in p.experts))
        for a, b in zip(run(m), reference):
            assert np.array_equal(a, b)
        assert "experts: cache hit" in m.weights.expert_stats.line()


def test_calibrate_moe_profile_counts_each_tokens_experts(moe_path, tmp_path, monkeypatch, capsys):
    from engine.calibrate import main as calibrate_main
    from engine.plan import main as plan_main
    from engine.tiers.router_stats import find_router_profile

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world, this is a test\n\n  the quick brown fox  \n")
    assert calibrate_main(["--moe-profile", str(prompts), "--model", str(moe_path)]) == 0
    assert "written to" in capsys.readouterr().out
    prof = find_router_profile(moe_path)
    f, spec, lays = layouts(moe_path)
    with Model.load(moe_path) as m:
        n_tokens = len(m.tokenize("hello world, this is a test")) + len(m.tokenize("the quick brown fox"))
        # independently: the experts a one-token pass routes to, token by token, from the model's own calls
        seen = [[0] * spec.n_experts for _ in range(spec.n_layers)]
        orig = m.weights.experts

        def experts(i, ids, rows=None):
            for e in ids:
                seen[i][e] += 1
            return orig(i, ids, rows)

        m.weights.experts = experts
        for text in ("hello world, this is a test", "the quick brown fox"):
            with m.open_sequence() as seq:
                for t in m.tokenize(text):
                    m.step([(seq, [t])])
    assert prof.tokens == n_tokens and prof.model == moe_path.name
    assert [[round(x * n_tokens) for x in row] for row in prof.frequency] == seen
    assert all(abs(sum(row) - spec.n_experts_used) < 1e-9 for row in prof.frequency)
    # the planner reads it for that model file
    assert plan_main(["--model", str(moe_path), "--json", "--prompt-tokens", "16", "--gen-tokens", "16"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["experts"]["router"] == prof.source
    # bad invocations: one error line, exit 1
    assert calibrate_main(["--moe-profile", str(prompts)]) == 1
    assert "--model" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n\n")
    assert calibrate_main(["--moe-profile", str(tmp_path / "empty.txt"), "--model", str(moe_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no prompts" in err


def test_stats_line_and_trace_report_the_expert_cache(moe_path, tmp_path, capsys):
    from engine.generate import main as generate_main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("device: cpu\nresident_budget: 70%\nslow_tier: disk\n"
                   "kv_cache:\n  placement: resident\n  max_context: 64\n")
    trace = tmp_path / "t.json"
    assert generate_main(["hello", "--model", str(moe_path), "--config", str(cfg), "--max-tokens", "6",
                          "--temperature", "0", "--trace", str(trace)]) == 0
    err = capsys.readouterr().err
    assert "experts: cache hit" in err and "MiB read/token" in err and "through an expert cache" in err
    import json

    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["name"].startswith("experts blk.")]
    assert events and all({"hits", "misses", "hit_rate_so_far"} <= set(e["args"]) for e in events)
    assert sum(e["args"]["misses"] for e in events) > 0
    assert generate_main(["hello", "--model", str(moe_path), "--config", str(cfg), "--max-tokens", "2",
                          "--temperature", "0", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert 0 <= rec["experts"]["hit_rate"] <= 1 and rec["experts"]["read_bytes_per_token"] > 0


def test_synthetic_qwen3moe_writer(tmp_path):
    """scripts/make_synthetic_model.py's MoE variant loads as qwen3moe, and its router's fitted scales give
    the capped Zipf-like selection frequencies on Gaussian inputs (checked on fresh samples)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from make_synthetic_model import ROUTER_CAP, SyntheticConfig, write_synthetic_model, zipf_router_scales

    cfg = SyntheticConfig(arch="qwen3moe", n_layers=2, dim=256, ffn=512, n_heads=4, n_kv_heads=2, head_dim_=64,
                          n_experts=8, n_experts_used=2, expert_ffn=256, vocab=1024, ctx=128)
    path = write_synthetic_model(tmp_path / "s.gguf", cfg)
    f, spec, lays = layouts(path)
    assert (spec.architecture, spec.n_experts, spec.n_experts_used, spec.expert_ffn_dim, spec.head_dim) == \
        ("qwen3moe", 8, 2, 256, 64)
    with Model.load(path, n_ctx=64) as m:
        assert np.isfinite(run(m, 2)[-1]).all()
    sigma, target = zipf_router_scales(32, 4, 0.8, 0)
    assert abs(target.sum() - 4) < 1e-9 and target.max() <= ROUTER_CAP + 1e-12
    assert list(target) == sorted(target, reverse=True)
    g = np.random.default_rng(123).standard_normal((20000, 32)) * sigma
    top = np.argpartition(-g, 3, axis=1)[:, :4]
    freq = np.bincount(top.ravel(), minlength=32) / 20000
    assert np.abs(freq - target).max() < 0.03
