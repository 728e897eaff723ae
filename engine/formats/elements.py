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
    keeps sign and payload bits. NaN lanes are rewritten from their bits to match exactly. On a GPU
    that is done branch-free over every lane: asking whether any NaN exists would sync the host."""

    __slots__ = ()
    dtype = torch.float16

    def _decode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        bits = _aligned(blocks).view(torch.int16)  # (m, 1); negative iff the sign bit is set
        out.copy_(bits.view(torch.float16))
        rewrite_nans(bits, out, branch_free=out.device.type != "cpu")


def rewrite_nans(bits: torch.Tensor, out: torch.Tensor, branch_free: bool) -> None:
    """out (fp32) gets the fp16 NaNs of `bits` (int16) with their sign and payload bits. branch_free:
    over every lane with torch.where (no host sync), else only where a NaN was found."""
    nan = (bits & 0x7FFF) > 0x7C00
    if branch_free:
        out.view(torch.int32).copy_(torch.where(nan, _nan_bits(bits.to(torch.int32)), out.view(torch.int32)))
    elif nan.any():
        out.view(torch.int32)[nan] = _nan_bits(bits[nan].to(torch.int32))


def _nan_bits(h: torch.Tensor) -> torch.Tensor:
    """fp32 bits of the fp16 NaNs h (int32 holding the int16 bits, negative iff the sign is set)."""
    f = 0x7F800000 | ((h & 0x03FF) << 13)
    return torch.where(h < 0, f | -(1 << 31), f)


class BF16(_Elementwise):
    __slots__ = ()
    dtype = torch.bfloat16
