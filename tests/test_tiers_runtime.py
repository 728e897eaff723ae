"""Stores and the streaming scheduler: every placement gives bit-identical logits; failures are clear."""
from __future__ import annotations

import collections
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

import engine
import engine.tiers.io
from engine.defaults import default_model_path
from engine.errors import PlanError, WeightIOError
from engine.gguf_file import GGUFFile
from engine.model import Model
from engine.spec import ModelSpec
from engine.tiers.io import FileReader, ReadPlan, aligned_empty
from engine.tiers.runtime import Placement, head_info
from engine.weights import layer_layout
from tiny_llama import TinyConfig, write_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
TOKENS = [5, 17, 300, 42, 8, 99, 1, 250, 3, 77]


def placements(path):
    """All-resident, all-streamed with ring depths 1..3, and mixed plans with partial residency."""
    f = GGUFFile(path)
    spec = ModelSpec.from_gguf(f)
    lays = [layer_layout(f, spec, i) for i in range(spec.n_layers)]
    head = head_info(f, spec)
    yield "resident", Placement.uniform(lays, head, stream=False)
    for k in (1, 2, 3):
        yield f"disk-k{k}", Placement.uniform(lays, head, stream=True, ring_size=k)
    yield "disk-head-in-3-chunks", Placement.uniform(lays, head, stream=True, ring_size=2, head_chunks=3)
    # every other block streamed, the FFN of block 0 streamed while its attention stays resident
    mixed = [frozenset(t.name for r, t in lay.tensors if (i % 2 == 1) or (i == 0 and r.startswith("ffn_")))
             for i, lay in enumerate(lays)]
    whole = ((0, head.shape[0]),)
    yield "mixed-head-resident", Placement(tuple(mixed) + (frozenset(),), whole, "resident", 2)
    yield "mixed-head-streamed", Placement(tuple(mixed) + (frozenset({head.name}),), whole, "disk", 2)
    # the host tier (on the CPU: bound in the host store, no ring) beside disk units and a resident one
    yield "host-all", Placement.uniform(lays, head, stream=True, ring_size=2, head_chunks=2, source="host")
    n = len(mixed)
    yield "host-and-disk", Placement(tuple(mixed) + (frozenset({head.name}),), whole, "host", 2,
                                     sources=tuple("host" if i % 3 == 0 else "disk" for i in range(n + 1)))


def run(path, placement):
    with Model.load(path, placement=placement) as m:
        logits = m.logits(TOKENS)
        text = "".join(m.generate(TOKENS[:3], max_tokens=12, temperature=0))
        return logits, text, m.plan_summary()


@pytest.mark.parametrize("cfg", [TinyConfig(n_layers=3), TinyConfig(n_layers=4, fmt=(QT.Q4_K, QT.Q6_K, QT.Q5_0),
                                                                       tied=False, rope_freqs=True, seed=5)])
def test_all_placements_bit_identical_tiny(tmp_path, cfg):
    path = write_tiny_llama(tmp_path / "t.gguf", cfg)
    results = {name: run(path, p) for name, p in placements(path)}
    ref_logits, ref_text, _ = results.pop("resident")
    for name, (logits, text, summary) in results.items():
        assert np.array_equal(logits, ref_logits), name
        assert text == ref_text, name
        assert ("host tier" if name.startswith("host") else "streamed") in summary, (name, summary)


def run_config(path, config, rank=0):
    with engine.load(path, config=config, rank=rank) as m:
        logits = m.logits(TOKENS)
        text = "".join(m.generate(TOKENS[:3], max_tokens=12, temperature=0))
        return logits, text, m.plan_summary()


def test_all_placements_bit_identical_smollm2():
    path = default_model_path()
    got = {name: run(path, p) for name, p in placements(path)
           if name in ("resident", "disk-k2", "disk-head-in-3-chunks", "mixed-head-streamed")}
    configs = Path(__file__).resolve().parents[1] / "configs"
    for name in ("cpu-default", "cpu-tight"):
        got[name] = run_config(path, configs / f"{name}.yaml")
    got["cpu-tight-runner-up"] = run_config(path, configs / "cpu-tight.yaml", rank=1)  # the planner's second choice
    assert "streamed" in got["cpu-tight"][2] and "all resident" in got["cpu-default"][2]
    assert got["cpu-tight-runner-up"][2] != got["cpu-tight"][2]
    ref_logits, ref_text, _ = got.pop("resident")
    for name, (logits, text, _) in got.items():
        assert np.array_equal(logits, ref_logits), name
        assert text == ref_text, name


