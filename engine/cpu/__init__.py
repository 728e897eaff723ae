"""Fast CPU linear layers on raw GGUF weight bytes: out = x @ dequant(W)^T, fp32 accumulation.

The C++ kernels (qlinear.cpp) are compiled on first use and cached (see build.py). Results are
deterministic and independent of the thread count and of how many rows of x are passed at once.
"""
from __future__ import annotations

import logging

import torch

from ..errors import KernelError
from .build import slow_fallback_allowed
from .launcher import (ACTIVATIONS, FORMAT_NAMES, FORMATS, INT8_FORMATS, INT16_FORMATS, INTERLEAVE_FORMATS,
                       MAX_MANY, ROW_GROUP, DecodeLayer, activations_mode, default_kernels, type_word)

SUPPORTED: frozenset[str] = frozenset(FORMAT_NAMES)

log = logging.getLogger("engine.cpu")

__all__ = ["ACTIVATIONS", "FORMATS", "INT8_FORMATS", "INT16_FORMATS", "INTERLEAVE_FORMATS", "MAX_MANY", "ROW_GROUP",
           "SUPPORTED", "DecodeLayer", "activations_mode", "available", "decode_block", "linear", "linear_many",
           "row_interleave", "set_num_threads", "type_word"]


def available() -> bool:
    """True if the kernel library is built and loaded. If it cannot be: raises its KernelError (the
    compiler's message and the fix), or returns False, logged, under ENGINE_SLOW_FALLBACK=1."""
    try:
        default_kernels()
    except KernelError as e:
        if not slow_fallback_allowed():
            raise
        log.warning("CPU kernels unavailable (%s); every matrix is dequantized to fp32 on each call "
                    "(ENGINE_SLOW_FALLBACK=1: several times slower and above the memory plan)", e)
        return False
    return True


def linear(x: torch.Tensor, w: torch.Tensor, fmt: str, n: int, k: int,
           out: torch.Tensor | None = None, exact: bool = False, activations: str = "int16",
           interleave: int = 1) -> torch.Tensor:
    """x (T, K) float32 contiguous, w raw GGUF bytes of an (N, K) `fmt` matrix -> (T, N) float32.

    `out`, if given, must be a contiguous (T, N) float32 tensor not overlapping x or w.
    Formats in INT16_FORMATS round x to int16 per 256- or 32-element block (~1e-5 relative error) unless
    `exact`; activations="int8" rounds x to int8 per 256 elements for INT8_FORMATS instead (~1e-2
    relative, faster; see ACTIVATIONS). `interleave`: w's rows are plain (1) or interleaved in groups of
    ROW_GROUP (engine.weights.interleave_rows). Raises KernelError on bad arguments or if the kernels are
    unavailable.
    """
    return default_kernels().linear(x, w, fmt, n, k, out, exact, activations, interleave)


def linear_many(x: torch.Tensor, mats, k: int, exact: bool = False, activations: str = "int16") -> list[torch.Tensor]:
    """[linear(x, w, fmt, n, k, interleave=il) for (w, fmt, n[, il]) in mats] in one call and one pool job
    (q/k/v, gate/up): x is quantized once, every result is bit-identical to the separate call."""
    return default_kernels().linear_many(x, mats, k, exact, activations)


def decode_block(layer: DecodeLayer, x: torch.Tensor, out: torch.Tensor, rot: torch.Tensor, keys, vals,
                 starts) -> None:
    """One Llama block for R rows of one decode token each, in one call (see Kernels.decode_block and
    engine/cpu/decode_step.h): out (R, dim) from x (R, dim), the new keys/values written into the slots."""
    default_kernels().decode_block(layer, x, out, rot, keys, vals, starts)


def row_interleave(fmt: str, activations: str = "int16") -> int:
    """Rows per group in which the loaded kernels want a resident `fmt` matrix computed with these
    activations (ROW_GROUP or 1)."""
    return default_kernels().row_interleave(fmt, activations)


def set_num_threads(n: int) -> None:
    """Threads used by `linear` (the calling thread counts as one)."""
    default_kernels().set_num_threads(n)
