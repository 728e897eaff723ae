"""The single table of supported formats and the lookups built on it."""
from __future__ import annotations

import operator
import os
from types import MappingProxyType
from typing import Mapping, Sequence

from gguf import GGMLQuantizationType

from ..errors import UnsupportedModelError
from .base import QuantFormat
from .elements import BF16, F16, F32
from .iquants import IQ4_NL, IQ4_XS
from .kquants import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
from .legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0

# class, ggml type id, elements per block, bytes per block (the ggml on-disk ABI), byte offsets of the
# block's fp16 fields
_TABLE: tuple[tuple[type[QuantFormat], int, int, int, tuple[int, ...]], ...] = (
    (F32, 0, 1, 4, ()),
    (F16, 1, 1, 2, ()),
    (BF16, 30, 1, 2, ()),
    (Q4_0, 2, 32, 2 + 16, (0,)),
    (Q4_1, 3, 32, 2 + 2 + 16, (0, 2)),
    (Q5_0, 6, 32, 2 + 4 + 16, (0,)),
    (Q5_1, 7, 32, 2 + 2 + 4 + 16, (0, 2)),
    (Q8_0, 8, 32, 2 + 32, (0,)),
    (Q2_K, 10, 256, 16 + 64 + 2 + 2, (80, 82)),
    (Q3_K, 11, 256, 32 + 64 + 12 + 2, (108,)),
    (Q4_K, 12, 256, 2 + 2 + 12 + 128, (0, 2)),
    (Q5_K, 13, 256, 2 + 2 + 12 + 32 + 128, (0, 2)),
    (Q6_K, 14, 256, 128 + 64 + 16 + 2, (208,)),
    (IQ4_NL, 20, 32, 2 + 16, (0,)),
    (IQ4_XS, 23, 256, 2 + 2 + 4 + 128, (0,)),
)

FORMATS: Mapping[str, QuantFormat] = MappingProxyType(
    {cls.__name__: cls(cls.__name__, *row) for cls, *row in _TABLE})
_BY_TYPE: Mapping[int, QuantFormat] = MappingProxyType({f.ggml_type: f for f in FORMATS.values()})


def format_for(t: int | str | GGMLQuantizationType, *, path: str | os.PathLike | None = None,
               field: str | None = None) -> QuantFormat:
    """The format for a ggml type id, enum member or name; UnsupportedModelError if not supported."""
    if isinstance(t, str):
        fmt, what = FORMATS.get(t), repr(t)
    else:
        try:
            type_id = operator.index(t) if not isinstance(t, bool) else None  # numpy ints welcome
        except TypeError:
            type_id = None
        if type_id is None:
            raise UnsupportedModelError(f"tensor type must be a ggml type id or name, got {t!r}",
                                        path=path, field=field)
        fmt, what = _BY_TYPE.get(type_id), _describe_type_id(type_id)
    if fmt is None:
        raise UnsupportedModelError(
            f"tensor type {what} is not supported (supported: {', '.join(FORMATS)})", path=path, field=field)
    return fmt


def tensor_nbytes(fmt: str | QuantFormat, shape: Sequence[int]) -> int:
    """Bytes of a tensor of numpy-order `shape` in `fmt`; pure accounting, no data is read."""
    return (fmt if isinstance(fmt, QuantFormat) else format_for(fmt)).nbytes(shape)


def _describe_type_id(t: int) -> str:
    try:
        return f"{GGMLQuantizationType(t).name} ({t})"
    except ValueError:
        return f"id {t}"
