"""Byte-level BPE through HF `tokenizers` (Rust) with llama.cpp's pre-tokenizer splits and merge ranks."""
from __future__ import annotations

from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models as hf_models
from tokenizers import pre_tokenizers as hf_pre

from .pretokenizers import PreTokenizer


class BpeModel:
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
