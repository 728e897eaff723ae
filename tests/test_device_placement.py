"""Where the forward's tensors live, checked on the CPU: the model runs on a fake compute device whose
tensors are on torch's `meta` device (weights "uploaded" through its staging hooks, matrices by a
linear that returns meta tensors of the right shape), under a dispatch mode that records every op's
devices. No op may mix devices, nothing may cross host<->device inside a block, a decode token costs
at most one device-to-host copy (the sampled id), and the KV cache sits on the device in its dtype.
Also: the CPU path never imports engine.cuda, and the CLI turns torch's errors into one line."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as QT
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import engine
from engine.attention import attend, attend_each, sdpa_decode_rows, sdpa_kernel
from engine.cli import guarded
from engine.gguf_file import GGUFFile
from engine.model import Model
from engine.spec import ModelSpec
from engine.tiers.io import aligned_empty
from engine.tiers.runtime import Placement, head_info
from engine.tiers.staging import Upload
from engine.weights import layer_layout
from tiny_llama import TinyConfig, write_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")
TOKEN = 7  # what a device-to-host copy of a token id "reads" from a meta tensor


class MetaStaging:
    """Reads land in real host buffers; uploads and resident copies become meta tensors."""

    name = "meta"
    separate = True  # device memory apart from the host's, as on a GPU

    def alloc_host(self, nbytes: int, align: int = 4096) -> torch.Tensor:
        return aligned_empty(nbytes, align)

    def alloc_device(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=META)

    def upload(self, host: torch.Tensor, dev: torch.Tensor, nbytes: int) -> Upload:
        return Upload(dev[:nbytes])

    def wait(self, handle: Upload) -> None:
        pass

    def release(self, handle: Upload) -> None:
        pass

    def host_free(self, handle: Upload) -> bool:
        return True

    def wait_host_free(self, handle: Upload) -> None:
        pass

    def device_free(self, dev: torch.Tensor) -> bool:
        return True

    def wait_device_free(self, dev: torch.Tensor) -> None:
        pass

    def to_resident(self, host_view: torch.Tensor) -> torch.Tensor:
        return torch.empty(host_view.numel(), dtype=torch.uint8, device=META)


class MetaDevice:
    """A compute device on `meta`: shapes and devices flow as on a GPU, no arithmetic happens."""

    name = "meta"
    torch_device = META
    act_dtype = torch.float16

    def __init__(self, kv_dtype: torch.dtype = torch.float16):
        self.kv_dtype, self.staging = kv_dtype, MetaStaging()
        self.linears = 0

    def linear(self, x: torch.Tensor, w, out=None) -> torch.Tensor:
        assert x.device == META and w.data.device == META, (w.name, x.device, w.data.device)
        assert x.shape[-1] == w.shape[1], w.name
        self.linears += 1
        return torch.empty(*x.shape[:-1], w.shape[0], device=META)

    def linear_many(self, x, ws):
        return [self.linear(x, w) for w in ws]

    def prepare(self, formats):
        self.prepared = list(formats)

    def attention(self, q, keys, vals, mask):
        assert q.device == keys.device == META and keys.dtype == self.kv_dtype
        return attend(q, keys, vals, mask, lambda *a: sdpa_kernel(*a, 0.125))

    def attention_rows(self, q, rows, ends):
        """As CudaDevice: a pass of decode rows in one SDPA, other passes row by row."""
        self.batched = getattr(self, "batched", 0) + (ends is not None and len(rows) > 1)
        if ends is None or len(rows) == 1:
            return attend_each(q, rows, self.attention)
        return sdpa_decode_rows(q, rows, ends, 0.125)


class Recorder(TorchDispatchMode):
    """Every op's input/output devices, tagged with the unit being computed ("" between units).
    Copies out of meta (.item(), .cpu()) are counted as device-to-host and answered with TOKEN."""

    def __init__(self):
        super().__init__()
        self.unit = ""
        self.mixed: list[str] = []
        self.h2d: list[tuple[str, str]] = []  # (unit, op)
        self.d2h: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__)
        ins = {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
        scalars = {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() == 0}
        if name == "_local_scalar_dense" and "meta" in ins | scalars:
            self.d2h.append((self.unit, name))
            return TOKEN
        if name in ("_to_copy", "copy_", "to"):
            dst = kwargs.get("device") or (args[0].device if name == "copy_" else None)
            src = args[1].device if name == "copy_" else args[0].device
            dst = torch.device(dst) if dst is not None else src
            if src.type == "cpu" and dst.type == "meta":
                self.h2d.append((self.unit, name))
            elif src.type == "meta" and dst.type == "cpu":
                self.d2h.append((self.unit, name))
                return torch.full(args[0].shape, TOKEN, dtype=kwargs.get("dtype") or args[0].dtype)
        elif len(ins) > 1 or (ins == {"meta"} and "cpu" in scalars and name not in _CPU_SCALAR_OK):
            self.mixed.append(f"{self.unit or 'outside units'}: {name} {sorted(ins | scalars)}")
        return func(*args, **kwargs)


# ops that legitimately take a 0-dim CPU tensor beside device tensors (torch wraps Python scalars so)
_CPU_SCALAR_OK = {"mul", "div", "add", "sub", "where", "masked_fill", "lt", "ge", "le", "gt", "eq"}


class Units:
    """The weight provider, telling the recorder which unit is being computed."""

    def __init__(self, weights, rec: Recorder):
        self._w, self._rec = weights, rec

    def layer(self, i, rows=None):
        got = self._w.layer(i, rows)
        self._rec.unit = f"unit {i}"
        return got

    def release(self, i):
        self._rec.unit = ""
        self._w.release(i)

    def __getattr__(self, name):
        return getattr(self._w, name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = TinyConfig(n_layers=3, n_heads=8, n_kv_heads=2, fmt=(QT.Q4_K, QT.Q8_0), rope_freqs=True, tied=False)
    return write_tiny_llama(tmp_path_factory.mktemp("place") / "p.gguf", cfg)


def placements(path):
    f = GGUFFile(path)
    spec = ModelSpec.from_gguf(f)
    lays = [layer_layout(f, spec, i) for i in range(spec.n_layers)]
    head = head_info(f, spec)
    return {"resident": Placement.uniform(lays, head, stream=False),
            "streamed": Placement.uniform(lays, head, stream=True, ring_size=2, head_chunks=2)}


@pytest.mark.parametrize("where", ["resident", "streamed"])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "top_k": 5, "top_p": 0.9,
                                                           "min_p": 0.05, "repeat_penalty": 1.1}])
def test_forward_stays_on_the_device(tiny, where, sampling):
    dev = MetaDevice()
    with Model.load(tiny, placement=placements(tiny)[where], device=dev) as m:
        rec = Recorder()
        m.weights = Units(m.weights, rec)
        prompt, n = [5, 17, 300, 42, 8], 4
        with rec:
            pieces = list(m.generate(prompt, max_tokens=n, stop=(), **sampling))
        assert m.stats.decode_tokens == n and pieces  # every token was "read" as TOKEN, a non-stop id
        assert rec.mixed == []
        assert [u for u, _ in rec.h2d + rec.d2h if u] == []  # nothing crosses inside a unit
        assert len(rec.d2h) == n  # one device-to-host copy per token: its id
        assert dev.linears == (m.spec.n_layers * 7 + len(m.weights.head_rows)) * n  # prefill + n - 1 decodes
        with m.open_sequence() as seq:
            assert {(t.device, t.dtype) for t in seq.keys + seq.vals} == {(META, torch.float16)}
            assert len(seq.keys) == m.spec.n_layers and seq.keys[0].shape == (2, m.n_ctx, m.spec.head_dim)


def test_ragged_pass_on_the_device_returns_device_logits(tiny):
    with Model.load(tiny, placement=placements(tiny)["resident"], device=MetaDevice(torch.float32)) as m:
        rec = Recorder()
        m.weights = Units(m.weights, rec)
        with m.open_sequence() as a, m.open_sequence() as b, rec:
            la, lb = m.step([(a, [1, 2, 3]), (b, [4, 5])], trees=[None, [-1, 0]])
            (la2,) = m.step([(a, [6])], last_only=True)
            dev = m.device
            m.step([(a, [7]), (b, [8])])  # decode rows: one batched attention per layer
            assert dev.batched == m.spec.n_layers
            assert {t.dtype for t in a.keys} == {torch.float32}
        assert (la.device, la.shape, lb.shape, la2.shape) == (META, (3, m.spec.vocab_size), (2, m.spec.vocab_size),
                                                              (1, m.spec.vocab_size))
        assert rec.mixed == [] and rec.d2h == [] and [u for u, _ in rec.h2d if u] == []


def test_recorder_catches_a_host_tensor_inside_a_block(tiny, monkeypatch):
    """The checks above can fail: a block that reads a host tensor is caught."""
    from engine.models import llama

    real = llama.Llama.block

    def leaky(self, x, w, *args):
        x = x + torch.zeros(x.shape[-1]).to(x.device)  # a host tensor uploaded inside the block
        return real(self, x, w, *args)

    monkeypatch.setattr(llama.Llama, "block", leaky)
    with Model.load(tiny, placement=placements(tiny)["resident"], device=MetaDevice()) as m:
        rec = Recorder()
        m.weights = Units(m.weights, rec)
        with rec:
            list(m.generate([1, 2], max_tokens=1, temperature=0))
    assert [u for u, _ in rec.h2d if u] == ["unit 0", "unit 1", "unit 2"]


def test_cpu_path_never_imports_engine_cuda(tiny):
    code = textwrap.dedent(f"""
        import sys, engine
        for config in ({{"device": "cpu"}}, None):
            with engine.load({str(tiny)!r}, config=config) as m:
                text = "".join(m.generate([1, 2, 3], max_tokens=3, temperature=0))
        loaded = sorted(k for k in sys.modules if k.startswith("engine.cuda") or k in ("cupy", "kvikio", "pynvml"))
        print(loaded)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_cli_turns_torch_errors_into_one_line(capsys):
    def boom():
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices\n"
                           "cuda:0 and cpu!")

    assert guarded(boom) == (1, None)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: RuntimeError: Expected all tensors")


