"""Tokenizer built from GGUF metadata that reproduces llama.cpp's token ids and detokenized text.

Two vocabulary kinds are supported, chosen by `tokenizer.ggml.model`:

* ``gpt2`` -- byte-level BPE. The pre-tokenizer (a sequence of isolating regex splits, picked by
  `tokenizer.ggml.pre`) and the merge loop run in HF `tokenizers` (Rust); ranks come from
  `tokenizer.ggml.merges`.
* ``llama`` -- SentencePiece-style vocab (tokens + scores, ``<0xXX>`` byte fallback, "▁" for
  spaces). llama.cpp does not use SentencePiece's own algorithm but a greedy "merge the adjacent
  pair whose concatenation is the highest-scoring token" loop; no HF model reproduces its
  tie-breaking exactly, so that loop is implemented here (`_SpmModel`).

Around both sits llama.cpp's handling of special tokens: control/user-defined/unknown tokens are
cut out of the text as whole strings before the model sees it (longest token text first), BOS/EOS
are added per `tokenizer.ggml.add_bos_token`/`add_eos_token` (with llama.cpp's per-type defaults),
and the end-of-generation set is derived from the ids in the metadata plus llama.cpp's list of
well-known end-of-turn token texts.
"""
from __future__ import annotations

import codecs
import functools
import heapq
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import jinja2
from gguf import TokenType
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models as hf_models
from tokenizers import pre_tokenizers as hf_pre

from .errors import TokenizerError

KEY = "tokenizer.ggml."
SPACE_MARK = "\u2581"  # SentencePiece's visible space "▁"

# ------------------------------------------------------------------ pre-tokenizers (BPE vocabs)

# The regexes below are the ones the upstream HF tokenizer.json files use; llama.cpp applies the
# same splits (partly with hand-written matchers), one after another, each isolating its matches.
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_RE_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Mistral's tekken: llama.cpp's rewrite of the tokenizer.json regex ([^a-z] / [^A-Z] restricted to letters
# standing for the upper-/lower-case classes), which is what its ids follow.
_RE_TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
              r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
              r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True, slots=True)
class PreTokenizer:
    """How llama.cpp treats one `tokenizer.ggml.pre` value."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a whole pre-token found in the vocab is emitted as is
    clean_spaces: bool = True  # detokenizer drops the space in " ," " 's" ... (clean_up_tokenization_spaces)
    add_bos: bool = False  # default when tokenizer.ggml.add_bos_token is absent


_DEFAULT_PRE = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))


def _pre_table() -> dict[str, PreTokenizer]:
    gpt2, gpt2_raw = PreTokenizer((_RE_GPT2,)), PreTokenizer((_RE_GPT2,), clean_spaces=False)
    llama3 = PreTokenizer((_RE_LLAMA3,), ignore_merges=True, add_bos=True)
    digits_gpt2 = PreTokenizer((r"\p{N}", _RE_GPT2))
    digits_gpt2_raw = PreTokenizer((r"\p{N}", _RE_GPT2), clean_spaces=False)
    qwen2, qwen2_raw = PreTokenizer((_RE_QWEN2,)), PreTokenizer((_RE_QWEN2,), clean_spaces=False)
    groups: list[tuple[PreTokenizer, tuple[str, ...]]] = [
        (_DEFAULT_PRE, ("default",)),
        (llama3, ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                 "jina-v5-nano")),
        (PreTokenizer((_RE_LLAMA3,)), ("dbrx", "smaug-bpe")),
        (gpt2, ("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "jina-es", "jina-de", "gigachat",
                "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum", "modern-bert")),
        (gpt2_raw, ("trillion", "granite-docling")),
        (digits_gpt2, ("starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2")),
        (digits_gpt2_raw, ("smollm", "command-r")),
        (qwen2, ("stablelm2", "megrez")),
        (qwen2_raw, ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open")),
        (PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _RE_GPT2, r"[0-9][0-9][0-9]")), ("falcon",)),
        (PreTokenizer((_RE_TEKKEN,), ignore_merges=True, clean_spaces=False, add_bos=True), ("tekken",)),
        (PreTokenizer((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
                       r"\p{N}"), clean_spaces=False), ("deepseek-coder",)),
    ]
    return {name: spec for spec, names in groups for name in names}


PRE_TOKENIZERS: Mapping[str, PreTokenizer] = _pre_table()

# ------------------------------------------------------------------ special-token conventions

# Token texts llama.cpp treats as end-of-turn when tokenizer.ggml.eot_token_id is absent ...
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
# ... the FIM tokens it also stops on (pad / repo / file separator), when their ids are absent ...
_FIM_EOG_TEXTS = {
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# ... and every token with one of these texts ends generation.
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
))

_KNOWN_TYPES = frozenset(int(t) for t in TokenType)
_SPECIAL_TYPES = frozenset((TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN))
_HIDDEN_TYPES = frozenset((TokenType.CONTROL, TokenType.UNKNOWN))  # rendered only with specials


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table used by byte-level BPE vocabs."""
    direct = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in direct}
    shifted = (b for b in range(256) if b not in direct)
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


