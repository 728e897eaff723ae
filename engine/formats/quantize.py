"""Quantizers: float32 rows -> the raw bytes of a format, for converting checkpoints on load.

Q8_0 is gguf-py's reference quantizer (llama.cpp's rounding). Q4_K is a plain min/max quantizer
written here (llama.cpp searches each sub-block's scale and min iteratively; this one takes the
sub-block's range), so its bytes are valid Q4_K that any reader decodes, with a somewhat larger
error than llama.cpp's. F32/F16/BF16 are exact conversions (BF16 rounds to nearest even).
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, quantize as gguf_quantize

from ..errors import UnsupportedModelError
from .registry import FORMATS

QUANTIZERS = ("F32", "F16", "BF16", "Q8_0", "Q4_K")  # formats a checkpoint may be converted to


def quantize(x: torch.Tensor, fmt: str) -> np.ndarray:
    """(N, K) or (K,) float tensor -> uint8 array (N, row_nbytes(K)) / (row_nbytes(K),) in `fmt`."""
    if fmt not in QUANTIZERS:
        raise UnsupportedModelError(f"cannot quantize to {fmt} (supported: {', '.join(QUANTIZERS)})", field="quantize")
    x = x.detach().to(torch.float32).contiguous()
    FORMATS[fmt].row_nbytes(x.shape[-1], field="quantize")  # the row length must be whole blocks
    if fmt == "F32":
        raw = x.numpy().view(np.uint8)
    elif fmt == "F16":
        raw = x.to(torch.float16).numpy().view(np.uint8)
    elif fmt == "BF16":
        raw = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    elif fmt == "Q8_0":
        raw = gguf_quantize(x.numpy(), GGMLQuantizationType.Q8_0)
    else:
        raw = _q4_k(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
    return np.ascontiguousarray(raw).reshape(*x.shape[:-1], -1)


def _q4_k(x: torch.Tensor) -> np.ndarray:
    """Q4_K: super-blocks of 256 = 8 sub-blocks of 32; value = d * sc * q - dmin * m with 6-bit sc, m."""
    n, k = x.shape
    blocks = x.reshape(-1, 8, 32)  # (B, 8, 32)
    lo = blocks.amin(-1).clamp(max=0.0)  # (B, 8): the offset is -dmin * m <= 0
    hi = blocks.amax(-1)
    scale, mins = (hi - lo) / 15.0, -lo  # per sub-block step and (non-negative) min
    d = scale.amax(-1) / 63.0  # (B,)
    dmin = mins.amax(-1) / 63.0
    d16, dmin16 = d.to(torch.float16), dmin.to(torch.float16)
    d, dmin = d16.to(torch.float32), dmin16.to(torch.float32)
    sc = torch.where(d[:, None] > 0, torch.round(scale / d[:, None].clamp(min=1e-30)), 0).clamp(0, 63)
    m = torch.where(dmin[:, None] > 0, torch.round(mins / dmin[:, None].clamp(min=1e-30)), 0).clamp(0, 63)
    step = (d[:, None] * sc)[..., None]  # (B, 8, 1)
    off = (dmin[:, None] * m)[..., None]
    q = torch.where(step > 0, torch.round((blocks + off) / step.clamp(min=1e-30)), 0).clamp(0, 15).to(torch.uint8)
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)  # (B, 8)
    # scales[12]: j < 4: sc[j], m[j] in the low 6 bits of bytes j, j + 4; j >= 4: low nibbles in byte
    # j + 4 (sc low, m high), the top 2 bits in the high bits of bytes j - 4 (sc) and j (m)
    packed = torch.zeros(sc.shape[0], 12, dtype=torch.uint8)
    packed[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    # qs[128]: chunk c of 64 values -> 32 bytes, low nibble value c*64 + l, high nibble c*64 + 32 + l
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    head = torch.stack([d16, dmin16], -1).view(torch.uint8)  # (B, 4)
    out = torch.cat([head, packed, qs], 1)  # (B, 144)
    return out.reshape(n, -1).numpy()
