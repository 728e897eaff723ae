"""The Llama block as llama.cpp runs it from GGUF: RMSNorm, adjacent-pair rope (GGUF stores Q/K
permuted for it), grouped-query attention, SwiGLU, tied embeddings when output.weight is absent.
Other architectures are the same block with the spec's variations as data: Q/K/V biases (qwen2),
per-head q/k RMSNorm (qwen3), NeoX rope (halves rotated, Q/K not permuted), a head size of its own.

The model owns no weights: each pass asks the weight provider for layer i and the device that
computes it (`device_for`), and calls that device's format-aware `linear` for every projection.
A pass is a ragged batch (engine.sequence.Batch): the rows' tokens packed along one axis, each row
attending over its own sequence's KV slot, so each row's result is what a pass of that row alone
gives. Activations, the rope table, norms, the KV cache and the logits stay on the compute device;
they move only where consecutive units compute on different devices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import AttnMask
from ..sequence import Batch
from ..spec import ModelSpec
from ..weights import GlobalWeights, LayerWeights


class RopeTable:
    """Rope rotations as unit complex numbers, (n_ctx, rope_dim/2), computed in float64, with a copy on
    each device that asks for it. Pair i is (x[2i], x[2i+1]) in the "norm" style, (x[i], x[i + rope_dim/2])
    in the "neox" style."""

    def __init__(self, spec: ModelSpec, n_ctx: int, freq_factors: torch.Tensor | None):
        half = spec.rope_dim // 2
        inv = spec.rope_base ** (-torch.arange(half, dtype=torch.float64) * 2.0 / spec.rope_dim)
        if freq_factors is not None:
            inv = inv / freq_factors.to("cpu", torch.float64)
        pos = torch.arange(n_ctx, dtype=torch.float64) / spec.rope_scale
        ang = torch.outer(pos, inv)  # (n_ctx, half)
        self.rot = {torch.device("cpu"): torch.polar(torch.ones_like(ang), ang).to(torch.complex64)}  # cos + i sin
        self.rope_dim = spec.rope_dim
        self.neox = spec.rope_style == "neox"

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """The rotations of positions (N,) on their device -> (N, 1, half)."""
        table = self.rot.get(positions.device)
        if table is None:
            table = self.rot[positions.device] = self.rot[torch.device("cpu")].to(positions.device)
        return table[positions, None, :]

    def apply(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """Rotate x (N, H, D) in place: the pairs of the first rope_dim dims by rot (N, 1, half)."""
        if self.neox:
            a, b = x[..., :self.rope_dim].unflatten(-1, (2, -1)).unbind(-2)  # (N, H, half) views
            z = torch.complex(a, b).mul_(rot)
            a.copy_(z.real)
            b.copy_(z.imag)
        else:
            torch.view_as_complex(x[..., :self.rope_dim].unflatten(-1, (-1, 2))).mul_(rot)  # (N, H, half)
        return x


class Llama:
    def __init__(self, spec: ModelSpec, glob: GlobalWeights, n_ctx: int):
        self.spec, self.glob = spec, glob
        self.n_ctx = n_ctx
        self.rope = RopeTable(spec, n_ctx, glob.rope_freqs)
        self._out_norm: dict[torch.device, torch.Tensor] = {}

    def embed(self, ids: torch.Tensor, device) -> torch.Tensor:
        """ids (N,) -> (N, dim) fp32 rows of the embedding on the device of the first unit."""
        return self.glob.token_embd.rows(ids).to(device.torch_device)  # (N, dim)

    def block(self, x: torch.Tensor, w: LayerWeights, layer: int, batch: Batch, dev, kv_dev,
              rot: torch.Tensor) -> torch.Tensor:
        """x (N, dim) on dev -> (N, dim): one transformer block over a ragged batch; rot (N, 1, half)
        the tokens' rope rotations on dev."""
        s = self.spec
        N = x.shape[0]
        h = F.rms_norm(x, (s.dim,), w.attn_norm, s.rms_eps)
        q, k, v = dev.linear_many(h, (w.attn_q, w.attn_k, w.attn_v))  # (N, q_dim), (N, kv_dim), (N, kv_dim)
        if s.attn_bias:
            q, k, v = q + w.attn_q_bias, k + w.attn_k_bias, v + w.attn_v_bias
        q = q.view(N, s.n_heads, s.head_dim)  # (N, H, hd)
        k = k.view(N, s.n_kv_heads, s.head_dim)  # (N, Hkv, hd)
        v = v.view(N, s.n_kv_heads, s.head_dim)
        if s.qk_norm:
            q = F.rms_norm(q, (s.head_dim,), w.attn_q_norm, s.rms_eps)
            k = F.rms_norm(k, (s.head_dim,), w.attn_k_norm, s.rms_eps)
        self.rope.apply(q, rot)
        self.rope.apply(k, rot)
        att = self.attend(q, k, v, layer, batch, kv_dev)  # (N, H, hd)
        x = x + dev.linear(att.reshape(N, s.q_dim), w.attn_output)
        h = F.rms_norm(x, (s.dim,), w.ffn_norm, s.rms_eps)
        gate, up = dev.linear_many(h, (w.ffn_gate, w.ffn_up))  # (N, ffn)
        return x + dev.linear(F.silu(gate) * up, w.ffn_down)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: Batch, kv_dev) -> torch.Tensor:
        """Write each row's new keys/values into its KV slot, then attend over it on the KV device.
        q (N, H, hd), k/v (N, Hkv, hd) -> (N, H, hd) on q's device."""
        home, kd = q.device, kv_dev.torch_device
        if kd != home:  # the KV cache lives elsewhere (hybrid): attention runs beside it
            q, k, v = q.to(kd), k.to(kd), v.to(kd)
        trees = batch.on(kd).trees
        out = None if len(batch.rows) == 1 else torch.empty(q.shape, dtype=torch.float32, device=kd)
        for r, tree in zip(batch.rows, trees):
            rows = slice(r.offset, r.offset + r.T)
            keys, vals = r.seq.keys[layer], r.seq.vals[layer]  # (Hkv, n_ctx, hd)
            keys[:, r.start:r.start + r.T] = k[rows].transpose(0, 1)
            vals[:, r.start:r.start + r.T] = v[rows].transpose(0, 1)
            att = kv_dev.attention(q[rows], keys, vals, AttnMask(r.start, tree))  # (T, H, hd)
            if out is None:
                out = att
            else:
                out[rows] = att
        return out if kd == home else out.to(home)

    def head(self, x: torch.Tensor, weights) -> torch.Tensor:
        """Final norm and output head; the head comes as units L.. holding row ranges of the vocab."""
        L, rows, R = self.spec.n_layers, weights.head_rows, x.shape[0]
        dev = weights.device_for(L, R)
        x = x.to(dev.torch_device)
        norm = self._out_norm.get(x.device)
        if norm is None:
            norm = self._out_norm[x.device] = self.glob.output_norm.to(x.device)
        h = F.rms_norm(x, (self.spec.dim,), norm, self.spec.rms_eps)
        if len(rows) == 1:
            logits = dev.linear(h, weights.layer(L, R))  # (R, vocab)
            weights.release(L)
            return logits
        logits = torch.empty(h.shape[0], self.spec.vocab_size, dtype=torch.float32, device=x.device)
        for c, (r0, r1) in enumerate(rows):
            logits[:, r0:r1] = dev.linear(h, weights.layer(L + c, R))
            weights.release(L + c)
        return logits

    def forward(self, batch: Batch, weights) -> torch.Tensor:
        """A ragged batch -> logits (N, vocab) fp32, or (R, vocab) of the rows' last tokens (last_only).
        Everything a block needs on its devices (activations, positions, rope rotations, tree masks) is
        moved there before the block's weights are taken: inside a block nothing crosses devices."""
        N = batch.n_tokens
        x = self.embed(batch.ids, weights.device_for(0, N))  # (N, dim)
        rot: dict[torch.device, torch.Tensor] = {}
        for i in range(self.spec.n_layers):
            dev, kv_dev = weights.device_for(i, N), weights.kv_device(i)
            d = dev.torch_device
            if d not in rot:
                rot[d] = self.rope.at(batch.on(d).positions)  # (N, 1, half)
            batch.on(kv_dev.torch_device)
            x = x.to(d)
            w = weights.layer(i, N)  # bound where device_for(i, N) computes it
            x = self.block(x, w, i, batch, dev, kv_dev, rot[d])
            weights.release(i)
        if batch.last_only:
            x = x.index_select(0, batch.on(x.device).last) if len(batch.rows) > 1 else x[-1:]
        return self.head(x, weights)
