"""Speculative decoding that never changes what the user gets.

A drafter proposes up to k tokens after a sequence's history; the target model scores the last
history token and the k drafts in one pass; `verify` keeps the drafts the target agrees with and adds
one token of its own, so every pass yields at least one token.

* Greedy: a draft is kept while it equals the target's argmax, the first disagreement is replaced
  by that argmax: the output is the target's greedy output token for token.
* Sampling: standard speculative rejection sampling (Leviathan et al. 2023, Chen et al. 2023): a
  draft x drawn from q is kept with probability min(1, p(x) / q(x)); on rejection the token is drawn
  from max(p - q, 0), normalised; after k kept drafts one more is drawn from p. Each emitted token is
  distributed exactly as a draw from p, the target's sampling distribution (penalty, top-k/p, min-p
  and temperature applied). A deterministic drafter (prompt lookup) is a point mass q.

Drafters: `PromptLookup` (n-grams of the context, no second model) and `DraftModel` (a GGUF sharing
the target's vocabulary; the target itself works too).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import DraftMismatchError, EngineError
from ..sampling import Sampler, SamplingParams
from .slots import Slots

Dist = tuple[torch.Tensor, torch.Tensor]  # (token ids (n,), probabilities (n,))


@dataclass(slots=True)
class Proposal:
    tokens: list[int] = field(default_factory=list)
    dists: list[Dist] | None = None  # the draft distribution of each token; None: deterministic


def verify(sampler: Sampler, history: list[int], logits: torch.Tensor, prop: Proposal) -> list[int]:
    """logits (k+1, vocab): row j scores the position after history + drafts[:j].
    -> the kept drafts followed by one token of the target's (1..k+1 tokens)."""
    drafts, out = prop.tokens, []
    for j, x in enumerate(drafts):
        hist = history + out
        if sampler.p.greedy:
            t = int(torch.argmax(sampler.penalised(logits[j], hist)))
            if t != x:
                return out + [t]
        else:
            ids, p = sampler.distribution(logits[j], hist)
            px = float(p[ids == x].sum())
            if prop.dists is None:
                qx, q_ids, q = 1.0, torch.tensor([x]), torch.ones(1)
            else:
                q_ids, q = prop.dists[j]
                qx = float(q[q_ids == x].sum())
            if not (qx > 0 and sampler.uniform() < px / qx):
                return out + [_residual(sampler, ids, p, q_ids, q)]
        out.append(x)
    return out + [sampler(logits[len(drafts)], history + out)]


def _residual(sampler: Sampler, ids: torch.Tensor, p: torch.Tensor, q_ids: torch.Tensor, q: torch.Tensor) -> int:
    """A draw from max(p - q, 0) normalised, p and q sparse over their own ids."""
    r = p.clone()
    pos = {int(t): i for i, t in enumerate(ids)}
    for t, qv in zip(q_ids.tolist(), q.tolist()):
        i = pos.get(t)
        if i is not None:
            r[i] = max(0.0, float(r[i]) - qv)
    total = float(r.sum())
    if total <= 0.0:  # p <= q everywhere only when p == q: then a rejection has probability 0
        return sampler.draw(ids, p)
    return sampler.draw(ids, r / total)


