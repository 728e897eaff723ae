"""A GGUF file as an editable structure (header values, tensor infos, data bytes) and back to bytes.

Independent of engine.gguf_file (pure struct code after the GGUF spec), so tests and scripts/fuzz.py
can build files the engine must refuse or accept: nested arrays, odd alignments, moved offsets, wrong
types. `encode` writes exactly what the structure says (no validation); `relayout` recomputes the
tensor offsets for an alignment and places the data accordingly.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

# GGUF value types (gguf-py's GGUFValueType)
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
RAW = -1  # Value.etype for a payload given as encoded bytes
SCALAR_CODES = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q",
                I64: "q", F64: "d"}


@dataclass
class Value:
    """A typed header value: scalars and strings as Python values; an ARRAY holds `etype` and a list
    of Values (nested arrays allowed)."""

    vtype: int
    value: Any
    etype: int | None = None  # ARRAY only; RAW: `value` is the encoded payload (after the type)


@dataclass
class TensorEntry:
    name: str
    dims: list[int]  # GGUF order: dims[0] is the contiguous one
    ggml_type: int
    offset: int  # relative to the data section
    nbytes: int = 0  # bytes of data (computed by decode from the next offset / data end)


@dataclass
class GGUFDoc:
    version: int
    kvs: list[tuple[str, Value]]
    tensors: list[TensorEntry]
    data: bytes  # the data section (from the aligned end of the header to the end of the file)
    alignment: int = 32
    counts: dict[str, int] = field(default_factory=dict)  # override tensor_count / kv_count

    def copy(self) -> "GGUFDoc":
        return GGUFDoc(self.version, list(self.kvs),
                       [TensorEntry(t.name, list(t.dims), t.ggml_type, t.offset, t.nbytes) for t in self.tensors],
                       self.data, self.alignment, dict(self.counts))

    def get(self, key: str) -> Value | None:
        return next((v for k, v in self.kvs if k == key), None)

    def set(self, key: str, value: Value) -> None:
        for i, (k, _) in enumerate(self.kvs):
            if k == key:
                self.kvs[i] = (key, value)
                return
        self.kvs.append((key, value))

    def tensor(self, name: str) -> TensorEntry:
        return next(t for t in self.tensors if t.name == name)


class _Reader:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def unpack(self, code: str):
        (v,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += struct.calcsize("<" + code)
        return v

    def string(self) -> str:
        n = self.unpack("Q")
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s.decode("utf-8")

    def value(self, vtype: int) -> Value:
        if vtype in SCALAR_CODES:
            return Value(vtype, self.unpack(SCALAR_CODES[vtype]))
        if vtype == STRING:
            return Value(vtype, self.string())
        if vtype == ARRAY:
            etype, count = self.unpack("I"), self.unpack("Q")
            return Value(ARRAY, [self.value(etype) for _ in range(count)], etype)
        raise ValueError(f"value type {vtype}")


def decode(buf: bytes) -> GGUFDoc:
    """Parse a well-formed GGUF (the seeds; no validation)."""
    r = _Reader(buf)
    assert buf[:4] == b"GGUF"
    r.pos = 4
    version, n_tensors, n_kv = r.unpack("I"), r.unpack("Q"), r.unpack("Q")
    kvs = []
    for _ in range(n_kv):
        key = r.string()
        kvs.append((key, r.value(r.unpack("I"))))
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.unpack("Q") for _ in range(r.unpack("I"))]
        tensors.append(TensorEntry(name, dims, r.unpack("I"), r.unpack("Q")))
    align = next((v.value for k, v in kvs if k == "general.alignment"), 32)
    start = -(-r.pos // align) * align
    data = buf[start:]
    ends = sorted({t.offset for t in tensors} | {len(data)})
    for t in tensors:
        t.nbytes = next(e for e in ends if e > t.offset) - t.offset
    return GGUFDoc(version, kvs, tensors, data, align)


def _enc_value(v: Value, out: list[bytes]) -> None:
    if v.etype == RAW:
        out.append(v.value)
    elif v.vtype in SCALAR_CODES:
        out.append(struct.pack("<" + SCALAR_CODES[v.vtype], v.value))
    elif v.vtype == STRING:
        raw = v.value.encode("utf-8", "surrogateescape") if isinstance(v.value, str) else v.value
        out.append(struct.pack("<Q", len(raw)) + raw)
    elif v.vtype == ARRAY:
        out.append(struct.pack("<IQ", v.etype, len(v.value)))
        for item in v.value:
            _enc_value(item, out)
    # an unknown type: its number only (the engine must refuse it)


def encode_header(doc: GGUFDoc) -> bytes:
    return b"".join(header_parts(doc))


def boundaries(doc: GGUFDoc) -> list[int]:
    """File offsets where one field of the structure ends and the next begins (header fields, the data
    section, every tensor's data start and end): the places a truncation is most informative."""
    ends, pos = [], 0
    for part in header_parts(doc):
        pos += len(part)
        ends.append(pos)
    start = -(-pos // doc.alignment) * doc.alignment
    ends += [start] + [start + t.offset for t in doc.tensors] + [start + t.offset + t.nbytes for t in doc.tensors]
    return sorted(set(ends))


def payload(v: Value) -> bytes:
    """The encoded bytes of a value after its type field."""
    out: list[bytes] = []
    _enc_value(v, out)
    return b"".join(out)


def header_parts(doc: GGUFDoc) -> list[bytes]:
    out = [b"GGUF", struct.pack("<IQQ", doc.version, doc.counts.get("tensor_count", len(doc.tensors)),
                                doc.counts.get("kv_count", len(doc.kvs)))]
    for key, v in doc.kvs:
        raw = key.encode("utf-8", "surrogateescape")
        out.append(struct.pack("<Q", len(raw)) + raw + struct.pack("<I", v.vtype))
        _enc_value(v, out)
    for t in doc.tensors:
        raw = t.name.encode("utf-8", "surrogateescape")
        out.append(struct.pack("<Q", len(raw)) + raw + struct.pack("<I", len(t.dims)))
        out.append(struct.pack(f"<{len(t.dims)}Q", *t.dims) + struct.pack("<IQ", t.ggml_type, t.offset))
    return out


def encode(doc: GGUFDoc) -> bytes:
    head = encode_header(doc)
    start = -(-len(head) // doc.alignment) * doc.alignment
    return head + b"\0" * (start - len(head)) + doc.data


def relayout(doc: GGUFDoc, alignment: int, first: int = 0) -> GGUFDoc:
    """Place every tensor's bytes again for `alignment` (general.alignment is set to it), the first at
    relative offset `first`: alignment 1 with first=1 puts F32 tensors at odd file offsets."""
    pos, placed = first, []
    for t in doc.tensors:
        pos = -(-pos // alignment) * alignment
        placed.append((t, pos))
        pos += t.nbytes
    data = bytearray(pos)
    for t, off in placed:
        data[off:off + t.nbytes] = doc.data[t.offset:t.offset + t.nbytes]
    tensors = [TensorEntry(t.name, list(t.dims), t.ggml_type, off, t.nbytes) for t, off in placed]
    out = GGUFDoc(doc.version, list(doc.kvs), tensors, bytes(data), alignment, dict(doc.counts))
    out.set("general.alignment", Value(U32, alignment))
    return out