def test_cuda_request_without_cuda_is_one_error_line(tiny, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from engine import generate

    cfg = tmp_path / "gpu.yaml"
    cfg.write_text("device: cuda\n")
    assert generate.main(["--model", str(tiny), "--config", str(cfg), "--max-tokens", "2", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "cuda" in err and "Traceback" not in err
    with pytest.raises(engine.EngineError, match="device"):
        engine.load(tiny, config={"device": "cuda:0"})


# budgets (bytes) that make the planner use every tier for `tiny` on an RTX 4090 profile: host and hybrid
# layers, a host KV cache, disk streaming; each config's every ranked plan is loaded
CUDA_PLAN_CONFIGS = {
    "host": {"resident_budget": 1_600_000, "host_budget": 2_000_000},
    "disk": {"resident_budget": 1_600_000, "host_budget": 700_000},
}


@pytest.mark.parametrize("name", list(CUDA_PLAN_CONFIGS))
def test_every_plan_for_a_cuda_profile_loads_and_runs(tiny, name):
    """Every placement the planner ranks for a CUDA hardware profile exists at runtime: Model.load plans
    it for the (meta) device, binds each tier where the plan says (a host KV cache and CPU-decoded
    layers' KV in host RAM, in the plan's dtype), and a generation runs with no op mixing devices and
    host<->device copies inside a block only where a layer's attention runs beside a host KV cache."""
    from engine.tiers.config import load_config
    from engine.tiers.footprint import footprint_from_gguf
    from engine.tiers.hardware import PRESETS
    from engine.tiers.planner import Workload, ranked

    cfg = load_config({"device": "cuda", "hardware": "rtx4090", "kv_cache": {"max_context": 64},
                       **CUDA_PLAN_CONFIGS[name]})
    f = GGUFFile(tiny)
    plans = ranked(footprint_from_gguf(f, ModelSpec.from_gguf(f)), PRESETS["rtx4090"](), cfg, Workload(1, 32, 32), 100)
    assert len(plans) > 10
    kinds = {(p.kv_tier, any(lp.cpu_decode for lp in p.layers), frozenset(lp.tier for lp in p.layers)) for p in plans}
    assert {k[0] for k in kinds} == {"resident", "host"}  # the planner does plan a host KV cache here
    threads = torch.get_num_threads()
    try:
        for rank, p in enumerate(plans):
            with Model.load(tiny, cfg, n_ctx=64, rank=rank, device=MetaDevice()) as m:
                assert (m.plan.layers, m.plan.kv_tier, m.plan.embedding_tier) == (p.layers, p.kv_tier, p.embedding_tier)
                w, L = m.weights, m.spec.n_layers
                host_kv = [p.kv_tier == "host" or lp.cpu_decode for lp in p.layers]
                for lp, on_host in zip(p.layers, host_kv):
                    assert w.kv_device(lp.index).torch_device.type == ("cpu" if on_host else "meta"), (rank, lp)
                    assert w.device_for(lp.index, 1).torch_device.type == ("cpu" if lp.cpu_decode else "meta")
                    assert w.sources[lp.index] == ("resident" if lp.tier == "resident" else lp.tier)
                rec = Recorder()
                m.weights = Units(w, rec)
                with rec, m.open_sequence() as seq:
                    m.prefill(seq, [5, 17, 300, 42, 8])
                    m.step([(seq, [9])])
                    assert [(k.device.type, k.dtype) for k in seq.keys] == \
                        [("cpu" if h else "meta", torch.float16) for h in host_kv]
                assert rec.mixed == [], (rank, rec.mixed[:3])
                crossing = {u for u, _ in rec.h2d + rec.d2h if u}
                beside = {f"unit {i}" for i in range(L) if host_kv[i]}
                assert crossing <= beside, (rank, crossing)
                if p.kv_tier == "host":
                    assert crossing, rank  # the GPU layers' attention did run beside the host KV
    finally:
        torch.set_num_threads(threads)