class PromptLookup:
    """Drafts by finding the latest earlier occurrence of the context's last n-gram (longest first,
    `max_ngram` down to `min_ngram` tokens) and proposing the tokens that followed it."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise EngineError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}", field="ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, sampler: Sampler):
        return None

    def propose(self, state, tokens: list[int], k: int) -> Proposal:
        n_tok = len(tokens)
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            tail = tokens[n_tok - n:]
            for i in range(n_tok - n - 1, -1, -1):  # latest match first; the tail itself excluded
                if tokens[i:i + n] == tail:
                    got = tokens[i + n:i + n + k]
                    if got:
                        return Proposal(got)
        return Proposal()

    def close(self, state) -> None:
        pass

    token_s = 0.0

    def shutdown(self) -> None:
        pass


@dataclass(slots=True)
class _DraftState:
    seq: object
    sampler: Sampler
    cached: list[int] = field(default_factory=list)  # the tokens in the draft's KV cache


class DraftModel:
    """A smaller model sharing the target's vocabulary drafts k tokens autoregressively (greedy for a
    greedy target, otherwise sampled from the draft's distribution under the same sampling params).
    `owned`: close the draft model with this drafter."""

    def __init__(self, draft, target, owned: bool = False):
        a, b = draft.tokenizer, target.tokenizer
        if (draft.spec.vocab_size != target.spec.vocab_size or a.vocab_size != b.vocab_size
                or any(a.id_to_token(i) != b.id_to_token(i) for i in range(a.vocab_size))):
            raise DraftMismatchError(
                f"the draft's vocabulary ({a.vocab_size} tokens) differs from the target's "
                f"({b.vocab_size} tokens, {target.file.path})", path=draft.file.path, field="tokenizer.ggml.tokens")
        self.model, self.slots, self.owned = draft, Slots(draft), owned

    @property
    def token_s(self) -> float:
        """Predicted time per drafted token (0 when the draft was loaded without a plan)."""
        plan = self.model.plan
        return plan.predicted.token_s if plan is not None else 0.0

    def shutdown(self) -> None:
        if self.owned:
            self.model.close()

    def start(self, sampler: Sampler) -> _DraftState:
        p = sampler.p
        seed = int(torch.randint(0, 2**62, (), generator=sampler.gen))
        params = SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                                repeat_penalty=p.repeat_penalty, repeat_last_n=p.repeat_last_n, seed=seed)
        return _DraftState(self.slots.open(), Sampler(params))

    def propose(self, st: _DraftState, tokens: list[int], k: int) -> Proposal:
        k = min(k, self.slots.n_ctx - len(tokens))
        if k <= 0:
            return Proposal()
        keep = 0  # the cached prefix still valid for this history
        for a, b in zip(st.cached, tokens):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(tokens) - 1)  # the last token is fed to get the first draft
        st.seq.truncate(keep)
        del st.cached[keep:]
        feed, prop = tokens[keep:], Proposal(dists=None if st.sampler.p.greedy else [])
        hist = list(tokens)
        for _ in range(k):
            logits = self.slots.step([(st.seq, feed)], [1])[0][0]
            st.cached += feed
            if st.sampler.p.greedy:
                x = st.sampler(logits, hist)
            else:
                ids, q = st.sampler.distribution(logits, hist)
                x = st.sampler.draw(ids, q)
                prop.dists.append((ids, q))
            prop.tokens.append(x)
            hist.append(x)
            feed = [x]
        return prop

    def close(self, st: _DraftState) -> None:
        st.seq.close()


PROMPT_LOOKUP = "prompt-lookup"


def drafter_for(target, draft, **load_options):
    """`draft`: "prompt-lookup", a drafter, a loaded Model, or a GGUF path (loaded and owned)."""
    if draft == PROMPT_LOOKUP:
        return PromptLookup()
    if isinstance(draft, (PromptLookup, DraftModel)):
        return draft
    if hasattr(draft, "tokenizer") and hasattr(draft, "spec"):
        return DraftModel(draft, target)
    from ..model import Model

    model = Model.load(draft, n_ctx=target.n_ctx, **load_options)
    try:
        return DraftModel(model, target, owned=True)
    except BaseException:
        model.close()
        raise


def verify_widths(target, drafter):
    """Tokens to verify per pass for `target`: the cost model's pass times (speculation.PassCosts; each
    generation picks the width from them with the acceptance it measures), or 4 when the model was
    loaded without a plan."""
    from ..plan import hardware_for
    from ..tiers import speculation
    from ..tiers.footprint import footprint_from_gguf

    plan, cfg = target.plan, getattr(target, "config", None)
    if plan is None or cfg is None:
        return 4
    fp = footprint_from_gguf(target.file, target.spec)
    return speculation.pass_costs(fp, hardware_for(cfg), cfg, plan, draft_token_s=drafter.token_s)


def describe_widths(widths) -> str:
    return str(widths) if isinstance(widths, int) else f"auto (cost model, up to {len(widths.pass_s)})"
