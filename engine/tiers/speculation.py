"""How many tokens to verify per pass over the weights, from the cost model.

A pass that verifies T tokens (the last accepted one and T-1 drafts) moves the same weight bytes as a
one-token pass but computes T rows. With each draft kept with probability `acceptance` (independently,
the chain model of Leviathan et al.), a pass yields E(T) = (1 - a^T) / (1 - a) tokens on average. A
draft tree spends its T-1 rows on `breadth` alternatives per level: it is (T-1)/breadth levels deep,
each level is passed with probability a (one of its nodes kept), and E = (1 - a^(D+1)) / (1 - a) for
depth D -- the chain is breadth 1. A wider tree keeps more per level (a higher a) but reaches less deep.
The choice maximises E(T) / (pass time at T tokens + the drafter's time for T-1 drafts): large
when the pass is I/O-bound (streamed weights cost the same for any T), 1 (speculation off) when
the extra rows cost more compute than the kept drafts save. A generation re-chooses T before every
pass with the acceptance it has measured so far (engine.serving.decode), so a drafter that keeps
missing stops costing verification rows.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .config import TierConfig
from .footprint import ModelFootprint
from .hardware import HardwareProfile
from .planner import Plan, Workload, evaluate
from .planner.experts import evaluate_experts

DEFAULT_ACCEPTANCE = 0.6
MAX_VERIFY = 32


@dataclass(frozen=True, slots=True)
class Speculation:
    tokens: int  # verified per pass (1 = no speculation)
    acceptance: float  # the per-level acceptance rate assumed
    pass_s: float  # predicted time of one pass at `tokens` rows, drafting included
    plain_tps: float  # predicted tok/s without speculation
    tps: float  # predicted tok/s with it
    breadth: float = 1.0  # draft nodes per tree level (1: a chain)

    def line(self) -> str:
        if self.tokens == 1:
            return (f"speculation: off (verifying more than 1 token per pass costs more than it saves at "
                    f"acceptance {self.acceptance:.2f}); {self.plain_tps:.3g} tokens/s")
        return (f"speculation: verify {self.tokens} tokens per pass at acceptance {self.acceptance:.2f} -> "
                f"{expected_tokens(self.tokens, self.acceptance, self.breadth):.2f} tokens per pass of "
                f"{self.pass_s * 1e3:.3g} ms: {self.tps:.3g} tokens/s predicted (plain {self.plain_tps:.3g})")

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "acceptance": self.acceptance, "breadth": self.breadth, "pass_s": self.pass_s,
                "plain_tokens_per_s": self.plain_tps, "tokens_per_s": self.tps}


def expected_tokens(t: int, acceptance: float, breadth: float = 1.0) -> float:
    """Tokens a T-token verification yields on average (the target's own token included), its T-1
    drafts a tree of `breadth` nodes per level ((T-1)/breadth levels; breadth 1: a chain)."""
    a, depth = acceptance, (t - 1) / max(1.0, breadth)
    return 1.0 + depth if a >= 1.0 else (1.0 - a ** (depth + 1)) / (1.0 - a)


@dataclass(frozen=True, slots=True)
class PassCosts:
    """Predicted pass times for verifying 1..len(pass_s) tokens, drafting included; `best(a)` is the
    width with the most tokens per second at per-draft acceptance a."""

    pass_s: tuple[float, ...]

    def best(self, acceptance: float, breadth: float = 1.0) -> int:
        """The width for per-level acceptance a and drafts `breadth` nodes per level (1: a chain)."""
        best_t, best_rate = 1, 1.0 / self.pass_s[0]
        for t in range(2, len(self.pass_s) + 1):
            rate = expected_tokens(t, acceptance, breadth) / self.pass_s[t - 1]
            if rate > best_rate * 1.02:  # a 2% gain at least: ties keep the cheaper pass
                best_t, best_rate = t, rate
        return best_t

    def speculation(self, acceptance: float, breadth: float = 1.0) -> Speculation:
        t = self.best(acceptance, breadth)
        s = self.pass_s[t - 1]
        return Speculation(t, acceptance, s, 1.0 / self.pass_s[0], expected_tokens(t, acceptance, breadth) / s,
                           breadth)


def pass_costs(fp: ModelFootprint, hw: HardwareProfile, cfg: TierConfig, plan: Plan, *,
               draft_token_s: float = 0.0, max_tokens: int = MAX_VERIFY) -> PassCosts:
    """The cost model's pass time for `plan` (the placement the model runs) at 1..max_tokens tokens;
    `draft_token_s` is the drafter's time per drafted token (0 for prompt lookup). The KV read is
    counted per row, a slight overestimate for the rows of one sequence."""
    if max_tokens < 1:
        raise ConfigError(f"must be >= 1, got {max_tokens}", field="max_tokens")
    w = plan.workload

    def pass_s(t: int) -> float:
        work = Workload(batch=t, prompt_tokens=w.prompt_tokens, gen_tokens=w.gen_tokens)
        if plan.experts:  # experts as units: t rows route to more experts, whose reads the pass waits for
            return evaluate_experts(fp, hw, cfg, plan, work).token_s + (t - 1) * draft_token_s
        pred = evaluate(fp, hw, cfg, plan.layers, output_tier=plan.output_tier,
                        embedding_tier=plan.embedding_tier, kv_tier=plan.kv_tier,
                        ring_size=max(plan.ring_size, 1), work=work, output_cpu_decode=plan.output_cpu_decode)
        return pred.token_s + (t - 1) * draft_token_s

    return PassCosts(tuple(pass_s(t) for t in range(1, max_tokens + 1)))


def choose(fp: ModelFootprint, hw: HardwareProfile, cfg: TierConfig, plan: Plan, *,
           acceptance: float = DEFAULT_ACCEPTANCE, draft_token_s: float = 0.0,
           max_tokens: int = MAX_VERIFY, breadth: float = 1.0) -> Speculation:
    """The verification width for `plan` at a given acceptance (per tree level) and tree breadth."""
    check_acceptance(acceptance)
    return pass_costs(fp, hw, cfg, plan, draft_token_s=draft_token_s,
                      max_tokens=max_tokens).speculation(acceptance, breadth)


def check_acceptance(acceptance: float) -> None:
    if not 0.0 <= acceptance <= 1.0:
        raise ConfigError(f"must be in [0, 1], got {acceptance}", field="acceptance")
