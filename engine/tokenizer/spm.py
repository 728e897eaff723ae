"""llama.cpp's tokenizer for SentencePiece-style ("llama") vocabularies."""
from __future__ import annotations

import heapq
from collections.abc import Mapping

SPACE_MARK = "\u2581"  # SentencePiece's visible space "▁"


class SpmModel:
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
