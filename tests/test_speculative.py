"""Speculative decoding never changes what the user gets: greedy output equals plain greedy token for
token (prompt lookup, a draft model, the target as its own draft); sampled output follows the
target's distribution (chi-square on a tiny model's next-token distribution)."""
from __future__ import annotations

import collections

import pytest
import torch

import engine
from engine.errors import DraftMismatchError
from engine.sampling import Sampler, SamplingParams
from engine.serving.batcher import generate
from engine.serving.speculative import DraftModel, PromptLookup, Proposal, verify
from tiny_llama import TinyConfig, write_tiny_llama

PROMPT = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]  # repeats: prompt lookup has n-grams to draft from


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    target = engine.load(write_tiny_llama(d / "t.gguf", TinyConfig(n_layers=2, ctx=96)))
    draft = engine.load(write_tiny_llama(d / "d.gguf", TinyConfig(n_layers=1, seed=3, ctx=96)))
    other = engine.load(write_tiny_llama(d / "o.gguf", TinyConfig(n_layers=1, vocab="spm")))
    yield target, draft, other
    for m in (target, draft, other):
        m.close()


def greedy(**kw):
    return SamplingParams(temperature=0, **kw)


def run(model, params, n, **kw):
    return "".join(generate(model, list(PROMPT), params, n, **kw))


@pytest.mark.parametrize("depth", [2, 5])
def test_prompt_lookup_greedy_equals_plain(models, depth):
    target = models[0]
    plain = "".join(target.generate(list(PROMPT), 40, temperature=0))
    spec = run(target, greedy(), 40, drafter=PromptLookup(), depth=depth)
    assert spec == plain and len(plain) > 20


def test_draft_model_and_self_draft_greedy_equal_plain(models):
    target, draft, _ = models
    plain = "".join(target.generate(list(PROMPT), 40, temperature=0, repeat_penalty=1.3))
    assert run(target, greedy(repeat_penalty=1.3), 40, drafter=DraftModel(draft, target), depth=4) == plain
    assert run(target, greedy(repeat_penalty=1.3), 40, drafter=DraftModel(target, target), depth=4) == plain


def test_self_draft_accepts_its_own_greedy_tokens(models):
    """The target drafting for itself proposes exactly what it verifies: nearly every draft is kept
    (a rejection needs a near tie that the one-token and multi-token passes round differently)."""
    from engine.serving.decode import Decode
    from engine.serving.slots import Slots

    target = models[0]
    slots = Slots(target)
    d = Decode(slots, slots.open(), list(PROMPT), greedy(), 40, target.tokenizer, DraftModel(target, target), 4)
    from engine.serving.batcher import run_round
    while not d.done:
        run_round(slots, [d])
    d.close()
    d.seq.close()
    u = d.usage
    assert u.drafted > 20 and u.accepted >= 0.9 * u.drafted
    assert u.passes < u.completion_tokens  # several tokens per weight pass


def test_a_row_verifies_drafts_while_another_prefills(models):
    """Rows ask for their own outputs (model.step want=): one generation verifies prompt-lookup drafts
    in the same passes that feed another's prompt chunks; both texts equal plain greedy."""
    from engine.serving.batcher import run_round
    from engine.serving.decode import Decode
    from engine.serving.slots import Slots

    target = models[0]
    long = PROMPT * 5
    plain = ["".join(target.generate(list(PROMPT), 20, temperature=0)),
             "".join(target.generate(list(long), 8, temperature=0))]
    slots = Slots(target)
    a = Decode(slots, slots.open(), list(PROMPT), greedy(), 20, target.tokenizer, PromptLookup(), 4)
    b = Decode(slots, slots.open(), list(long), greedy(), 8, target.tokenizer, prefill_chunk=4)
    texts, mixed = {id(a): "", id(b): ""}, 0
    while not (a.done and b.done):
        live = [d for d in (a, b) if not d.done]
        drafted, feeding = a.usage.drafted, b.prefilling and not b.done
        for d, t in zip(live, run_round(slots, live)):
            texts[id(d)] += t
        mixed += feeding and a.usage.drafted > drafted
    for d in (a, b):
        d.close()
        d.seq.close()
    assert mixed >= 3  # passes that fed b's prompt and verified a's drafts
    assert [texts[id(a)], texts[id(b)]] == plain


