"""The QuantFormat base: byte accounting, input validation and the chunked dequantize driver.

A format stores a tensor row as consecutive blocks of `block_size` elements, each `type_size`
bytes. Subclasses only decode a (m, type_size) uint8 block matrix into a (m, block_size) float32
output; everything else (shape checks, buffer checks, chunking) lives here once.
"""
from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ModelFormatError

# Decode this many elements per step: the uint8 intermediates and the 4 MB output slice stay in
# cache between the few passes (100 MB of Q4_K: ~1.6x faster than one whole-tensor pass; smaller
# steps lose to per-op overhead).
_CHUNK_ELEMENTS = 1 << 20

PathLike = str | os.PathLike | None


@dataclass(frozen=True, slots=True)
class QuantFormat:
    """One GGUF tensor format. Instances are immutable; one subclass per format."""

    name: str  # spelled as in gguf.GGMLQuantizationType
    ggml_type: int  # gguf.GGMLQuantizationType value
    block_size: int  # elements per block (1 for F32/F16/BF16)
    type_size: int  # bytes per block
    scale_offsets: tuple[int, ...] = ()  # byte offsets of the block's fp16 fields (scales, mins)

    # -- byte accounting (pure: never touches weights) ------------------------------------------
    def row_nbytes(self, k: int, *, path: PathLike = None, field: str | None = None) -> int:
        """Bytes of one row of k elements."""
        k = _dim(k, "row length", path, field)
        if k % self.block_size:
            raise ModelFormatError(
                f"row length {k} is not a multiple of the {self.name} block size {self.block_size}",
                path=path, field=field)
        return k // self.block_size * self.type_size

    def nbytes(self, shape: Sequence[int], *, path: PathLike = None, field: str | None = None) -> int:
        """Bytes of a tensor of numpy-order `shape` (..., k): the last dimension is contiguous."""
        dims = _shape(shape, path, field)
        rows = 1
        for d in dims[:-1]:
            rows *= d
        return rows * self.row_nbytes(dims[-1], path=path, field=field)

    # -- decoding ----------------------------------------------------------------------------------
    def dequantize(self, raw: torch.Tensor, shape: Sequence[int], *, path: PathLike = None,
                   field: str | None = None) -> torch.Tensor:
        """Decode `raw` (torch.uint8, contiguous, exactly nbytes(shape) bytes, may be a read-only
        mmap view) into a new float32 tensor of `shape`, bit-exact with gguf.quants.dequantize.
        The result never aliases `raw` (F32 is copied too), so callers may modify it."""
        dims = _shape(shape, path, field)
        expected = self.nbytes(dims, path=path, field=field)
        if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
            got = raw.dtype if isinstance(raw, torch.Tensor) else type(raw).__name__
            raise ModelFormatError(f"raw {self.name} data must be a torch.uint8 tensor, got {got}",
                                   path=path, field=field)
        if not raw.is_contiguous():
            raise ModelFormatError(f"raw {self.name} data must be contiguous", path=path, field=field)
        if raw.numel() != expected:
            raise ModelFormatError(
                f"raw {self.name} data holds {raw.numel()} bytes but shape {dims} needs {expected}",
                path=path, field=field)
        n_blocks = expected // self.type_size
        blocks = raw.reshape(n_blocks, self.type_size)  # (B, type_size), a view
        out = torch.empty((n_blocks, self.block_size), dtype=torch.float32, device=raw.device)  # (B, block_size)
        step = max(1, _CHUNK_ELEMENTS // self.block_size)
        for start in range(0, n_blocks, step):
            self._decode(blocks[start:start + step], out[start:start + step])
        return out.view(dims)

    def _decode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        """Write the float32 values of `blocks` (m, type_size) uint8 into `out` (m, block_size)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _decode")


def _dim(value: object, what: str, path: PathLike, field: str | None) -> int:
    try:
        d = operator.index(value)
    except TypeError:
        raise ModelFormatError(f"{what} must be an integer, got {value!r}", path=path, field=field) from None
    if d < 0:
        raise ModelFormatError(f"{what} must be >= 0, got {d}", path=path, field=field)
    return d


def _shape(shape: Sequence[int], path: PathLike, field: str | None) -> tuple[int, ...]:
    try:
        items = tuple(shape)
    except TypeError:
        raise ModelFormatError(f"shape must be a sequence of integers, got {shape!r}",
                               path=path, field=field) from None
    if not items:
        raise ModelFormatError("shape must have at least one dimension", path=path, field=field)
    return tuple(_dim(d, "shape dimension", path, field) for d in items)
