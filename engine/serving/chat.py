"""Multi-turn chat on one sequence: every turn renders the whole conversation with the model's chat
template, and only the tokens after the already-cached prefix are computed (the KV of earlier turns,
replies included, is reused)."""
from __future__ import annotations

from typing import Iterator

from ..sampling import SamplingParams
from .batcher import check_prompt, run_round
from .decode import Decode, Usage
from .slots import Slots


def chat_ids(tok, messages: list[dict], rendered: str | None = None) -> list[int]:
    """Token ids of the conversation rendered with the chat template (one BOS even when the template
    writes its own)."""
    if rendered is None:
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = tok.encode(rendered, add_special=True)
    if tok.bos_id is not None and len(ids) > 1 and ids[0] == ids[1] == tok.bos_id:
        ids = ids[1:]
    return ids


class ChatSession:
    def __init__(self, model, system: str | None = None, *, drafter=None, depth: int = 1):
        self.model, self.slots = model, Slots(model)
        self.seq = self.slots.open()
        self.drafter, self.depth = drafter, depth
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.tokens: list[int] = []  # the conversation so far; tokens[:seq.pos] are cached
        self.text: str | None = ""  # the rendered conversation `tokens` stands for (None: unknown)
        self.usage = Usage()  # of the last turn

    def _ids(self, rendered: str) -> list[int]:
        tok = self.model.tokenizer
        if self.text and rendered.startswith(self.text):  # extend the cached tokens, never re-tokenize them
            return self.tokens + tok.encode(rendered[len(self.text):], add_special=False)
        return chat_ids(tok, [], rendered)

    def turn(self, user: str, max_tokens: int = 256, **sampling) -> Iterator[str]:
        """Text pieces of the reply to `user`; `self.usage.prefill_tokens` counts what was computed."""
        params = SamplingParams(**sampling)
        tok = self.model.tokenizer
        messages = self.messages + [{"role": "user", "content": user}]
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True)
        ids = self._ids(rendered)
        check_prompt(ids, self.slots.n_ctx)
        keep = 0
        for a, b in zip(self.tokens[:self.seq.pos], ids):
            if a != b:
                break
            keep += 1
        self.seq.truncate(min(keep, len(ids) - 1))
        d = Decode(self.slots, self.seq, ids, params, max_tokens, tok, self.drafter, self.depth)
        self.usage, pieces, ok = d.usage, [], False
        try:
            while not d.done:
                piece = run_round(self.slots, [d])[0]
                if piece:
                    pieces.append(piece)
                    yield piece
            ok = True
        finally:
            d.close()
            self.tokens = d.tokens if ok else d.tokens[:self.seq.pos]  # the reply's last token is not cached yet
            reply = "".join(pieces)
            if ok:
                self.messages = messages + [{"role": "assistant", "content": reply}]
                self.text = rendered + reply if tok.decode(d.generated) == reply else None
            else:
                self.text = None

    def close(self) -> None:
        self.seq.close()
