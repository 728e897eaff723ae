"""Typed reads of the tokenizer keys of GGUF metadata; every failure names the key."""
from __future__ import annotations

from collections.abc import Mapping

from ..errors import TokenizerError

KEY = "tokenizer.ggml."


class Meta:
    """Typed reads of tokenizer keys; every failure names the GGUF key."""

    __slots__ = ("meta", "path")

    def __init__(self, meta: Mapping[str, object], path: str | None):
        self.meta, self.path = meta, path

    def error(self, field: str, message: str) -> TokenizerError:
        return TokenizerError(message, path=self.path, field=field)

    def get_str(self, key: str) -> str | None:
        value = self.meta.get(key)
        if value is not None and not isinstance(value, str):
            raise self.error(key, f"expected a string, got {type(value).__name__}")
        return value

    def get_bool(self, key: str) -> bool | None:
        value = self.meta.get(key)
        if value is not None and not isinstance(value, (bool, int)):
            raise self.error(key, f"expected a bool, got {type(value).__name__}")
        return None if value is None else bool(value)

    def get_id(self, key: str) -> int | None:
        value = self.meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.error(key, f"expected a token id, got {type(value).__name__}")
        return value

    def get_list(self, key: str, kind: type | tuple[type, ...], n: int | None = None) -> list | None:
        value = self.meta.get(key)
        if value is None:
            return None
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise self.error(key, f"expected an array, got {type(value).__name__}")
        items = list(value)
        for i, item in enumerate(items):
            if isinstance(item, bool) or not isinstance(item, kind):
                raise self.error(f"{key}[{i}]", f"unexpected element type {type(item).__name__}")
        if n is not None and len(items) < n:
            raise self.error(key, f"has {len(items)} entries for {n} tokens")
        return items
