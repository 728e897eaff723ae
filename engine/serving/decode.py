"""One generation on one sequence, as a state machine the scheduler drives: `feed()` says which
tokens the next pass runs for it (a prompt chunk, or the last token plus drafts), `take(logits)`
turns that pass's logits into accepted tokens and text. Text is assembled like llama.cpp streams it:
stop strings are cut (text that may be the start of one is held back), end-of-generation tokens end
the generation without text.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..sampling import Sampler, SamplingParams
from ..sequence import tree_depths
from ..tiers.speculation import DEFAULT_ACCEPTANCE
from ..tiers.units import PREFILL_TOKENS
from .speculative import Proposal, verify


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0  # tokens of the prompt
    prefill_tokens: int = 0  # prompt tokens actually computed (the rest came from a reused KV prefix)
    completion_tokens: int = 0
    passes: int = 0  # passes over the target's weights that produced tokens
    drafted: int = 0
    accepted: int = 0  # drafts kept


class TextStream:
    """Generated tokens -> text pieces, with stop strings cut and held back while they may be forming."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.dec, self.stops = tokenizer.decoder(), stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""

    def push(self, tok: int) -> tuple[str, bool]:
        """-> (text ready to emit, whether a stop string ended the text)."""
        self.pending += self.dec.push(tok)
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        if len(self.pending) > self.hold:
            n = len(self.pending) - self.hold
            out, self.pending = self.pending[:n], self.pending[n:]
            return out, False
        return "", False

    def flush(self) -> str:
        out, self.pending = self.pending + self.dec.flush(), ""
        return out


PRIOR_WEIGHT = 2.0  # drafts' worth of belief in the cost model's default acceptance
DECAY = 0.9  # per pass: old acceptance evidence fades, so a width that fell to 1 is tried again later


@dataclass(eq=False)
class Decode:
    """`tokens` is the whole history (prompt and accepted tokens); the sequence caches tokens[:seq.pos]
    and the rest is fed by the next pass. `drafter`/`depth`: speculation; depth is the number of tokens
    verified per pass (1 = off), or the cost model's PassCosts: then each pass takes the width that
    predicts the most tokens per second at the acceptance measured so far."""

    slots: object
    seq: object
    tokens: list[int]
    params: SamplingParams
    max_tokens: int
    tokenizer: object
    drafter: object = None
    depth: int = 1
    prefill_chunk: int = PREFILL_TOKENS
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None  # "stop" | "length" once done
    generated: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.sampler = Sampler(self.params)
        self.text = TextStream(self.tokenizer, self.params.stop)
        self.usage.prompt_tokens = len(self.tokens)
        self.usage.prefill_tokens = len(self.tokens) - self.seq.pos
        self.draft_state = self.drafter.start(self.sampler) if self.drafter is not None else None
        self._prop, self._fed = Proposal(), 0
        self._kept = self._tried = 0.0  # decayed counts of draft levels kept / reached
        self._nodes = self._levels = 0.0  # decayed counts of draft nodes / tree levels proposed
        if self.max_tokens <= 0:
            self.finish_reason = "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        """More than one uncached token: the next pass feeds (part of) a prompt."""
        return len(self.tokens) - self.seq.pos > 1

    def feed(self, budget: int | None = None) -> tuple[list[int], int, list[int] | None]:
        """-> (token ids for the next pass, how many last positions need logits, the row's tree parents
        or None for a chain). No drafts while this generation's prompt is being fed; `budget` (>= 1):
        the most prompt tokens this pass may take for it."""
        todo = self.tokens[self.seq.pos:]
        chunk = self.prefill_chunk if budget is None else min(self.prefill_chunk, budget)
        if len(todo) > chunk:
            return todo[:chunk], 1, None
        k = 0 if self.prefilling else min(
            self.width() - 1, self.max_tokens - len(self.generated) - 1, self.slots.n_ctx - len(self.tokens) - 1)
        self._prop = prop = Proposal()
        if self.drafter is not None and k > 0:
            self._prop = prop = self.drafter.propose(self.draft_state, self.tokens, k, tree=self.slots.trees)
        tree, self._fed = None, len(todo)
        if prop.parents is not None:  # the uncached tokens are a chain, the drafts hang under the last
            n = len(todo)
            tree = list(range(-1, n - 1)) + [n - 1 if par < 0 else n + par for par in prop.parents]
        return todo + prop.tokens, len(prop.tokens) + 1, tree

    @property
    def acceptance(self) -> float:
        """Estimated chance that a draft level the verification reaches is kept (a chain's draft, or one
        node of a tree level): measured, pulled towards the cost model's default."""
        return (self._kept + PRIOR_WEIGHT * DEFAULT_ACCEPTANCE) / (self._tried + PRIOR_WEIGHT)

    @property
    def breadth(self) -> float:
        """Draft nodes per tree level the drafter proposes (1 for chains): measured, prior 1."""
        return (self._nodes + PRIOR_WEIGHT) / (self._levels + PRIOR_WEIGHT)

    def width(self) -> int:
        if self.drafter is None:
            return 1
        return self.depth if isinstance(self.depth, int) else self.depth.best(self.acceptance, self.breadth)

    def take(self, logits: torch.Tensor) -> str:
        """logits (want, vocab) of the pass that ran `feed()` -> the text it produced."""
        if self.seq.pos < len(self.tokens):  # a prompt chunk: nothing to sample yet
            return ""
        prop, self._prop = self._prop, Proposal()
        base = len(self.tokens)
        path, new = verify(self.sampler, self.tokens, logits, prop)
        kept = len(path)
        if prop.parents is None:
            self.seq.truncate(base + kept)  # drop the KV of rejected drafts
        else:  # keep the uncached tokens and the accepted path's KV, contiguous
            self.seq.keep_path(list(range(self._fed)) + [self._fed + j for j in path])
        u = self.usage
        u.passes += 1
        u.drafted += len(prop.tokens)
        u.accepted += kept
        levels = len(prop.tokens) if prop.parents is None else 1 + max(tree_depths(prop.parents), default=-1)
        self._kept = DECAY * self._kept + kept
        self._tried = DECAY * self._tried + min(kept + 1, levels)  # the levels verification reached
        self._nodes = DECAY * self._nodes + len(prop.tokens)
        self._levels = DECAY * self._levels + levels
        out, cut = [], False
        for tok in new:
            u.completion_tokens += 1
            if tok in self.tokenizer.stop_ids:
                self.finish_reason = "stop"
                break
            self.tokens.append(tok)
            self.generated.append(tok)
            piece, cut = self.text.push(tok)
            out.append(piece)
            if cut:
                self.finish_reason = "stop"
                break
            if len(self.generated) >= self.max_tokens or len(self.tokens) >= self.slots.n_ctx:
                self.finish_reason = "length"
                break
        if self.done:
            if not cut:  # the bytes the decoder and the stop-string check held back
                out.append(self.text.flush())
            self.seq.truncate(min(self.seq.pos, len(self.tokens)))  # the cache holds tokens[:pos] only
        return "".join(out)

    def close(self) -> None:
        if self.drafter is not None and self.draft_state is not None:
            self.drafter.close(self.draft_state)
            self.draft_state = None