_BYTE_DECODER = _gpt2_byte_decoder()

# clean_up_tokenization_spaces as llama.cpp applies it, in its three passes
_CLEAN_PASSES = ((re.compile(rb" ([?!.,])"), rb"\1"),
                 (re.compile(rb" ' "), rb"'"),
                 (re.compile(rb" '(?=[sm]|re|ve)"), rb"'"))

# ------------------------------------------------------------------ metadata access


class _Meta:
    """Typed reads of tokenizer keys; every failure names the GGUF key."""

    __slots__ = ("meta", "path")

    def __init__(self, meta: Mapping[str, object], path: str | None):
        self.meta, self.path = meta, path

    def error(self, field: str, message: str) -> TokenizerError:
        return TokenizerError(message, path=self.path, field=field)

    def get_str(self, key: str) -> str | None:
        value = self.meta.get(key)
        if value is not None and not isinstance(value, str):
            raise self.error(key, f"expected a string, got {type(value).__name__}")
        return value

    def get_bool(self, key: str) -> bool | None:
        value = self.meta.get(key)
        if value is not None and not isinstance(value, (bool, int)):
            raise self.error(key, f"expected a bool, got {type(value).__name__}")
        return None if value is None else bool(value)

    def get_id(self, key: str) -> int | None:
        value = self.meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.error(key, f"expected a token id, got {type(value).__name__}")
        return value

    def get_list(self, key: str, kind: type | tuple[type, ...], n: int | None = None) -> list | None:
        value = self.meta.get(key)
        if value is None:
            return None
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise self.error(key, f"expected an array, got {type(value).__name__}")
        items = list(value)
        for i, item in enumerate(items):
            if isinstance(item, bool) or not isinstance(item, kind):
                raise self.error(f"{key}[{i}]", f"unexpected element type {type(item).__name__}")
        if n is not None and len(items) < n:
            raise self.error(key, f"has {len(items)} entries for {n} tokens")
        return items


# ------------------------------------------------------------------ the two vocabulary models


class _BpeModel:
    """Byte-level BPE: HF tokenizers with llama.cpp's pre-tokenizer splits and merge ranks."""

    def __init__(self, tokens: list[str], merges: list[str], pre: PreTokenizer):
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = []
        for m in merges:  # "left right", split at the first space after position 0 like llama.cpp
            pos = m.find(" ", 1)
            if pos < 0:
                continue
            left, right = m[:pos], m[pos + 1:]
            # HF refuses merges whose parts or result are not tokens; llama.cpp could only ever
            # reach such a merge with a broken vocabulary, so they are dropped.
            if left in vocab and right in vocab and left + right in vocab:
                pairs.append((left, right))
        # A character missing from the vocab stays a symbol of its own in llama.cpp: it blocks
        # merges across it and is dropped from the output. HF does that for its unknown token,
        # so a sentinel entry (id = vocab size, never a real id) plays that part and is removed.
        self._unk = len(tokens)
        unk_text = "\x00<unknown>"
        while unk_text in vocab:
            unk_text += "\x00"
        vocab[unk_text] = self._unk
        hf = HFTokenizer(hf_models.BPE(vocab=vocab, merges=pairs, unk_token=unk_text, fuse_unk=False,
                                       ignore_merges=pre.ignore_merges))
        hf.pre_tokenizer = hf_pre.Sequence(
            [hf_pre.Split(Regex(r), behavior="isolated") for r in pre.regexes]
            + [hf_pre.ByteLevel(add_prefix_space=False, use_regex=False)])
        self._hf = hf

    def encode(self, text: str, after_special: bool) -> list[int]:
        """`after_special` is irrelevant here: byte-level BPE adds no space prefix."""
        ids = self._hf.encode(text, add_special_tokens=False).ids
        return [i for i in ids if i != self._unk] if self._unk in ids else ids


