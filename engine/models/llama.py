"""The Llama block as llama.cpp runs it from GGUF: RMSNorm, adjacent-pair rope (GGUF stores Q/K
permuted for it), grouped-query attention, SwiGLU, tied embeddings when output.weight is absent.
Other architectures are the same block with the spec's variations as data: Q/K/V biases (qwen2),
per-head q/k RMSNorm (qwen3), NeoX rope (halves rotated, Q/K not permuted), a head size of its own.

The model owns no weights: each step asks the weight provider for layer i and calls the device's
format-aware `linear` for every projection.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..spec import ModelSpec
from ..weights import GlobalWeights, LayerWeights


class RopeTable:
    """Rope rotations as unit complex numbers, (n_ctx, rope_dim/2), computed in float64. Pair i is
    (x[2i], x[2i+1]) in the "norm" style, (x[i], x[i + rope_dim/2]) in the "neox" style."""

    def __init__(self, spec: ModelSpec, n_ctx: int, freq_factors: torch.Tensor | None):
        half = spec.rope_dim // 2
        inv = spec.rope_base ** (-torch.arange(half, dtype=torch.float64) * 2.0 / spec.rope_dim)
        if freq_factors is not None:
            inv = inv / freq_factors.to(torch.float64)
        pos = torch.arange(n_ctx, dtype=torch.float64) / spec.rope_scale
        ang = torch.outer(pos, inv)  # (n_ctx, half)
        self.rot = torch.polar(torch.ones_like(ang), ang).to(torch.complex64)  # cos + i sin
        self.rope_dim = spec.rope_dim
        self.neox = spec.rope_style == "neox"

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x (B, T, H, D) in place: the pairs of the first rope_dim dims, positions start.."""
        T = x.shape[1]
        rot = self.rot[start:start + T, None, :]  # (T, 1, half)
        if self.neox:
            a, b = x[..., :self.rope_dim].unflatten(-1, (2, -1)).unbind(-2)  # (B, T, H, half) views
            z = torch.complex(a, b).mul_(rot)
            a.copy_(z.real)
            b.copy_(z.imag)
        else:
            torch.view_as_complex(x[..., :self.rope_dim].unflatten(-1, (-1, 2))).mul_(rot)  # (B, T, H, half)
        return x


class KVCache:
    """Preallocated keys/values for every layer: (n_layers, B, n_kv_heads, n_ctx, head_dim) fp32.

    torch.empty reserves address space only; pages are touched as positions are written.
    """

    def __init__(self, spec: ModelSpec, batch: int, n_ctx: int):
        shape = (spec.n_layers, batch, spec.n_kv_heads, n_ctx, spec.head_dim)
        self.k = torch.empty(shape, dtype=torch.float32)
        self.v = torch.empty(shape, dtype=torch.float32)
        self.batch, self.n_ctx = batch, n_ctx

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class Llama:
    def __init__(self, spec: ModelSpec, glob: GlobalWeights, device, n_ctx: int):
        self.spec, self.glob, self.device = spec, glob, device
        self.n_ctx = n_ctx
        self.rope = RopeTable(spec, n_ctx, glob.rope_freqs)
        self.scale = 1.0 / math.sqrt(spec.head_dim)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        return self.glob.token_embd.rows(tokens).to(tokens.device).view(B, T, self.spec.dim)  # (B, T, dim)

    def block(self, x: torch.Tensor, w: LayerWeights, layer: int, cache: KVCache, start: int) -> torch.Tensor:
        s, lin = self.spec, self.device.linear
        B, T, _ = x.shape
        h = F.rms_norm(x, (s.dim,), w.attn_norm, s.rms_eps)
        q, k, v = lin(h, w.attn_q), lin(h, w.attn_k), lin(h, w.attn_v)  # (B, T, q_dim / kv_dim)
        if s.attn_bias:
            q, k, v = q + w.attn_q_bias, k + w.attn_k_bias, v + w.attn_v_bias
        q = q.view(B, T, s.n_heads, s.head_dim)  # (B, T, H, hd)
        k = k.view(B, T, s.n_kv_heads, s.head_dim)  # (B, T, Hkv, hd)
        v = v.view(B, T, s.n_kv_heads, s.head_dim)
        if s.qk_norm:
            q = F.rms_norm(q, (s.head_dim,), w.attn_q_norm, s.rms_eps)
            k = F.rms_norm(k, (s.head_dim,), w.attn_k_norm, s.rms_eps)
        self.rope.apply(q, start)
        self.rope.apply(k, start)
        end = start + T
        cache.k[layer, :, :, start:end] = k.transpose(1, 2)
        cache.v[layer, :, :, start:end] = v.transpose(1, 2)
        att = self.attend(q, cache.k[layer, :, :, :end], cache.v[layer, :, :, :end], start)  # (B, T, H, hd)
        x = x + lin(att.reshape(B, T, s.q_dim), w.attn_output)
        h = F.rms_norm(x, (s.dim,), w.ffn_norm, s.rms_eps)
        a = F.silu(lin(h, w.ffn_gate)) * lin(h, w.ffn_up)  # (B, T, ffn)
        return x + lin(a, w.ffn_down)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, start: int) -> torch.Tensor:
        """Causal GQA: q (B, T, H, hd), keys/vals (B, Hkv, L, hd) with L = start + T -> (B, T, H, hd)."""
        B, T, H, hd = q.shape
        Hkv, L = keys.shape[1], keys.shape[2]
        g = H // Hkv
        qg = q.view(B, T, Hkv, g, hd).permute(0, 2, 3, 1, 4).reshape(B, Hkv, g * T, hd)  # (B, Hkv, g*T, hd)
        scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(self.scale)  # (B, Hkv, g*T, L)
        if T > 1:  # query t (row g*T + t) sees keys 0..start+t
            future = torch.ones(T, L, dtype=torch.bool).triu_(start + 1)
            scores.view(B, Hkv, g, T, L).masked_fill_(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, vals)  # (B, Hkv, g*T, hd)
        return out.view(B, Hkv, g, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, H, hd)

    def head(self, x: torch.Tensor, weights) -> torch.Tensor:
        """Final norm and output head; the head comes as units L.. holding row ranges of the vocab."""
        L, rows = self.spec.n_layers, weights.head_rows
        h = F.rms_norm(x, (self.spec.dim,), self.glob.output_norm, self.spec.rms_eps)
        if len(rows) == 1:
            logits = self.device.linear(h, weights.layer(L))  # (B, T, vocab)
            weights.release(L)
            return logits
        logits = torch.empty(*h.shape[:-1], self.spec.vocab_size, dtype=torch.float32)
        for c, (r0, r1) in enumerate(rows):
            logits[..., r0:r1] = self.device.linear(h, weights.layer(L + c))
            weights.release(L + c)
        return logits

    def forward(self, tokens: torch.Tensor, start: int, cache: KVCache, weights, last_only: bool) -> torch.Tensor:
        """tokens (B, T) int64 at positions start..start+T-1 -> logits (B, T or 1, vocab) fp32."""
        L = self.spec.n_layers
        x = self.embed(tokens)
        for i in range(L):
            x = self.block(x, weights.layer(i), i, cache, start)
            weights.release(i)
        if last_only:
            x = x[:, -1:]
        return self.head(x, weights)
