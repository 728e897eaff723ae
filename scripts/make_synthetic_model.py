"""Write a random-weight llama GGUF with realistic layer sizes, for tier benchmarks and memory tests.

    python scripts/make_synthetic_model.py OUT.gguf [--layers 16] [--seed 0] [--vocab 128256] ...
    python scripts/make_synthetic_model.py OUT.gguf --qwen3-moe [--layers 8] [--zipf 0.8] ...

Defaults are Llama-3-8B-shaped: dim 4096, FFN 14336, 32 query / 8 KV heads of 128, vocab 128256,
block matrices Q4_K, embedding Q4_K, untied output head Q6_K (the Q4_K_S mix). Each block is
~117 MiB; 16 blocks (the default) make a ~2.6 GiB file. The full 128256-token vocabulary is kept
because the output head (~411 MiB in Q6_K) is the largest single streamed unit of a real model.

Weights are random K-quant blocks: random bytes with the fp16 super-block scales (d, and dmin for
Q4_K) overwritten by finite values chosen so a row dotted with a unit-RMS input has roughly unit
variance (weights with std ~ 1/sqrt(K)), so activations stay finite through any number of layers.
--qwen3-moe writes a Qwen3-30B-A3B-shaped mixture of experts instead (arch qwen3moe: dim 2048, 32
query / 4 KV heads of 128 with per-head q/k norms, 128 experts of FFN 768, top-8; stacked expert tensors
in the block format, the router F32). Its router is synthetic: row e is a random direction scaled by
sigma_e, and the sigmas are fitted (on isotropic Gaussian inputs) so that top-k routing selects expert
e with a Zipf-like frequency proportional to 1 / rank^zipf, capped at 0.45 (zero-mean logits win at
most about half the time), rank a random permutation per layer -- a larger logit spread means more
top-k wins; the benchmark measures the frequencies it gets.
The tokenizer is a byte-level BPE ("gpt2", pre-tokenizer llama-bpe): 256 byte tokens, two- and
three-character tokens over [a-zA-Z0-9] (with the 'Ġ' space marker as a first character) each with
its merge, then 256 special tokens (begin/end of text, eot, reserved) -- vocab_size equals the
embedding rows. The file is written by engine.synthetic (the writer of the tests' tiny models too):
tensors streamed to disk one at a time (memory is bounded by the largest tensor, the output head), to a
temporary name renamed when complete. The output is a pure function of the arguments (each tensor has
its own generator seeded by (seed, tensor index)).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import TokenType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.synthetic import Layout, TensorSpec, random_quantized, write_gguf  # noqa: E402

N_SPECIAL = 256  # like Llama 3's reserved block: begin/end of text, eot, then reserved tokens
NAMED_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
_SPACE = "\u0120"  # byte-level BPE's character for the space byte
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

# per format, the std of the integer product each block decodes to (scale code x quant, random bytes),
# which sets d so that the weights have std ~ 1/sqrt(K), and the min as a multiple of d that cancels the mean.
#   Q4_K: w = d*sc*q - dmin*m, sc, m in 0..63, q in 0..15: std(sc*q) ~ 218; dmin = 7.5 d.
#   Q6_K: w = d*sc*(q - 32), sc int8, q in 0..63: std(sc*(q-32)) ~ 74 * 18.5 ~ 1370.
#   Q8_0: w = d*q, q int8: std 74.   Q4_1: w = d*q + m, q in 0..15: std 4.6; m = -7.5 d.
_SCALES = {"Q4_K": (218.0, 7.5), "Q6_K": (1370.0, 0.0), "Q8_0": (74.0, 0.0), "Q4_1": (4.6, -7.5)}
FORMATS = {name: QT[name] for name in _SCALES}


@dataclass(frozen=True, slots=True)
class SyntheticConfig:
    n_layers: int = 16
    dim: int = 4096
    ffn: int = 14336
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab: int = 128256
    ctx: int = 8192
    rope_base: float = 500000.0
    eps: float = 1e-5
    block_fmt: str = "Q4_K"
    embd_fmt: str = "Q4_K"
    output_fmt: str = "Q6_K"
    seed: int = 0
    arch: str = "llama"  # "qwen3moe": per-head q/k norms and routed experts
    head_dim_: int = 0  # 0: dim / n_heads (written as attention.key_length when it differs)
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn: int = 0
    zipf: float = 0.8  # the router's target popularity exponent (MoE)

    @classmethod
    def qwen3_moe(cls, **kw) -> "SyntheticConfig":
        """Qwen3-30B-A3B's shapes (48 layers in the real model; pass n_layers) in Q4_K."""
        base = dict(n_layers=8, dim=2048, ffn=6144, n_heads=32, n_kv_heads=4, vocab=32768, ctx=4096,
                    rope_base=1e6, eps=1e-6, arch="qwen3moe", head_dim_=128, n_experts=128, n_experts_used=8,
                    expert_ffn=768)
        return cls(**(base | kw))

    def __post_init__(self):
        for name in ("block_fmt", "embd_fmt", "output_fmt"):
            if getattr(self, name) not in FORMATS:
                raise ValueError(f"{name} must be one of {', '.join(FORMATS)}, got {getattr(self, name)!r}")
        if self.arch not in ("llama", "qwen3moe"):
            raise ValueError(f"arch must be llama or qwen3moe, got {self.arch!r}")
        if self.arch == "qwen3moe" and self.expert_ffn < 1:
            raise ValueError(f"qwen3moe needs expert_ffn > 0, got {self.expert_ffn}")
        self.layout()  # positive sizes, heads, experts, rows in whole blocks
        if self.vocab < 256 + N_SPECIAL + len(_ALNUM):
            raise ValueError(f"vocab must be at least {256 + N_SPECIAL + len(_ALNUM)}, got {self.vocab}")

    def layout(self) -> Layout:
        return Layout(arch=self.arch, n_layers=self.n_layers, dim=self.dim, n_heads=self.n_heads,
                      n_kv_heads=self.n_kv_heads, ffn=self.ffn, vocab=self.vocab, ctx=self.ctx,
                      rope_base=self.rope_base, eps=self.eps, head_dim=self.head_dim_ or None, tied=False,
                      n_experts=self.n_experts, n_experts_used=self.n_experts_used,
                      expert_ffn=self.expert_ffn or None, embd_fmt=FORMATS[self.embd_fmt],
                      block_fmts=(FORMATS[self.block_fmt],), output_fmt=FORMATS[self.output_fmt])

    def file_bytes(self) -> int:
        """Tensor data bytes (the header and alignment padding come on top)."""
        return self.layout().file_bytes()


