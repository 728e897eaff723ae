"""Router statistics of a mixture-of-experts model: how often each expert of each layer is selected.

`python -m engine.calibrate --moe-profile PROMPTS --model M` runs the model over the prompts and writes
a `RouterProfile` (JSON, versioned) beside the hardware profile, in `cache_dir()/moe/<model file>.json`;
the planner reads it to keep the hottest experts resident (uniform k/E when there is none).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, brief
from .hardware import cache_dir, read_json_object, write_json

PROFILE_VERSION = 1
KIND = "router-statistics"


@dataclass(frozen=True, slots=True)
class RouterProfile:
    """frequency[i][e]: the fraction of routed tokens of layer i that selected expert e (each token selects
    n_experts_used experts, so a layer's frequencies sum to n_experts_used)."""

    model: str  # the model file's name the statistics were gathered on
    n_experts: int
    n_experts_used: int
    tokens: int  # routed tokens per layer
    frequency: tuple[tuple[float, ...], ...]
    source: str = "uniform"  # the profile's path, or "uniform"

    def __post_init__(self):
        where = self.source if self.source != "uniform" else None
        for name, low in (("n_experts", 1), ("n_experts_used", 1), ("tokens", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"must be an integer >= {low}, got {brief(v)}", path=where, field=name)
        if self.n_experts_used > self.n_experts:
            raise ConfigError(f"{self.n_experts_used} experts used per token exceed the {self.n_experts} experts",
                              path=where, field="n_experts_used")
        rows = []
        for i, row in enumerate(self.frequency):
            field = f"frequency[{i}]"
            if not isinstance(row, Sequence) or isinstance(row, str) or len(row) != self.n_experts:
                raise ConfigError(f"must list {self.n_experts} frequencies, got {brief(row)}", path=where, field=field)
            vals = []
            for e, v in enumerate(row):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                    raise ConfigError(f"must be a fraction in [0, 1], got {brief(v)}", path=where,
                                      field=f"{field}[{e}]")
                vals.append(float(v))
            if not math.isclose(sum(vals), self.n_experts_used, rel_tol=1e-6, abs_tol=1e-6):
                raise ConfigError(f"sums to {sum(vals):.6g}; each token selects {self.n_experts_used} experts",
                                  path=where, field=field)
            rows.append(tuple(vals))
        if not rows:
            raise ConfigError("no layers", path=where, field="frequency")
        object.__setattr__(self, "frequency", tuple(rows))

    @property
    def n_layers(self) -> int:
        return len(self.frequency)

    @classmethod
    def uniform(cls, n_layers: int, n_experts: int, n_experts_used: int, model: str = "") -> RouterProfile:
        p = n_experts_used / n_experts
        return cls(model, n_experts, n_experts_used, 0, tuple((p,) * n_experts for _ in range(n_layers)))

    @classmethod
    def from_counts(cls, model: str, counts: Sequence[Sequence[int]], n_experts_used: int, tokens: int,
                    source: str = "uniform") -> RouterProfile:
        """counts[i][e]: tokens of layer i routed to expert e, out of `tokens` routed tokens per layer."""
        if tokens < 1:
            raise ConfigError("no tokens were routed (empty prompts?)", field="--moe-profile")
        return cls(model, len(counts[0]), n_experts_used, tokens,
                   tuple(tuple(c / tokens for c in row) for row in counts), source)

    def check(self, n_layers: int, n_experts: int, n_experts_used: int, path: str | None = None) -> None:
        """The profile fits the model (same layer and expert counts); ConfigError naming what differs."""
        for field, mine, theirs in (("frequency", self.n_layers, n_layers), ("n_experts", self.n_experts, n_experts),
                                    ("n_experts_used", self.n_experts_used, n_experts_used)):
            if mine != theirs:
                raise ConfigError(f"the router profile has {mine} but the model {theirs} ({field}); "
                                  "run engine.calibrate --moe-profile again", path=path or self.source, field=field)

    def to_json(self) -> dict:
        return {"kind": KIND, "version": PROFILE_VERSION, "model": self.model, "n_experts": self.n_experts,
                "n_experts_used": self.n_experts_used, "tokens": self.tokens,
                "frequency": [list(r) for r in self.frequency]}

    @classmethod
    def from_json(cls, data: object, path: str) -> RouterProfile:
        if data.get("kind") != KIND:
            raise ConfigError(f"not a router profile (kind {brief(data.get('kind'))})", path=path, field="kind")
        if data.get("version") != PROFILE_VERSION:
            raise ConfigError(f"version {brief(data.get('version'))} is not {PROFILE_VERSION}; run engine.calibrate "
                              "--moe-profile again", path=path, field="version")
        missing = [k for k in ("model", "n_experts", "n_experts_used", "tokens", "frequency") if k not in data]
        if missing:
            raise ConfigError("missing", path=path, field=missing[0])
        freq = data["frequency"]
        if not isinstance(freq, list):
            raise ConfigError(f"must be a list of per-layer lists, got {brief(freq)}", path=path, field="frequency")
        return cls(str(data["model"]), data["n_experts"], data["n_experts_used"], data["tokens"], tuple(freq), path)


def gather(model, prompts: Sequence[Sequence[int]], max_tokens: int | None = None) -> RouterProfile:
    """Run `model` (an engine.model.Model of an MoE GGUF) over the token lists one token per pass -- so each
    pass's routed experts are one token's k -- and count how often each expert of each layer is selected.
    At most `max_tokens` tokens in all (None: every token of every prompt)."""
    spec, w = model.spec, model.weights
    if not spec.moe:
        from ..errors import EngineError

        raise EngineError(f"{model.file.path} is not a mixture-of-experts model (no expert_count)", field="--model")
    counts = [[0] * spec.n_experts for _ in range(spec.n_layers)]
    routed = [0] * spec.n_layers
    experts = w.experts

    def counting(i, ids, rows=None):
        for e in ids:
            counts[i][e] += 1
        routed[i] += 1
        return experts(i, ids, rows)

    w.experts = counting
    budget = max_tokens if max_tokens is not None else sum(len(p) for p in prompts)
    try:
        for toks in prompts:
            toks = list(toks)[:budget - routed[0]] if budget > routed[0] else []
            if not toks:
                continue
            toks = toks[:model.n_ctx]
            with model.open_sequence() as seq:
                for t in toks:
                    model.step([(seq, [t])], last_only=True)
    finally:
        del w.experts  # the instance attribute goes: the provider's own method again
    return RouterProfile.from_counts(Path(model.file.path).name, counts, spec.n_experts_used, routed[0])


def profile_path(model_path: str | os.PathLike) -> Path:
    """Where the router profile of a model file lives: beside the hardware profiles, one per model file."""
    return cache_dir() / "moe" / f"{Path(model_path).name}.json"


def save_router_profile(profile: RouterProfile, path: str | os.PathLike) -> Path:
    return write_json(Path(path), profile.to_json())


def load_router_profile(path: str | os.PathLike) -> RouterProfile:
    path = os.fspath(path)
    return RouterProfile.from_json(read_json_object(path, "router profile"), path)


def find_router_profile(model_path: str | os.PathLike) -> RouterProfile | None:
    """The calibrated profile of this model file, or None (the planner then assumes uniform routing)."""
    path = profile_path(model_path)
    return load_router_profile(path) if path.is_file() else None
