"""The GGUF vocabulary tokenizer: llama.cpp's ids and detokenized text, and its stream decoder."""
from __future__ import annotations

import codecs
import re
from collections.abc import Mapping, Sequence

from gguf import TokenType

from ..errors import TokenizerError
from .bpe import BpeModel
from .chat_template import render_chat_template
from .metadata import KEY, Meta
from .pretokenizers import DEFAULT_PRE, PRE_TOKENIZERS, PreTokenizer
from .specials import FIM_EOG_TEXTS, HIDDEN_TYPES, KNOWN_TYPES, SPECIAL_TYPES, end_of_generation
from .spm import SPACE_MARK, SpmModel


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


class Tokenizer:
    """Encode/decode exactly like llama.cpp for the vocabulary described by GGUF metadata."""

    def __init__(self, *, path: str | None, kind: str, pre: str | None, tokens: list[str],
                 types: list[int], scores: list[float], merges: list[str] | None, meta: Meta):
        self.path = path
        self.kind = kind  # "gpt2" or "llama"
        self.pre = pre
        self.vocab_size = len(tokens)
        self._tokens = tokens
        self._ids = {t: i for i, t in enumerate(tokens)}
        if len(self._ids) != len(tokens):
            dup = next(t for i, t in enumerate(tokens) if self._ids[t] != i)
            raise meta.error(KEY + "tokens", f"duplicate token {dup!r}")
        types = [t if t in KNOWN_TYPES else 0 for t in types]  # unknown values: llama.cpp's UNDEFINED

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
        fim = {name: special(name, None) for name in FIM_EOG_TEXTS}
        self.add_bos = meta.get_bool(KEY + "add_bos_token")
        self.add_bos = add_bos if self.add_bos is None else self.add_bos
        self.add_eos = bool(meta.get_bool(KEY + "add_eos_token"))
        if self.add_bos and self.bos_id is None:
            raise meta.error(KEY + "bos_token_id", "add_bos_token is true but there is no BOS token")
        if self.add_eos and self.eos_id is None:
            raise meta.error(KEY + "eos_token_id", "add_eos_token is true but there is no EOS token")

        self.eot_id, self.eom_id, self.stop_ids, forced = end_of_generation(
            self._ids, self.eos_id, self.eot_id, self.eom_id, fim)
        for tid in forced:  # llama.cpp makes every token it found by its text a control token
            types[tid] = TokenType.CONTROL
        self._types = types

        # special tokens are cut out of the text longest first (ties: lower id first)
        self._specials = sorted((i for i, t in enumerate(types) if t in SPECIAL_TYPES),
                                key=lambda i: (-len(tokens[i].encode("utf-8")), i))
        self._pieces = [self._piece(i) for i in range(self.vocab_size)]
        if spm:
            self._model: BpeModel | SpmModel = SpmModel(self._ids, scores, self.unk_id, self.add_space_prefix)
        else:
            self._model = BpeModel(tokens, merges or [], pre_spec)
        self._template_src = meta.get_str("tokenizer.chat_template")

    @staticmethod
    def _pre_spec(pre: str | None, meta: Meta) -> PreTokenizer:
        if pre is None:
            return DEFAULT_PRE  # llama.cpp warns and uses its default splits
        spec = PRE_TOKENIZERS.get(pre)
        if spec is None:
            raise meta.error(KEY + "pre", f"unsupported pre-tokenizer {pre!r} "
                                          f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
        return spec

    @classmethod
    def from_metadata(cls, meta: Mapping[str, object], path: str | None = None) -> Tokenizer:
        """Build from GGUF metadata (key -> python value); raises TokenizerError naming the key. A GGUF
        converted from a Hugging Face checkpoint carries its tokenizer.json instead: an HFTokenizer."""
        from .hf import HF_JSON_KEY, HFTokenizer

        if KEY + "model" not in meta and HF_JSON_KEY in meta:
            return HFTokenizer(meta, path)
        m = Meta(meta, path)
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
        if ttype in SPECIAL_TYPES:
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
        return self._pieces[tid] if special or self._types[tid] not in HIDDEN_TYPES else b""

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
