"""Hugging Face safetensors checkpoints: converted once into a GGUF the engine streams like any other.

`gguf_for_checkpoint(directory, quantize, cache_dir)` returns the GGUF to load: the cached one when
`cache_dir` holds a conversion of these exact files (config, tokenizer files, shard sizes and times,
quantization), else a new conversion, written there atomically or, without a cache directory, to a
temporary file the caller deletes once the model has opened it.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from ..errors import CacheError, ConfigError
from .checkpoint import QUANTIZE_CHOICES, Checkpoint, bar, write_gguf

__all__ = ["QUANTIZE_CHOICES", "checkpoint_footprint", "gguf_for_checkpoint"]


def _check_quantize(quantize: str | None) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"unknown quantization {quantize!r} (choices: q8_0, q4_k, None to keep the "
                          "checkpoint's F32/F16/BF16)", field="quantize")


def checkpoint_footprint(directory: str | os.PathLike, quantize: str | None = "q8_0"):
    """The footprint of the GGUF a conversion would write (formats as `quantize` says), for the
    planner; only the checkpoint's headers are read."""
    from ..tiers.footprint import footprint_from_description
    from ..weights import role_of

    _check_quantize(quantize)
    ck = Checkpoint(directory)
    try:
        fmts = {(f"blk.{n.split('.')[1]}.{role_of(n)}" if n.startswith("blk.") else n.rsplit(".", 1)[0]):
                ck.format_of(n, quantize) for n in ck.names}
        return footprint_from_description(ck.spec, fmts, source=str(ck.dir))
    finally:
        ck.close()


def gguf_for_checkpoint(directory: str | os.PathLike, quantize: str | None = "q8_0",
                        cache_dir: str | os.PathLike | None = None, progress: bool | None = None
                        ) -> tuple[Path, bool]:
    """-> (GGUF path, temporary). `progress`: a bar on stderr (default: when stderr is a terminal)."""
    _check_quantize(quantize)
    show = bar() if (sys.stderr.isatty() if progress is None else progress) else None
    ck = Checkpoint(directory)
    try:
        if cache_dir is None:
            out = Path(tempfile.gettempdir()) / f"engine-{os.getpid()}-{ck.cache_key(quantize)}.gguf"
            return write_gguf(ck, out, quantize, show), True
        cache = Path(cache_dir)
        if not cache.is_dir():
            raise CacheError("not a directory", path=cache, field="cache_dir")
        out = cache / f"{ck.dir.resolve().name}.{quantize or 'orig'}.{ck.cache_key(quantize)}.gguf"
        if out.is_file():
            return out, False
        return write_gguf(ck, out, quantize, show), False
    finally:
        ck.close()
