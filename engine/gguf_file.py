"""Read a GGUF file as it is: metadata, tensor index and per-layer byte runs, memory-mapped.

The header is parsed here directly from the memory map (gguf-py's GGUFReader builds one numpy
array per string and takes ~4 s on a 49k-token vocabulary; this parser takes a few tens of ms).
gguf-py remains the source of the type tables and the independent reference in the tests.
Every structural problem raises `ModelFormatError` naming the file and the field or tensor.
"""
from __future__ import annotations

import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from gguf import GGUFValueType

from .errors import ModelFormatError, UnsupportedModelError, brief
from .formats import QuantFormat, format_for

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# value type -> (struct code, numpy dtype) for the fixed-size scalar types
_SCALARS: dict[int, tuple[str, str]] = {
    GGUFValueType.UINT8: ("B", "<u1"),
    GGUFValueType.INT8: ("b", "<i1"),
    GGUFValueType.UINT16: ("H", "<u2"),
    GGUFValueType.INT16: ("h", "<i2"),
    GGUFValueType.UINT32: ("I", "<u4"),
    GGUFValueType.INT32: ("i", "<i4"),
    GGUFValueType.FLOAT32: ("f", "<f4"),
    GGUFValueType.BOOL: ("?", "<u1"),
    GGUFValueType.UINT64: ("Q", "<u8"),
    GGUFValueType.INT64: ("q", "<i8"),
    GGUFValueType.FLOAT64: ("d", "<f8"),
}

_LAYER_RE = re.compile(r"^blk\.(\d+)\.")
MAX_ARRAY_DEPTH = 4  # arrays of arrays: GGUF allows them, no model needs more than two levels
MAX_NAME_BYTES = 1024  # metadata keys and tensor names (llama.cpp allows 63 for tensor names)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of the file. `shape` is numpy order: the last dimension is contiguous."""

    name: str
    fmt: QuantFormat
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def coalesce(spans: list[tuple[int, int]], max_gap: int = 0) -> tuple[tuple[int, int], ...]:
    """Merge (offset, length) spans into sorted runs; gaps of up to `max_gap` bytes are bridged."""
    runs: list[list[int]] = []
    for off, length in sorted(spans):
        if runs and off <= runs[-1][0] + runs[-1][1] + max_gap:
            runs[-1][1] = max(runs[-1][1], off + length - runs[-1][0])
        else:
            runs.append([off, length])
    return tuple((o, n) for o, n in runs)


class _Cursor:
    """Little-endian reader over the mapped header, with errors that name the field being read."""

    __slots__ = ("buf", "pos", "path", "size")

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def take(self, n: int, field: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise ModelFormatError(
                f"file is truncated: need {n} bytes at offset {self.pos}, file has {self.size}",
                path=self.path, field=field)
        start = self.pos
        self.pos += n
        return start

    def scalar(self, vtype: int, field: str):
        code = _SCALARS[vtype][0]
        start = self.take(struct.calcsize("<" + code), field)
        return struct.unpack_from("<" + code, self.buf, start)[0]

    def u32(self, field: str) -> int:
        return self.scalar(GGUFValueType.UINT32, field)

    def u64(self, field: str) -> int:
        return self.scalar(GGUFValueType.UINT64, field)

    def string(self, field: str, limit: int | None = None) -> str:
        n = self.u64(field)
        if limit is not None and n > limit:
            raise ModelFormatError(f"name of {n} bytes (at most {limit} allowed)", path=self.path, field=field)
        start = self.take(n, field)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ModelFormatError(f"string is not valid UTF-8 ({e.reason})", path=self.path, field=field) from None

    def value(self, vtype: int, field: str, depth: int = 0) -> Any:
        """One metadata value, the only reader of values: every failure is a ModelFormatError naming the
        field; nested arrays are bounded (MAX_ARRAY_DEPTH) and every element consumes file bytes, so
        neither recursion nor a huge count can run away."""
        if vtype in _SCALARS:
            return self.scalar(vtype, field)
        if vtype == GGUFValueType.STRING:
            return self.string(field)
        if vtype == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise ModelFormatError(f"arrays nested more than {MAX_ARRAY_DEPTH} deep", path=self.path,
                                       field=field)
            etype, count = self.u32(field), self.u64(field)
            if etype in _SCALARS:
                dt = np.dtype(_SCALARS[etype][1])
                start = self.take(count * dt.itemsize, field)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=start)
                return arr.astype(bool).tolist() if etype == GGUFValueType.BOOL else arr.tolist()
            if etype == GGUFValueType.STRING:
                return self._strings(count, field)
            if etype != GGUFValueType.ARRAY:
                raise ModelFormatError(f"unknown array element type {etype}", path=self.path, field=field)
            if count * 12 > self.size - self.pos:  # each nested array takes at least its 12-byte header
                self.take(count * 12, field)  # raises the truncation error
            return [self.value(etype, f"{field}[{i}]", depth + 1) for i in range(count)]
        raise ModelFormatError(f"unknown metadata value type {vtype}", path=self.path, field=field)

    def _strings(self, count: int, field: str) -> list[str]:
        # The hot part of the header (vocabularies, merges): one tight loop, no per-item objects.
        buf, pos, size, out = self.buf, self.pos, self.size, []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                break
            (n,) = unpack(buf, pos)
            if pos + 8 + n > size:
                break
            out.append(buf[pos + 8:pos + 8 + n])
            pos += 8 + n
        if len(out) != count:
            self.pos = pos
            self.take(size + 1, f"{field}[{len(out)}]")  # raises the truncation error
        self.pos = pos
        try:
            return [b.decode("utf-8") for b in out]
        except UnicodeDecodeError as e:
            raise ModelFormatError(f"string is not valid UTF-8 ({e.reason})", path=self.path, field=field) from None


