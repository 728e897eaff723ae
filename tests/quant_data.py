"""Random raw GGUF weight bytes for kernel tests (shared by the CPU-shim and GPU kernel tests)."""
from __future__ import annotations

import gguf
import numpy as np

from engine.formats import FORMATS

K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


def random_weights(fmt: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Raw GGUF bytes (n, row_nbytes): gguf-py quantize for legacy/float formats, random bytes with
    finite fp16 scales for K-quants (gguf-py cannot quantize those)."""
    spec = FORMATS[fmt]
    if fmt in K_QUANTS:
        raw = rng.integers(0, 256, size=(n, spec.row_nbytes(k)), dtype=np.uint8)
        blocks = raw.reshape(n, -1, spec.type_size)
        n_scales = 1 if fmt == "Q6_K" else 2  # Q6_K: d at byte 208; Q4_K/Q5_K: d, dmin at 0
        scales = (rng.standard_normal(blocks.shape[:2] + (n_scales,)) * 0.02).astype(np.float16).view(np.uint8)
        if fmt == "Q6_K":
            blocks[:, :, 208:210] = scales
        else:
            blocks[:, :, 0:4] = scales
        return raw
    values = rng.standard_normal((n, k)).astype(np.float32)
    return np.ascontiguousarray(gguf.quants.quantize(values, gguf.GGMLQuantizationType[fmt]).view(np.uint8)).reshape(n, -1)


def dequantized(fmt: str, raw: np.ndarray, n: int, k: int) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt]).reshape(n, k).astype(np.float32)
