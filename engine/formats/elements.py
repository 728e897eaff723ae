"""Formats that store one element per "block": F32, F16, BF16 (exact conversion to float32)."""
from __future__ import annotations

from typing import ClassVar

import torch

from .base import QuantFormat


class _Elementwise(QuantFormat):
    __slots__ = ()
    dtype: ClassVar[torch.dtype]

    def _decode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        if blocks.storage_offset() % self.type_size:  # a dtype view needs an aligned start
            blocks = blocks.clone()
        out.copy_(blocks.view(self.dtype))  # (m, 1)


class F32(_Elementwise):
    __slots__ = ()
    dtype = torch.float32


class F16(_Elementwise):
    __slots__ = ()
    dtype = torch.float16


class BF16(_Elementwise):
    __slots__ = ()
    dtype = torch.bfloat16