class GGUFFile:
    """A memory-mapped GGUF file: `metadata` (key -> python value), `tensors` (name -> TensorInfo).

    Read-only: the map is opened with ACCESS_READ, so model files are never written.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise ModelFormatError(f"cannot open model file: {e.strerror}", path=self.path) from None
        except ValueError as e:  # an embedded NUL byte in the path
            raise ModelFormatError(f"cannot open model file: {e}", path=repr(self.path)) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise ModelFormatError(f"is {what}; give the path of a .gguf file", path=self.path)
            self.file_size = st.st_size
            if self.file_size < 24:
                raise ModelFormatError(f"not a GGUF file: only {self.file_size} bytes", path=self.path, field="magic")
            try:
                self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise ModelFormatError(f"cannot map the model file: {e}", path=self.path) from None
        finally:
            os.close(fd)
        self._parse()

    # -- parsing -----------------------------------------------------------------------------
    def _parse(self) -> None:
        cur = _Cursor(self._mmap, self.path)
        if self._mmap[:4] != GGUF_MAGIC:
            raise ModelFormatError(f"not a GGUF file (magic {bytes(self._mmap[:4])!r})", path=self.path, field="magic")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in (2, 3):
            hint = " (a big-endian file?)" if self.version > 0xFFFF else ""
            raise UnsupportedModelError(f"GGUF version {self.version} is not supported (2 or 3){hint}",
                                        path=self.path, field="version")
        n_tensors, n_kv = cur.u64("tensor_count"), cur.u64("kv_count")
        if n_tensors > self.file_size or n_kv > self.file_size:
            raise ModelFormatError(f"implausible counts: {n_tensors} tensors, {n_kv} metadata keys",
                                   path=self.path, field="tensor_count")
        meta: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}", MAX_NAME_BYTES)
            vtype = cur.u32(key)
            if key in meta:
                raise ModelFormatError("duplicate metadata key", path=self.path, field=key)
            meta[key] = cur.value(vtype, key)
        self.metadata: Mapping[str, Any] = meta

        align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ModelFormatError(f"alignment must be a power of two, got {brief(align)}",
                                   path=self.path, field="general.alignment")
        self.alignment = align

        raw_infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor #{i} name", MAX_NAME_BYTES)
            n_dims = cur.u32(f"{name}.n_dims")
            if not 1 <= n_dims <= 4:
                raise ModelFormatError(f"tensor has {n_dims} dimensions (1..4 allowed)", path=self.path, field=name)
            dims = [cur.u64(f"{name}.dims") for _ in range(n_dims)]
            ggml_type = cur.u32(f"{name}.type")
            rel = cur.u64(f"{name}.offset")
            raw_infos.append((name, dims, ggml_type, rel))
        self.data_start = -(-cur.pos // align) * align

        tensors: dict[str, TensorInfo] = {}
        for name, dims, ggml_type, rel in raw_infos:
            if name in tensors:
                raise ModelFormatError("duplicate tensor name", path=self.path, field=name)
            if any(d <= 0 for d in dims):
                raise ModelFormatError(f"tensor has a zero or negative dimension {dims}", path=self.path, field=name)
            fmt = format_for(ggml_type, path=self.path, field=name)
            shape = tuple(int(d) for d in reversed(dims))
            nbytes = fmt.nbytes(shape, path=self.path, field=name)
            offset = self.data_start + rel
            if rel % align:
                raise ModelFormatError(f"tensor data offset {rel} is not aligned to {align}", path=self.path, field=name)
            if offset + nbytes > self.file_size:
                raise ModelFormatError(
                    f"tensor data [{offset}, {offset + nbytes}) lies past the end of the file ({self.file_size} bytes);"
                    " the file is truncated or corrupt", path=self.path, field=name)
            tensors[name] = TensorInfo(name, fmt, shape, offset, nbytes)
        self.tensors: Mapping[str, TensorInfo] = tensors

    # -- queries -----------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str, kind: type | tuple[type, ...] = object) -> Any:
        if key not in self.metadata:
            raise ModelFormatError("required metadata key is missing", path=self.path, field=key)
        value = self.metadata[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
            raise ModelFormatError(f"has type {type(value).__name__}, expected {getattr(kind, '__name__', kind)}",
                                   path=self.path, field=key)
        return value

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFormatError("required tensor is missing", path=self.path, field=name) from None

    def layer_tensors(self, layer: int) -> list[TensorInfo]:
        prefix = f"blk.{layer}."
        return [t for t in self.tensors.values() if t.name.startswith(prefix)]

    def layer_runs(self, layer: int) -> tuple[tuple[int, int], ...]:
        """The layer's tensors as coalesced (absolute offset, length) runs, in file order."""
        return coalesce([(t.offset, t.nbytes) for t in self.layer_tensors(layer)], max_gap=self.alignment - 1)

    def n_layers_in_index(self) -> int:
        ids = {int(m.group(1)) for n in self.tensors if (m := _LAYER_RE.match(n))}
        return max(ids) + 1 if ids else 0

    def view(self, t: TensorInfo) -> torch.Tensor:
        """A zero-copy, read-only uint8 view of the tensor's bytes in the map."""
        return self.bytes_view(t.offset, t.nbytes)

    def bytes_view(self, offset: int, length: int) -> torch.Tensor:
        import warnings

        with warnings.catch_warnings():  # the map is read-only; the engine never writes through it
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self._mmap, dtype=torch.uint8, count=length, offset=offset)

    def close(self) -> None:
        try:
            self._mmap.close()
        except BufferError:  # tensors still view the map; it is released with them
            pass