def random_kquant(rng: np.random.Generator, shape: tuple[int, int], fmt: str) -> np.ndarray:
    """Random quantized bytes for an (N, K) matrix -> uint8 (N, K / block * type_size), finite scales."""
    spread, m_over_d = _SCALES[fmt]

    def scales(n_blocks: int, fields: int) -> list[np.ndarray]:
        d = rng.uniform(0.5, 1.5, size=n_blocks) / (spread * np.sqrt(shape[1]))
        return [d, d * m_over_d][:fields]

    return random_quantized(rng, shape, FORMATS[fmt], scales)


def _byte_chars() -> list[str]:
    """The byte-level BPE alphabet: byte b -> a printable character (GPT-2's reversible mapping)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def synthetic_vocab(size: int) -> dict:
    """tokens, types, merges and BOS/EOS ids of a byte-level BPE vocabulary of exactly `size` tokens."""
    tokens = _byte_chars()
    merges: list[str] = []
    n_normal = size - N_SPECIAL
    firsts = _SPACE + _ALNUM
    pairs = [a + b for a in firsts for b in _ALNUM]
    for p in pairs:
        if len(tokens) == n_normal:
            break
        tokens.append(p)
        merges.append(f"{p[0]} {p[1]}")
    for p in pairs:
        for c in _ALNUM:
            if len(tokens) == n_normal:
                break
            tokens.append(p + c)
            merges.append(f"{p} {c}")
    if len(tokens) < n_normal:
        raise ValueError(f"vocab {size} is larger than this generator's {len(tokens) + N_SPECIAL} tokens")
    types = [int(TokenType.NORMAL)] * len(tokens)
    specials = [*NAMED_SPECIALS, *(f"<|reserved_special_token_{i}|>" for i in range(N_SPECIAL - len(NAMED_SPECIALS)))]
    first = len(tokens)
    tokens += specials
    types += [int(TokenType.CONTROL)] * len(specials)
    return {"model": "gpt2", "pre": "llama-bpe", "tokens": tokens, "types": types, "merges": merges,
            "bos": first, "eos": first + 1, "eot": first + 2}


ROUTER_CAP = 0.45  # a zero-mean logit is among the top k at most about half the time


@functools.lru_cache(maxsize=8)
def zipf_router_scales(n_experts: int, k: int, zipf: float, seed: int, samples: int = 4096,
                       steps: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert logit scales sigma (E,) such that top-k of sigma * g (g ~ N(0, I)) selects expert e with
    frequency ~ target[e]: k * r_e^-zipf / sum over ranks r_e = 1..E, capped at ROUTER_CAP with the excess
    spread over the others in proportion (water-filling). Fitted by multiplicative updates on fixed
    samples. -> (sigma, target)."""
    rng = np.random.default_rng([seed, 1 << 20])
    w = 1.0 / np.arange(1, n_experts + 1) ** zipf
    target = k * w / w.sum()
    for _ in range(n_experts):
        over = target >= ROUTER_CAP
        if not (target > ROUTER_CAP + 1e-12).any():
            break
        target[over] = ROUTER_CAP
        target[~over] *= (k - ROUTER_CAP * over.sum()) / target[~over].sum()
    g = rng.standard_normal((samples, n_experts))
    log_s = np.zeros(n_experts)
    for _ in range(steps):
        top = np.argpartition(-(g * np.exp(log_s)), k - 1, axis=1)[:, :k]
        freq = np.bincount(top.ravel(), minlength=n_experts) / samples
        log_s += 0.3 * (np.log(target) - np.log(np.maximum(freq, 0.5 / samples)))
        log_s -= log_s.mean()
    return np.exp(log_s), target