class _SpmModel:
    """llama.cpp's SentencePiece-vocab tokenizer: greedy merges of adjacent symbols by token score.

    Spaces become "▁" (with one prepended to text that starts the input or follows a special
    token, when add_space_prefix). Start from single characters; repeatedly merge the adjacent
    pair whose concatenation is a token with the highest score (ties: leftmost pair). Symbols left
    that are not tokens are emitted as <0xXX> byte tokens.
    """

    def __init__(self, token_to_id: Mapping[str, int], scores: list[float], unk_id: int | None,
                 add_space_prefix: bool):
        self._ids = token_to_id
        self._scores = scores
        self._space_prefix = add_space_prefix
        byte_ids = []
        for b in range(256):
            tid = token_to_id.get(f"<0x{b:02X}>")
            if tid is None and b < 0x80:
                tid = token_to_id.get(chr(b))
            byte_ids.append(unk_id if tid is None else tid)
        self._byte_ids = byte_ids

    def encode(self, text: str, after_special: bool) -> list[int]:
        if self._space_prefix and after_special:
            text = " " + text
        return self._merge(text.replace(" ", SPACE_MARK))

    def _merge(self, text: str) -> list[int]:
        if not text:
            return []
        ids, scores = self._ids, self._scores
        syms = list(text)  # (n,) current symbol texts; "" once merged into the left neighbour
        n = len(syms)
        nxt = [*range(1, n), -1]
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []  # (-score, left, right, merged length)

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                merged = syms[left] + syms[right]
                tid = ids.get(merged)
                if tid is not None:
                    heapq.heappush(heap, (-scores[tid], left, right, len(merged)))

        for i in range(1, n):
            push(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not syms[left] or not syms[right] or len(syms[left]) + len(syms[right]) != size:
                continue  # stale: one side was merged since
            syms[left] += syms[right]
            syms[right] = ""
            nxt[left] = nxt[right]
            if nxt[left] >= 0:
                prv[nxt[left]] = left
            push(prv[left], left)
            push(left, nxt[left])

        out: list[int] = []
        i = 0
        while i >= 0:
            tid = ids.get(syms[i])
            if tid is not None:
                out.append(tid)
            else:
                out.extend(b for b in (self._byte_ids[c] for c in syms[i].encode("utf-8")) if b is not None)
            i = nxt[i]
        return out


# ------------------------------------------------------------------ the tokenizer


def _end_of_generation(ids: Mapping[str, int], eos: int | None, eot: int | None, eom: int | None,
                       fim: Mapping[str, int | None]) -> tuple[int | None, int | None, frozenset[int], set[int]]:
    """llama.cpp's EOT/EOM/FIM lookup by token text and its end-of-generation set.

    Returns (eot, eom, stop ids, ids found by their text). Where several texts match, llama.cpp
    takes the first in its hash-map order, which cannot be reproduced; the order of the text lists
    (most specific end-of-turn texts first) is used instead. The stop set does not depend on it.
    """
    found: set[int] = set()

    def by_text(current: int | None, texts: Sequence[str]) -> int | None:
        if current is None:
            current = next((ids[t] for t in texts if t in ids), None)
            if current is not None:
                found.add(current)
        return current

    eot, eom = by_text(eot, _EOT_TEXTS), by_text(eom, _EOM_TEXTS)
    fim_ids = {by_text(tid, _FIM_EOG_TEXTS[name]) for name, tid in fim.items()}
    by_eog_text = {tid for text, tid in ids.items() if text in _EOG_TEXTS}
    found |= by_eog_text
    stop = (fim_ids | by_eog_text | {eos, eot, eom}) - {None}
    return eot, eom, frozenset(stop), found


class Tokenizer:
    """Encode/decode exactly like llama.cpp for the vocabulary described by GGUF metadata."""

    def __init__(self, *, path: str | None, kind: str, pre: str | None, tokens: list[str],
                 types: list[int], scores: list[float], merges: list[str] | None, meta: _Meta):
        self.path = path
        self.kind = kind  # "gpt2" or "llama"
        self.pre = pre
        self.vocab_size = len(tokens)
        self._tokens = tokens
        self._ids = {t: i for i, t in enumerate(tokens)}
        if len(self._ids) != len(tokens):
            dup = next(t for i, t in enumerate(tokens) if self._ids[t] != i)
            raise meta.error(KEY + "tokens", f"duplicate token {dup!r}")
        types = [t if t in _KNOWN_TYPES else 0 for t in types]  # unknown values: llama.cpp's UNDEFINED

        spm = kind == "llama"
        if spm:
            pre_spec = None
            bos, eos, unk = 1, 2, 0
            add_bos, self.add_space_prefix, self._clean_spaces = True, True, False
        else:
            pre_spec = self._pre_spec(pre, meta)
            bos, eos, unk = 11, 11, None
            add_bos, self.add_space_prefix, self._clean_spaces = pre_spec.add_bos, False, pre_spec.clean_spaces
        space_prefix = meta.get_bool(KEY + "add_space_prefix")
        if space_prefix is not None:
            self.add_space_prefix = space_prefix

        def special(name: str, default: int | None) -> int | None:
            if default is not None and default >= self.vocab_size:
                default = None
            value = meta.get_id(f"{KEY}{name}_token_id")
            return value if value is not None and 0 <= value < self.vocab_size else default

        self.bos_id = special("bos", bos)
        self.eos_id = special("eos", eos)
        self.unk_id = special("unknown", unk)
        self.pad_id = special("padding", None)
        self.eot_id = special("eot", None)
        self.eom_id = special("eom", None)
        fim = {name: special(name, None) for name in _FIM_EOG_TEXTS}
        self.add_bos = meta.get_bool(KEY + "add_bos_token")
        self.add_bos = add_bos if self.add_bos is None else self.add_bos
        self.add_eos = bool(meta.get_bool(KEY + "add_eos_token"))
        if self.add_bos and self.bos_id is None:
            raise meta.error(KEY + "bos_token_id", "add_bos_token is true but there is no BOS token")
        if self.add_eos and self.eos_id is None:
            raise meta.error(KEY + "eos_token_id", "add_eos_token is true but there is no EOS token")

        self.eot_id, self.eom_id, self.stop_ids, forced = _end_of_generation(
            self._ids, self.eos_id, self.eot_id, self.eom_id, fim)
        for tid in forced:  # llama.cpp makes every token it found by its text a control token
            types[tid] = TokenType.CONTROL
        self._types = types

        # special tokens are cut out of the text longest first (ties: lower id first)
        self._specials = sorted((i for i, t in enumerate(types) if t in _SPECIAL_TYPES),
                                key=lambda i: (-len(tokens[i].encode("utf-8")), i))
        self._pieces = [self._piece(i) for i in range(self.vocab_size)]
        if spm:
            self._model: _BpeModel | _SpmModel = _SpmModel(self._ids, scores, self.unk_id, self.add_space_prefix)
        else:
            self._model = _BpeModel(tokens, merges or [], pre_spec)
        self._template_src = meta.get_str("tokenizer.chat_template")

    @staticmethod
    def _pre_spec(pre: str | None, meta: _Meta) -> PreTokenizer:
        if pre is None:
            return _DEFAULT_PRE  # llama.cpp warns and uses its default splits
        spec = PRE_TOKENIZERS.get(pre)
        if spec is None:
            raise meta.error(KEY + "pre", f"unsupported pre-tokenizer {pre!r} "
                                          f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
        return spec

    @classmethod
    def from_metadata(cls, meta: Mapping[str, object], path: str | None = None) -> Tokenizer:
        """Build from GGUF metadata (key -> python value); raises TokenizerError naming the key. A GGUF
        converted from a Hugging Face checkpoint carries its tokenizer.json instead: an HFTokenizer."""
        from .hf.tokenizer import HF_JSON_KEY, HFTokenizer

        if KEY + "model" not in meta and HF_JSON_KEY in meta:
            return HFTokenizer(meta, path)
        m = _Meta(meta, path)
        kind = m.get_str(KEY + "model")
        if kind is None:
            raise m.error(KEY + "model", "missing: the file has no tokenizer")
        if kind not in ("gpt2", "llama"):
            raise m.error(KEY + "model", f"unsupported tokenizer model {kind!r} (supported: gpt2, llama)")
        tokens = m.get_list(KEY + "tokens", str)
        if not tokens:
            raise m.error(KEY + "tokens", "missing or empty vocabulary")
        n = len(tokens)
        # llama.cpp replaces empty token texts so they stay unique and never match
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        types = m.get_list(KEY + "token_type", int, n) or [int(TokenType.NORMAL)] * n
        scores = m.get_list(KEY + "scores", (int, float), n) or [0.0] * n
        merges = m.get_list(KEY + "merges", str)
        if kind == "gpt2" and merges is None:
            raise m.error(KEY + "merges", "missing: a gpt2 (BPE) vocabulary needs its merges")
        return cls(path=path, kind=kind, pre=m.get_str(KEY + "pre"), tokens=tokens, types=types[:n],
                   scores=[float(s) for s in scores[:n]], merges=merges, meta=m)

    # -------------------------------------------------------------- encode

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids for `text`; BOS/EOS added per the vocab when `add_special`; special token
        texts (control tokens like <|im_start|>) become their ids when `parse_special`
        (user-defined tokens always do, as in llama.cpp)."""
        if not isinstance(text, str):
            raise TokenizerError(f"expected str, got {type(text).__name__}", path=self.path, field="text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenizerError(f"not encodable as UTF-8 at {e.start}: {e.reason}",
                                 path=self.path, field="text") from None
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)
        after_special = True  # the start of the text counts as following a special token
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                after_special = True
            else:
                out += self._model.encode(frag, after_special)
                after_special = False
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split `text` into raw-text fragments and special token ids, longest token text first."""
        frags: list[str | int] = [text] if text else []
        for tid in self._specials:
            if not parse_special and self._types[tid] != TokenType.USER_DEFINED:
                continue
            needle = self._tokens[tid]
            if not any(isinstance(f, str) and needle in f for f in frags):
                continue
            split: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or needle not in f:
                    split.append(f)
                    continue
                for j, part in enumerate(f.split(needle)):
                    if j:
                        split.append(tid)
                    if part:
                        split.append(part)
            frags = split
        return frags

    # -------------------------------------------------------------- decode

    def _piece(self, tid: int) -> bytes:
        """The bytes llama.cpp renders for one token when special tokens are shown."""
        text, ttype = self._tokens[tid], self._types[tid]
        if ttype in _SPECIAL_TYPES:
            return text.encode("utf-8")
        if ttype == TokenType.BYTE:
            return bytes((int(text[3:5], 16),))
        if ttype != TokenType.NORMAL:
            return b""  # unused / undefined tokens render as nothing
        if self.kind == "llama":
            return text.replace(SPACE_MARK, " ").encode("utf-8")
        out = bytearray()
        for ch in text:
            b = _BYTE_DECODER.get(ch)
            if b is None:  # llama.cpp's marker for a character outside the byte table
                out += f"[UNK_BYTE_0x{ch.encode('utf-8').hex()}{text}]".encode()
            else:
                out.append(b)
        return bytes(out)

    def token_bytes(self, tid: int, *, special: bool = True) -> bytes:
        """One token's bytes (control/unknown tokens are empty unless `special`)."""
        tid = self._check_id(tid, "id")
        return self._pieces[tid] if special or self._types[tid] not in _HIDDEN_TYPES else b""

    def _check_id(self, tid: object, field: str) -> int:
        if isinstance(tid, bool) or not hasattr(tid, "__index__"):
            raise TokenizerError(f"token id must be an int, got {type(tid).__name__}", path=self.path, field=field)
        tid = tid.__index__()
        if not 0 <= tid < self.vocab_size:
            raise TokenizerError(f"token id {tid} outside the vocabulary [0, {self.vocab_size})",
                                 path=self.path, field=field)
        return tid

    def decode_bytes(self, ids: Sequence[int], *, skip_special: bool = False) -> bytes:
        """llama_detokenize(remove_special=skip_special, unparse_special=not skip_special)."""
        ids = [self._check_id(t, f"ids[{i}]") for i, t in enumerate(ids)]
        strip_space = self.add_space_prefix
        if skip_special and self.add_bos and ids and ids[0] == self.bos_id:
            strip_space = False
            ids = ids[1:]
        if skip_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        parts = [self.token_bytes(t, special=not skip_special) for t in ids]
        if strip_space and parts and parts[0].startswith(b" "):
            parts[0] = parts[0][1:]
        out = b"".join(parts)
        if self._clean_spaces:
            for pattern, repl in _CLEAN_PASSES:
                out = pattern.sub(repl, out)
        return out

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text for `ids` as llama.cpp detokenizes it; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    def decoder(self, *, skip_special: bool = True) -> StreamDecoder:
        """Incremental decoder for generated tokens (see StreamDecoder)."""
        return StreamDecoder(self, skip_special=skip_special)

    # -------------------------------------------------------------- vocabulary lookups

    def id_to_token(self, tid: int) -> str:
        """The raw vocabulary entry (e.g. 'Ġthe', '▁the', '<0x0A>')."""
        return self._tokens[self._check_id(tid, "id")]

    def token_to_id(self, text: str) -> int | None:
        """Id of the vocabulary entry spelled exactly `text`, or None."""
        return self._ids.get(text)

    # -------------------------------------------------------------- chat template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `tokenizer.chat_template` (jinja2, sandboxed) the way transformers does."""
        special = {name: ("" if tid is None else self._tokens[tid])
                   for name, tid in (("bos_token", self.bos_id), ("eos_token", self.eos_id))}
        return render_chat_template(self._template_src, messages, add_generation_prompt, special, self.path)


def render_chat_template(source: str | None, messages: list[dict], add_generation_prompt: bool,
                         special: Mapping[str, str], path: str | None,
                         field: str = "tokenizer.chat_template") -> str:
    """Render a chat template (jinja2, sandboxed, compiled once per source) the way transformers does;
    `special` holds bos_token/eos_token texts. Errors name `field` of `path`."""
    if source is None:
        raise TokenizerError("the model has no chat template", path=path, field=field)
    if not isinstance(messages, (list, tuple)):
        raise TokenizerError(f"expected a list of messages, got {type(messages).__name__}", path=path,
                             field="messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str):
            raise TokenizerError("each message must be a mapping with a string 'role'", path=path,
                                 field=f"messages[{i}]")
    try:
        template = _compiled(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template does not compile: {e}", path=path, field=field) from None
    try:
        return template.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               **special)
    except _TemplateRaised as e:
        raise TokenizerError(f"chat template rejected the messages: {e}", path=path, field="messages") from None
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template failed: {e}", path=path, field=field) from None


@functools.lru_cache(maxsize=8)
def _compiled(source: str) -> jinja2.Template:
    return _template_env().from_string(source)


class _TemplateRaised(Exception):
    """raise_exception() called from inside a chat template."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _template_env() -> ImmutableSandboxedEnvironment:
    """A sandboxed environment configured like transformers' chat-template renderer."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class StreamDecoder:
    """Turns generated token ids into text as they arrive.

    `push(id)` returns the complete UTF-8 text not yet returned; bytes of a character split
    across tokens are held back until it is complete (invalid sequences become U+FFFD).
    `flush()` returns whatever is held back. Pieces are rendered like llama.cpp's per-token
    `token_to_piece` (what its CLI/server stream): no leading-space strip and no
    clean_up_tokenization_spaces, so the concatenation equals `decode()` except for those two
    cosmetic passes on vocabularies that enable them.
    """

    __slots__ = ("_special", "_tok", "_utf8")

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True):
        self._tok = tokenizer
        self._special = not skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.token_bytes(token_id, special=self._special))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
