"""A Hugging Face safetensors checkpoint -> a GGUF file the engine streams like any other.

The shards are memory-mapped with the `safetensors` library and converted one tensor at a time
(peak memory: one tensor in float32), renamed to GGUF's names, Q/K rows permuted for llama's
adjacent-pair rope where llama.cpp's converter does it, and quantized as asked. The file is written
under a temporary name and renamed into place, so a GGUF at the final path is always complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from safetensors import SafetensorError, safe_open

from ..errors import CacheError, EngineError, ModelFormatError, TokenizerError, UnsupportedModelError
from ..formats import FORMATS
from ..formats.quantize import quantize as quantize_rows
from ..tokenizer.hf import HF_CONFIG_KEY, HF_GENERATION_KEY, HF_JSON_KEY
from ..weights import expected_layer_shapes, tensor_name
from .config import llama3_rope_factors, read_config

QUANTIZE_CHOICES = ("q8_0", "q4_k", None)  # None: keep the checkpoint's F32/F16/BF16 values exactly
CONVERTER_VERSION = 1  # part of the cache key: bump when the bytes written for the same input change

_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_BLOCK = {  # HF name within model.layers.N. -> GGUF name within blk.N.
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")  # old checkpoints' rope tables
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_DTYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}  # safetensors dtype -> GGUF format kept by quantize=None


@dataclass(frozen=True, slots=True)
class _Source:
    shard: str  # the shard file
    name: str  # HF tensor name
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name


def _gguf_name(hf: str) -> str | None:
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    m = _LAYER.match(hf)
    if m and m.group(2) in _BLOCK:
        return f"blk.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return None


def _shards(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelFormatError(f"unreadable shard index: {e}", path=index, field="weight_map") from None
        for shard in names:
            if not (directory / shard).is_file():
                first = next(t for t, s in weight_map.items() if s == shard)
                raise ModelFormatError(f"shard listed in {index.name} is missing (it holds {first!r})",
                                       path=directory / shard, field=first)
        return [directory / s for s in names]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise ModelFormatError("no *.safetensors weights in the checkpoint directory", path=directory,
                               field="*.safetensors")
    return found


class Checkpoint:
    """An opened checkpoint: config, spec and every tensor located and validated (nothing read yet)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.cfg = read_config(self.dir)
        self.spec = self.cfg.spec
        self._stack = ExitStack()
        self.generated: dict[str, torch.Tensor] = {}  # tensors the converter computes (llama3 rope factors)
        if self.cfg.llama3_rope is not None:
            self.generated["rope_freqs.weight"] = torch.tensor(llama3_rope_factors(self.cfg), dtype=torch.float32)
        self._handles: dict[str, object] = {}
        sources: dict[str, _Source] = {}
        try:
            for shard in _shards(self.dir):
                try:
                    h = self._stack.enter_context(safe_open(str(shard), framework="pt"))
                except (SafetensorError, OSError) as e:
                    raise ModelFormatError(f"not a readable safetensors file: {e}", path=shard,
                                           field="header") from None
                self._handles[str(shard)] = h
                for name in h.keys():
                    if _IGNORED.match(name):
                        continue
                    gguf = _gguf_name(name)
                    if gguf is None:
                        raise UnsupportedModelError(f"unexpected tensor in a {self.cfg.model_type} checkpoint",
                                                    path=shard, field=name)
                    sl = h.get_slice(name)
                    sources[gguf] = _Source(str(shard), name, tuple(sl.get_shape()), sl.get_dtype())
            if self.spec.tied_output:
                sources.pop("output.weight", None)  # some tied checkpoints store the copy too
            self.sources = self._validate(sources)
        except BaseException:
            self._stack.close()
            raise

    def _validate(self, sources: dict[str, _Source]) -> dict[str, _Source]:
        s = self.spec
        expected = {"token_embd.weight": (s.vocab_size, s.dim), "output_norm.weight": (s.dim,)}
        if not s.tied_output:
            expected["output.weight"] = (s.vocab_size, s.dim)
        for i in range(s.n_layers):
            expected |= {tensor_name(i, role): shape for role, shape in expected_layer_shapes(s).items()}
        hf_names = {v: k for k, v in _GLOBAL.items()}
        for name, shape in expected.items():
            src = sources.get(name)
            if src is None:
                m = re.match(r"blk\.(\d+)\.(.+)", name)
                hf = (f"model.layers.{m.group(1)}." + {v: k for k, v in _BLOCK.items()}[m.group(2)]) if m \
                    else hf_names[name]
                raise ModelFormatError("required tensor is missing from every shard", path=self.dir, field=hf)
            if src.shape != shape:
                raise ModelFormatError(f"shape {src.shape} does not match config.json, expected {shape}",
                                       path=src.shard, field=src.name)
            if src.dtype not in _DTYPES:
                raise UnsupportedModelError(f"dtype {src.dtype} is not supported (F32, F16, BF16)",
                                            path=src.shard, field=src.name)
        extra = sorted(set(sources) - set(expected))
        if extra:
            raise UnsupportedModelError(f"tensor beyond the {s.n_layers} layers of config.json",
                                        path=sources[extra[0]].shard, field=sources[extra[0]].name)
        order = lambda n: (0, -1, n) if n == "token_embd.weight" else (
            (1, int(n.split(".")[1]), n) if n.startswith("blk.") else (2, 0, n))
        return {n: sources[n] for n in sorted(expected, key=order)}

    def close(self) -> None:
        self._stack.close()

    @property
    def names(self) -> list[str]:
        """Every GGUF tensor, in file order."""
        return [*self.generated, *self.sources]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.generated[name].shape) if name in self.generated else self.sources[name].shape

    def tensor(self, name: str) -> torch.Tensor:
        """The GGUF tensor `name` as stored in the checkpoint (llama's Q/K rows permuted)."""
        if name in self.generated:
            return self.generated[name]
        src = self.sources[name]
        t = self._handles[src.shard].get_tensor(src.name)
        if self.cfg.permute_qk and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = self.spec.n_heads if name.endswith("attn_q.weight") else self.spec.n_kv_heads
            t = _permute(t, heads)
        return t

    def format_of(self, name: str, quantize: str | None) -> str:
        """Vectors become F32 (exactly); matrices as asked: None keeps their dtype, a row that is not
        whole blocks of the format falls back to Q8_0, then F16."""
        if len(self.shape(name)) == 1:
            return "F32"
        src = self.sources[name]
        if quantize is None:
            return _DTYPES[src.dtype]
        for fmt in (quantize.upper(), "Q8_0", "F16"):
            if src.shape[-1] % FORMATS[fmt].block_size == 0:
                return fmt
        return "F16"

    def cache_key(self, quantize: str | None) -> str:
        h = hashlib.sha256(f"v{CONVERTER_VERSION} {quantize}".encode())
        for name in ("config.json", *TOKENIZER_FILES):
            p = self.dir / name
            h.update(name.encode() + (p.read_bytes() if p.is_file() else b"-"))
        for shard in self._handles:
            st = os.stat(shard)
            h.update(f"{os.path.basename(shard)} {st.st_size} {st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotates halves of each head; GGUF llama rotates adjacent pairs: interleave the halves' rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def tokenizer_metadata(directory: Path) -> dict[str, object]:
    """The HF tokenizer files, carried verbatim in the GGUF (engine.tokenizer.hf reads them back)."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError("missing: the checkpoint needs its tokenizer.json", path=path, field="tokenizer.json")
    meta: dict[str, object] = {HF_JSON_KEY: path.read_text("utf-8")}
    for name, key in (("tokenizer_config.json", HF_CONFIG_KEY), ("generation_config.json", HF_GENERATION_KEY)):
        if (directory / name).is_file():
            meta[key] = (directory / name).read_text("utf-8")
    return meta


def write_gguf(ck: Checkpoint, out: Path, quantize: str | None, progress: Callable[[int, int], None] | None) -> Path:
    """Convert into `out` atomically: a temporary file beside it, renamed into place when complete."""
    directory = out.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=directory)
    except OSError as e:
        raise CacheError(f"cannot write a GGUF here: {e.strerror}", path=directory, field="cache_dir") from None
    os.close(fd)
    try:
        w = GGUFWriter(tmp, arch=ck.spec.architecture)
        for key, value in {**ck.cfg.gguf_metadata(), **tokenizer_metadata(ck.dir)}.items():
            _add(w, key, value)
        w.add_string("general.source.hf_model_type", ck.cfg.model_type)
        fmts = {name: ck.format_of(name, quantize) for name in ck.names}
        for name in ck.names:
            fmt, shape = FORMATS[fmts[name]], ck.shape(name)
            rows = int(np.prod(shape[:-1], dtype=np.int64))
            w.add_tensor_info(name, (rows, fmt.row_nbytes(shape[-1])) if len(shape) > 1
                              else (fmt.row_nbytes(shape[-1]),), np.dtype(np.uint8),
                              fmt.nbytes(shape), raw_dtype=GGMLQuantizationType[fmt.name])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        total = len(ck.names)
        for n, name in enumerate(ck.names, 1):
            w.write_tensor_data(quantize_rows(ck.tensor(name), fmts[name]))
            if progress:
                progress(n, total)
        w.close()
        os.replace(tmp, out)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, EngineError):
            raise CacheError(f"writing the GGUF failed: {e.strerror or e}", path=out, field="cache_dir") from None
        raise
    return out


def _add(w: GGUFWriter, key: str, value: object) -> None:
    if isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    else:
        w.add_float32(key, float(value))


def bar(stream=None) -> Callable[[int, int], None]:
    """A one-line progress bar on stderr."""
    stream = stream or sys.stderr

    def show(n: int, total: int) -> None:
        filled = 30 * n // total
        stream.write(f"\rconverting [{'#' * filled}{'.' * (30 - filled)}] {n}/{total} tensors")
        if n == total:
            stream.write("\n")
        stream.flush()

    return show
