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
    parents: list[int] | None = None  # a tree: parents[j] = index of draft j's parent, -1 = the root; None: a chain

    def children(self) -> dict[int, list[int]]:
        parents = self.parents if self.parents is not None else list(range(-1, len(self.tokens) - 1))
        out: dict[int, list[int]] = {}
        for j, par in enumerate(parents):
            out.setdefault(par, []).append(j)
        return out


def verify(sampler: Sampler, history: list[int], logits: torch.Tensor, prop: Proposal) -> tuple[list[int], list[int]]:
    """logits (1 + drafts, vocab): row 0 scores the position after history, row j+1 the position after
    draft j (and its ancestors). -> (the kept drafts' indices, a path from the root; the emitted tokens:
    the kept drafts followed by one token of the target's)."""
    children, path, out = prop.children(), [], []
    v = -1
    while True:
        row, kids, hist = v + 1, children.get(v, []), history + out
        if not kids:
            return path, out + [sampler(logits[row], hist)]
        if sampler.p.greedy:
            t = int(torch.argmax(sampler.penalised(logits[row], hist)))
            nxt = next((j for j in kids if prop.tokens[j] == t), None)
            if nxt is None:
                return path, out + [t]
        else:
            ids, p = sampler.distribution(logits[row], hist)
            if prop.dists is None:  # deterministic candidates: try each with its remaining probability
                nxt = None
                for j in kids:
                    hit = ids == prop.tokens[j]
                    if sampler.uniform() < float(p[hit].sum()):
                        nxt = j
                        break
                    p = p.masked_fill(hit, 0.0)
                    p = p / p.sum()
                if nxt is None:
                    return path, out + [sampler.draw(ids, p)]
            else:  # one sampled candidate (a chain): keep it with probability min(1, p/q)
                nxt = kids[0]
                x = prop.tokens[nxt]
                q_ids, q = prop.dists[nxt]
                px, qx = float(p[ids == x].sum()), float(q[q_ids == x].sum())
                if not (qx > 0 and sampler.uniform() < px / qx):
                    return path, out + [_residual(sampler, ids, p, q_ids, q)]
        path.append(nxt)
        out.append(prop.tokens[nxt])
        v = nxt


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
    """Drafts from the context itself: the continuations of earlier occurrences of the context's last
    n-gram (longest n first, `max_ngram` down to `min_ngram` tokens, latest occurrence first). As a
    chain: the latest continuation. As a tree (tree=True): up to `branches` distinct continuations
    merged into a trie, filled level by level."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, branches: int = 4):
        if not 1 <= min_ngram <= max_ngram or branches < 1:
            raise EngineError(f"need 1 <= min_ngram <= max_ngram and branches >= 1, got {min_ngram}, "
                              f"{max_ngram}, {branches}", field="ngram")
        self.max_ngram, self.min_ngram, self.branches = max_ngram, min_ngram, branches

    token_s = 0.0

    def start(self, sampler: Sampler):
        return None

    def continuations(self, tokens: list[int], k: int, most: int) -> list[list[int]]:
        n_tok, found, seen = len(tokens), [], set()
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            tail = tokens[n_tok - n:]
            for i in range(n_tok - n - 1, -1, -1):  # latest match first; the tail itself excluded
                if tokens[i:i + n] == tail:
                    got = tuple(tokens[i + n:i + n + k])
                    if got and got not in seen:
                        seen.add(got)
                        found.append(list(got))
                        if len(found) == most:
                            return found
        return found

    def propose(self, state, tokens: list[int], k: int, tree: bool = False) -> Proposal:
        conts = self.continuations(tokens, k, self.branches if tree else 1)
        if not tree or len(conts) < 2:
            return Proposal(conts[0] if conts else [])
        prop = Proposal(parents=[])
        node = [-1] * len(conts)  # each continuation's deepest node so far
        index: dict[tuple[int, int], int] = {}  # (parent, token) -> node
        for depth in range(k):
            for c, cont in enumerate(conts):
                if depth >= len(cont):
                    continue
                key = (node[c], cont[depth])
                if key not in index:
                    if len(prop.tokens) == k:
                        return prop
                    index[key] = len(prop.tokens)
                    prop.tokens.append(cont[depth])
                    prop.parents.append(node[c])
                node[c] = index[key]
        return prop

    def close(self, state) -> None:
        pass

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

    def propose(self, st: _DraftState, tokens: list[int], k: int, tree: bool = False) -> Proposal:
        """A chain of k drafted tokens (`tree` is ignored: the draft model drafts chains)."""
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
    """`draft`: "prompt-lookup", a drafter, a loaded Model, or a GGUF path (loaded and owned; its CPU
    kernels round activations as the target's config says unless `load_options` names cpu_activations)."""
    if draft == PROMPT_LOOKUP:
        return PromptLookup()
    if isinstance(draft, (PromptLookup, DraftModel)):
        return draft
    if hasattr(draft, "tokenizer") and hasattr(draft, "spec"):
        return DraftModel(draft, target)
    from ..model import Model

    load_options.setdefault("cpu_activations", getattr(getattr(target, "config", None), "cpu_activations", None))
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
