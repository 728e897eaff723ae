"""The 256-element super-block formats: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Same float32 operation order as gguf-py: sub-block scale = d * sc (and min = dmin * m) first,
then scale * q - min (Q2_K/Q4_K/Q5_K) or scale * q (Q3_K/Q6_K), each a separately rounded float32 op.
"""
from __future__ import annotations

import torch

from .base import QuantFormat
from .unpack import bit_planes, f16_field, k_scale_min, nibbles


class Q2_K(QuantFormat):
    """Block: 16 scale bytes (low nibble: scale, high: min, per 16 elements), 64 bytes of 2-bit
    quants, d, dmin (fp16). Each half (128 elements) uses 32 quant bytes: bit pair p of byte l is
    element 32p + l. Value (d * scale) * q - (dmin * min)."""

    __slots__ = ()

    def _decode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        q = bit_planes(blocks[:, 16:80].reshape(-1, 2, 32), 2).reshape(-1, 16, 16)  # (m, 16, 16)
        packed = blocks[:, :16]
        scale = (f16_field(blocks, 80) * (packed & 0x0F)).unsqueeze(-1)  # (m, 16, 1)
        shift = (f16_field(blocks, 82) * (packed >> 4)).unsqueeze(-1)
        out.view(-1, 16, 16).copy_(q).mul_(scale).sub_(shift)


class Q3_K(QuantFormat):
    """Block: 32 bytes of high-bit masks, 64 bytes of 2-bit low parts, 12 bytes of 6-bit scales, d (fp16).

    Element e = 32j + l (j = 0..7) has its low 2 bits as in Q2_K and bit j of mask byte l as its
    high bit; q = low - 4 when that bit is clear, else low (so q is -4..3). Scale i (per 16
    elements) is nibble i of bytes 0-7 (low nibbles first) with bits 4-5 from bit pair i // 4 of
    byte 8 + i % 4, minus 32. Value (d * scale) * q.
    """

    __slots__ = ()

    def _decode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        low = bit_planes(blocks[:, 32:96].reshape(-1, 2, 32), 2).reshape(-1, 8, 32)  # (m, 8, 32)
        high = bit_planes(blocks[:, :32], 1)  # (m, 8, 32)
        q = low.view(torch.int8) - ((high ^ 1) << 2).view(torch.int8)
        packed = blocks[:, 96:108]
        sc = (nibbles(packed[:, :8]) | (bit_planes(packed[:, 8:], 2).reshape(-1, 16) << 4)).view(torch.int8) - 32
        scale = f16_field(blocks, 108) * sc  # (m, 16)
        out.view(-1, 16, 16).copy_(q.view(-1, 16, 16)).mul_(scale.unsqueeze(-1))


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
