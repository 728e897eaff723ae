"""Tier config schema: units, unknown keys with suggestions, bad values, every shipped YAML; hardware profiles."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from engine.errors import ConfigError, EngineError
from engine.tiers.config import Budget, KVCacheConfig, TierConfig, load_config
from engine.tiers.hardware import (PRESETS, ComputeRate, HardwareProfile, default_profile, load_profile,
                                   profile_path, save_profile)
from engine.tiers.units import format_size, parse_percent, parse_size

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("text, expected", [
    ("20GiB", 20 * 2 ** 30), ("512MB", 512 * 10 ** 6), ("1.5 GB", 1_500_000_000), ("1.5GiB", 3 * 2 ** 29),
    ("4096", 4096), (4096, 4096), ("64 KiB", 65536), ("2T", 2 * 2 ** 40), ("7b", 7), ("0", 0), (3.0, 3),
])
def test_parse_size(text, expected):
    assert parse_size(text, field="x") == expected


@pytest.mark.parametrize("bad", ["-1GiB", "12 parsecs", "GiB", "", "1,5GB", True, None, 1.5, [1], "1e9"])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError) as e:
        parse_size(bad, field="resident_budget", path="c.yaml")
    assert "resident_budget" in str(e.value) and "c.yaml" in str(e.value)


def test_percent_and_format():
    assert parse_percent("33%", field="x") == pytest.approx(0.33)
    assert parse_percent("33", field="x") is None
    for bad in ("0%", "101%"):
        with pytest.raises(ConfigError):
            parse_percent(bad, field="x")
    assert format_size(495 * 2 ** 20) == "495 MiB"
    assert format_size(1.25 * 2 ** 30) == "1.25 GiB"
    assert format_size(512) == "512 B"


def test_defaults_are_auto():
    for cfg in (load_config(None), load_config({}), TierConfig()):
        assert cfg.device == "auto" and cfg.resident_budget.auto and cfg.host_budget.auto
        assert cfg.prefetch_depth is None and cfg.staging_buffers is None and cfg.kv_cache.max_context is None
        assert cfg.slow_tier == "disk" and cfg.io_backend == "auto" and cfg.hardware == "auto"
    cfg = TierConfig(resident_budget="8GiB")
    assert load_config(cfg) is cfg
    assert cfg.resident_budget == Budget(nbytes=8 * 2 ** 30)


def test_values_are_normalised():
    cfg = load_config({"device": "cpu", "resident_budget": "33%", "prefetch_depth": 2, "staging_buffers": "auto",
                       "kv_cache": {"placement": "resident", "max_context": 512}, "io_threads": 3})
    assert cfg.resident_budget.fraction == pytest.approx(0.33) and cfg.resident_budget.nbytes is None
    assert cfg.prefetch_depth == 2 and cfg.staging_buffers is None
    assert cfg.kv_cache == KVCacheConfig(placement="resident", max_context=512)
    assert cfg.to_json()["resident_budget"] == "33%" and cfg.to_json()["kv_cache"]["dtype"] == "auto"
    with pytest.raises(Exception):
        cfg.device = "cuda"  # frozen


def test_unknown_key_suggests_closest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("device: cpu\nresident_budet: 8GiB\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "resident_budet" in msg and "did you mean 'resident_budget'" in msg
    p.write_text("kv_cache:\n  placment: host\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "kv_cache.placment" in str(e.value) and "'placement'" in str(e.value)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config({"zzz": 1})


@pytest.mark.parametrize("data, field, fragment", [
    ({"device": "cdua"}, "device", "did you mean 'cuda'"),
    ({"slow_tier": "nvme"}, "slow_tier", "disk, none"),
    ({"io_backend": "o_direct"}, "io_backend", "odirect"),
    ({"resident_budget": "lots"}, "resident_budget", "cannot read"),
    ({"host_budget": "50%"}, "host_budget", "percentage is not allowed"),
    ({"resident_budget": "150%"}, "resident_budget", "(0, 100]"),
    ({"prefetch_depth": 0}, "prefetch_depth", "an integer in [1, "),
    ({"io_threads": -2}, "io_threads", "an integer in [1, "),
    ({"compute_threads": True}, "compute_threads", "an integer in [1, "),
    ({"staging_buffers": 2, "prefetch_depth": 2}, "staging_buffers", "at least 3"),
    ({"kv_cache": {"placement": "vram"}}, "kv_cache.placement", "resident"),
    ({"kv_cache": {"max_context": "long"}}, "kv_cache.max_context", "an integer in [1, "),
    ({"kv_cache": {"dtype": "q8"}}, "kv_cache.dtype", "f16"),
    ({"kv_cache": "big"}, "kv_cache", "mapping"),
    ({"device": "cpu", "io_backend": "kvikio"}, "io_backend", "kvikio"),
    ({"hardware": "rtx4900"}, "hardware", "did you mean 'rtx4090'"),
])
def test_bad_values_name_the_field(data, field, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(data)
    assert e.value.field == field and fragment in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- device: cpu\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)
    p.write_text("device: cpu\n  bad: indent\n")
    with pytest.raises(ConfigError, match="not valid YAML at line 2"):
        load_config(p)
    with pytest.raises(ConfigError, match="expected a YAML path"):
        load_config(42)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_config(empty) == TierConfig()


def test_every_shipped_config_loads():
    names = {p.stem for p in CONFIGS}
    assert {"cpu-default", "cpu-tight", "rtx3090-70b", "rtx4090-70b", "h100-70b"} <= names
    for p in CONFIGS:
        cfg = load_config(p)
        assert cfg.source == str(p)
        if p.stem.startswith("cpu"):
            assert cfg.device == "cpu"
        else:
            assert cfg.device == "cuda" and cfg.hardware in PRESETS
    assert load_config(CONFIGS[0]).to_json() == load_config(load_config(CONFIGS[0]).to_json()).to_json()


# -- hardware profiles --------------------------------------------------------------------------------
def _profile(**over) -> HardwareProfile:
    kw = dict(device="cpu", name="test", resident_bytes=8 << 30, host_bytes=0, disk_read_direct=1e9,
              disk_read_buffered=5e8, disk_latency_s=1e-4, host_to_device=5e9, memcpy=5e9, resident_bandwidth=1e10,
              compute={"Q4_0": ComputeRate(2e9, 2e10), "Q8_0": ComputeRate(3e9, 3e10)}, layer_overhead_s=1e-4,
              token_overhead_s=1e-3, source="test")
    kw.update(over)
    return HardwareProfile(**kw)


def test_profile_roundtrip_and_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    assert profile_path("cpu") == tmp_path / "hardware-cpu.json"
    assert load_profile(None, "cpu").source.startswith("default")  # nothing calibrated yet
    p = _profile(measurements={"note": "x"})
    written = save_profile(p)
    assert written == tmp_path / "hardware-cpu.json"
    back = load_profile()
    assert back == p and back.measurements["note"] == "x"
    assert json.loads(written.read_text())["compute"]["Q4_0"] == {"t1": 2e9, "batched": 2e10}
    # a format that was not measured gets the slowest measured rate
    assert back.rate("Q6_K") == ComputeRate(2e9, 2e10) and back.rate("Q8_0").t1 == 3e9


def test_profile_int8_rates(tmp_path):
    """The 8-bit-activation rates (CPU profiles: compute_int8; beside a GPU: host_compute_int8) round-trip,
    older profiles without them load with none, and rate/host_rate pick them only for int8."""
    r16, r8 = ComputeRate(2e9, 2e10), ComputeRate(3e9, 5e10)
    p = _profile(compute={"Q4_K": r16, "Q8_0": ComputeRate(3e9, 3e10)}, compute_int8={"Q4_K": r8})
    back = load_profile(save_profile(p, tmp_path / "p.json"))
    assert back == p and back.compute_int8 == {"Q4_K": r8}
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["compute_int8"] == {"Q4_K": {"t1": 3e9, "batched": 5e10}} and data["host_compute_int8"] == {}
    assert (back.rate("Q4_K"), back.rate("Q4_K", "int16"), back.rate("Q4_K", "int8")) == (r16, r16, r8)
    assert back.rate("Q8_0", "int8") == ComputeRate(3e9, 3e10)  # no int8 path: as with int16
    assert back.rate("Q6_K", "int8") == r16  # not measured: the slowest measured rate
    for name in ("compute_int8", "host_compute_int8"):
        del data[name]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = load_profile(tmp_path / "old.json")
    assert old.compute_int8 == {} == old.host_compute_int8 and old.rate("Q4_K", "int8") == r16
    with pytest.raises(ConfigError, match="int16") as e:
        back.rate("Q4_K", "int4")
    assert e.value.field == "cpu_activations"
    gpu = PRESETS["rtx4090"]()
    assert gpu.host_compute_int8 == {} and gpu.host_rate("Q4_K", "int8") == gpu.host_rate("Q4_K")
    host8 = ComputeRate(9e10, 9e11)
    g8 = HardwareProfile.from_json({**gpu.to_json(), "host_compute_int8": {"Q5_K": {"t1": 9e10, "batched": 9e11}}})
    assert (g8.host_rate("Q5_K", "int8"), g8.host_rate("Q5_K")) == (host8, gpu.host_compute["Q5_K"])
    assert g8.rate("Q5_K", "int8") == gpu.compute["Q5_K"]  # the GPU's kernels do not take it
    assert g8.host_rate("Q8_0", "int8") == gpu.host_compute["Q8_0"]


@pytest.mark.parametrize("over, field, match", [
    ({"compute_int8": {"Q8_0": ComputeRate(1, 1)}}, "compute_int8", "without an 8-bit-activation path"),
    ({"compute_int8": {"Q9_9": ComputeRate(1, 1)}}, "compute_int8", "Q9_9"),
    ({"host_compute_int8": {"Q4_0": ComputeRate(1, 1)}, "host_compute": {"Q4_0": ComputeRate(1, 1)},
      "host_bandwidth": 1e9}, "host_compute_int8", "Q4_0"),
    ({"host_compute_int8": {"Q4_K": ComputeRate(1, 1)}}, "host_compute_int8", "needs host_compute"),
    ({"device": "cuda", "compute_int8": {"Q4_K": ComputeRate(1, 1)}}, "compute_int8", "GPU"),
])
def test_profile_int8_errors(tmp_path, over, field, match):
    with pytest.raises(ConfigError, match=match) as e:
        _profile(**over)
    assert e.value.field == field
    path = tmp_path / "bad.json"  # the same from a file: the file and the field named
    data = _profile().to_json() | {k: ({f: {"t1": r.t1, "batched": r.batched} for f, r in v.items()}
                                        if isinstance(v, dict) else v) for k, v in over.items()}
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=match) as e:
        load_profile(path)
    assert e.value.field == field and str(path) in str(e.value)


def test_profile_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_profile(bad)
    bad.write_text(json.dumps({"device": "cpu"}))
    with pytest.raises(ConfigError, match="not a hardware profile") as e:
        load_profile(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_profile(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="positive bandwidth"):
        _profile(memcpy=0)
    with pytest.raises(ConfigError, match="unknown formats"):
        _profile(compute={"Q9_9": ComputeRate(1, 1)})
    with pytest.raises(ConfigError, match="device"):
        _profile(device="tpu")


def test_defaults_and_presets():
    cpu = default_profile("cpu")
    assert cpu.device == "cpu" and cpu.host_bytes == 0 and "not calibrated" in cpu.source
    for name, make in PRESETS.items():
        p = make()
        assert p.device == "cuda" and "predicted" in p.source and p.resident_bytes >= 24 << 30
        # memory-bound GEMV can never beat the memory it streams from
        assert all(r.t1 < p.resident_bandwidth / 0.8 for r in p.compute.values())
    with pytest.raises(EngineError):
        default_profile("tpu")
    rate = ComputeRate(t1=1e9, batched=1e10)
    assert rate.seconds(10 ** 9, 1) == pytest.approx(1.0)  # memory bound
    assert rate.seconds(10 ** 9, 100) == pytest.approx(10.0)  # compute bound


def test_calibrate_quick_writes_a_profile_the_planner_uses(tmp_path, capsys):
    from engine import calibrate, cpu
    from engine import plan as plan_cli

    out = tmp_path / "profile.json"
    rc = calibrate.main(["--quick", "--size", "8MiB", "--threads", "1", "--io-threads", "2", "--no-drop-caches",
                         "--dir", str(tmp_path / "scratch"), "--output", str(out), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["path"] == str(out)
    prof = load_profile(out)
    assert prof.source.startswith("calibrated") and prof.device == "cpu"
    assert set(prof.compute) == set(cpu.SUPPORTED)
    assert set(prof.compute_int8) == cpu.INT8_FORMATS  # measured again with cpu_activations int8
    assert all(r.t1 > 0 and r.batched > 0 for r in (*prof.compute.values(), *prof.compute_int8.values()))
    kernels = prof.measurements["kernels"]
    assert {f for f, raw in kernels.items() if {"t1_int8_s", "t32_int8_s"} <= set(raw)} == cpu.INT8_FORMATS
    assert not any("t1_int8_s" in raw for f, raw in kernels.items() if f not in cpu.INT8_FORMATS)
    shown = {line.split()[0]: line for line in calibrate.describe_profile(prof).splitlines()[6:]}
    assert set(shown) == set(cpu.SUPPORTED) and {f for f, line in shown.items() if "(" in line} == cpu.INT8_FORMATS
    assert prof.disk_read_direct > 0 and prof.disk_read_buffered > 0 and prof.disk_latency_s > 0
    assert prof.measurements["disk_file_bytes"] == 8 << 20 and prof.measurements["compute_threads"] == 1
    assert list((tmp_path / "scratch").iterdir()) == []  # the scratch file is removed
    assert plan_cli.main(["--hardware", str(out), "--config", str(CONFIGS[0])]) == 0
    assert "calibrated" in capsys.readouterr().out
    assert calibrate.main(["--size", "1MiB"]) == 1
    assert "--size" in capsys.readouterr().err



def _bomb_config(field: str) -> str:
    """A YAML document whose `field` is an alias bomb of 9^10 elements once expanded (anchors nested
    inside the value, so the document itself is a few hundred bytes)."""
    value = "&a0 [" + ", ".join(["x"] * 9) + "]"
    for i in range(1, 10):
        value = f"&a{i} [{value}, " + ", ".join([f"*a{i - 1}"] * 8) + "]"
    top, _, sub = field.partition(".")
    return f"{top}: {value}\n" if not sub else f"{top}:\n  {sub}: {value}\n"


@pytest.mark.parametrize("field", ["device", "resident_budget", "host_budget", "compute_threads", "io_threads",
                                   "kv_cache", "kv_cache.placement", "kv_cache.max_context", "hardware"])
def test_alias_bomb_is_refused_at_once(tmp_path, field):
    """'Billion laughs' in a real field: a one-line ConfigError naming the field, at once, without
    rendering the expansion (the validators used to format it with repr: minutes, or out of memory)."""
    p = tmp_path / "bomb.yaml"
    p.write_text(_bomb_config(field))
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert e.value.field == field and str(p) in msg and "\n" not in msg and len(msg) < 500, msg


@pytest.mark.parametrize("text, field, fragment", [
    ("io_threads: 65536\n", "io_threads", "[1, 64]"),
    ("compute_threads: 100000\n", "compute_threads", "[1, 1024]"),
    ("staging_buffers: 99999999999999999999999\n", "staging_buffers", "[1, 1024]"),
    ("resident_budget: " + "9" * 400 + "\n", "resident_budget", "larger than"),
    ("resident_budget: " + "9" * 300 + "TiB\n", "resident_budget", "cannot read"),  # > 64 chars
    ("resident_budget: 99999999999999999999 TiB\n", "resident_budget", "larger than"),
    ("resident_budget: .inf\n", "resident_budget", "whole number"),
    ("resident_budget: .nan\n", "resident_budget", "whole number"),
    ("host_budget: 1.0e+400\n", "host_budget", "whole number"),  # YAML reads it as inf
    ("kv_cache:\n  max_context: 1e30\n", "kv_cache.max_context", "[1, "),
    ("device: " + "c" * 100000 + "\n", "device", "(100000 chars)"),
])
def test_huge_values_are_refused_with_a_bounded_message(tmp_path, text, field, fragment):
    p = tmp_path / "big.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert e.value.field == field and fragment in msg and len(msg) < 500, msg


@pytest.mark.parametrize("raw, fragment", [
    (b"device: cpu\n# caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 17)"),
    (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested more than 64 levels deep"),
    # block style: a RecursionError inside PyYAML, or (under a raised recursion limit) an unknown key
    pytest.param(b"".join(b" " * i + b"a:\n" for i in range(1200)), "", id="block-nesting"),
    (b"io_threads: " + b"7" * 5000 + b"\n", "not a usable config"),  # int() refuses > 4300 digits
    (b"device: [cpu\n", "not valid YAML at line 2"),
    (b"x" * (1 << 20) + b"xx", "larger than 1 MiB"),
])
def test_unreadable_configs_are_one_line_config_errors(tmp_path, raw, fragment):
    p = tmp_path / "c.yaml"
    p.write_bytes(raw)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert fragment in msg and str(p) in msg and "\n" not in msg, msg
