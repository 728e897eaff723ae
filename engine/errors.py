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