def test_batcher_feeds_at_most_its_prompt_budget_per_pass(models, monkeypatch):
    """Concurrent requests with long prompts: one pass feeds at most prefill_chunk prompt tokens in all
    (the plan's workspace holds PREFILL_TOKENS rows), decode rows beside them; every text equals its
    request run alone."""
    from engine.serving.batcher import Batcher

    target = models[0]
    prompts = [PROMPT * 3, [9, 8, 7, 6] * 6, PROMPT + [1, 2, 3]]
    alone = ["".join(target.generate(list(p), 10, temperature=0)) for p in prompts]
    passes, step = [], target.step

    def recording_step(rows, *a, **kw):
        passes.append([len(ids) for _, ids in rows])
        return step(rows, *a, **kw)

    monkeypatch.setattr(target, "step", recording_step)
    b = Batcher(target, max_batch=3, prefill_chunk=8)
    try:
        handles = [b.submit(list(p), greedy(), 10) for p in prompts]
        texts = ["".join(ev.text for ev in h) for h in handles]
    finally:
        b.close()
    assert texts == alone
    prompt_tokens = [sum(n for n in rows if n > 1) for rows in passes]  # undrafted: rows of > 1 are prompt
    assert max(prompt_tokens) == 8 and max(len(rows) for rows in passes) == 3


def test_draft_with_another_vocabulary_is_refused(models):
    target, _, other = models
    with pytest.raises(DraftMismatchError, match="tokenizer.ggml.tokens"):
        DraftModel(other, target)


def test_prompt_lookup_proposes_the_continuation_of_the_latest_match():
    pl = PromptLookup(max_ngram=2)
    assert pl.propose(None, [1, 2, 3, 9, 1, 2, 4, 7, 1, 2], 3).tokens == [4, 7, 1]  # latest "1 2" first
    assert pl.propose(None, [1, 2, 3], 3).tokens == []
    assert pl.propose(None, [3, 8, 8, 3], 2).tokens == [8, 8]


def test_prompt_lookup_tree_merges_continuations_level_by_level():
    pl = PromptLookup(max_ngram=2, branches=3)
    ctx = [1, 2, 3, 9, 1, 2, 4, 7, 1, 2, 3, 5, 1, 2]  # "1 2" continues as 3 5 / 4 7 / 3 9 (latest first)
    prop = pl.propose(None, ctx, 5, tree=True)
    # level 0: 3 (shared by two continuations), 4; level 1: 5 under 3, 7 under 4, 9 under 3
    assert prop.tokens == [3, 4, 5, 7, 9] and prop.parents == [-1, -1, 0, 1, 0]
    assert pl.propose(None, ctx, 2, tree=True).tokens == [3, 4]  # the node budget is respected
    assert pl.propose(None, [1, 2, 3, 1, 2], 3, tree=True).parents is None  # one continuation: a chain


def test_tree_verification_follows_the_greedy_path():
    sampler = Sampler(SamplingParams(temperature=0))
    V = 10
    logits = torch.zeros(6, V)
    # root row prefers 4; under draft 1 (token 4) row 2 prefers 7; under draft 3 (token 7) row 4 prefers 2
    for row, tok in ((0, 4), (2, 7), (4, 2), (1, 0), (3, 0), (5, 0)):
        logits[row, tok] = 5.0
    prop = Proposal([3, 4, 9, 7, 1], parents=[-1, -1, 0, 1, 3])
    assert verify(sampler, [0], logits, prop) == ([1, 3], [4, 7, 2])  # draft 4 (token 1) is rejected for 2


