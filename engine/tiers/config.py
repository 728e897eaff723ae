"""The tier config: where weights, KV cache and staging live, validated from YAML or a dict.

Every field defaults to "auto" (decided from the detected machine and the model at plan time).
Sizes are written "20GiB", "512MB", "1.5 GB" or as a byte count. `resident_budget` may also be a
percentage of the model's weight bytes ("33%"): that is a *weights* budget (resident weights plus
staging buffers); the planner adds the KV cache and activation workspace on top of it. A byte
budget is the whole tier: weights, staging, KV cache (when placed there) and workspace.

On CPU the compute device reads RAM directly, so "resident" is RAM within `resident_budget` and
there is no separate host tier: `host_budget` is ignored there and the planner says so in its notes.
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..cpu.launcher import ACTIVATIONS
from ..errors import ConfigError, brief
from .hardware import PRESETS
from .units import format_size, parse_percent, parse_size

DEVICES = ("auto", "cpu", "cuda")
SLOW_TIERS = ("disk", "none")
KV_PLACEMENTS = ("auto", "resident", "host")
KV_DTYPES = ("auto", "f32", "f16")
IO_BACKENDS = ("auto", "kvikio", "posix", "odirect")
HYBRID = ("auto", "off")
CPU_ACTIVATIONS = tuple(ACTIVATIONS)  # int16 (default) | int8: see engine.cpu.launcher.ACTIVATIONS
AUTO = "auto"
MAX_CONFIG_BYTES = 1 << 20
MAX_NESTING = 64  # flow collections ([...], {...}); a tier config needs two levels


MAX_IO_THREADS = 64  # reader threads: far beyond any disk's useful queue depth, far below thread limits
MAX_COMPUTE_THREADS = 1024
MAX_CONTEXT = 1 << 24
MAX_RING = 1024  # staging buffers / prefetch depth


def _suggest(word: object, options) -> str:
    if not isinstance(word, str) or len(word) > 64:
        return ""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _choice(obj, name: str, options: tuple[str, ...], prefix: str = "") -> None:
    v = getattr(obj, name)
    if v is None:
        object.__setattr__(obj, name, AUTO if AUTO in options else options[0])
    elif not isinstance(v, str) or v not in options:
        raise ConfigError(f"must be one of {', '.join(options)}, got {brief(v)}{_suggest(v, options)}",
                          path=obj.source, field=prefix + name)


def _count(obj, name: str, prefix: str = "", limit: int = MAX_RING) -> None:
    v = getattr(obj, name)
    if v is None or (isinstance(v, str) and v == AUTO):
        object.__setattr__(obj, name, None)
    elif isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
        raise ConfigError(f"must be an integer in [1, {limit}] or auto, got {brief(v)}", path=obj.source,
                          field=prefix + name)


@dataclass(frozen=True, slots=True)
class Budget:
    """A memory budget: auto (both None), an absolute byte count, or a fraction of the model weights."""

    nbytes: int | None = None
    fraction: float | None = None

    @property
    def auto(self) -> bool:
        return self.nbytes is None and self.fraction is None

    @classmethod
    def parse(cls, value: object, *, field: str, path: str | None, allow_fraction: bool) -> Budget:
        if isinstance(value, Budget):
            return value
        if value is None or (isinstance(value, str) and value == AUTO):
            return cls()
        if isinstance(value, str) and "%" in value:
            if not allow_fraction:
                raise ConfigError(f"a percentage is not allowed here, give a size, got {brief(value)}",
                                  path=path, field=field)
            frac = parse_percent(value, field=field, path=path)
            if frac is None:
                raise ConfigError(f"cannot read {brief(value)} as a percentage (e.g. 33%)", path=path, field=field)
            return cls(fraction=frac)
        return cls(nbytes=parse_size(value, field=field, path=path))

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}% of the model weights"
        return AUTO if self.nbytes is None else format_size(self.nbytes)

    def to_json(self) -> object:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return AUTO if self.nbytes is None else self.nbytes


@dataclass(frozen=True, slots=True)
class KVCacheConfig:
    placement: str = AUTO  # auto | resident | host (host: RAM beside a GPU; same as resident on CPU)
    max_context: int | None = None  # tokens per sequence; None = min(model context, 4096)
    dtype: str = AUTO  # auto (f32 on CPU, f16 on CUDA) | f32 | f16
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        _choice(self, "placement", KV_PLACEMENTS, "kv_cache.")
        _choice(self, "dtype", KV_DTYPES, "kv_cache.")
        _count(self, "max_context", "kv_cache.", MAX_CONTEXT)


@dataclass(frozen=True, slots=True)
class TierConfig:
    device: str = AUTO  # auto | cpu | cuda
    resident_budget: Budget = Budget()  # VRAM on a GPU, RAM on CPU; auto = 80% of available RAM / 90% of VRAM
    host_budget: Budget = Budget()  # pinned RAM beside a GPU; auto = 50% of available RAM; ignored on CPU
    slow_tier: str = "disk"  # disk: stream from the model file's byte ranges | none: everything must fit
    prefetch_depth: int | None = None  # streamed layers in flight ahead of the computing one
    staging_buffers: int | None = None  # ring size k; needs k >= prefetch_depth + 1
    kv_cache: KVCacheConfig = KVCacheConfig()
    io_backend: str = AUTO  # auto | kvikio | posix | odirect
    io_threads: int | None = None
    compute_threads: int | None = None
    hardware: str = AUTO  # auto (calibrated profile, else defaults) | preset name | profile JSON path
    # auto: on CUDA, host-tier layers compute on the CPU in small passes where the cost model predicts
    # that faster than streaming them over PCIe | off: every layer computes on the GPU
    hybrid_compute: str = AUTO
    # how the CPU kernels round activations for Q4_K/Q5_K/Q6_K matrices (every product they compute: the
    # whole model on device cpu, the hybrid layers on CUDA; the GPU's kernels ignore it): int16 (default,
    # ~1e-5 relative) | int8 (as llama.cpp, ~1e-2 relative on logits, faster)
    cpu_activations: str = "int16"
    source: str | None = field(default=None, compare=False, repr=False)  # file it was read from

    def __post_init__(self):
        p = self.source
        _choice(self, "device", DEVICES)
        _choice(self, "slow_tier", SLOW_TIERS)
        _choice(self, "io_backend", IO_BACKENDS)
        _choice(self, "hybrid_compute", HYBRID)
        _choice(self, "cpu_activations", CPU_ACTIVATIONS)
        object.__setattr__(self, "resident_budget",
                           Budget.parse(self.resident_budget, field="resident_budget", path=p, allow_fraction=True))
        object.__setattr__(self, "host_budget",
                           Budget.parse(self.host_budget, field="host_budget", path=p, allow_fraction=False))
        for name, limit in (("prefetch_depth", MAX_RING), ("staging_buffers", MAX_RING),
                            ("io_threads", MAX_IO_THREADS), ("compute_threads", MAX_COMPUTE_THREADS)):
            _count(self, name, limit=limit)
        kv = self.kv_cache
        if isinstance(kv, Mapping):
            kv = _build(KVCacheConfig, kv, p, "kv_cache.")
        elif not isinstance(kv, KVCacheConfig):
            raise ConfigError(f"expected a mapping (placement, max_context, dtype), got {brief(kv)}", path=p,
                              field="kv_cache")
        object.__setattr__(self, "kv_cache", kv)
        if self.prefetch_depth is not None and self.staging_buffers is not None \
                and self.staging_buffers < self.prefetch_depth + 1:
            raise ConfigError(f"prefetch_depth {self.prefetch_depth} needs at least {self.prefetch_depth + 1} "
                              f"staging buffers (one is being computed on), got {self.staging_buffers}",
                              path=p, field="staging_buffers")
        if self.io_backend == "kvikio" and self.device == "cpu":
            raise ConfigError("kvikio reads into GPU memory; use posix or odirect on device cpu", path=p,
                              field="io_backend")
        hw = self.hardware
        if not isinstance(hw, str) or not hw:
            raise ConfigError(f"expected auto, a preset ({', '.join(PRESETS)}) or a JSON path, got {brief(hw)}",
                              path=p, field="hardware")
        if hw != AUTO and hw not in PRESETS and not hw.endswith(".json"):
            raise ConfigError(f"unknown hardware preset {brief(hw)}{_suggest(hw, (AUTO, *PRESETS))} "
                              f"(or give a profile .json path)", path=p, field="hardware")

    def hardware_path(self) -> str | None:
        """The profile JSON path when `hardware` names one (relative to the config file's directory)."""
        if not self.hardware.endswith(".json"):
            return None
        base = Path(self.source).parent if self.source else Path.cwd()
        return os.fspath(base / self.hardware)

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            if f.name == "source":
                continue
            v = getattr(self, f.name)
            if isinstance(v, Budget):
                v = v.to_json()
            elif isinstance(v, KVCacheConfig):
                v = {k: (AUTO if x is None else x) for k, x in asdict(v).items() if k != "source"}
            out[f.name] = AUTO if v is None else v
        return out


def load_config(src: str | os.PathLike | Mapping | TierConfig | None = None) -> TierConfig:
    """A validated TierConfig from a YAML path, a mapping, a TierConfig (returned as is) or None (auto)."""
    if src is None:
        return TierConfig()
    if isinstance(src, TierConfig):
        return src
    if isinstance(src, Mapping):
        return _build(TierConfig, src, None)
    if not isinstance(src, (str, os.PathLike)):
        raise ConfigError(f"expected a YAML path, a mapping or a TierConfig, got {type(src).__name__}",
                          field="config")
    path = os.fspath(src)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config: {e.strerror}", path=path) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"larger than {format_size(MAX_CONFIG_BYTES)}; a tier config is a few lines", path=path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})", path=path) from None
    if _flow_depth(text) > MAX_NESTING:  # PyYAML takes seconds per thousand levels before it recurses out
        raise ConfigError(f"not a usable config: YAML nested more than {MAX_NESTING} levels deep", path=path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or getattr(e, "context", None) or type(e).__name__
        raise ConfigError(f"not valid YAML{where}: {' '.join(str(what).split())}", path=path) from None
    except RecursionError:
        raise ConfigError("not a usable config: YAML nested too deeply", path=path) from None
    except ValueError as e:  # the YAML constructors' int()/float() (e.g. an integer of > 4300 digits)
        raise ConfigError(f"not a usable config: {brief(str(e), 120)}", path=path) from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"the top level must be a mapping of keys, got {type(data).__name__}", path=path)
    return _build(TierConfig, data, path)


def _flow_depth(text: str) -> int:
    """The deepest nesting of YAML flow collections ([...] and {...}) outside quotes and comments."""
    depth = deepest = 0
    quote = ""
    comment = False
    for ch in text:
        if comment:
            comment = ch != "\n"
        elif quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            comment = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
    return deepest


def _build(cls, data: Mapping[str, Any], path: str | None, prefix: str = ""):
    valid = [f.name for f in fields(cls) if f.name != "source"]
    for key in data:
        if not isinstance(key, str) or key not in valid:
            raise ConfigError(f"unknown key{_suggest(key, valid)} (valid keys: {', '.join(valid)})",
                              path=path, field=prefix + (key if isinstance(key, str) and len(key) <= 64 else brief(key)))
    return cls(**data, source=path)
