"""Random raw GGUF weight bytes for the format and kernel tests (shared by the dequantizer, CPU,
CPU-shim and GPU kernel tests)."""
from __future__ import annotations

import gguf
import numpy as np

from engine.formats import FORMATS
from engine.synthetic import random_quantized

# Byte offsets of the fp16 fields inside one block of each block format.
FP16_FIELDS = {name: f.scale_offsets for name, f in FORMATS.items() if f.block_size > 1}
# Formats gguf-py cannot quantize: their test data is random bytes with finite fp16 fields.
RANDOM_ONLY = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


def random_blocks(fmt: str, n: int, k: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
    """Raw bytes (n, row_nbytes) of random valid blocks: every payload bit random, the fp16 fields
    normal(0, scale) values (finite, so the weights are)."""
    return random_quantized(rng, (n, k), gguf.GGMLQuantizationType[fmt],
                            lambda n_blocks, fields: [rng.standard_normal(n_blocks) * scale for _ in range(fields)])


def random_weights(fmt: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Raw GGUF bytes (n, row_nbytes): gguf-py quantize for legacy/float formats, random valid blocks
    for the formats it cannot quantize."""
    if fmt in RANDOM_ONLY:
        return random_blocks(fmt, n, k, rng)
    values = rng.standard_normal((n, k)).astype(np.float32)
    return np.ascontiguousarray(gguf.quants.quantize(values, gguf.GGMLQuantizationType[fmt]).view(np.uint8)).reshape(n, -1)


def dequantized(fmt: str, raw: np.ndarray, n: int, k: int) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt]).reshape(n, k).astype(np.float32)
