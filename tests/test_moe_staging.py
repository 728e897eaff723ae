"""The expert cache on a simulated CUDA device (tests/stream_sim.py runs the copy and compute streams in
adversarial orders): routed experts from every tier -- resident (device copy), host (page-locked, uploaded
into a cache slot), disk (read into a page-locked slot, then uploaded) -- are bound in device memory and
hold their own bytes whenever the compute stream reads them, with a cache smaller than a pass's experts
(slots reused within the pass) and with prefetch hints; the same code on the CPU staging."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from stream_sim import POLICIES, sim_staging
from test_tiers_staging import SyncReader

from engine.formats import FORMATS
from engine.gguf_file import TensorInfo
from engine.tiers.experts import ExpertStore, region_name
from engine.tiers.io import FileReader
from engine.tiers.scheduler import HostStore, ResidentStore
from engine.tiers.staging import HostStaging

FMT = FORMATS["F32"]
L, E = 3, 6
TIERS = {(i, e): ("resident", "host", "disk")[(i + 2 * e) % 3] for i in range(L) for e in range(E)}


@pytest.fixture(scope="module")
def expert_file(tmp_path_factory):
    """Three stacked 'tensors' per layer; expert e's slice of each is contiguous (like GGUF)."""
    path = tmp_path_factory.mktemp("moe_staging") / "experts.bin"
    rng = np.random.default_rng(3)
    slices, off = {}, 4096
    rows = (1200, 1200, 2000)  # bytes of one expert's slice of gate, up, down
    starts = {}
    for i in range(L):
        for r, n in enumerate(rows):
            starts[(i, r)] = off
            off += E * n + 512
    for i in range(L):
        for e in range(E):
            slices[(i, e)] = tuple(TensorInfo(f"blk.{i}.{role}[{e}]", FMT, (n // 4, 1), starts[(i, r)] + e * n, n)
                                   for r, (role, n) in enumerate(zip(("gate", "up", "down"), rows)))
    data = rng.integers(0, 256, size=off + 4096, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return path, data, slices


def make_store(slices, reader, staging, slots):
    resident = ResidentStore(reader, [t for k, ts in slices.items() if TIERS[k] == "resident" for t in ts], staging,
                             bounce=8192)
    host = HostStore(reader, {region_name(*k): ts for k, ts in slices.items() if TIERS[k] == "host"}, staging)
    return ExpertStore(slices, TIERS, resident, host, reader, staging, slots)


def run_passes(store, ops, routes, hints=False):
    """Per pass and layer: routed(), then each expert taken in ids order and a 'kernel' snapshotting its
    bytes on the compute stream (at once without a device). -> [((i, e), (gate, up, down) bytes)]"""
    seen = []
    for route in routes:
        for i, ids in enumerate(route):
            got = store.routed(i, ids, 1)
            for e in ids:
                ew = got[e]
                rec = ((i, e), [])
                seen.append(rec)

                def kernel(rec=rec, ew=ew):
                    rec[1].extend(w.data.clone() for w in (ew.gate, ew.up, ew.down))

                if ops is None:
                    kernel()
                else:
                    ops.enqueue(ops.streams["compute"], kernel)
            if hints and i + 1 < L:
                store.hint(i + 1, route[i + 1][::-1])  # a guess: the right experts
                store.hint(i + 1, [(e + 1) % E for e in route[i + 1]])  # and some wrong ones
    if ops is not None:
        ops.finish()
    return seen


def wrong(seen, data, slices):
    return [k for k, got in seen
            if any(not torch.equal(g, torch.from_numpy(data[t.offset:t.offset + t.nbytes].copy()))
                   for g, t in zip(got, slices[k]))]


ROUTES = [[(0, 1, 2, 3), (1, 4), (0, 5)], [(2, 3), (0, 1, 2, 3, 4, 5), (5,)], [(0, 1, 2, 3), (1, 4), (0, 5)]]


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("slots", [1, 2, 8])
@pytest.mark.parametrize("hints", [False, True])
def test_routed_experts_hold_their_bytes_on_the_device(expert_file, policy, slots, hints):
    path, data, slices = expert_file
    staging, ops = sim_staging(policy)
    store = make_store(slices, SyncReader(path, data), staging, slots)
    seen = run_passes(store, ops, ROUTES, hints)
    assert wrong(seen, data, slices) == []
    st = store.stats.snapshot()
    assert st.hits + st.misses == sum(1 for r in ROUTES for i, ids in enumerate(r) for e in ids
                                      if TIERS[(i, e)] != "resident")
    for k, ts in slices.items():  # every expert bound in device memory, wherever it lives
        got = store.routed(k[0], [k[1]], 1)[k[1]]
        assert all(ops.on_device(w.data) for w in (got.gate, got.up, got.down)), (k, TIERS[k])
        in_slot = any(s.data_ptr() <= got.gate.data.data_ptr() < s.data_ptr() + s.numel() for s in store.dev_slots)
        assert in_slot == (TIERS[k] != "resident")
    # page-locked: the host tier exactly, the disk slots, and bounce buffers of at most 8 KiB
    assert (store.host.buf.data_ptr(), store.host.nbytes) in ops.pinned
    assert (store.arena.data_ptr(), store.n_slots * store.slot_bytes) in ops.pinned


@pytest.mark.parametrize("slots", [1, 3])
def test_the_cpu_staging_runs_the_same_code(expert_file, slots):
    path, data, slices = expert_file
    reader = FileReader(str(path), backend="posix", threads=2)
    try:
        store = make_store(slices, reader, HostStaging(), slots)
        assert wrong(run_passes(store, None, ROUTES, hints=True), data, slices) == []
        # on the CPU the host tier is computed in place: only disk experts move
        assert set(store.plans) == {k for k in slices if TIERS[k] == "disk"}
    finally:
        reader.close()


def test_unused_guesses_leave_room_for_a_pass(expert_file):
    """Hints may hold at most n_slots - len(ids) slots with guesses not yet used: the pass that follows
    keeps room for as many experts as were guessed."""
    path, data, slices = expert_file
    reader = FileReader(str(path), backend="posix", threads=2)
    try:
        store = make_store(slices, reader, HostStaging(), 4)
        disk = [e for e in range(E) if TIERS[(1, e)] == "disk"]
        store.hint(1, disk[:2])  # 4 slots - 2 guessed: both may start
        assert sum(ent.hinted for ent in store.lru.values()) == 2
        store.hint(2, [e for e in range(E) if TIERS[(2, e)] == "disk"][:2])  # 4 - 2 - 2 held: none
        assert sum(ent.hinted for ent in store.lru.values()) == 2
        got = store.routed(1, disk[:2], 1)  # the guesses are hits, then no longer guesses
        assert store.stats.hits == 2 and store.stats.hinted_used == 2
        assert wrong([((1, e), [w.data.clone() for w in (got[e].gate, got[e].up, got[e].down)])
                      for e in disk[:2]], data, slices) == []
    finally:
        reader.close()
