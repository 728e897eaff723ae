"""The tokenizer of a Hugging Face checkpoint: its tokenizer.json run by the `tokenizers` library.

For safetensors checkpoints the HF tokenizer's ids are the reference (llama.cpp's pre-tokenizers
may split differently, e.g. digits under qwen2). The files travel verbatim inside the converted
GGUF under the keys below, so a cached conversion tokenizes exactly like the checkpoint.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from tokenizers import Tokenizer as RustTokenizer

from ..errors import TokenizerError
from .chat_template import render_chat_template

HF_JSON_KEY = "tokenizer.huggingface.json"
HF_CONFIG_KEY = "tokenizer.huggingface.tokenizer_config"
HF_GENERATION_KEY = "tokenizer.huggingface.generation_config"


def _token_text(value: object) -> str | None:
    """tokenizer_config's bos_token/eos_token: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """Same interface as engine.tokenizer.vocab.Tokenizer (encode/decode/decoder/chat template/stop ids)."""

    kind = "hf"

    def __init__(self, meta: Mapping[str, object], path: str | None = None):
        self.path = path

        def load_json(key: str, required: bool) -> dict:
            text = meta.get(key)
            if text is None and not required:
                return {}
            try:
                value = json.loads(text) if isinstance(text, str) else None
            except ValueError as e:
                raise TokenizerError(f"not valid JSON: {e}", path=path, field=key) from None
            if not isinstance(value, dict):
                raise TokenizerError("expected a JSON object", path=path, field=key)
            return value

        load_json(HF_JSON_KEY, True)
        try:
            self._hf = RustTokenizer.from_str(meta[HF_JSON_KEY])
        except Exception as e:  # the Rust library raises plain Exceptions for malformed files
            raise TokenizerError(f"the tokenizers library refused it: {e}", path=path, field=HF_JSON_KEY) from None
        config, generation = load_json(HF_CONFIG_KEY, False), load_json(HF_GENERATION_KEY, False)
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._id(_token_text(config.get("bos_token")), HF_CONFIG_KEY + ".bos_token")
        self.eos_id = self._id(_token_text(config.get("eos_token")), HF_CONFIG_KEY + ".eos_token")
        gen_eos = generation.get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        bad = [t for t in gen_eos if t is not None and (not isinstance(t, int) or not 0 <= t < self.vocab_size)]
        if bad:
            raise TokenizerError(f"token id {bad[0]!r} is not in the vocabulary", path=path,
                                 field=HF_GENERATION_KEY + ".eos_token_id")
        self.stop_ids = frozenset(t for t in (*gen_eos, self.eos_id) if t is not None)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, Mapping)
                             and t.get("name") == "default"), None)
        self._template_src = template if isinstance(template, str) else None
        self._special_texts = {"bos_token": _token_text(config.get("bos_token")) or "",
                               "eos_token": _token_text(config.get("eos_token")) or ""}

    def _id(self, text: str | None, field: str) -> int | None:
        if text is None:
            return None
        tid = self._hf.token_to_id(text)
        if tid is None:
            raise TokenizerError(f"token {text!r} is not in the vocabulary", path=self.path, field=field)
        return tid

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"expected str, got {type(text).__name__}", path=self.path, field="text")
        self._hf.encode_special_tokens = not parse_special
        try:
            return self._hf.encode(text, add_special_tokens=add_special).ids
        finally:
            self._hf.encode_special_tokens = False

    def _check(self, ids: Sequence[int]) -> list[int]:
        out = []
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not hasattr(t, "__index__") or not 0 <= t.__index__() < self.vocab_size:
                raise TokenizerError(f"token id {t!r} outside the vocabulary [0, {self.vocab_size})",
                                     path=self.path, field=f"ids[{i}]")
            out.append(t.__index__())
        return out

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self._hf.decode(self._check(ids), skip_special_tokens=skip_special)

    def decoder(self, *, skip_special: bool = True) -> "HFStreamDecoder":
        return HFStreamDecoder(self, skip_special=skip_special)

    def id_to_token(self, tid: int) -> str:
        return self._hf.id_to_token(self._check([tid])[0])

    def token_to_id(self, text: str) -> int | None:
        return self._hf.token_to_id(text)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat_template(self._template_src, messages, add_generation_prompt, self._special_texts,
                                    self.path, field=HF_CONFIG_KEY + ".chat_template")


class HFStreamDecoder:
    """Text of generated ids as they arrive: the decode of the ids so far, emitted once it no longer
    ends in an incomplete character (U+FFFD); the window restarts after each emitted piece."""

    __slots__ = ("_ids", "_prefix", "_read", "_skip", "_tok")

    def __init__(self, tokenizer: HFTokenizer, *, skip_special: bool = True):
        self._tok, self._skip = tokenizer, skip_special
        self._ids: list[int] = []
        self._prefix = self._read = 0

    def _text(self, a: int, b: int | None = None) -> str:
        return self._tok.decode(self._ids[a:b], skip_special=self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before, now = self._text(self._prefix, self._read), self._text(self._prefix)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before, now = self._text(self._prefix, self._read), self._text(self._prefix)
        self._prefix = self._read = len(self._ids)
        return now[len(before):]
