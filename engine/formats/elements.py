"""Formats that store one element per "block": F32, F16, BF16 (exact conversion to float32)."""
from __future__ import annotations

from typing import ClassVar

import torch

from .base import QuantFormat


class _Elementwise(QuantFormat):
    __slots__ = ()
    dtype: ClassVar[torch.dtype]

    def _decode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(_aligned(blocks).view(self.dtype))  # (m, 1)


def _aligned(blocks: torch.Tensor) -> torch.Tensor:
    """`blocks` (m, itemsize) starting at a multiple of its row size, as a dtype view requires."""
    return blocks.clone() if blocks.storage_offset() % blocks.shape[1] else blocks


class F32(_Elementwise):
    __slots__ = ()
    dtype = torch.float32


class F16(_Elementwise):
    """torch's fp16 -> fp32 conversion changes NaN payloads (quiets or canonicalises them); numpy
    keeps sign and payload bits. NaN lanes are rewritten from their bits to match exactly."""

    __slots__ = ()
    dtype = torch.float16

    def _decode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        bits = _aligned(blocks).view(torch.int16)  # (m, 1); negative iff the sign bit is set
        out.copy_(bits.view(torch.float16))
        nan = (bits & 0x7FFF) > 0x7C00
        if nan.any():
            h = bits[nan].to(torch.int32)
            f = 0x7F800000 | ((h & 0x03FF) << 13)
            out.view(torch.int32)[nan] = torch.where(h < 0, f | -(1 << 31), f)


class BF16(_Elementwise):
    __slots__ = ()
    dtype = torch.bfloat16