def _router(cfg: SyntheticConfig, index: int, shape: tuple[int, int]) -> np.ndarray:
    """A router (E, dim) whose top-k choices on random hidden states follow the Zipf-like popularity:
    random unit rows scaled by the fitted sigmas (in a random order of experts per layer)."""
    E, d = shape
    rng = np.random.default_rng([cfg.seed, index])
    sigma, _ = zipf_router_scales(E, cfg.n_experts_used, cfg.zipf, cfg.seed)
    rows = rng.standard_normal((E, d))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    # a unit-RMS input x has |x| = sqrt(d): row . x ~ N(0, 1); 3 x sigma makes the softmax decisive
    return (rows * (3.0 * sigma[rng.permutation(E)])[:, None]).astype(np.float32)


def _tensor_data(cfg: SyntheticConfig, index: int, t: TensorSpec) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, index])
    if t.kind == "router":
        return _router(cfg, index, t.shape)
    if t.kind == "norm":
        return (1.0 + 0.1 * rng.standard_normal(t.shape[0])).astype(np.float32)
    return random_kquant(rng, t.rows, t.fmt.name)  # stacked experts (E, N, K): rows of one (E*N, K) matrix


def write_synthetic_model(path: str | os.PathLike, cfg: SyntheticConfig = SyntheticConfig(),
                          progress=None) -> Path:
    """Write the model to `path` atomically (temporary file in the same directory, then rename)."""
    return write_gguf(path, cfg.layout(), synthetic_vocab(cfg.vocab), functools.partial(_tensor_data, cfg),
                      name=f"synthetic {cfg.arch} {cfg.n_layers}x{cfg.dim} (random weights, seed {cfg.seed})",
                      quantization_version=2, progress=progress)


def main(argv: list[str] | None = None) -> int:
    d = SyntheticConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Defaults: Llama-3-8B-shaped blocks in Q4_K, 16 of them (~2.6 GiB).")
    p.add_argument("output", help="GGUF file to write (replaced atomically)")
    p.add_argument("--layers", type=int, default=d.n_layers)
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--ffn", type=int, default=d.ffn)
    p.add_argument("--heads", type=int, default=d.n_heads)
    p.add_argument("--kv-heads", type=int, default=d.n_kv_heads)
    p.add_argument("--vocab", type=int, default=d.vocab)
    p.add_argument("--ctx", type=int, default=d.ctx)
    p.add_argument("--block-format", choices=list(FORMATS), default=d.block_fmt)
    p.add_argument("--embd-format", choices=list(FORMATS), default=d.embd_fmt)
    p.add_argument("--output-format", choices=list(FORMATS), default=d.output_fmt)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--qwen3-moe", action="store_true", help="Qwen3-30B-A3B shapes (dim, heads, experts); "
                   "--layers (default 8), --vocab (default 32768), --zipf and the formats still apply")
    p.add_argument("--zipf", type=float, default=d.zipf, help="MoE: the router's popularity exponent")
    a = p.parse_args(argv)
    try:
        if a.qwen3_moe:
            cfg = SyntheticConfig.qwen3_moe(
                n_layers=a.layers if a.layers != d.n_layers else 8, vocab=a.vocab if a.vocab != d.vocab else 32768,
                block_fmt=a.block_format, embd_fmt=a.embd_format, output_fmt=a.output_format, seed=a.seed,
                zipf=a.zipf)
        else:
            cfg = SyntheticConfig(n_layers=a.layers, dim=a.dim, ffn=a.ffn, n_heads=a.heads, n_kv_heads=a.kv_heads,
                                  vocab=a.vocab, ctx=a.ctx, block_fmt=a.block_format, embd_fmt=a.embd_format,
                                  output_fmt=a.output_format, seed=a.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    print(f"writing {a.output}: {cfg.n_layers} layers, {cfg.file_bytes() / 2**30:.2f} GiB of tensors", flush=True)

    def progress(done: int, total: int, name: str) -> None:
        if name.endswith(("ffn_down.weight", "ffn_down_exps.weight")) or done == total:
            print(f"  {done}/{total} tensors ({name}), {time.perf_counter() - t0:.1f} s", flush=True)

    try:
        out = write_synthetic_model(a.output, cfg, progress)
    except OSError as e:
        print(f"error: {a.output}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