def _chi2_pvalue(counts: dict[int, int], probs: dict[int, float], n: int) -> float:
    stat = sum((counts.get(t, 0) - n * p) ** 2 / (n * p) for t, p in probs.items())
    assert set(counts) <= set(probs)  # nothing outside the target's support
    df = len(probs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("source", ["draft-model", "point-mass", "point-mass-tree"])
def test_rejection_sampling_preserves_the_target_distribution(models, source):
    """First emitted token of verify() over 2 drafts vs the target's own sampling distribution."""
    target, draft, _ = models
    params = SamplingParams(temperature=1.3, top_k=6, top_p=1.0, min_p=0.0, seed=11)
    ctx = list(PROMPT)
    p_logits = torch.from_numpy(target.logits(ctx)[-1])
    q_logits = torch.from_numpy(draft.logits(ctx)[-1])
    sampler = Sampler(params)
    ids, p = sampler.distribution(p_logits, ctx)
    expect = dict(zip(ids.tolist(), p.tolist()))
    q_ids, q = Sampler(params).distribution(q_logits, ctx)
    qd = dict(zip(q_ids.tolist(), q.tolist()))
    tv = 0.5 * sum(abs(expect.get(t, 0.0) - qd.get(t, 0.0)) for t in set(expect) | set(qd))
    assert tv > 0.2  # the draft really differs: keeping its tokens unverified would fail the test
    rows = p_logits.expand(5, -1)  # rows after the first only matter for later tokens, not tested here
    n, counts = 6000, collections.Counter()
    drafter_gen = torch.Generator().manual_seed(5)
    for i in range(n):
        if source == "draft-model":
            x = int(q_ids[torch.multinomial(q, 1, generator=drafter_gen)])
            prop = Proposal([x, x], [(q_ids, q), (q_ids, q)])
        elif source == "point-mass":  # a deterministic drafter proposing the target's second most likely token
            prop = Proposal([int(ids[1]), int(ids[0])])
        else:  # a tree: three candidates for the first token (the 2nd, 3rd and 1st most likely), one child
            prop = Proposal([int(ids[1]), int(ids[2]), int(ids[0]), int(ids[0])], parents=[-1, -1, -1, 0])
        counts[verify(sampler, ctx, rows, prop)[1][0]] += 1
    assert _chi2_pvalue(counts, expect, n) > 1e-3


def test_sampled_speculation_is_reproducible_and_stops(models):
    target, draft, _ = models
    params = dict(temperature=0.9, seed=4)
    a = run(target, SamplingParams(**params), 30, drafter=DraftModel(draft, target), depth=3)
    b = run(target, SamplingParams(**params), 30, drafter=DraftModel(draft, target), depth=3)
    assert a == b and a


class _WrongDrafter:
    """Always proposes the last vocabulary entry (a special token greedy never picks here)."""

    token_s = 0.0

    def __init__(self, vocab):
        self.tok = vocab - 1

    def start(self, sampler):
        return None

    def propose(self, state, tokens, k, tree=False):
        return Proposal([self.tok] * k)

    def close(self, state):
        pass


def test_width_follows_measured_acceptance_and_pass_costs(models):
    from engine.serving.batcher import run_round
    from engine.serving.decode import Decode
    from engine.serving.slots import Slots
    from engine.tiers.speculation import PassCosts

    target = models[0]
    slots = Slots(target)
    flat, linear = PassCosts((1.0,) * 8), PassCosts(tuple(float(t) for t in range(1, 9)))

    def decode(drafter, costs):
        d = Decode(slots, slots.open(), list(PROMPT), greedy(), 30, target.tokenizer, drafter, costs)
        widths = []
        while not d.done:
            widths.append(d.width())
            run_round(slots, [d])
        d.close()
        d.seq.close()
        return d, widths

    d, widths = decode(_WrongDrafter(target.spec.vocab_size), flat)
    assert widths[0] == 8 and widths[-1] == 2  # free rows: keep probing, but narrowly
    assert d.usage.accepted == 0
    d, widths = decode(_WrongDrafter(target.spec.vocab_size), linear)
    assert set(widths) == {1} and d.usage.drafted == 0  # rows cost what they save: never speculate
    d, widths = decode(DraftModel(target, target), flat)
    assert min(widths[1:-1]) >= 7  # drafts kept: the width stays wide


def test_measured_breadth_and_acceptance_count_tree_levels(models):
    """The cost model's inputs a generation measures: breadth (draft nodes per tree level) is 1 for a
    chain drafter and above 1 where prompt lookup drafts trees; acceptance counts the levels the
    verification reached (a first draft rejected is one level tried, not the whole chain)."""
    from engine.serving.batcher import run_round
    from engine.serving.decode import DECAY, PRIOR_WEIGHT, Decode
    from engine.serving.slots import Slots
    from engine.tiers.speculation import DEFAULT_ACCEPTANCE

    target = models[0]
    slots = Slots(target)

    def decode(drafter, prompt, n=16):
        d = Decode(slots, slots.open(), list(prompt), greedy(), n, target.tokenizer, drafter, 6)
        while not d.done:
            run_round(slots, [d])
        d.close()
        d.seq.close()
        return d

    branching = [5, 6, 7, 1, 5, 6, 8, 2, 5, 6, 9, 3, 5, 6]  # "5 6" goes on three ways: a tree of candidates
    assert decode(PromptLookup(), branching).breadth > 1.2
    assert decode(DraftModel(target, target), PROMPT).breadth == 1.0
    d = decode(_WrongDrafter(target.spec.vocab_size), PROMPT)
    assert d.usage.accepted == 0 and d.usage.drafted > 3 * d.usage.passes
    most = sum(DECAY ** i for i in range(d.usage.passes))  # at most one level reached per pass
    assert d.acceptance >= PRIOR_WEIGHT * DEFAULT_ACCEPTANCE / (most + PRIOR_WEIGHT) > 0.1


def test_smollm2_speculative_greedy_equals_plain():
    """The default model: prompt lookup (a tree once step() verifies trees) and the model as its own
    draft give plain greedy's text on an editing prompt whose answer repeats the prompt."""
    m = engine.load()
    try:
        ids = m.prompt_ids("Correct the spelling mistakes in this sentence and write it out again: The quick "
                           "brown fox jumpd over the lazy dog and ran thru the forest.", chat=True)
        plain = "".join(m.generate(ids, 32, temperature=0))
        from engine.serving.decode import Usage

        u = Usage()
        assert "".join(generate(m, ids, greedy(), 32, drafter=PromptLookup(), depth=6, usage=u)) == plain
        assert u.accepted > 0 and u.passes < u.completion_tokens
        assert "".join(m.generate(ids, 32, temperature=0, draft=m, speculate=3)) == plain
    finally:
        m.close()
