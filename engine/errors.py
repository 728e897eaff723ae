"""One exception hierarchy for everything the engine refuses.

Every error names the file (when there is one) and the field or tensor that is wrong, so the CLI
can print a single line and exit non-zero.
"""
from __future__ import annotations

import os


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, field: str | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.field = field
        where = []
        if self.path is not None:
            where.append(self.path)
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class ModelFormatError(EngineError):
    """The model file is not a valid model: not GGUF, truncated, inconsistent metadata or shapes."""


class UnsupportedModelError(ModelFormatError):
    """A valid file that uses something the engine does not implement (architecture, tensor type)."""


class TokenizerError(ModelFormatError):
    """The tokenizer metadata in the model is missing or unusable."""


class CacheError(EngineError):
    """A converted checkpoint could not be written as a GGUF (read-only or full cache directory)."""


class ConfigError(EngineError):
    """A tier config (YAML or object) is invalid."""


class PlanError(EngineError):
    """No placement satisfies the budgets; the message says what is needed."""


class WeightIOError(EngineError):
    """Reading weights failed at run time (file shrank, read error); names the layer and file."""


class KernelError(EngineError):
    """A compute kernel was called with bad arguments or could not be built."""


class DraftMismatchError(EngineError):
    """A draft model that cannot draft for the target: another vocabulary."""


def brief(value: object, limit: int = 60) -> str:
    """A bounded rendering of an untrusted value for an error message. It never walks into containers
    (a YAML alias bomb expands to billions of elements) nor converts a huge integer to decimal."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 128 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, (str, bytes)):
        if len(value) <= limit:
            return repr(value)
        return f"{repr(value[:limit])}... ({len(value)} {'chars' if isinstance(value, str) else 'bytes'})"
    try:
        return f"a {type(value).__name__} of {len(value)} items"  # type: ignore[arg-type]
    except Exception:
        return f"a {type(value).__name__}"
