"""Deterministic tiny vocab-only GGUF files for tokenizer tests.

Shared by tests/test_tokenizer.py and scripts/make_llamacpp_fixtures.py: the fixture script runs
llama.cpp on exactly the files written here, so any change to this module must be followed by
re-running the script. Everything is pure Python (no engine code) so it stays an independent
reference: the SPM vocabulary is a hand-rolled frequency count of substrings with deliberately
tied scores, the BPE vocabulary is a hand-rolled byte-level BPE training run.

Both files are "llama" architecture with minimal hyperparameters and no tensors, which is what
llama.cpp needs to load them with vocab_only=True.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from functools import partial
from itertools import pairwise
from pathlib import Path

from gguf import GGUFReader, GGUFWriter, TokenType

TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog doesn't mind; it's used to the fox.
In the beginning there was the word, and the word was tokenized into pieces.
Tokenizers split text into tokens, and tokens into ids: the ids feed the model.
def tokenize(text):
    return [vocab[piece] for piece in text.split()]
for i in range(10): print(i, i * 2, 2024, 31415)
Café, naïve, façade, résumé, über, Straße, jalapeño.
日本語のテキストと中文文本。 안녕하세요 세계.
They'll say we've been there; I'm sure you're right, he'd agree.
Numbers: 1234 12345 123456 2024 2025 100 1000 10000 3.14159 2.71828 42 420 4200.
"""

SPM_SPECIALS = (  # (text, type) right after <unk> <s> </s>, before the byte tokens
    ("<|im_start|>", TokenType.CONTROL),
    ("<|im_end|>", TokenType.CONTROL),
    ("<tool>", TokenType.USER_DEFINED),
    ("<unused0>", TokenType.UNUSED),
)
SPM_ABSENT_CHARS = frozenset("qzQZ;中")  # left out so they go through byte fallback
SPM_N_PIECES = 260

BPE_SPECIALS = (  # appended after the merged tokens, like llama 3's reserved block
    ("<|begin_of_text|>", TokenType.CONTROL),
    ("<|end_of_text|>", TokenType.CONTROL),
    ("<|start_header_id|>", TokenType.CONTROL),
    ("<|end_header_id|>", TokenType.CONTROL),
    ("<|eot_id|>", TokenType.CONTROL),
    ("<|reserved_special_token_0|>", TokenType.CONTROL),
    ("<tool>", TokenType.USER_DEFINED),
    ("<tool><tool>", TokenType.CONTROL),  # contains another special token: longest is cut out first
)
BPE_N_MERGES = 300
BPE_WHOLE_WORDS = (" zebra", " tokenizers")  # whole-word tokens without a merge path (ignore_merges)


def _write(path: Path, kv: dict) -> Path:
    """Write a vocab-only llama GGUF: tokenizer keys from `kv` plus minimal hyperparameters."""
    w = GGUFWriter(str(path), arch="llama")
    w.add_context_length(256)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(kv["model"])
    if "pre" in kv:
        w.add_tokenizer_pre(kv["pre"])
    w.add_token_list(kv["tokens"])
    w.add_token_types([int(t) for t in kv["types"]])
    if "scores" in kv:
        w.add_token_scores(kv["scores"])
    if "merges" in kv:
        w.add_token_merges(kv["merges"])
    for key in ("bos", "eos", "unk"):
        if key in kv:
            getattr(w, f"add_{key}_token_id")(kv[key])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------- SentencePiece-style "llama" vocab


def spm_vocab() -> dict:
    """tokens/scores/types for a tiny SPM vocab; no add_bos/add_space_prefix keys (llama.cpp defaults)."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    for text, ttype in SPM_SPECIALS:
        tokens.append(text)
        types.append(ttype)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)

    words = ["\u2581" + w for w in TRAIN_TEXT.split()]
    chars = sorted({c for w in words for c in w} - SPM_ABSENT_CHARS)
    counts: Counter[str] = Counter()
    for w in words:
        for n in range(2, 7):
            for i in range(len(w) - n + 1):
                piece = w[i:i + n]
                if not (set(piece) & SPM_ABSENT_CHARS):
                    counts[piece] += 1
    ranked = sorted(counts, key=lambda p: (-counts[p] * len(p), p))[:SPM_N_PIECES]
    for rank, piece in enumerate(ranked):
        tokens.append(piece)
        types.append(TokenType.NORMAL)
        scores.append(-float(rank // 16))  # groups of 16 share a score: exercises tie-breaking
    for c in chars:  # single characters last, with the lowest scores
        tokens.append(c)
        types.append(TokenType.NORMAL)
        scores.append(-1000.0)
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores,
            "bos": 1, "eos": 2, "unk": 0}


# ---------------------------------------------------------------- byte-level BPE "llama-bpe" vocab


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _train_bpe(words: Counter[tuple[str, ...]], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent pair (ties: smallest pair)."""
    merges = []
    words = Counter(words)
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in words.items():
            for pair in pairwise(word):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged
    return merges


def bpe_vocab(pre: str = "llama-bpe") -> dict:
    """tokens/types/merges for a tiny byte-level BPE vocab; `pre` only changes tokenizer.ggml.pre."""
    b2u = byte_to_unicode()
    enc = lambda s: "".join(b2u[b] for b in s.encode("utf-8"))
    words: Counter[tuple[str, ...]] = Counter()
    for line in TRAIN_TEXT.splitlines():
        for i, w in enumerate(line.split(" ")):
            if w:
                words[tuple(enc(w if i == 0 else " " + w))] += 1
    merges = _train_bpe(words, BPE_N_MERGES)
    tokens = [b2u[b] for b in range(256)]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    for w in BPE_WHOLE_WORDS:
        if enc(w) not in tokens:
            tokens.append(enc(w))
    types = [TokenType.NORMAL] * len(tokens)
    first_special = len(tokens)
    for text, ttype in BPE_SPECIALS:
        tokens.append(text)
        types.append(ttype)
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types,
            "merges": [f"{a} {b}" for a, b in merges],
            "bos": first_special, "eos": first_special + 1}


# one tokenizer.ggml.pre value per distinct pre-tokenizer behaviour, recorded on the same BPE vocab
BPE_PRE_VARIANTS = ("default", "gpt-2", "trillion", "dbrx", "starcoder", "smollm", "stablelm2", "qwen2",
                    "deepseek-r1-qwen", "falcon", "deepseek-coder", "tekken")

VOCABS: dict[str, Callable[[], dict]] = {
    "tiny_spm": spm_vocab,
    "tiny_llama_bpe": bpe_vocab,
    **{f"tiny_bpe_{pre}": partial(bpe_vocab, pre) for pre in BPE_PRE_VARIANTS},
}


def write_vocab(name: str, directory: str | Path) -> Path:
    """Write the named tiny vocab as `<directory>/<name>.gguf` and return its path."""
    return _write(Path(directory) / f"{name}.gguf", VOCABS[name]())


def read_meta(path: str | Path) -> dict:
    """GGUF metadata as key -> python value, read with gguf-py (the reference reader)."""
    return {key: field.contents() for key, field in GGUFReader(str(path)).fields.items()}


def fingerprint(meta: dict) -> str:
    """Hash of the tokenizer keys, to tell whether a fixture was recorded from this vocabulary."""
    keys = sorted(k for k in meta if k.startswith("tokenizer.ggml."))
    blob = json.dumps([[k, meta[k]] for k in keys], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
