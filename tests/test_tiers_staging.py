"""The tier scheduler on a simulated CUDA device (tests/stream_sim.py runs the copy and compute streams
in adversarial orders): every tier bound where the placement says, exact-size pinned memory, eager
uploads that overlap compute, units that own their slot uploaded once, GPUDirect reads fenced, and
hybrid compute (device_for / kv_device) following the placement."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from stream_sim import POLICIES, Barrier, sim_staging

from engine.cuda.staging import TorchCudaOps
from engine.formats import FORMATS
from engine.gguf_file import TensorInfo
from engine.tiers.io import FileReader, ReadPlan
from engine.tiers.scheduler import HostStore, ResidentStore, TieredWeights, Unit
from engine.tiers.staging import HostStaging

FMT = FORMATS["F32"]
SIZES = (5000, 12000, 300, 7000, 9000, 4096, 6000)  # bytes of each unit's two tensors together


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A file with one unit per SIZES entry: two tensors each, 100-byte gaps between tensors."""
    path = tmp_path_factory.mktemp("tiers_staging") / "units.bin"
    rng = np.random.default_rng(7)
    units, off = [], 4096
    for u, size in enumerate(SIZES):
        a = size // 3
        ts = (TensorInfo(f"u{u}.a", FMT, (a // 4,), off, a), TensorInfo(f"u{u}.b", FMT, (1,), off + a + 100, size - a))
        units.append(Unit(f"unit{u}", ts, lambda view, layout, ts=ts: {t.name: view(t) for t in ts}))
        off += size + 100 + 1000
    data = rng.integers(0, 256, size=off + 4096, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return path, data, units


class SyncReader:
    """FileReader's interface with reads done at submit (deterministic); device_reads as kvikio with
    GPUDirect would have it. `on_submit(buf)` runs before each read."""

    align = 4096
    direct = False
    tracer = None

    def __init__(self, path, data, device_reads=False, on_submit=None):
        self.data, self.device_reads, self.on_submit, self.submits = data, device_reads, on_submit, []

    def plan(self, runs) -> ReadPlan:
        return ReadPlan.build(tuple(runs), self.align)

    def submit(self, plan, buf, label):
        if self.on_submit:
            self.on_submit(buf)
        self.submits.append(label)
        for off, _, dest, need in plan.spans:
            buf[dest:dest + need] = torch.from_numpy(self.data[off:off + need].copy())
        return types.SimpleNamespace(wait=lambda: None, done=lambda: True, cancel=lambda: None)


def build(units, reader, staging, sources, k, cpu_units=frozenset(), cpu_max_rows=0):
    """TieredWeights for per-unit sources: "" resident, "host" or "disk" (all tensors of a unit)."""
    streamed = [frozenset(t.name for t in u.tensors) if src else frozenset() for u, src in zip(units, sources)]
    resident = ResidentStore(reader, [t for u, s in zip(units, streamed) for t in u.tensors if t.name not in s],
                             staging, bounce=8192)
    host = HostStore(reader, {u.name: u.tensors for u, src in zip(units, sources) if src == "host"}, staging)
    return TieredWeights(units, streamed, reader, resident, k, staging, host=host, sources=sources,
                         cpu_units=cpu_units, cpu_max_rows=cpu_max_rows, device="gpu", cpu_device="cpu")


def expected(data, t: TensorInfo) -> torch.Tensor:
    return torch.from_numpy(data[t.offset:t.offset + t.nbytes].copy())


def run_passes(w, ops, units, rows_per_pass, log=None):
    """The model's use of the provider: per pass, each unit's 'kernel' snapshots its bound bytes, on
    the compute stream for the device or at once for the CPU. Returns [(pass, unit, device, {name: bytes})]."""
    seen = []
    for p, rows in enumerate(rows_per_pass):
        for i in range(len(units)):
            dev = w.device_for(i, rows)
            bound = w.layer(i, rows)
            rec = (p, i, dev, {})
            seen.append(rec)

            def kernel(rec=rec, bound=bound):
                rec[3].update({name: v.clone() for name, v in bound.items()})

            if dev == "cpu":
                kernel()
            else:
                if log is not None:
                    log.append(("kernel", len(ops.streams["compute"].ops), len(ops.copies)))
                ops.enqueue(ops.streams["compute"], kernel)
            syncs = ops.syncs
            w.release(i)
            assert ops.syncs == syncs, "release blocked the host"
    ops.finish()
    return seen


def errors(seen, data, units):
    return [(p, i) for p, i, _, got in seen
            if any(not torch.equal(got[t.name], expected(data, t)) for t in units[i].tensors)]


MIX = ("", "host", "disk", "host", "", "disk", "host")


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("reader_kind", ["threads", "sync"])
def test_every_tier_bound_where_the_placement_says(model_file, policy, reader_kind):
    path, data, units = model_file
    staging, ops = sim_staging(policy)
    reader = FileReader(str(path), backend="posix", threads=2) if reader_kind == "threads" else SyncReader(path, data)
    try:
        w = build(units, reader, staging, MIX, k=2)
        seen = run_passes(w, ops, units, [1, 1, 1])
        assert errors(seen, data, units) == []
        for i, src in enumerate(MIX):
            views = list(w.layer(i).values())
            w.release(i)
            # resident: in the device copy of the resident store; host and disk: in a device ring slot
            assert all(ops.on_device(v) for v in views), (i, src)
            in_slot = [any(s.data_ptr() <= v.data_ptr() < s.data_ptr() + s.numel() for s in w.dev_slots)
                       for v in views]
            assert all(in_slot) == (src != "") and any(in_slot) == (src != ""), (i, src)
        # host tier: one exact-size page-locked allocation holding the host units' read plans
        host_bytes = sum(w.host.plans[u.name].size for u, src in zip(units, MIX) if src == "host")
        assert (w.host.buf.data_ptr(), host_bytes) in ops.pinned and w.host.nbytes == host_bytes
        for u, src in zip(units, MIX):
            if src == "host":
                for t in u.tensors:
                    assert torch.equal(w.host.view(u.name, t), expected(data, t))
        # the resident store never pinned whole: only bounce buffers of at most 8 KiB
        assert w.resident.nbytes > 8192 and ops.on_device(w.resident.buf)
        others = [n for p, n in ops.pinned if p not in (w.host.buf.data_ptr(), w.arena.data_ptr())]
        assert others and max(others) <= 8192
    finally:
        reader.close() if hasattr(reader, "close") else None


@pytest.mark.parametrize("drop", ["compute_wait", "copy_wait"])
def test_the_harness_catches_a_missing_fence(model_file, drop):
    path, data, units = model_file
    failing = []
    for policy in POLICIES:
        staging, ops = sim_staging(policy, drop)
        w = build(units, SyncReader(path, data), staging, ("host",) * 7, k=2)
        if errors(run_passes(w, ops, units, [1, 1]), data, units):
            failing.append(policy)
    assert failing


def asap_end(ops, stream: str, index: int) -> int:
    """End time of op `index` of `stream` when both streams run as early as their dependencies allow
    (copies and kernels take one tick, barriers none)."""
    ends: dict[tuple[str, int], int] = {}

    def end(name, j):
        if j < 0:
            return 0
        key = (name, j)
        if key not in ends:
            op = ops.streams[name].ops[j]
            start = end(name, j - 1)
            if isinstance(op, Barrier):
                ends[key] = max(start, end(op.event.stream.name, op.event.index - 1))
            else:
                ends[key] = start + 1
        return ends[key]

    sys.setrecursionlimit(10000)
    return end(stream, index)


@pytest.mark.parametrize("sources", [("host",) * 7, ("disk",) * 7, ("host", "disk") * 3 + ("host",)])
def test_uploads_are_issued_early_and_overlap_compute(model_file, sources):
    """k=3: when unit n's kernel is issued, the copies of units n+1 and n+2 already are (host tier at
    once, disk units as soon as their read has completed), and nothing orders them after kernel n.
    Host-tier units: no stream runs at all while the passes are issued. Disk units: a host slot is
    refilled once the copy out of it has run, so there the streams run as soon as they can."""
    path, data, units = model_file
    staging, ops = sim_staging("lazy")
    if "disk" in sources:
        ops.eager = frozenset({"copy", "compute"})
    copy_log = []
    orig = ops.copy

    def copy(dst, src, stream):
        copy_log.append(len(stream.ops))  # index of the copy op on the copy stream
        orig(dst, src, stream)

    ops.copy = copy
    w = build(units, SyncReader(path, data), staging, sources, k=3)
    log = []
    # issue two passes without letting any stream run (lazy, no host sync in the host-tier path)
    for _ in range(2):
        for i in range(7):
            w.layer(i)
            log.append((len(ops.streams["compute"].ops), len(copy_log)))
            ops.streams["compute"].ops.append(lambda: None)  # the kernel
            w.release(i)
    for n, (kernel, copies_before) in enumerate(log[:-2]):
        assert copies_before >= n + 3, f"kernel {n} issued before the copies of units {n + 1}, {n + 2}"
        assert asap_end(ops, "copy", copy_log[n + 1]) <= asap_end(ops, "compute", kernel), n
    ops.finish()


def test_units_that_own_their_slot_are_read_and_uploaded_once(model_file):
    path, data, units = model_file
    sources = ("", "host", "disk", "", "host", "", "")
    staging, ops = sim_staging("copy-eager")
    reader = SyncReader(path, data)
    w = build(units, reader, staging, sources, k=4)
    assert not w.cyclic
    seen = run_passes(w, ops, units, [1] * 4)
    assert errors(seen, data, units) == []
    assert reader.submits.count("unit2") == 1
    slots = {s.data_ptr() for s in w.dev_slots}
    assert len([c for c in ops.copies if c[0] in slots]) == 3  # three streamed units, one upload each


@pytest.mark.parametrize("policy", list(POLICIES))
def test_gpudirect_reads_wait_for_the_slot_fence(model_file, policy):
    """kvikio with GDS writes device slots outside the streams' order: it may start only once the
    kernels that read the slot's previous unit have run."""
    path, data, units = model_file
    staging, ops = sim_staging(policy)
    hazards = []

    def check(buf):
        fence = staging._released.get(buf.data_ptr())
        if fence is not None and not ops.query(fence):
            hazards.append(buf.data_ptr())

    reader = SyncReader(path, data, device_reads=True, on_submit=check)
    w = build(units, reader, staging, ("disk", "host") * 3 + ("disk",), k=2)
    assert w.staging_bytes == 0  # no pinned bounce slots: reads land in device memory
    seen = run_passes(w, ops, units, [1, 1, 1])
    assert hazards == [] and errors(seen, data, units) == []


@pytest.mark.parametrize("policy", list(POLICIES))
def test_hybrid_compute_follows_the_placement(model_file, policy):
    """Host-tier units in cpu_units compute on the CPU over the host store at <= cpu_max_rows rows
    and stream to the device above; their KV lives with the CPU. Prefill and decode passes alternate."""
    path, data, units = model_file
    sources = ("", "host", "disk", "host", "", "host", "host")
    cpu = frozenset({1, 5, 6})
    staging, ops = sim_staging(policy)
    w = build(units, SyncReader(path, data), staging, sources, k=2, cpu_units=cpu, cpu_max_rows=8)
    passes = [64, 1, 1, 8, 9, 1]
    seen = run_passes(w, ops, units, passes)
    assert errors(seen, data, units) == []
    for p, i, dev, _ in seen:
        assert dev == ("cpu" if i in cpu and passes[p] <= 8 else "gpu"), (p, i)
    assert [w.kv_device(i) for i in range(7)] == ["cpu" if i in cpu else "gpu" for i in range(7)]
    host_lo, host_hi = w.host.buf.data_ptr(), w.host.buf.data_ptr() + w.host.nbytes
    for i in cpu:
        assert all(host_lo <= v.data_ptr() < host_hi for v in w.layer(i, 1).values())  # the host store itself
        w.release(i)
        assert all(ops.on_device(v) for v in w.layer(i, 64).values())  # a ring slot
        w.release(i)
    ops.finish()


def test_cpu_has_no_separate_host_tier(model_file):
    """On the CPU the host store is compute memory: host units are bound there once, never copied."""
    path, data, units = model_file
    w = build(units, SyncReader(path, data), HostStaging(), MIX, k=2, cpu_units=frozenset({1}), cpu_max_rows=8)
    assert w.cpu_units == frozenset() and w.device_for(1, 1) == "gpu"
    host_lo = w.host.buf.data_ptr()
    for i, src in enumerate(MIX):
        got = w.layer(i)
        for t in units[i].tensors:
            assert torch.equal(got[t.name], expected(data, t))
        if src == "host":
            assert all(host_lo <= v.data_ptr() < host_lo + w.host.nbytes for v in got.values())
        w.release(i)
    assert w.seq == [2, 5]


def test_exact_size_page_locking(monkeypatch):
    """TorchCudaOps pins with cudaHostRegister over an exact-size aligned allocation (torch's pinned
    caching allocator would round 5 MiB + 12345 up to 8 MiB) and unregisters when the memory dies."""
    calls = []
    fake = types.SimpleNamespace(cudaHostRegister=lambda p, n, f: calls.append(("reg", p, n, f)) or 0,
                                 cudaHostUnregister=lambda p: calls.append(("unreg", p)) or 0)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(torch, "empty", None)  # torch.empty(pin_memory=True) must not be how it pins
    ops = TorchCudaOps(torch.device("cuda", 0))
    nbytes = (5 << 20) + 12345
    buf = ops.pin_host(nbytes, 4096)
    assert buf.numel() == nbytes and buf.dtype == torch.uint8
    assert calls == [("reg", buf.data_ptr(), nbytes, 1)] and buf.data_ptr() % (2 << 20) == 0
    ptr = buf.data_ptr()
    view = buf[100:200]
    del buf
    assert len(calls) == 1  # a view keeps the registration alive
    del view
    assert calls[-1] == ("unreg", ptr)
    failing = types.SimpleNamespace(cudaHostRegister=lambda p, n, f: 2, cudaHostUnregister=lambda p: 0)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: failing)
    from engine.errors import KernelError

    with pytest.raises(KernelError) as e:
        ops.pin_host(1 << 20, 4096)
    assert e.value.field == "host_budget" and "1 MiB" in str(e.value)


def test_read_plan_pieces_cover_the_plan():
    runs = ((5000, 100), (5100, 50), (20000, 10), (9000, 40000), (100000, 3))
    p = ReadPlan.build(runs, 4096)
    parts = p.pieces(8192)
    assert all(part.size <= 8192 for _, part in parts)
    covered = sorted((dest + d, n) for dest, part in parts for _, n, d, _ in part.spans)
    pos = 0
    for d, n in covered:
        assert d == pos
        pos += n
    assert pos == p.size
    file_of = {dest + d: off for dest, part in parts for off, _, d, _ in part.spans}
    for off, n, dest, _ in p.spans:
        assert file_of[dest] == off


# -- a real plan, bound on a simulated CUDA device ---------------------------------------------------------
PLAN_CASES = {  # tiny model of 8 layers (3.2 MiB each): budgets that make the planner use every tier
    "tiers": {"resident_budget": 14_000_000, "host_budget": 10_000_000, "hybrid_compute": "off"},
    "hybrid": {"resident_budget": 14_000_000, "host_budget": 10_000_000, "hybrid_compute": "auto",
               "kv_cache": {"placement": "resident", "max_context": 64}},
    "kv-host": {"resident_budget": 14_000_000, "host_budget": 10_000_000, "hybrid_compute": "auto",
                "kv_cache": {"placement": "host", "max_context": 64}},
}


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    from tiny_llama import TinyConfig, write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny8") / "t.gguf",
                            TinyConfig(n_layers=8, dim=512, ffn=1536, tied=False, seed=3, ctx=256))


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_every_planned_tier_is_bound_where_the_plan_says(tiny8, case):
    """planner -> Placement.from_plan -> build_weights on a simulated CUDA device: resident tensors in
    device memory, host-tier layers in the exact-size pinned host store (and, hybrid, computed there by
    the CPU at decode), disk layers read through the ring, the embedding in its tier; device_for and
    kv_device follow the plan; every bound byte is the file's."""
    import dataclasses

    from engine.gguf_file import GGUFFile
    from engine.spec import ModelSpec
    from engine.tiers.config import load_config
    from engine.tiers.footprint import footprint_from_gguf
    from engine.tiers.hardware import PRESETS
    from engine.tiers.planner import Workload, plan
    from engine.tiers.runtime import Placement, build_weights, head_info
    from engine.weights import layer_layout

    f = GGUFFile(tiny8)
    spec = ModelSpec.from_gguf(f)
    hw = dataclasses.replace(PRESETS["rtx4090"](), resident_bytes=1 << 30, host_bytes=1 << 30)
    cfg = load_config({"device": "cuda", "io_backend": "posix", "kv_cache": {"max_context": 64}, **PLAN_CASES[case]})
    kv_host = case == "kv-host"
    p = plan(footprint_from_gguf(f, spec), hw, cfg, Workload(1, 16, 16))
    tiers = {lp.tier for lp in p.layers}
    assert tiers == {"resident", "host", "disk"} if case == "tiers" else {"resident", "host"} <= tiers
    assert any(lp.cpu_decode for lp in p.layers) == (case != "tiers")
    assert p.kv_tier == ("host" if kv_host else "resident")
    layouts = [layer_layout(f, spec, i) for i in range(spec.n_layers)]
    placement = Placement.from_plan(p, layouts, head_info(f, spec))
    staging, ops = sim_staging("lazy")
    device = types.SimpleNamespace(name="cuda-sim", staging=staging, kv_dtype=torch.float16)
    threads = torch.get_num_threads()
    reader = FileReader(str(tiny8), backend="posix", threads=p.io_threads)
    try:
        w, glob = build_weights(f, spec, layouts, placement, reader, device, cpu_threads=1, cpu_activations="int8")
        assert (w.cpu_device is not device) == (case != "tiers")
        if w.cpu_device is not device:  # the CPU's hybrid layers round activations as the config says
            assert w.cpu_device.activations == "int8"
        host = w.host.buf
        assert (host.data_ptr(), host.numel()) in ops.pinned  # the host tier: one exact-size pinned allocation
        assert host.numel() == sum(pl.size for pl in w.host.plans.values())

        def inside(t, buf):
            return buf.data_ptr() <= t.data_ptr() and t.data_ptr() + t.numel() <= buf.data_ptr() + buf.numel()

        seen = []
        for rows in (16, 1, 1):  # a prefill pass, then decode passes
            for lp, lay in zip(p.layers, layouts):
                i = lp.index
                dev = w.device_for(i, rows)
                assert dev is (w.cpu_device if lp.cpu_decode and rows <= p.cpu_max_rows else device)
                assert w.kv_device(i) is (w.cpu_device if lp.cpu_decode or kv_host else device)
                got = w.layer(i, rows)
                for role, t in lay.tensors:
                    data = getattr(got, role)
                    data = data.data if hasattr(data, "data") and not isinstance(data, torch.Tensor) else data
                    if role in lp.resident_roles:
                        where = inside(data, w.resident.buf) and ops.on_device(data)
                    elif dev is not device:  # hybrid decode: the CPU reads the pinned host store itself
                        where = lp.tier == "host" and inside(data, host)
                    else:  # host and disk tiers alike reach the GPU through a ring slot
                        where = any(inside(data, s) for s in w.dev_slots)
                    assert where, (rows, i, role, lp.tier)
                    seen.append((t, data.view(torch.uint8) if data.dtype != torch.uint8 else data))
                    ops.enqueue(ops.streams["compute"], lambda s=seen, n=len(seen) - 1: s.__setitem__(
                        n, (s[n][0], s[n][1].clone())))  # the 'kernel' reads the bytes in stream order
                w.release(i)
        ops.finish()
        for t, data in seen:
            assert torch.equal(data, torch.from_numpy(f.view(t).numpy().copy())), t.name
        embd = glob.token_embd.data
        if p.embedding_tier == "resident":
            assert ops.on_device(embd)
        elif p.embedding_tier == "host":
            assert inside(embd, host) and not ops.on_device(embd)
        else:
            assert not ops.on_device(embd) and not inside(embd, host)
        assert torch.equal(embd, f.view(f.tensor("token_embd.weight")))
        assert w.cpu_max_rows == p.cpu_max_rows and w.cpu_units == placement.cpu_units
        assert w.cpu_device.kv_dtype == torch.float16  # host KV keeps the plan's dtype
    finally:
        torch.set_num_threads(threads)
        reader.close()
