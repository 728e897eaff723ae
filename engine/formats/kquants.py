"""The 256-element super-block formats: Q4_K, Q5_K, Q6_K.

Same float32 operation order as gguf-py: sub-block scale = d * sc (and min = dmin * m) first,
then scale * q - min (Q4_K/Q5_K) or scale * q (Q6_K), each a separately rounded float32 op.
"""
from __future__ import annotations

import torch

from .base import QuantFormat
from .unpack import bit_planes, f16_field, k_scale_min


class Q4_K(QuantFormat):
    """Block: d, dmin (fp16), 12 bytes of 6-bit scales/mins, 128 bytes of nibbles.

    Nibble bytes come in 4 groups of 32; group g's low nibbles are sub-block 2g, high 2g+1.
    """

    __slots__ = ()

    def _decode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        q = bit_planes(blocks[:, 16:].reshape(-1, 4, 32), 4).reshape(-1, 8, 32)  # (m, 8, 32)
        _scale_shift(blocks, q, out)


class Q5_K(QuantFormat):
    """Block: d, dmin (fp16), 12 bytes of 6-bit scales/mins, 32 bytes of high bits, 128 nibbles.

    Low nibbles as in Q4_K; bit s of high-bit byte l is bit 4 of element l of sub-block s.
    """

    __slots__ = ()

    def _decode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        low = bit_planes(blocks[:, 48:].reshape(-1, 4, 32), 4).reshape(-1, 8, 32)  # (m, 8, 32)
        high = bit_planes(blocks[:, 16:48], 1)  # (m, 8, 32)
        _scale_shift(blocks, low | (high << 4), out)


class Q6_K(QuantFormat):
    """Block: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales, d (fp16).

    Each half (128 elements) uses 64 nibble bytes (low nibbles: elements 0-63, high: 64-127) and
    32 high-part bytes (bit pair p of byte l belongs to element 32p + l); value d * scale * (q - 32)
    with one int8 scale per 16 elements.
    """

    __slots__ = ()

    def _decode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        low = bit_planes(blocks[:, :128].reshape(-1, 2, 64), 4).reshape(-1, 16, 16)  # (m, 16, 16)
        high = bit_planes(blocks[:, 128:192].reshape(-1, 2, 32), 2).reshape(-1, 16, 16)
        q = (low | (high << 4)).view(torch.int8) - 32  # (m, 16, 16)
        scale = f16_field(blocks, 208) * blocks[:, 192:208].view(torch.int8)  # (m, 16)
        out.view(-1, 16, 16).copy_(q).mul_(scale.unsqueeze(-1))


def _scale_shift(blocks: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> None:
    """out = (d * sc) * q - (dmin * m) per 32-element sub-block; q (m, 8, 32) uint8."""
    sc, mn = k_scale_min(blocks[:, 4:16])  # (m, 8) each
    scale = (f16_field(blocks, 0) * sc).unsqueeze(-1)  # (m, 8, 1)
    shift = (f16_field(blocks, 2) * mn).unsqueeze(-1)
    out.view(-1, 8, 32).copy_(q).mul_(scale).sub_(shift)
