"""Grouped-query attention of one sequence's new tokens over its KV slot, in query chunks so that
no score tensor exceeds SCORE_BYTES whatever the prompt or context length; and of a ragged batch's
rows (AttnRow), which a device takes in one call (Device.attention_rows): the CPU row by row, the GPU
with its decode rows (one causal token each) in one fused SDPA over keys padded to the longest row.

A mask says which cached keys each new query sees: every one of the `start` tokens cached before
the pass, then among the pass's own tokens either its causal prefix (`tree` None) or its ancestors
in a draft tree (`tree` (T, T) bool, the diagonal included).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tiers.units import SCORE_BYTES



@dataclass(frozen=True, slots=True)
class AttnMask:
    start: int  # tokens cached before this pass (the new keys sit at start..start+T-1)
    tree: torch.Tensor | None = None  # (T, T) bool on the compute device: query t sees new key j


@dataclass(frozen=True, slots=True)
class AttnRow:
    """One row of a ragged batch: its queries q[offset:offset+T] attend over its sequence's KV slot."""

    offset: int
    T: int
    keys: torch.Tensor  # (Hkv, n_ctx, hd), the row's new keys already written at mask.start..
    vals: torch.Tensor
    mask: AttnMask

    @property
    def decode(self) -> bool:
        """One causal token: it sees the mask.start + 1 keys up to itself."""
        return self.T == 1 and self.mask.tree is None


def attend_each(q: torch.Tensor, rows: Sequence[AttnRow], attention) -> torch.Tensor:
    """q (N, H, hd) -> (N, H, hd) fp32, row by row: attention(q_rows, keys, vals, mask) per row."""
    if len(rows) == 1:
        r = rows[0]
        return attention(q, r.keys, r.vals, r.mask)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for r in rows:
        out[r.offset:r.offset + r.T] = attention(q[r.offset:r.offset + r.T], r.keys, r.vals, r.mask)
    return out


def sdpa_decode_rows(q: torch.Tensor, rows: Sequence[AttnRow], ends: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode rows (one causal token each, q (R, H, hd)) in one fused SDPA: every row's keys and values
    padded to the longest row's L (R stacked copies), a key past its row's end masked and zeroed with
    its value (a slot's unwritten bytes may hold NaN, which a mask alone does not cancel). ends (R,) int64 on the KV device: keys row r sees
    (mask.start + 1), given by the caller so that no mask is built on the host. -> (R, H, hd) fp32."""
    L = max(r.mask.start for r in rows) + 1
    k = torch.stack([r.keys[:, :L] for r in rows])  # (R, Hkv, L, hd)
    v = torch.stack([r.vals[:, :L] for r in rows])
    seen = torch.arange(L, device=q.device) < ends[:, None]  # (R, L)
    unseen = ~seen[:, None, :, None]  # (R, 1, L, 1)
    k.masked_fill_(unseen, 0)
    v.masked_fill_(unseen, 0)
    qh = q.to(k.dtype).unsqueeze(2)  # (R, H, 1, hd)
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=seen[:, None, None, :], scale=scale,
                                         enable_gqa=True)  # (R, H, 1, hd)
    return out.squeeze(2).float()


def query_chunk(n_heads: int, context: int, score_bytes: int = SCORE_BYTES) -> int:
    """Queries per chunk so that one chunk's (n_heads, rows, context) fp32 scores fit score_bytes."""
    return max(1, score_bytes // (4 * n_heads * max(1, context)))


def chunk_mask(mask: AttnMask, t0: int, t1: int, keys: int, device: torch.device) -> torch.Tensor | None:
    """(t1-t0, keys) bool, True where query t (t0 <= t < t1) may see key j; None when it sees all."""
    s = mask.start
    if mask.tree is None:
        if t1 - t0 == 1:  # the last query of a causal chunk sees every key up to itself
            return None
        return torch.ones(t1 - t0, keys, dtype=torch.bool, device=device).tril_(s + t0)
    m = torch.ones(t1 - t0, keys, dtype=torch.bool, device=device)
    m[:, s:] = mask.tree[t0:t1, :keys - s]
    return m


def attend(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: AttnMask, kernel,
           score_bytes: int = SCORE_BYTES) -> torch.Tensor:
    """q (T, H, hd), keys/vals (Hkv, >= start+T, hd) -> (T, H, hd) fp32.

    kernel(q (c, H, hd), k (Hkv, L, hd), v, allowed (c, L) bool | None) -> (c, H, hd) fp32: one chunk."""
    T, H, hd = q.shape
    s = mask.start
    step = query_chunk(H, s + T, score_bytes)
    if step >= T:
        L = s + T
        return kernel(q, keys[:, :L], vals[:, :L], chunk_mask(mask, 0, T, L, q.device))
    out = torch.empty(T, H, hd, dtype=torch.float32, device=q.device)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        L = s + t1 if mask.tree is None else s + T  # a causal chunk sees no key past its last query
        out[t0:t1] = kernel(q[t0:t1], keys[:, :L], vals[:, :L], chunk_mask(mask, t0, t1, L, q.device))
    return out


def matmul_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    """Scores, softmax and weighted sum in fp32 with explicit matmuls (the CPU's path: one thread of
    torch is fastest on a few heads of one token; keys stored in fp16 are widened per chunk)."""
    c, H, hd = q.shape
    Hkv, L = k.shape[0], k.shape[1]
    g = H // Hkv
    k, v = k.float(), v.float()
    qg = q.view(c, Hkv, g, hd).permute(1, 2, 0, 3).reshape(Hkv, g * c, hd)  # (Hkv, g*c, hd)
    scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(scale)  # (Hkv, g*c, L)
    if allowed is not None:
        scores.view(Hkv, g, c, L).masked_fill_(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v)  # (Hkv, g*c, hd)
    return out.view(Hkv, g, c, hd).permute(2, 0, 1, 3).reshape(c, H, hd)


def sdpa_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                scale: float) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention with GQA, in the KV cache's dtype (the GPU's path)."""
    qh = q.to(k.dtype).transpose(0, 1).unsqueeze(0)  # (1, H, c, hd)
    out = F.scaled_dot_product_attention(qh, k.unsqueeze(0), v.unsqueeze(0), attn_mask=allowed, scale=scale,
                                         enable_gqa=True)  # (1, H, c, hd)
    return out[0].transpose(0, 1).float()
