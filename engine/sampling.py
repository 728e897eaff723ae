"""Token sampling: repetition penalty, then top-k, top-p, min-p on the penalised logits, then
temperature, as llama.cpp's default chain orders them. Temperature 0 is greedy (argmax)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ConfigError


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0.0 = off
    repeat_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        checks = {
            "temperature": self.temperature >= 0,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "min_p": 0 <= self.min_p < 1,
            "repeat_penalty": self.repeat_penalty > 0,
            "repeat_last_n": self.repeat_last_n >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"invalid value {getattr(self, name)!r}", field=name)
        self.stop = tuple(s for s in self.stop if s)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Draws on the logits' device: the filters are masks (no host round trip), and the drawn id is
    the one device-to-host copy of a token."""

    def __init__(self, params: SamplingParams):
        self.p = params
        self.seed = params.seed if params.seed is not None else torch.seed()
        self.gen = torch.Generator()
        self.gen.manual_seed(self.seed)
        self._device_gens: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator for draws on `device` (the CPU's also serves meta tensors: shapes only)."""
        if device.type in ("cpu", "meta"):
            return self.gen
        g = self._device_gens.get(device)
        if g is None:
            g = self._device_gens[device] = torch.Generator(device=device)
            g.manual_seed(self.seed)
        return g

    def penalised(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        """logits (vocab,) with the repetition penalty of the last repeat_last_n tokens applied."""
        p = self.p
        if p.repeat_penalty != 1.0 and p.repeat_last_n and history:
            logits = logits.clone()
            ids = torch.tensor(sorted(set(history[-p.repeat_last_n:])), dtype=torch.long, device=logits.device)
            sel = logits[ids]
            logits[ids] = torch.where(sel > 0, sel / p.repeat_penalty, sel * p.repeat_penalty)
        return logits

    def distribution(self, logits: torch.Tensor, history: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The distribution a non-greedy draw samples from: (token ids (n,), probabilities (n,)) after
        penalty, top-k, top-p, min-p and temperature; tokens outside `ids` have probability 0 (and so
        may some of `ids`: the filters mask, they do not cut, so nothing waits for the device)."""
        p = self.p
        logits = self.penalised(logits, history)
        k = p.top_k if 0 < p.top_k < logits.numel() else logits.numel()
        vals, ids = torch.topk(logits, k)  # (k,) sorted, descending
        probs = torch.softmax(vals, dim=0)
        keep = torch.ones_like(probs, dtype=torch.bool)
        if p.top_p < 1.0:  # the smallest prefix whose mass reaches top_p: tokens whose predecessors' mass is below it
            before = torch.cat([probs.new_zeros(1), torch.cumsum(probs, dim=0)[:-1]])  # (k,) mass ahead of each
            keep &= before < p.top_p
        if p.min_p > 0:
            keep &= probs >= p.min_p * probs[0]
        return ids, torch.softmax(vals.masked_fill(~keep, float("-inf")) / p.temperature, dim=0)

    def draw(self, ids: torch.Tensor, probs: torch.Tensor) -> int:
        """One token from a (ids, probs) distribution, with this sampler's generator."""
        return int(ids[torch.multinomial(probs, 1, generator=self.generator(probs.device))])

    def uniform(self) -> float:
        """A uniform [0, 1) number from this sampler's generator (speculative acceptance tests)."""
        return float(torch.rand((), generator=self.gen))

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """logits (vocab,) fp32 on any device -> the next token id (its one device-to-host copy)."""
        if self.p.greedy:
            return int(torch.argmax(self.penalised(logits, history)))
        return self.draw(*self.distribution(logits, history))
