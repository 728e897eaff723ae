"""The fuzzer's fixed-seed CI subset: 2,100 mutated GGUF files and tier configs through engine.load and
one forward pass, in long-lived workers under a time and memory watchdog (scripts/fuzz.py). Every case
must end `ok` or `typed`: no untyped exception, no signal, no hang, no memory blow-up."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_fuzz_ci_subset(tmp_path):
    out = tmp_path / "fuzz.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz.py"), "--gguf", "1800", "--config", "300",
                        "--seed", "1", "--jobs", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.exists(), r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["gguf_cases"] == 1800 and res["config_cases"] == 300
    assert res["findings"] == [] and r.returncode == 0, r.stdout[-5000:]
    for kind in ("gguf", "config"):
        counts = res[kind]
        assert counts["untyped"] == counts["signal"] == counts["hang"] == counts["memory"] == 0
        # not vacuous: the mutations reach both the refusals and files that load and compute
        assert counts["typed"] >= 0.3 * res[f"{kind}_cases"] and counts["ok"] >= 0.05 * res[f"{kind}_cases"], counts


def test_fuzz_classifies_a_crash_a_hang_and_an_untyped_error(tmp_path, monkeypatch):
    """The watchdog itself: a worker killed by a signal, one that never answers and one that raises a
    non-engine exception are told apart (run with a stand-in worker command)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import fuzz

    script = tmp_path / "w.py"
    script.write_text(
        "import json, os, signal, sys, time\n"
        "for line in sys.stdin:\n"
        "    c = json.loads(line)\n"
        "    if c['id'] == 0: os.kill(os.getpid(), signal.SIGBUS)\n"
        "    if c['id'] == 1: time.sleep(60)\n"
        "    if c['id'] == 2: x = bytearray(600 << 20); time.sleep(5)\n"
        "    out = 'untyped' if c['id'] == 3 else 'typed'\n"
        "    print(json.dumps({'id': c['id'], 'outcome': out, 'error': 'TypeError'}), flush=True)\n")

    class W(fuzz.Worker):
        def start(self):
            self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, bufsize=1)

    w = W({})
    try:
        got = [w.run({"id": i}, timeout=3, mem_mb=400, first=False)[0] for i in range(5)]
    finally:
        w.close()
    assert got == ["signal", "hang", "memory", "untyped", "typed"]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _gone(pids: list[int], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_fuzz_leaves_no_files_or_workers_when_killed(tmp_path, sig):
    """Interrupted mid-run, the fuzzer removes its work folder (under --tmp, /dev/shm by default) and
    its workers; killed outright (SIGKILL), its workers die with it and the next run removes the
    folder it left."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import fuzz

    p = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "fuzz.py"), "--gguf", "100000", "--config", "0",
                          "--jobs", "1", "--tmp", str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("engine-fuzz-*/w0.gguf")) and time.monotonic() < deadline:
            assert p.poll() is None
            time.sleep(0.1)
        assert list(tmp_path.glob("engine-fuzz-*/w0.gguf")), "the fuzzer never started its cases"
        workers = _children(p.pid)
        assert workers
        p.send_signal(sig)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert _gone(workers), "a worker outlived the fuzzer"
    if sig == signal.SIGKILL:
        (left,) = tmp_path.iterdir()
        (bystander := tmp_path / f"engine-fuzz-{os.getpid()}-live").mkdir()  # a running fuzzer's folder stays
        assert fuzz.sweep_stale(str(tmp_path)) == [left]
        bystander.rmdir()
    assert list(tmp_path.iterdir()) == []
