"""The non-linear 4-bit formats IQ4_NL and IQ4_XS: each 4-bit code indexes a fixed table of 16
int8 levels (llama.cpp's kvalues_iq4nl), times a per-block (IQ4_NL) or per-32-element (IQ4_XS) scale.

Same float32 operation order as gguf-py: IQ4_XS's sub-block scale d * sc first, then scale * level.
"""
from __future__ import annotations

import torch

from .base import QuantFormat
from .unpack import bits_bytewise, f16_field, nibbles

# The 16 levels a code 0..15 stands for (llama.cpp's kvalues_iq4nl, also in gguf-py's IQ4_NL).
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_LEVELS = torch.tensor(IQ4_LEVELS, dtype=torch.float32)


def _levels(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 -> their table levels as float32 (exact), same shape."""
    return _LEVELS.to(codes.device)[codes.long()]


class IQ4_NL(QuantFormat):
    """Block: d (fp16), 16 bytes of codes (elements 0-15 low nibbles, 16-31 high); value d * level."""

    __slots__ = ()

    def _decode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(_levels(nibbles(blocks[:, 2:]))).mul_(f16_field(blocks, 0))  # (m, 32)


class IQ4_XS(QuantFormat):
    """Block: d (fp16), high scale bits (u16 LE: bit pair i), 4 bytes of low scale nibbles (nibble
    i, low first), 128 bytes of codes: sub-block i (32 elements) is bytes 16i..16i+15, low nibbles
    then high. Sub-block scale (low | high << 4) - 32; value (d * scale) * level."""

    __slots__ = ()

    def _decode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        sc = (bits_bytewise(blocks[:, 4:8], 4) | (bits_bytewise(blocks[:, 2:4], 2) << 4)).view(torch.int8) - 32
        scale = (f16_field(blocks, 0) * sc).unsqueeze(-1)  # (m, 8, 1)
        codes = nibbles(blocks[:, 8:].reshape(-1, 8, 16))  # (m, 8, 32)
        out.view(-1, 8, 32).copy_(_levels(codes)).mul_(scale)
