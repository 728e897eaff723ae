"""llama.cpp's special-token conventions: end-of-turn/FIM texts, token types, the end-of-generation set."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from gguf import TokenType

# Token texts llama.cpp treats as end-of-turn when tokenizer.ggml.eot_token_id is absent ...
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
# ... the FIM tokens it also stops on (pad / repo / file separator), when their ids are absent ...
FIM_EOG_TEXTS = {
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

KNOWN_TYPES = frozenset(int(t) for t in TokenType)
SPECIAL_TYPES = frozenset((TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN))
HIDDEN_TYPES = frozenset((TokenType.CONTROL, TokenType.UNKNOWN))  # rendered only with specials


def end_of_generation(ids: Mapping[str, int], eos: int | None, eot: int | None, eom: int | None,
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
    fim_ids = {by_text(tid, FIM_EOG_TEXTS[name]) for name, tid in fim.items()}
    by_eog_text = {tid for text, tid in ids.items() if text in _EOG_TEXTS}
    found |= by_eog_text
    stop = (fim_ids | by_eog_text | {eos, eot, eom}) - {None}
    return eot, eom, frozenset(stop), found
