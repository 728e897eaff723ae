"""The 32-element block formats: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Each float32 value is produced with the same operations, in the same order, as gguf-py:
`d * q` for the symmetric formats, `(d * q) + m` for the *_1 formats, with d and m the block's
fp16 fields converted exactly to float32 and q an exactly representable small integer.
"""
from __future__ import annotations

import torch

from .base import QuantFormat
from .unpack import bits_bytewise, f16_field, nibbles


class Q8_0(QuantFormat):
    """Block: d (fp16), 32 x int8; value q * d."""

    __slots__ = ()

    def _decode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(blocks[:, 2:].view(torch.int8)).mul_(f16_field(blocks, 0))  # (m, 32)


class Q4_0(QuantFormat):
    """Block: d (fp16), 16 bytes of nibbles (elements 0-15 low, 16-31 high); value d * (q - 8)."""

    __slots__ = ()

    def _decode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        q = nibbles(blocks[:, 2:]).view(torch.int8) - 8  # (m, 32)
        out.copy_(q).mul_(f16_field(blocks, 0))


class Q4_1(QuantFormat):
    """Block: d (fp16), m (fp16), 16 bytes of nibbles; value d * q + m."""

    __slots__ = ()

    def _decode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(nibbles(blocks[:, 4:])).mul_(f16_field(blocks, 0)).add_(f16_field(blocks, 2))  # (m, 32)


class Q5_0(QuantFormat):
    """Block: d (fp16), 32 high bits (u32 LE), 16 bytes of low nibbles; value d * (q - 16)."""

    __slots__ = ()

    def _decode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        q = _five_bit(blocks[:, 2:6], blocks[:, 6:]).view(torch.int8) - 16  # (m, 32)
        out.copy_(q).mul_(f16_field(blocks, 0))


class Q5_1(QuantFormat):
    """Block: d (fp16), m (fp16), 32 high bits (u32 LE), 16 bytes of low nibbles; value d * q + m."""

    __slots__ = ()

    def _decode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        q = _five_bit(blocks[:, 4:8], blocks[:, 8:])  # (m, 32)
        out.copy_(q).mul_(f16_field(blocks, 0)).add_(f16_field(blocks, 2))


def _five_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """(m, 4) high-bit bytes + (m, 16) nibble bytes -> (m, 32) uint8 values 0..31."""
    return nibbles(qs) | (bits_bytewise(qh) << 4)
