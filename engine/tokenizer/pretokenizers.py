"""llama.cpp's pre-tokenizers for byte-level BPE vocabularies, by `tokenizer.ggml.pre`."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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


DEFAULT_PRE = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))


def _pre_table() -> dict[str, PreTokenizer]:
    gpt2, gpt2_raw = PreTokenizer((_RE_GPT2,)), PreTokenizer((_RE_GPT2,), clean_spaces=False)
    llama3 = PreTokenizer((_RE_LLAMA3,), ignore_merges=True, add_bos=True)
    digits_gpt2 = PreTokenizer((r"\p{N}", _RE_GPT2))
    digits_gpt2_raw = PreTokenizer((r"\p{N}", _RE_GPT2), clean_spaces=False)
    qwen2, qwen2_raw = PreTokenizer((_RE_QWEN2,)), PreTokenizer((_RE_QWEN2,), clean_spaces=False)
    groups: list[tuple[PreTokenizer, tuple[str, ...]]] = [
        (DEFAULT_PRE, ("default",)),
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
