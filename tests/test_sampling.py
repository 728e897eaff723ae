"""Sampler: each filter against a hand computation; generation stops on EOG tokens and stop strings."""
from __future__ import annotations

import collections

import pytest
import torch

import engine
from engine.errors import ConfigError
from engine.sampling import Sampler, SamplingParams
from tiny_llama import TinyConfig, write_tiny_llama

LOGITS = torch.tensor([2.0, 1.0, 0.5, 3.0, -1.0, 2.9])  # order by logit: 3, 5, 0, 1, 2, 4


def draws(n=3000, history=(), **kw):
    s = Sampler(SamplingParams(seed=7, **kw))
    return collections.Counter(s(LOGITS, list(history)) for _ in range(n))


def test_greedy_is_argmax():
    assert draws(10, temperature=0) == {3: 10}


def test_top_k_limits_candidates():
    assert set(draws(top_k=2, top_p=1.0, min_p=0.0, temperature=1.0)) == {3, 5}


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.softmax(LOGITS, 0).sort(descending=True).values
    need = int((probs.cumsum(0) < 0.8).sum()) + 1  # tokens until the cumulative mass reaches 0.8
    assert len(draws(top_k=0, top_p=0.8, min_p=0.0, temperature=1.0)) == need


def test_min_p_drops_tokens_below_fraction_of_best():
    p = torch.softmax(LOGITS, 0)
    expect = {i for i in range(6) if p[i] >= 0.3 * p.max()}
    assert set(draws(top_k=0, top_p=1.0, min_p=0.3, temperature=1.0)) == expect


def test_temperature_sharpens_distribution():
    hot = draws(top_k=0, top_p=1.0, min_p=0.0, temperature=2.0)
    cold = draws(top_k=0, top_p=1.0, min_p=0.0, temperature=0.3)
    assert cold[3] > hot[3] and len(cold) <= len(hot)
    # frequencies follow softmax(logits / T)
    p = torch.softmax(LOGITS / 2.0, 0)
    for i in range(6):
        assert abs(hot[i] / 3000 - float(p[i])) < 0.03


def test_repetition_penalty_divides_positive_multiplies_negative():
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0))
    assert s(LOGITS, [3]) == 5  # 3.0 / 2 = 1.5 < 2.9
    assert s(torch.tensor([-0.5, -0.6]), [0]) == 1  # -0.5 * 2 = -1.0 < -0.6


def test_seed_reproducible():
    assert draws(50, temperature=1.5) == draws(50, temperature=1.5)


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_p": 0}, {"min_p": 1.0}, {"top_k": -2},
                                {"repeat_penalty": 0}])
def test_invalid_params(kw):
    with pytest.raises(ConfigError):
        SamplingParams(**kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return engine.load(write_tiny_llama(tmp_path_factory.mktemp("s") / "s.gguf", TinyConfig(n_layers=1)))


def test_stop_string_cuts_text_and_reports_stop(tiny):
    full = "".join(tiny.generate([5, 6, 7], max_tokens=20, temperature=0, stop=()))
    assert len(full) > 6
    stop = full[3:6]
    text = "".join(tiny.generate([5, 6, 7], max_tokens=20, temperature=0, stop=(stop,)))
    assert text == full[:full.index(stop)] and tiny.stats.finish_reason == "stop"


def test_eog_token_ends_generation(tiny, monkeypatch):
    eos = tiny.tokenizer.eos_id
    real = tiny.step

    def forced(rows, last_only=False, trees=None, want=None):  # the model "wants" EOS after two tokens
        starts = [seq.pos for seq, _ in rows]
        out = [o.clone() for o in real(rows, last_only, trees, want)]
        for o, start in zip(out, starts):
            if start >= 4:
                o[..., eos] = 1e4
        return out

    monkeypatch.setattr(tiny, "step", forced)
    pieces = list(tiny.generate([5, 6, 7], max_tokens=20, temperature=0, stop=()))
    assert tiny.stats.finish_reason == "stop" and tiny.stats.decode_tokens == 3 and pieces