def test_rank_beyond_the_placements_that_fit_is_a_plan_error():
    with pytest.raises(PlanError, match="rank 100000") as ei:
        engine.load(default_model_path(), config={"device": "cpu"}, rank=100000)
    assert ei.value.field == "rank"


def test_read_plan_alignment():
    runs = ((5000, 100), (5100, 50), (20000, 10), (9000, 4000))
    p = ReadPlan.build(runs, 4096)
    for off, n, dest, need in p.spans:
        assert off % 4096 == 0 and n % 4096 == 0 and dest % 4096 == 0 and need <= n
    for off, n in runs:  # every byte of every run is inside a span, found at a consistent place
        assert p.where(off + n - 1) - p.where(off) == n - 1
    plain = ReadPlan.build(runs, 1)
    assert plain.size == sum(n for _, n in runs) and plain.where(9000) == 150


@pytest.fixture(params=["native", "python"])
def reader_kind(request, monkeypatch):
    """Both read paths: native threads (preadq.cpp) and the Python-thread fallback."""
    if request.param == "python":
        monkeypatch.setattr(engine.tiers.io, "_native_library", lambda: None)
    else:
        assert engine.tiers.io._native_library() is not None  # a failed build raises KernelError
    return request.param


@pytest.mark.parametrize("backend", ["odirect", "posix"])
def test_reader_delivers_the_file_bytes(tmp_path, reader_kind, backend):
    """Runs at odd offsets and lengths, chunked across threads (64 KiB requests), land where the
    plan says, byte for byte; the file's tail reads short without error when `need` is met."""
    path = tmp_path / "data.bin"
    data = np.random.default_rng(7).integers(0, 256, 3 * 1024 * 1024 + 777, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    runs = ((5, 100), (70000, 1 << 20), (1 << 20, 5000), (len(data) - 777, 777))
    reader = FileReader(str(path), backend=backend, threads=3, chunk=64 << 10)
    try:
        assert reader.native == (reader_kind == "native") and reader.direct == (backend == "odirect")
        plan = reader.plan(runs)
        buf = aligned_empty(plan.size + 8192)
        buf.fill_(0xAB)
        reader.submit(plan, buf, "runs").wait()
        got = buf.numpy()
        for off, n in runs:
            p = plan.where(off)
            assert got[p:p + n].tobytes() == data[off:off + n]
        assert (got[plan.size:] == 0xAB).all()  # nothing written past the plan
    finally:
        reader.close()


def _streamed_model(tmp_path, n_layers=3):
    src = write_tiny_llama(tmp_path / "src.gguf", TinyConfig(n_layers=n_layers))
    path = tmp_path / "victim.gguf"
    shutil.copy(src, path)
    f = GGUFFile(path)
    spec = ModelSpec.from_gguf(f)
    lays = [layer_layout(f, spec, i) for i in range(spec.n_layers)]
    return path, Model.load(path, placement=Placement.uniform(lays, head_info(f, spec), stream=True, ring_size=1))


def test_file_shrinks_mid_generation(tmp_path, reader_kind):
    path, m = _streamed_model(tmp_path)
    assert m.reader.native == (reader_kind == "native")
    gen = m.generate(TOKENS[:3], max_tokens=50, temperature=0, stop=())
    next(gen, None)
    os.truncate(path, m.file.tensor("blk.1.attn_q.weight").offset)  # blocks 1.. and the head are gone
    with pytest.raises(WeightIOError) as ei:
        for _ in gen:
            pass
    msg = str(ei.value)
    assert str(path) in msg and ("blk." in msg or "output" in msg) and "truncated" in msg
    m.close()


def test_read_error_is_reported_with_layer_and_file(tmp_path, reader_kind):
    path, m = _streamed_model(tmp_path)
    expected = m.logits(TOKENS[:2])
    m.reader.inject_fault(m.file.tensor("blk.2.attn_norm.weight").offset - 4096, errno.EIO)
    t0 = time.monotonic()
    with pytest.raises(WeightIOError, match=r"(blk\.2|output).*Input/output error") as ei:
        m.logits(TOKENS[:2])
    assert str(path) in str(ei.value)
    assert time.monotonic() - t0 < 30
    m.reader.inject_fault(None)
    assert np.array_equal(m.logits(TOKENS[:2]), expected)  # the scheduler resynchronises after the failure
    m.close()


def test_ctrl_c_during_streaming_exits_cleanly(tmp_path):
    cfg = tmp_path / "disk.yaml"
    cfg.write_text("resident_budget: 3%\n")
    proc = subprocess.Popen([sys.executable, "-m", "engine.generate", "Once upon a time", "--config", str(cfg),
                             "--max-tokens", "100000", "--temperature", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell's background job inherits SIGINT ignored, and Python keeps it so
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.read(1)  # streaming has started
    assert first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"


def test_trace_shows_every_read_and_compute_and_their_overlap(tmp_path, reader_kind):
    """--trace: a Perfetto-loadable JSON with, per token, a read span of every streamed unit and a compute
    span of every unit; spans on one track never overlap (what Perfetto draws); reads of the next units run
    while the current one computes. Every compute span is stretched to >= 20 ms (a sleep before release,
    which frees the CPU and the GIL): SmolLM2's units compute in ~0.5 ms, and on a loaded machine the
    reads issued ahead of a unit could otherwise finish before it starts, or start only after it ended,
    so whether they overlapped it measured the load rather than the scheduler."""
    out = tmp_path / "trace.json"
    tokens = 3
    with engine.load(config=str(ROOT / "configs" / "cpu-tight.yaml"), n_ctx=64, trace=str(out)) as m:
        streamed = {m.weights.units[i].name for i in m.weights.seq}
        units = [u.name for u in m.weights.units]
        assert m.weights.k >= 2  # a ring of two or more: the next unit's read is issued before this one computes
        release = m.weights.release

        def slow_release(i: int) -> None:
            time.sleep(0.02)
            release(i)

        m.weights.release = slow_release
        list(m.generate([1, 2, 3, 4], max_tokens=tokens, temperature=0, stop=()))
    doc = json.loads(out.read_text())
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    named = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M"}
    count = collections.Counter(e["name"] for e in spans)
    assert streamed and len(streamed) < len(units)  # cpu-tight streams some units, keeps others
    for u in units:  # prefill + decode steps
        assert count[f"compute {u}"] >= tokens, u
    for u in streamed:
        assert count[f"read {u}"] >= tokens, u
    by_track = collections.defaultdict(list)
    for e in spans:
        by_track[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
    for tid, iv in by_track.items():
        iv.sort()
        assert all(b[0] >= a[1] - 1e-3 for a, b in zip(iv, iv[1:])), named.get(tid, tid)
    reads = [e for e in spans if e["name"].startswith("read ")]
    computes = [e for e in spans if e["name"].startswith("compute ")]
    overlapped = sum(any(r["ts"] < c["ts"] + c["dur"] and c["ts"] < r["ts"] + r["dur"] for c in computes)
                     for r in reads)
    assert overlapped >= len(reads) // 2, f"{overlapped} of {len(reads)} reads overlap a compute span"
    if reader_kind == "native":
        assert any(name.startswith("reads in flight") for name in named.values())
        # each read records how long it waited for a reader thread after submit: a real interval
        assert all(0 <= r["args"]["queued_us"] < 30e6 for r in reads)


@pytest.mark.parametrize("ring", [1, 2, 3])
def test_read_error_on_the_first_streamed_unit_recovers(tmp_path, reader_kind, ring):
    """A failed read of the first unit of the cycle (the case layer() cannot detect by a unit mismatch):
    the error is typed each time the fault is present, and the first pass after it clears is bit-identical."""
    path, m = _streamed_model(tmp_path)
    with m:
        f = GGUFFile(path)
        spec = ModelSpec.from_gguf(f)
        lays = [layer_layout(f, spec, i) for i in range(spec.n_layers)]
    with Model.load(path, placement=Placement.uniform(lays, head_info(f, spec), stream=True, ring_size=ring)) as m:
        expected = m.logits(TOKENS[:4])
        first = m.weights.plans[m.weights.seq[0]].spans[0][0]  # file offset of blk.0's first read
        m.reader.inject_fault(first, errno.EIO)  # every chunk of blk.0 and after fails
        try:  # units prefetched before the fault may carry this pass
            m.logits(TOKENS[:4])
        except WeightIOError as e:
            assert "Input/output error" in str(e)
        for _ in range(2):  # the pass restarts the cycle at blk.0; a unit whose bytes still sit in their
            # slot from before the fault is not read again, so the first re-read unit fails
            with pytest.raises(WeightIOError, match=r"blk\.\d+.*Input/output error"):
                m.logits(TOKENS[:4])
        m.reader.inject_fault(None)
        assert np.array_equal(m.logits(TOKENS[:4]), expected)
        text = "".join(m.generate(TOKENS[:3], max_tokens=6, temperature=0, stop=()))
        m.reader.inject_fault(first, errno.EIO)
        with pytest.raises(WeightIOError):
            list(m.generate(TOKENS[:3], max_tokens=6, temperature=0, stop=()))
        m.reader.inject_fault(None)
        assert "".join(m.generate(TOKENS[:3], max_tokens=6, temperature=0, stop=())) == text


def test_python_ticket_fails_only_after_every_chunk_stopped_writing():
    """The Python-fallback ticket: a failed chunk must not let wait() return while another chunk still
    writes into the slot (a resync would then reissue reads that the stale chunk overwrites)."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.tiers.io import Ticket

    finished = []

    def slow():
        time.sleep(0.3)
        finished.append("slow")

    def fail():
        raise WeightIOError("chunk failed", path="x.gguf")

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(fail), pool.submit(slow)]
        time.sleep(0.05)  # both chunks started
        queued = pool.submit(lambda: finished.append("queued"))  # waits for a free thread
        with pytest.raises(WeightIOError, match="chunk failed"):
            Ticket(futures + [queued], "blk.0", "x.gguf").wait()
        assert "slow" in finished and all(f.done() for f in futures + [queued])


def test_failed_odirect_probe_does_not_leak_its_descriptor(tmp_path, monkeypatch):
    path = tmp_path / "data.bin"
    path.write_bytes(b"\0" * 8192)
    real = os.preadv

    def refuse(fd, bufs, offset):
        if os.get_blocking(fd) and fcntl_flags(fd) & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, bufs, offset)

    def fcntl_flags(fd):
        import fcntl
        return fcntl.fcntl(fd, fcntl.F_GETFL)

    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(engine.tiers.io.os, "preadv", refuse)
    reader = FileReader(str(path), backend="odirect")
    monkeypatch.setattr(engine.tiers.io.os, "preadv", real)
    try:
        assert not reader.direct
        assert len(set(os.listdir("/proc/self/fd")) - before) == 1  # the buffered descriptor only
    finally:
        reader.close()
    assert set(os.listdir("/proc/self/fd")) - before == set()


def test_too_many_reader_threads_is_a_typed_error_not_an_abort(tmp_path):
    """std::thread failing (here: no address space for the stacks) used to escape the C boundary as an
    uncaught std::system_error and abort the process; now pq_open returns NULL and the reader says why."""
    path = tmp_path / "data.bin"
    path.write_bytes(b"\0" * 8192)
    code = textwrap.dedent(f"""
        import resource, sys
        from engine.tiers.io import FileReader, _native_library
        from engine.errors import WeightIOError
        assert _native_library() is not None
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))  # ~100 stacks
        try:
            FileReader({str(path)!r}, backend="posix", threads=1000)
        except WeightIOError as e:
            print("typed:", e)
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    assert "typed:" in r.stdout and "io_threads" in r.stdout and str(path) in r.stdout
