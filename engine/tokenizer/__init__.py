"""Tokenizer built from GGUF metadata that reproduces llama.cpp's token ids and detokenized text.

Two vocabulary kinds are supported, chosen by `tokenizer.ggml.model`:

* ``gpt2`` -- byte-level BPE. The pre-tokenizer (a sequence of isolating regex splits, picked by
  `tokenizer.ggml.pre`) and the merge loop run in HF `tokenizers` (Rust); ranks come from
  `tokenizer.ggml.merges`.
* ``llama`` -- SentencePiece-style vocab (tokens + scores, ``<0xXX>`` byte fallback, "▁" for
  spaces). llama.cpp does not use SentencePiece's own algorithm but a greedy "merge the adjacent
  pair whose concatenation is the highest-scoring token" loop; no HF model reproduces its
  tie-breaking exactly, so that loop is implemented here (`spm.SpmModel`).

The modules: pretokenizers (the `tokenizer.ggml.pre` table), bpe and spm (the two vocabulary models),
specials (end-of-generation conventions), metadata (typed key reads), chat_template, vocab (the
`Tokenizer` and its stream decoder) and hf (a checkpoint's tokenizer.json).

Around both sits llama.cpp's handling of special tokens: control/user-defined/unknown tokens are
cut out of the text as whole strings before the model sees it (longest token text first), BOS/EOS
are added per `tokenizer.ggml.add_bos_token`/`add_eos_token` (with llama.cpp's per-type defaults),
and the end-of-generation set is derived from the ids in the metadata plus llama.cpp's list of
well-known end-of-turn token texts.
"""
from __future__ import annotations

from .chat_template import render_chat_template
from .pretokenizers import PRE_TOKENIZERS, PreTokenizer
from .vocab import StreamDecoder, Tokenizer

__all__ = ["PRE_TOKENIZERS", "PreTokenizer", "StreamDecoder", "Tokenizer", "render_chat_template"]
