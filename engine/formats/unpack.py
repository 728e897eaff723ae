"""Bit-field helpers shared by the block formats. All take uint8 block matrices (m, ...)."""
from __future__ import annotations

import torch


def f16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The little-endian fp16 at byte `offset` of every block, as float32 (exact): (m, 1)."""
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).to(torch.float32)


def bit_planes(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Split every byte into 8 // bits fields, lowest first: (..., L) -> (..., 8 // bits, L).

    Plane p holds (x >> (p * bits)) & (2**bits - 1); e.g. bits=4 gives (low nibbles, high nibbles).
    (One scalar op per plane on a contiguous copy: several times faster than broadcasting a
    tensor of shifts over the strided block columns.)
    """
    mask = (1 << bits) - 1
    x = x.contiguous()
    planes = []
    for shift in range(0, 8, bits):  # no shift for the lowest plane, no mask for the highest
        plane = x >> shift if shift else x
        planes.append(plane & mask if shift + bits < 8 else plane)
    return torch.stack(planes, dim=-2)


def nibbles(x: torch.Tensor) -> torch.Tensor:
    """(..., L) bytes -> (..., 2L): the L low nibbles, then the L high nibbles."""
    return bit_planes(x, 4).flatten(-2)


def bits_bytewise(x: torch.Tensor, bits: int = 1) -> torch.Tensor:
    """(m, L) bytes read as a little-endian bit string of `bits`-bit fields -> (m, 8L // bits):
    element j is bits [j * bits, (j + 1) * bits) of the string (bits=1: element j is bit j)."""
    return bit_planes(x, bits).transpose(-1, -2).reshape(x.shape[0], -1)


def k_scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit (scale, min) pairs of a Q4_K/Q5_K block from its 12 packed bytes.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3 likewise; bytes 8-11 hold
    the low 4 bits of scale/min 4-7 (low/high nibble), whose top 2 bits are the spare top bits of
    bytes 0-3 / 4-7. Returns (scales, mins), each (m, 8) uint8.
    """
    lo, hi, mix = packed.reshape(-1, 3, 4).unbind(1)  # each (m, 4)
    scales = torch.cat((lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)), dim=-1)
    mins = torch.cat((hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)), dim=-1)
    return scales, mins
