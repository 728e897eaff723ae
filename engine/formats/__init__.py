"""GGUF tensor formats: byte accounting and bit-exact dequantization to float32.

One `QuantFormat` subclass per format, one instance each in `FORMATS` (built from the single
(type id, block size, type size) table in registry.py). Decoding is vectorised torch code that
reproduces gguf-py's float32 operation order, so results match gguf.quants.dequantize bit for bit.
"""
from __future__ import annotations

from .base import QuantFormat
from .registry import FORMATS, format_for, tensor_nbytes

__all__ = ["QuantFormat", "FORMATS", "format_for", "tensor_nbytes"]
