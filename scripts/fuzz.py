"""Fuzz the engine with mutated GGUF files and tier configs, as an attacker or an unlucky user would.

    python scripts/fuzz.py --gguf 20000 --config 2000 --seed 1 --jobs 2 [--json out.json]

Every case is one mutated file loaded with `engine.load` plus one forward pass (GGUF cases: a seed model
from tests/tiny_llama.py, mutated structure-aware with tests/gguf_edit.py: counts, value and tensor types,
offsets, dims, alignment, truncation at every field boundary, nested arrays, long and non-UTF-8 strings,
byte flips; config cases: a YAML tier config with alias bombs, deep nesting, non-UTF-8 bytes, huge and
wrongly typed values, broken syntax, or random valid values). Cases run in long-lived worker processes
(one per job) under a watchdog: a case that exceeds --timeout is a `hang`, a worker whose RSS exceeds
--mem-mb (polled) or that raises MemoryError is `memory`, a worker killed by a signal is `signal`; those
workers are replaced. The others are `ok` (loaded and computed), `typed` (an engine.errors.EngineError)
or `untyped` (any other exception: a bug). Case i is generated from (seed, i) alone: `--only i` reruns it.
Exit status 1 if any case is untyped, signal, hang or memory.

Case files go to a work folder `engine-fuzz-<pid>-*` under --tmp (/dev/shm by default), removed when the
run ends, is interrupted (Ctrl-C, SIGTERM, SIGHUP: the workers are stopped first) or -- for a parent
killed outright (SIGKILL) -- by the next run, which removes the folders of fuzzers no longer alive.
Workers die with their parent (PR_SET_PDEATHSIG) and exit when their input closes.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gguf_edit import (ARRAY, BOOL, F32, F64, I32, RAW, STRING, U8, U32, U64,  # noqa: E402
                       GGUFDoc, Value, boundaries, decode, encode, payload, relayout)

BAD = ("untyped", "signal", "hang", "memory")
OUTCOMES = ("ok", "typed") + BAD

# ------------------------------------------------------------------ seeds


def write_seeds(directory: Path) -> list[Path]:
    """Small models covering the metadata and tensor variations the loader handles."""
    from gguf import GGMLQuantizationType as QT
    from tiny_llama import TinyConfig, write_tiny_llama

    small = dict(dim=64, n_heads=2, n_kv_heads=1, ffn=128, ctx=64)
    cfgs = [TinyConfig(n_layers=1, **small),
            TinyConfig(n_layers=2, tied=False, fmt=(QT.Q4_K, QT.Q6_K, QT.Q5_0), embd_fmt=QT.Q4_0,
                       dim=256, n_heads=4, n_kv_heads=2, ffn=256, ctx=64),
            TinyConfig(n_layers=1, rope_freqs=True, fmt=(QT.F16, QT.Q4_1), embd_fmt=QT.F32, **small)]
    return [write_tiny_llama(directory / f"seed{i}.gguf", c) for i, c in enumerate(cfgs)]


# ------------------------------------------------------------------ GGUF mutations
HUGE = (0, 1, 2, 3, 7, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**48, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
IMPORTANT_KEYS = ("general.architecture", "general.alignment", "llama.block_count", "llama.context_length",
                  "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
                  "llama.attention.head_count_kv", "llama.rope.freq_base", "llama.rope.dimension_count",
                  "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.attention.key_length",
                  "llama.rope.scaling.type", "llama.rope.scaling.factor", "tokenizer.ggml.model",
                  "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.chat_template", "tokenizer.ggml.scores", "tokenizer.ggml.add_bos_token")


def random_value(r: random.Random, depth: int = 0) -> Value:
    kind = r.randrange(12)
    if kind == 0:
        return Value(U32, r.choice(HUGE) & 0xFFFFFFFF)
    if kind == 1:
        return Value(U64, r.choice(HUGE))
    if kind == 2:
        return Value(I32, r.choice((-1, -2**31, 0, 1, 2**31 - 1)))
    if kind == 3:
        return Value(F32, r.choice((float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e-30, 3.4e38)))
    if kind == 4:
        return Value(F64, r.choice((float("nan"), float("inf"), -0.0, 1e308, 5e-324)))
    if kind == 5:
        return Value(STRING, r.choice(("", "llama", "linear", "none", "x" * r.randrange(1, 5000), "gpt2", "spm")))
    if kind == 6:
        return Value(STRING, b"\xff\xfe" + bytes(r.randrange(256) for _ in range(8)))  # not UTF-8
    if kind == 7:
        return Value(BOOL, r.random() < 0.5)
    if kind == 8 and depth < 3:
        return Value(ARRAY, [random_value(r, depth + 1) for _ in range(r.randrange(4))], ARRAY)
    if kind == 9:
        return Value(ARRAY, [Value(STRING, r.choice(("a", "", "\u00e9"))) for _ in range(r.randrange(5))], STRING)
    if kind == 10:  # an array whose count promises more than the file holds
        return Value(ARRAY, struct.pack("<IQ", r.choice((U8, U32, STRING, ARRAY)), r.choice(HUGE)) + b"\0" * 8, RAW)
    return Value(ARRAY, [Value(U32, r.randrange(2**32)) for _ in range(r.randrange(4))], U32)


def _pick_key(r: random.Random, doc: GGUFDoc) -> int:
    names = [k for k, _ in doc.kvs]
    if r.random() < 0.7:
        known = [i for i, k in enumerate(names) if k in IMPORTANT_KEYS]
        if known:
            return r.choice(known)
    return r.randrange(len(names))


def m_counts(r, doc, raw):
    doc.counts[r.choice(("tensor_count", "kv_count"))] = r.choice(
        HUGE + (len(doc.tensors) + 1, max(0, len(doc.tensors) - 1), len(doc.kvs) + 1, max(0, len(doc.kvs) - 1)))
    return encode(doc)


def m_kv_type(r, doc, raw):
    i = _pick_key(r, doc)
    key, v = doc.kvs[i]
    doc.kvs[i] = (key, Value(r.choice(list(range(14)) + [99, 2**32 - 1]), payload(v), RAW))  # same bytes, other type
    return encode(doc)


def m_kv_value(r, doc, raw):
    i = _pick_key(r, doc)
    doc.kvs[i] = (doc.kvs[i][0], random_value(r))
    return encode(doc)


def m_remove_or_duplicate(r, doc, raw):
    if r.random() < 0.5:
        if r.random() < 0.5 and doc.kvs:
            del doc.kvs[_pick_key(r, doc)]
        elif doc.tensors:
            del doc.tensors[r.randrange(len(doc.tensors))]
    elif r.random() < 0.5:
        doc.kvs.append(doc.kvs[_pick_key(r, doc)])
    else:
        doc.tensors.append(doc.tensors[r.randrange(len(doc.tensors))])
    return encode(doc)


def m_tensor_type(r, doc, raw):
    t = r.choice(doc.tensors)
    t.ggml_type = r.choice(list(range(40)) + [2**31, 2**32 - 1])
    return encode(doc)


def m_tensor_dims(r, doc, raw):
    t = r.choice(doc.tensors)
    k = r.randrange(4)
    if k == 0:
        t.dims[r.randrange(len(t.dims))] = r.choice(HUGE)
    elif k == 1:
        t.dims = t.dims[::-1]
    elif k == 2:
        t.dims = t.dims + [r.choice((1, 2, 2**32))] if r.random() < 0.5 else t.dims[:-1] or [1]
    else:
        t.dims = [r.choice(HUGE) for _ in range(r.choice((0, 1, 5, 9)))]
    return encode(doc)


def m_tensor_offset(r, doc, raw):
    t = r.choice(doc.tensors)
    t.offset = r.choice((t.offset + 1, t.offset + doc.alignment, max(0, t.offset - doc.alignment), len(doc.data),
                         len(doc.data) - 1, r.choice(doc.tensors).offset) + HUGE)
    return encode(doc)


def m_alignment(r, doc, raw):
    a = r.choice((0, 1, 2, 3, 4, 8, 24, 64, 4096, 2**31, 2**32 - 1))
    if r.random() < 0.5 and a and not a & (a - 1) and a <= 4096:
        return encode(relayout(doc, a, r.choice((0, 0, 1, 3))))  # valid: loads and computes
    doc.set("general.alignment", Value(r.choice((U32, U64, I32, STRING)), a if r.random() < 0.9 else "32"))
    if doc.get("general.alignment").vtype == STRING:
        doc.set("general.alignment", Value(STRING, str(a)))
    elif doc.get("general.alignment").vtype == I32:
        doc.set("general.alignment", Value(I32, a - 2**32 if a >= 2**31 else a))
    return encode(doc)


def m_truncate(r, doc, raw):
    b = [x for x in boundaries(doc) if x < len(raw)]
    cut = r.choice(b) + r.choice((0, 0, 1, -1, 2, -2, 7)) if r.random() < 0.9 else r.randrange(len(raw))
    return raw[:max(0, min(len(raw) - 1, cut))]


def m_nested(r, doc, raw):
    depth = r.choice((2, 3, 4, 5, 6, 50, 1000, 100000))
    body = struct.pack("<IQ", ARRAY, 1) * (depth - 1) + struct.pack("<IQB", U8, 1, 1)
    if r.random() < 0.3:  # wide: many empty nested arrays
        body = struct.pack("<IQ", ARRAY, r.choice((1000, 100000, 2**40))) + struct.pack("<IQ", U8, 0) * 1000
    doc.kvs.insert(r.randrange(len(doc.kvs) + 1), (r.choice(("test.nested",) + IMPORTANT_KEYS), Value(ARRAY, body, RAW)))
    return encode(doc)


def m_long_string(r, doc, raw):
    n = r.choice((1000, 65536, 1 << 20, 5 << 20))
    k = r.randrange(4)
    if k == 0:
        doc.kvs.append(("k" * n, Value(U8, 1)))
    elif k == 1:
        doc.kvs.insert(r.randrange(len(doc.kvs) + 1), ("test.long", Value(STRING, "v" * n)))
    elif k == 2:
        r.choice(doc.tensors).name = "t" * r.choice((64, 1024, 1025, n))
    else:  # a length field that promises more than the file holds
        i = _pick_key(r, doc)
        doc.kvs[i] = (doc.kvs[i][0], Value(STRING, struct.pack("<Q", r.choice(HUGE)) + b"abc", RAW))
    return encode(doc)


def m_bad_utf8(r, doc, raw):
    junk = bytes(r.randrange(128, 256) for _ in range(r.randrange(1, 6))).decode("utf-8", "surrogateescape")
    k = r.randrange(3)
    if k == 0:
        i = _pick_key(r, doc)
        doc.kvs[i] = (doc.kvs[i][0] + junk, doc.kvs[i][1])
    elif k == 1:
        r.choice(doc.tensors).name += junk
    else:
        toks = doc.get("tokenizer.ggml.tokens")
        if toks is not None and toks.etype == STRING:
            items = list(toks.value)
            items[r.randrange(len(items))] = Value(STRING, junk)
            doc.set("tokenizer.ggml.tokens", Value(ARRAY, items, STRING))
    return encode(doc)


def m_version(r, doc, raw):
    doc.version = r.choice((0, 1, 2, 4, 2**24, 3 << 24, 2**32 - 1))
    return encode(doc)


def m_flip(r, doc, raw):
    data = bytearray(raw)
    end = min(len(data), boundaries(doc)[-1 - len(doc.tensors) * 2] + 64)  # the header, mostly
    for _ in range(r.randrange(1, 9)):
        data[r.randrange(end)] ^= 1 << r.randrange(8)
    return bytes(data)


def m_data(r, doc, raw):
    t = r.choice(doc.tensors)
    start = len(raw) - len(doc.data) + t.offset
    data = bytearray(raw)
    fill = r.choice((b"\xff", b"\x00", b"\x7f\xc0"))  # NaN halves, zeros, 0xff scales
    data[start:start + t.nbytes] = (fill * (t.nbytes // len(fill) + 1))[:t.nbytes]
    return bytes(data)


GGUF_MUTATORS = {f.__name__[2:]: f for f in (m_counts, m_kv_type, m_kv_value, m_remove_or_duplicate, m_tensor_type,
                                              m_tensor_dims, m_tensor_offset, m_alignment, m_truncate, m_nested,
                                              m_long_string, m_bad_utf8, m_version, m_flip, m_data)}


def gguf_case(seed_docs: list[tuple[GGUFDoc, bytes]], r: random.Random) -> tuple[bytes, list[str]]:
    doc, raw = seed_docs[r.randrange(len(seed_docs))]
    names = []
    for _ in range(r.choice((1, 1, 1, 2, 3))):
        name = r.choice(list(GGUF_MUTATORS))
        names.append(name)
        try:
            d = decode(raw) if names[:-1] else doc.copy()
            raw = GGUF_MUTATORS[name](r, d, raw)
        except Exception:  # a previous mutation left a structure our own decoder cannot follow: stop there
            names[-1] += "(skipped)"
            break
    return raw, names


# ------------------------------------------------------------------ config mutations
CONFIG_FIELDS = ("device", "resident_budget", "host_budget", "slow_tier", "prefetch_depth", "staging_buffers",
                 "io_backend", "io_threads", "compute_threads", "hardware", "cpu_activations", "kv_cache",
                 "kv_cache.placement", "kv_cache.max_context", "kv_cache.dtype")
VALID = {"device": ["cpu", "auto"], "resident_budget": ["3%", "20%", "100%", "1MiB", "64 MB", 10**9, "auto"],
         "host_budget": ["1GiB", "auto"], "slow_tier": ["disk", "none"], "prefetch_depth": [1, 2, "auto"],
         "staging_buffers": [2, 3, 4], "io_backend": ["posix", "odirect", "auto"], "io_threads": [1, 2, 4],
         "compute_threads": [1, 2], "hardware": ["auto"], "cpu_activations": ["int16", "int8"],
         "kv_cache.placement": ["auto", "resident", "host"],
         "kv_cache.max_context": [16, 64, 4096], "kv_cache.dtype": ["auto", "f32", "f16"]}


def _yaml_scalar(v) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v)


def _doc(fields: dict[str, str]) -> str:
    """YAML text from field -> YAML value text (kv_cache.* nested)."""
    top = [f"{k}: {v}" for k, v in fields.items() if "." not in k]
    kv = [f"  {k.split('.', 1)[1]}: {v}" for k, v in fields.items() if k.startswith("kv_cache.")]
    if kv and "kv_cache" not in fields:
        top.append("kv_cache:\n" + "\n".join(kv))
    return "\n".join(top) + "\n"


def _bomb(r) -> str:
    levels, width = r.choice(((9, 9), (12, 10), (20, 2))), None
    levels, width = levels
    v = "&a0 [" + ", ".join(["lol"] * width) + "]"
    for i in range(1, levels):
        v = f"&a{i} [{v}, " + ", ".join([f"*a{i - 1}"] * (width - 1)) + "]"
    return v


def config_case(r: random.Random) -> tuple[bytes, list[str]]:
    fields = {k: _yaml_scalar(r.choice(v)) for k, v in VALID.items() if r.random() < 0.3}
    fields.setdefault("device", "cpu")
    kind = r.choice(("bomb", "nesting", "utf8", "huge", "random", "unknown", "syntax", "valid", "valid", "hardware"))
    target = r.choice(CONFIG_FIELDS)
    if kind == "bomb":
        fields[target] = _bomb(r)
    elif kind == "nesting":
        n = r.choice((50, 1000, 20000, 200000))
        fields[target] = r.choice(("[" * n + "]" * n, "{a: " * n + "1" + "}" * n))
    elif kind == "huge":
        fields[target] = r.choice(("9" * r.choice((20, 400, 4300, 5000, 100000)), "-" + "9" * 30, ".inf", "-.inf",
                                   ".nan", "1.0e+308", "1.7976931348623157e+309", "99999999999999999999 TiB",
                                   "0x" + "f" * 40, "1e400%", "-0"))
    elif kind == "random":
        fields[target] = r.choice(("[]", "{}", "null", "true", "~", "''", "[1, 2]", "{placement: host}", "0",
                                   "-1", "1.5", "'50%'", "'0%'", "'101%'", "'-1GiB'", "'1.5.5 GB'", "'" + "x" * 5000 + "'",
                                   "!!binary aGVsbG8=", "2001-12-14", "'auto '", "AUTO", "'../../etc/passwd.json'"))
    elif kind == "unknown":
        fields[r.choice(("devices", "kv_cache.size", "x" * 1000, "? [a, b]", "1", "null"))] = "1"
    elif kind == "hardware":
        fields["hardware"] = r.choice(("'missing.json'", "'bad.json'", "'bad.json'"))
    text = _doc(fields)
    if kind == "syntax":
        cut = r.randrange(len(text) + 1)
        text = text[:cut] + r.choice(("\t", ": :", "'", "\"", "[", "{", "&x", "*nope", "%YAML 9\n---", "\x00", "- a\n"))
    raw = text.encode()
    if kind == "utf8":
        pos = r.randrange(len(raw) + 1)
        raw = raw[:pos] + bytes(r.randrange(128, 256) for _ in range(r.randrange(1, 4))) + raw[pos:]
    return raw, [f"{kind}:{target}"]


BAD_PROFILES = ('{"version": 1}', "[]", "not json", '{"cpu": {"ram_bytes": -1}}', '{"ram_bytes": "1e999"}', "{" * 100000)


# ------------------------------------------------------------------ the worker


def worker_main() -> None:
    """Read case lines on stdin, answer one JSON line each: outcome and error."""
    import logging

    logging.disable(logging.CRITICAL)
    import engine
    from engine.errors import EngineError

    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    for line in sys.stdin:
        case = json.loads(line)
        try:
            with engine.load(case["model"], config=case.get("config"), n_ctx=32) as m:
                m.logits([1, 2, 3])
            outcome, error = "ok", ""
        except EngineError as e:
            outcome, error = "typed", str(e)[:300]
        except MemoryError as e:
            outcome, error = "memory", repr(e)[:300]
        except BaseException as e:  # noqa: BLE001 -- any other exception is the finding
            import traceback

            tb = traceback.extract_tb(e.__traceback__)
            where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
            outcome, error = "untyped", f"{type(e).__name__} at {where}: {str(e)[:300]}"
        out.write(json.dumps({"id": case["id"], "outcome": outcome, "error": error}) + "\n")
        out.flush()


WORK_PREFIX = "engine-fuzz-"


def _die_with_parent() -> None:
    """In a worker, before exec: SIGKILL when the fuzzer dies (Linux prctl PR_SET_PDEATHSIG; strictly when
    the thread that started it ends, which is after it closed the worker or when the fuzzer dies)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def sweep_stale(tmp: str | None) -> list[Path]:
    """Remove the work folders of fuzzers that are no longer running (killed outright) -> those removed."""
    removed = []
    for d in Path(tmp or tempfile.gettempdir()).glob(WORK_PREFIX + "*"):
        pid = d.name[len(WORK_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


class _Interrupted(BaseException):
    """SIGTERM or SIGHUP in the fuzzer: unwinds like Ctrl-C, so the work folder is removed."""


def _raise_interrupted(signum, frame):
    raise _Interrupted(signal.Signals(signum).name)


class Worker:
    def __init__(self, env: dict, stopping=None):
        self.env, self.stopping = env, stopping  # stopping: an Event; once set, no new worker starts
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        if self.stopping is not None and self.stopping.is_set():
            return
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env, cwd=ROOT,
                                     text=True, bufsize=1, preexec_fn=_die_with_parent)

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, IndexError, ValueError):
            return 0.0

    def run(self, case: dict, timeout: float, mem_mb: float, first: bool) -> tuple[str, str]:
        """One case under the watchdog; the worker is replaced after a signal, hang or memory blow-up."""
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout * (4 if first else 1)  # the first case imports torch
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.05)
            if ready:
                line = self.proc.stdout.readline()
                if line:
                    rec = json.loads(line)
                    return rec["outcome"], rec["error"]
                rc = self.proc.wait()
                self.start()
                return ("signal", f"worker died: {signal.Signals(-rc).name}") if rc < 0 else ("signal", f"exit {rc}")
            if self.rss_mb() > mem_mb:
                self.kill()
                return "memory", f"RSS above {mem_mb:.0f} MiB"
            if time.monotonic() > deadline:
                self.kill()
                return "hang", f"no answer in {timeout:.0f} s"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.start()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """From another thread: end the worker now (the fuzzer is interrupted)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()


def run(args) -> dict:
    import threading

    # build (or find in the cache) the native libraries here, once: a first compile inside a worker would
    # count against the first case's time limit
    from engine.cpu.launcher import default_kernels
    from engine.tiers.io import _native_library

    default_kernels()
    _native_library()
    sweep_stale(args.tmp)
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=args.tmp))
    stopping, lock = threading.Event(), threading.Lock()
    workers: list[Worker] = []
    threads: list[threading.Thread] = []
    handlers = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        seeds = write_seeds(work)
        seed_docs = [(decode(p.read_bytes()), p.read_bytes()) for p in seeds]
        (work / "bad.json").write_text(BAD_PROFILES[args.seed % len(BAD_PROFILES)])
        ids = [args.only] if args.only is not None else range(args.gguf + args.config)
        cases = [(i, "gguf" if i < args.gguf else "config") for i in ids]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   ENGINE_SLOW_FALLBACK="", OMP_NUM_THREADS="1")
        counts = {"gguf": Counter(), "config": Counter()}
        findings: list[dict] = []
        queue = list(reversed(cases))
        t0 = time.monotonic()

        def job(w: int) -> None:
            worker = Worker(env, stopping)
            with lock:
                workers.append(worker)
            first = True
            try:
                while True:
                    with lock:
                        if not queue or stopping.is_set():
                            return
                        i, kind = queue.pop()
                    r = random.Random(f"{args.seed}:{i}")
                    if kind == "gguf":
                        raw, names = gguf_case(seed_docs, r)
                        path = work / f"w{w}.gguf"
                        path.write_bytes(raw)
                        case = {"id": i, "model": str(path)}
                    else:
                        raw, names = config_case(r)
                        path = work / f"w{w}.yaml"
                        path.write_bytes(raw)
                        case = {"id": i, "model": str(seeds[i % len(seeds)]), "config": str(path)}
                    try:
                        outcome, error = worker.run(case, args.timeout, args.mem_mb, first)
                    except (OSError, ValueError):  # its pipes closed under it: only when stopping
                        if stopping.is_set():
                            return
                        raise
                    first = False
                    with lock:
                        if stopping.is_set():  # the worker was stopped under this case: no outcome
                            return
                        counts[kind][outcome] += 1
                        if outcome in BAD:
                            findings.append({"id": i, "kind": kind, "mutations": names, "outcome": outcome,
                                             "error": error})
                        done = sum(sum(c.values()) for c in counts.values())
                        if args.progress and done % args.progress == 0:
                            print(f"{done}/{len(cases)} cases, {time.monotonic() - t0:.0f} s: "
                                  f"{dict(counts['gguf'])} {dict(counts['config'])}", file=sys.stderr, flush=True)
            finally:
                if worker.proc is not None:
                    worker.close()

        threads += [threading.Thread(target=job, args=(w,), daemon=True) for w in range(args.jobs)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():  # join with a timeout: signals reach the main thread meanwhile
                t.join(0.5)
        return {"seed": args.seed, "gguf_cases": sum(counts["gguf"].values()),
                "config_cases": sum(counts["config"].values()), "seconds": round(time.monotonic() - t0, 1),
                "gguf": {k: counts["gguf"][k] for k in OUTCOMES}, "config": {k: counts["config"][k] for k in OUTCOMES},
                "findings": sorted(findings, key=lambda f: f["id"])}
    finally:
        stopping.set()  # interrupted (or done): stop the workers before their folder goes
        with lock:
            for worker in workers:
                worker.stop()
        for t in threads:
            t.join(30)
        for sig, h in handlers.items():
            signal.signal(sig, h)
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=int, default=2000, help="GGUF cases (ids 0..N-1)")
    p.add_argument("--config", type=int, default=200, help="config cases (ids after the GGUF ones)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per case before it counts as a hang")
    p.add_argument("--mem-mb", type=float, default=3072, help="worker RSS that counts as a memory blow-up")
    p.add_argument("--only", type=int, help="run only case N (reproduce a finding)")
    p.add_argument("--tmp", default="/dev/shm" if os.path.isdir("/dev/shm") else None, help="where case files go")
    p.add_argument("--json", help="write the result record here")
    p.add_argument("--progress", type=int, default=0, help="print counts every N cases")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    res = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    for kind in ("gguf", "config"):
        print(f"{kind}: {res[f'{kind}_cases']} cases: " + ", ".join(f"{k} {v}" for k, v in res[kind].items()))
    print(f"{res['seconds']} s, seed {res['seed']}")
    for f in res["findings"][:50]:
        print(f"  case {f['id']} ({f['kind']}: {'+'.join(f['mutations'])}): {f['outcome']}: {f['error']}")
    return 1 if res["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
