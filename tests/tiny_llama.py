"""Tiny random-weight GGUFs (llama, qwen2, qwen3; Mixtral = llama with experts, qwen3moe) written by
engine.synthetic's writer with their own random streams, and an independent float64 reference forward
(numpy, no engine code) on the weights as gguf-py dequantizes them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, dequantize, quantize

from engine.synthetic import Layout, TensorSpec, random_quantized, write_gguf
from vocab_models import bpe_vocab, spm_vocab

# Blocks of the formats gguf-py cannot quantize are random bytes with their fp16 scale (and min) drawn
# uniformly around this value, so the weights stay in a sane range.
_KQUANT_SCALES = {QT.Q4_K: 3e-4, QT.Q5_K: 1.5e-4, QT.Q6_K: 3e-5, QT.Q2_K: 4e-3, QT.Q3_K: 2.5e-3,
                  QT.IQ4_NL: 1.3e-3, QT.IQ4_XS: 8e-5}


# how each architecture runs in llama.cpp, written down here independently of engine.spec
ROPE_NEOX = {"llama": False, "qwen2": True, "qwen3": True, "qwen3moe": True}


@dataclass(frozen=True)
class TinyConfig:
    arch: str = "llama"  # qwen2 adds attn_q/k/v biases, qwen3 per-head q/k norms, qwen3moe norms + experts
    head_dim: int | None = None  # written as attention.key_length/value_length when given
    sliding_window: int | None = None  # declared (Mistral-style); llama.cpp ignores it for llama
    n_layers: int = 2
    dim: int = 256
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn: int = 512
    rope_base: float = 10000.0
    eps: float = 1e-5
    ctx: int = 128
    rope_freqs: bool = False
    tied: bool = True
    fmt: tuple[QT, ...] = (QT.Q8_0,)  # cycled over the block matrices
    embd_fmt: QT = QT.Q8_0
    seed: int = 0
    vocab: str = "bpe"  # "bpe" (byte-level BPE) or "spm" (SentencePiece-style), from vocab_models
    chat_template: str | None = None
    fmt_of: tuple[tuple[str, QT], ...] = ()  # (tensor name without ".weight", format) overrides
    n_experts: int = 0  # > 0: an MoE FFN (llama: Mixtral-style; qwen3moe needs it)
    n_experts_used: int = 2
    expert_ffn: int | None = None  # qwen3moe's expert_feed_forward_length (llama experts use ffn)
    router_scale: float = 0.08  # std of the F32 router weights (bigger: more decisive routing)

    def layout(self, vocab: int) -> Layout:
        return Layout(arch=self.arch, n_layers=self.n_layers, dim=self.dim, n_heads=self.n_heads,
                      n_kv_heads=self.n_kv_heads, ffn=self.ffn, vocab=vocab, ctx=self.ctx, rope_base=self.rope_base,
                      eps=self.eps, head_dim=self.head_dim, sliding_window=self.sliding_window,
                      rope_freqs=self.rope_freqs, tied=self.tied, n_experts=self.n_experts,
                      n_experts_used=self.n_experts_used if self.n_experts else 0, expert_ffn=self.expert_ffn,
                      embd_fmt=self.embd_fmt, block_fmts=self.fmt, output_fmt=self.embd_fmt, fmt_of=self.fmt_of)


def _quantized(rng: np.random.Generator, shape: tuple[int, int], qt: QT) -> np.ndarray:
    if qt in _KQUANT_SCALES:
        scale = _KQUANT_SCALES[qt]
        return random_quantized(rng, shape, qt, lambda n, fields: [rng.uniform(0.5, 1.5, size=n) * scale
                                                                   for _ in range(fields)])
    w = rng.standard_normal(shape).astype(np.float32) * 0.08
    return quantize(w, qt)


def write_tiny_llama(path: str | Path, cfg: TinyConfig = TinyConfig()) -> Path:
    """One generator seeded by cfg.seed draws every tensor in file order (llama.cpp fixtures record these
    files' sha256: keep the draws as they are)."""
    rng = np.random.default_rng(cfg.seed)
    voc = {"bpe": bpe_vocab, "spm": spm_vocab}[cfg.vocab]()

    def data(_: int, t: TensorSpec) -> np.ndarray:
        if t.kind == "matrix":
            return _quantized(rng, t.rows, t.fmt)
        if t.kind == "router":
            return (rng.standard_normal(t.shape) * cfg.router_scale).astype(np.float32)
        if t.kind == "rope_freqs":
            return rng.uniform(1.0, 8.0, t.shape[0]).astype(np.float32)
        around = 1.0 if t.kind == "norm" else 0.0  # norms around 1, biases around 0
        return (around + 0.1 * rng.standard_normal(t.shape[0])).astype(np.float32)

    return write_gguf(path, cfg.layout(len(voc["tokens"])), voc, data, chat_template=cfg.chat_template)


def reference_moe(h: np.ndarray, router: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, k: int,
                  renormalise: bool = True, margins: np.ndarray | None = None) -> np.ndarray:
    """Mixtral / Qwen3-MoE FFN, token by token: softmax of the router logits, the k largest probabilities
    (renormalised to sum to 1), the weighted sum of those experts' SwiGLU outputs. h (T, dim); router (E, dim);
    gate/up (E, Fe, dim); down (E, dim, Fe). `margins` (T,): lowered to each token's gap between its k-th and
    (k+1)-th router logits (a routing near-tie, where other rounding may pick another expert)."""
    out = np.zeros_like(h)
    for t in range(h.shape[0]):
        z = router @ h[t]
        if margins is not None and k < len(z):
            zs = np.sort(z)[::-1]
            margins[t] = min(margins[t], zs[k - 1] - zs[k])
        p = np.exp(z - z.max())
        p /= p.sum()
        chosen = np.argsort(-p, kind="stable")[:k]
        wts = p[chosen] / p[chosen].sum() if renormalise else p[chosen]
        for e, wt in zip(chosen, wts):
            g, u = gate[e] @ h[t], up[e] @ h[t]
            out[t] += wt * (down[e] @ (g / (1 + np.exp(-g)) * u))
    return out


def reference_logits(path: str | Path, tokens: list[int], renormalise: bool = True,
                     margins: np.ndarray | None = None) -> np.ndarray:
    """Float64 forward of a llama/qwen2/qwen3 (with or without experts: Mixtral, qwen3moe) GGUF from
    gguf-py's dequantized weights -> (T, vocab). `renormalise` False: routing weights left unnormalised
    (a wrong variant, for tests showing that the comparison can fail). `margins` (T,) float, filled with
    +inf by the caller: lowered to each token's smallest router top-k margin over the MoE blocks."""
    r = GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items()}
    W = {}
    for t in r.tensors:  # gguf-py gives stacked expert tensors (E, N, K) flattened to rows: restore their shape
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        W[t.name] = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)
    arch = meta["general.architecture"]
    m = lambda key: meta[f"{arch}.{key}"]
    dim, nh = m("embedding_length"), m("attention.head_count")
    nkv, eps = m("attention.head_count_kv"), m("attention.layer_norm_rms_epsilon")
    base, L = m("rope.freq_base"), m("block_count")
    hd = meta.get(f"{arch}.attention.key_length", dim // nh)
    T = len(tokens)

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    inv = base ** (-np.arange(hd // 2) * 2.0 / hd)
    if "rope_freqs.weight" in W:
        inv = inv / W["rope_freqs.weight"]
    ang = np.arange(T)[:, None] * inv[None, :]  # (T, hd/2)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    # (T, H, hd): rotate adjacent pairs (2i, 2i+1), or halves (i, i + hd/2) in NeoX style
    first, second = (slice(0, hd // 2), slice(hd // 2, hd)) if ROPE_NEOX[arch] else (slice(0, hd, 2), slice(1, hd, 2))

    def rope(x):
        a, b = x[..., first], x[..., second]
        out = np.empty_like(x)
        out[..., first] = a * cos - b * sin
        out[..., second] = a * sin + b * cos
        return out

    def proj(h, p, role, heads):  # (T, heads, hd): matmul, optional bias, optional per-head norm
        y = h @ W[p + role + ".weight"].T
        y = (y + W[p + role + ".bias"] if p + role + ".bias" in W else y).reshape(T, heads, hd)
        return norm(y, W[p + role + "_norm.weight"]) if p + role + "_norm.weight" in W else y

    x = W["token_embd.weight"][tokens]  # (T, dim)
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(L):
        p = f"blk.{i}."
        h = norm(x, W[p + "attn_norm.weight"])
        q, k, v = rope(proj(h, p, "attn_q", nh)), rope(proj(h, p, "attn_k", nkv)), proj(h, p, "attn_v", nkv)
        rep = nh // nkv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # head j uses kv head j // rep
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + causal
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        att = np.einsum("hts,shd->thd", s, v).reshape(T, nh * hd)
        x = x + att @ W[p + "attn_output.weight"].T
        h = norm(x, W[p + "ffn_norm.weight"])
        if p + "ffn_gate_inp.weight" in W:
            x = x + reference_moe(h, W[p + "ffn_gate_inp.weight"], W[p + "ffn_gate_exps.weight"],
                                  W[p + "ffn_up_exps.weight"], W[p + "ffn_down_exps.weight"],
                                  meta[f"{arch}.expert_used_count"], renormalise, margins)
            continue
        g, u = h @ W[p + "ffn_gate.weight"].T, h @ W[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "ffn_down.weight"].T
    out = W.get("output.weight", W["token_embd.weight"])
    return norm(x, W["output_norm.weight"]) @ out.T


# -- the same weights as a Hugging Face safetensors checkpoint ----------------------------------------------
# GGUF name -> HF name, written down here independently of engine.hf
_HF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_HF_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_name(gguf_name: str) -> str:
    if gguf_name in _HF_GLOBAL:
        return _HF_GLOBAL[gguf_name]
    _, i, role, kind = gguf_name.split(".")
    return f"model.layers.{i}.{_HF_BLOCK[role]}.{kind}"


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation for llama (GGUF adjacent pairs -> HF rotate-half)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tokenizer_json(pre: str = "llama-bpe") -> str:
    """tokenizer.json for the tiny BPE vocab (the byte-level regexes of llama 3 / qwen2)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    voc = bpe_vocab(pre)
    n_plain = len(voc["tokens"]) - sum(1 for t in voc["types"] if t != 1)
    vocab = {t: i for i, t in enumerate(voc["tokens"][:n_plain])}
    merges = [tuple(m.split(" ", 1)) for m in voc["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre == "llama-bpe"))
    digits = r"\p{N}" if pre == "qwen2" else r"\p{N}{1,3}"
    regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|" + digits +
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(voc["tokens"][n_plain:], voc["types"][n_plain:])])
    return tok.to_str()


def write_hf_checkpoint(gguf_path: str | Path, directory: str | Path, dtype: str = "F32", n_shards: int = 2,
                        bos: bool = True) -> Path:
    """The GGUF's weights (as gguf-py dequantizes them) as an HF checkpoint, matrices in `dtype` (F32/F16/BF16),
    split over `n_shards` shards with an index, plus config.json and the tokenizer files."""
    import json

    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    r = GGUFReader(str(gguf_path))
    meta = {k: f.contents() for k, f in r.fields.items()}
    arch = meta["general.architecture"]
    m = lambda key, default=None: meta.get(f"{arch}.{key}", default)
    nh, nkv = m("attention.head_count"), m("attention.head_count_kv")
    tensors = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = _unpermute(w, nh if "attn_q" in t.name else nkv)
        kind = dtype if w.ndim == 2 else "F32"  # norms and biases in float32, as some checkpoints keep them
        tensors[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w)).to(getattr(torch, {
            "F32": "float32", "F16": "float16", "BF16": "bfloat16"}[kind]))
    names = sorted(tensors)
    weight_map = {}
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::n_shards]}
        save_file(part, str(directory / shard))
        weight_map |= {n: shard for n in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": arch, "hidden_size": m("embedding_length"), "num_hidden_layers": m("block_count"),
              "num_attention_heads": nh, "num_key_value_heads": nkv, "intermediate_size": m("feed_forward_length"),
              "vocab_size": int(tensors["model.embed_tokens.weight"].shape[0]),
              "max_position_embeddings": m("context_length"), "rms_norm_eps": m("attention.layer_norm_rms_epsilon"),
              "rope_theta": m("rope.freq_base"), "tie_word_embeddings": "output.weight" not in
              {t.name for t in r.tensors}, "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]}
    if m("attention.key_length"):
        config["head_dim"] = m("attention.key_length")
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    voc = bpe_vocab()  # the GGUF's own vocab (write_tiny_llama)
    (directory / "tokenizer.json").write_text(hf_tokenizer_json("qwen2" if arch.startswith("qwen") else "llama-bpe"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": voc["tokens"][voc["bos"]] if bos else None, "eos_token": voc["tokens"][voc["eos"]],
        "chat_template": "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>{{ m.content }}"
                         "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
                         "<|end_header_id|>{% endif %}"}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [voc["eos"], voc["eos"] + 3]}))
    return directory


# one tiny file per architecture, recorded through llama.cpp by scripts/make_llamacpp_fixtures.py (archs)
LLAMACPP_ARCH_MODELS = {
    "llama": TinyConfig(fmt=(QT.Q8_0,), n_layers=2, seed=31),
    "qwen2": TinyConfig(arch="qwen2", fmt=(QT.Q8_0,), tied=False, rope_base=1e6, seed=32),
    "qwen3": TinyConfig(arch="qwen3", head_dim=48, fmt=(QT.Q8_0,), rope_base=1e6, seed=33),
    # MoE seeds chosen so no routing near-tie falls in the prompt (tests/test_archs_llamacpp.py checks it)
    "mixtral": TinyConfig(n_experts=4, n_experts_used=2, ffn=256, fmt=(QT.Q8_0,), router_scale=0.25, seed=35),
    "qwen3moe": TinyConfig(arch="qwen3moe", n_heads=8, head_dim=64, n_experts=8, n_experts_used=2, expert_ffn=256,
                           fmt=(QT.Q8_0,), rope_base=1e6, router_scale=0.25, seed=49),
}
