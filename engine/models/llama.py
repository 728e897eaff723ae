"""The Llama block as llama.cpp runs it from GGUF: RMSNorm, adjacent-pair rope (GGUF stores Q/K
permuted for it), grouped-query attention, SwiGLU, tied embeddings when output.weight is absent.
Other architectures are the same block with the spec's variations as data: Q/K/V biases (qwen2),
per-head q/k RMSNorm (qwen3), NeoX rope (halves rotated, Q/K not permuted), a head size of its own,
and a mixture-of-experts FFN (Mixtral = llama + experts, qwen3moe = qwen3 + experts) in place of the
dense one: the router picks k of E experts per token and the provider hands over just those
(`weights.experts`), which run grouped by expert so each expert's bytes serve all its tokens at once.

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

from ..attention import AttnMask, AttnRow
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
              rot: torch.Tensor, weights) -> torch.Tensor:
        """x (N, dim) on dev -> (N, dim): one transformer block over a ragged batch; rot (N, 1, half)
        the tokens' rope rotations on dev; `weights` the provider (an MoE block's experts come from it)."""
        s = self.spec
        N = x.shape[0]
        fused = getattr(dev, "decode_block", None) if kv_dev is dev else None
        if fused is not None and (y := fused(x, w, s, layer, batch, rot)) is not None:
            return y  # this block for single decode tokens in one native call (equal within rounding)
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
        if s.moe and layer + 1 < s.n_layers and getattr(weights, "wants_hints", False):
            self.hint_next(x, layer + 1, dev, weights)  # before this FFN, so the reads can hide behind it
        h = F.rms_norm(x, (s.dim,), w.ffn_norm, s.rms_eps)
        if w.ffn_gate_inp is not None:
            return x + self.moe(h, w.ffn_gate_inp, layer, dev, weights)
        gate, up = dev.linear_many(h, (w.ffn_gate, w.ffn_up))  # (N, ffn)
        return x + dev.linear(F.silu(gate) * up, w.ffn_down)

    def route(self, h: torch.Tensor, router, dev) -> tuple[torch.Tensor, torch.Tensor]:
        """h (N, dim) -> (experts (N, k) int64, weights (N, k) fp32): softmax over the E router logits, the k
        most probable experts, their probabilities renormalised to sum to 1 (spec.expert_weights_norm)."""
        probs = torch.softmax(dev.linear(h, router).float(), dim=-1)  # (N, E)
        top, ids = torch.topk(probs, self.spec.n_experts_used, dim=-1)  # (N, k)
        if self.spec.expert_weights_norm:
            top = top / top.sum(-1, keepdim=True)
        return ids, top

    def moe(self, h: torch.Tensor, router, layer: int, dev, weights) -> torch.Tensor:
        """The MoE FFN of block `layer` on h (N, dim) -> (N, dim), grouped by expert: the tokens routed to
        expert e are gathered, run through its gate/up (one linear_many) and down (one linear) together,
        scaled by their routing weights and added back in place (index_add_). Experts go in ascending id
        order, so each token's sum is the same whichever batch it is in."""
        N, k = h.shape[0], self.spec.n_experts_used
        ids, top = self.route(h, router, dev)  # (N, k)
        flat = ids.reshape(-1)  # (N*k,) assignment a = token a // k
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        used, counts = torch.unique_consecutive(flat[order], return_counts=True)
        tokens = (order // k).to(h.device)  # (N*k,) the token of each grouped assignment
        scale = top.reshape(-1)[order].unsqueeze(-1)  # (N*k, 1)
        used, counts = used.tolist(), counts.tolist()  # the provider needs the ids on the host
        experts = weights.experts(layer, used, N)  # may bind lazily: take each expert once, in `used` order
        out = torch.zeros_like(h)
        a = 0
        for e, c in zip(used, counts):
            ew, t = experts[e], tokens[a:a + c]
            gate, up = dev.linear_many(h.index_select(0, t), (ew.gate, ew.up))  # (c, Fe)
            out.index_add_(0, t, dev.linear(F.silu(gate) * up, ew.down).mul_(scale[a:a + c]))  # (c, dim)
            a += c
        return out

    def hint_next(self, x: torch.Tensor, layer: int, dev, weights) -> None:
        """Tell the provider which experts block `layer` will likely want: its router (and ffn_norm) applied
        to x, the previous block's post-attention residual (the router and norm must be readable now)."""
        got = weights.router(layer)
        if got is None:
            return
        norm, router = got
        if router.data.device != x.device:
            return
        ids, _ = self.route(F.rms_norm(x, (self.spec.dim,), norm, self.spec.rms_eps), router, dev)
        weights.hint_experts(layer, torch.unique(ids).tolist())

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: Batch, kv_dev) -> torch.Tensor:
        """Write each row's new keys/values into its KV slot, then attend over it on the KV device.
        q (N, H, hd), k/v (N, Hkv, hd) -> (N, H, hd) on q's device."""
        home, kd = q.device, kv_dev.torch_device
        if kd != home:  # the KV cache lives elsewhere (hybrid): attention runs beside it
            q, k, v = q.to(kd), k.to(kd), v.to(kd)
        on = batch.on(kd)
        rows = []
        for r, tree in zip(batch.rows, on.trees):
            keys, vals = r.seq.keys[layer], r.seq.vals[layer]  # (Hkv, n_ctx, hd)
            keys[:, r.start:r.start + r.T] = k[r.offset:r.offset + r.T].transpose(0, 1)
            vals[:, r.start:r.start + r.T] = v[r.offset:r.offset + r.T].transpose(0, 1)
            rows.append(AttnRow(r.offset, r.T, keys, vals, AttnMask(r.start, tree)))
        decode = 1 < len(rows) == batch.n_tokens and all(r.decode for r in rows)  # rows of one causal token
        out = kv_dev.attention_rows(q, rows, on.positions + 1 if decode else None)  # (N, H, hd)
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
        """A ragged batch -> logits (N, vocab) fp32, or (M, vocab) of the tokens batch.last selects (last_only).
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
            x = self.block(x, w, i, batch, dev, kv_dev, rot[d], weights)
            weights.release(i)
        if batch.last_only:
            x = x.index_select(0, batch.on(x.device).last) if batch.last.numel() > 1 else x[-1:]
        return self.head(x, weights)
