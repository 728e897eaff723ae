"""The user-facing model: load a GGUF, open sequences and run ragged passes over them, tokenize,
generate text."""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator
from typing import Sequence as Seq

import numpy as np
import torch

from .device import Device, select_device
from .errors import EngineError, ModelFormatError, PlanError, brief
from .gguf_file import GGUFFile
from .models.llama import Llama
from .sampling import SamplingParams
from .sequence import Batch, Row, Sequence, tree_depths, tree_mask
from .spec import ModelSpec
from .tiers.config import MAX_COMPUTE_THREADS, load_config
from .tiers.planner.contract import AUTO_IO_THREADS
from .tiers.io import open_reader, reader_backend
from .tiers.runtime import Placement, build_weights, head_info
from .tiers.trace import Tracer
from .tiers.units import PREFILL_TOKENS
from .weights import layer_layout

DEFAULT_CTX = 4096
log = logging.getLogger("engine.model")


@dataclass(slots=True)
class GenerationStats:
    load_s: float = 0.0
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    finish_reason: str = ""

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM), in bytes."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matrix_formats(layouts, head) -> list[str]:
    """The tensor formats of the matrices a pass multiplies (blocks and the output head), in order."""
    names = [t.fmt.name for lay in layouts for _, t in lay.tensors if len(t.shape) >= 2]
    return list(dict.fromkeys([*names, head.fmt.name]))


class Model:
    def __init__(self, f: GGUFFile, spec: ModelSpec, device: Device, weights, glob, tokenizer, n_ctx: int,
                 load_s: float, reader, plan=None, tracer=None):
        self.file, self.spec, self.device, self.weights = f, spec, device, weights
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.plan, self.reader, self.tracer = plan, reader, tracer
        self.net = Llama(spec, glob, n_ctx)
        self.stats = GenerationStats(load_s=load_s)
        self.sequences: set[Sequence] = set()  # open KV slots
        self._lock = threading.Lock()  # one pass over the weights at a time
        self._fwd: list[Sequence] = []  # the sequences behind forward()

    @classmethod
    def load(cls, path: str | os.PathLike, config=None, *, n_ctx: int | None = None, threads: int | None = None,
             trace: str | None = None, placement: Placement | None = None, rank: int = 0,
             device: Device | None = None, cpu_activations: str | None = None) -> "Model":
        """Open, validate, pick the device, plan for it and load. `placement` overrides the planner and
        `device` the config's device (tests and tools); `rank` n takes the planner's (n+1)-th best
        placement instead of its best (benchmarks checking its ranking); `cpu_activations` (int16 | int8)
        overrides the config's."""
        from .tokenizer import Tokenizer

        for name, v, hi in (("n_ctx", n_ctx, None), ("threads", threads, MAX_COMPUTE_THREADS)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1 or (hi and v > hi)):
                raise EngineError(f"must be an integer >= 1{f' and <= {hi}' if hi else ''} (None: the default), "
                                  f"got {brief(v)}", field=name)
        t0 = time.perf_counter()
        f = GGUFFile(path)
        spec = ModelSpec.from_gguf(f)
        layouts = [layer_layout(f, spec, i) for i in range(spec.n_layers)]
        extra = f.n_layers_in_index()
        if extra > spec.n_layers:
            raise ModelFormatError(f"file has tensors for {extra} blocks, metadata says {spec.n_layers}",
                                   path=f.path, field=f"{spec.architecture}.block_count")
        tok = Tokenizer.from_metadata(f.metadata, f.path)
        cfg = load_config(config)
        if cpu_activations is not None:  # overrides the config's (validated there: a ConfigError naming the key)
            cfg = dataclasses.replace(cfg, cpu_activations=cpu_activations)
        if n_ctx is None:  # the config's max_context (or the default) is capped at the trained context
            n_ctx = min(cfg.kv_cache.max_context or DEFAULT_CTX, spec.context_length)
        elif n_ctx > spec.context_length:  # asked for explicitly: honoured, and said
            log.warning("%s: n_ctx %d is beyond the model's trained context of %d tokens (%s.context_length): "
                        "positions past it are extrapolated by rope, output quality is not guaranteed",
                        f.path, n_ctx, spec.context_length, spec.architecture)
        if device is None:  # before any large allocation: a CUDA request that cannot be honoured fails here
            device = select_device(cfg.device, threads=threads or cfg.compute_threads, kv_dtype=cfg.kv_cache.dtype,
                                   cpu_activations=cfg.cpu_activations)
        kind = "cpu" if device.torch_device.type == "cpu" else "cuda"  # a device with memory of its own plans as CUDA
        plan = None
        # the reader first: the plan assumes the backend that really opened (kvikio only when it started,
        # and as a disk-to-GPU path only when it reads into device memory)
        reader = open_reader(f.path, cfg.io_backend, threads=cfg.io_threads or (AUTO_IO_THREADS if placement is None else 2),
                             device_type=kind)
        try:
            if placement is None:
                plan, cfg = cls._plan(f, spec, cfg, device, kind, n_ctx, rank, reader)
                placement = Placement.from_plan(plan, layouts, head_info(f, spec))
            tracer = Tracer(trace) if trace else None
            reader.tracer = tracer
            weights, glob = build_weights(f, spec, layouts, placement, reader, device, tracer,
                                          cpu_threads=threads or cfg.compute_threads,
                                          cpu_activations=cfg.cpu_activations)
            device.prepare(matrix_formats(layouts, head_info(f, spec)))  # kernels ready before the first pass
        except BaseException:
            reader.close()
            raise
        model = cls(f, spec, device, weights, glob, tok, n_ctx, time.perf_counter() - t0, reader, plan, tracer)
        model.config = cfg
        return model

    @staticmethod
    def _plan(f: GGUFFile, spec: ModelSpec, cfg, device: Device, kind: str, n_ctx: int, rank: int, reader):
        """The planner's (rank+1)-th best plan for this device, the context and the opened reader, and
        the config it planned (device, KV dtype and io_backend resolved)."""
        from .plan import hardware_for, router_profile
        from .tiers.footprint import footprint_from_gguf
        from .tiers.planner import Workload, ranked

        kv = dataclasses.replace(cfg.kv_cache, max_context=n_ctx,
                                 dtype="f16" if device.kv_dtype == torch.float16 else "f32")
        # plan for the device we run on and the reader that opened
        cfg = dataclasses.replace(cfg, kv_cache=kv, device=kind, io_backend=reader_backend(reader))
        prompt = max(1, min(PREFILL_TOKENS, n_ctx // 2))
        work = Workload(prompt_tokens=prompt, gen_tokens=max(0, min(512, n_ctx - prompt)))
        fp = footprint_from_gguf(f, spec)
        router = router_profile(f.path) if fp.is_moe else None
        plans = ranked(fp, hardware_for(cfg), cfg, work, rank + 1, router)
        if rank >= len(plans):
            raise PlanError(f"rank {rank}: the planner has only {len(plans)} placements that fit",
                            path=cfg.source, field="rank")
        return plans[rank], cfg

    def plan_summary(self) -> str:
        w = self.weights
        n_units, n_ring = len(w.units), len(w.sequences[False])
        n_host = sum(1 for src in w.sources if src == "host")
        parts = [f"{len(w.fixed) - (n_host if not w.staging.separate else 0)}/{n_units} units resident "
                 f"({w.resident.nbytes / 2**20:.0f} MiB)"]
        if w.host.nbytes:
            where = "page-locked" if w.staging.separate else "in RAM, computed in place"
            parts.append(f"{n_host} in the host tier ({w.host.nbytes / 2**20:.0f} MiB {where}"
                         f"{f', {len(w.cpu_units)} computed on the CPU at <= {w.cpu_max_rows} rows' if w.cpu_units else ''})")
        if n_ring:
            parts.append(f"{n_ring} streamed through {w.k} x {w.slot_bytes / 2**20:.1f} MiB staging "
                         f"({'O_DIRECT' if self.reader.direct else 'buffered'})")
        ex = w.expert_store
        if ex is not None:
            moving = len(ex.plans)
            parts.append(f"{len(ex.slices) - moving}/{len(ex.slices)} experts in place, {moving} through an expert "
                         f"cache of {ex.n_slots} x {ex.slot_bytes / 2**20:.1f} MiB")
        if len(parts) == 1 and not n_ring:
            return f"all resident ({w.resident.nbytes / 2**20:.0f} MiB)"
        return ", ".join(parts)

    def close(self) -> None:
        for seq in list(self.sequences):
            seq.close()
        self.weights.close()
        self.reader.close()
        if self.tracer:
            self.tracer.write()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- sequences and passes ------------------------------------------------------------------
    def open_sequence(self) -> Sequence:
        """A new sequence with its own KV slot (per layer, on that layer's KV device in its KV dtype)."""
        s = self.spec
        keys, vals = [], []
        for i in range(s.n_layers):
            dev = self.weights.kv_device(i)
            shape = (s.n_kv_heads, self.n_ctx, s.head_dim)  # (Hkv, n_ctx, hd); CPU pages are touched as written
            keys.append(torch.empty(shape, dtype=dev.kv_dtype, device=dev.torch_device))
            vals.append(torch.empty(shape, dtype=dev.kv_dtype, device=dev.torch_device))
        seq = Sequence(self, keys, vals, self.n_ctx)
        self.sequences.add(seq)
        return seq

    def _batch(self, rows, want, trees) -> Batch:
        if not rows:
            raise EngineError("a pass needs at least one row", field="rows")
        if trees is not None and len(trees) != len(rows):
            raise EngineError(f"{len(trees)} tree parent lists for {len(rows)} rows", field="trees")
        if want is not None and len(want) != len(rows):
            raise EngineError(f"{len(want)} output counts for {len(rows)} rows", field="want")
        packed, ids, positions, seen = [], [], [], set()
        offset = 0
        for r, (seq, toks) in enumerate(rows):
            if not isinstance(seq, Sequence) or seq.owner is not self:
                raise EngineError(f"row {r}: not a sequence of this model", field="rows")
            seq.check_open()
            if id(seq) in seen:
                raise EngineError(f"row {r}: a sequence may appear only once in a pass", field="rows")
            seen.add(id(seq))
            t = torch.as_tensor(toks, dtype=torch.int64).reshape(-1).cpu()
            T = t.numel()
            if T == 0:
                raise EngineError(f"row {r}: no tokens", field="rows")
            if want is not None and (isinstance(want[r], bool) or not isinstance(want[r], int)
                                     or not 1 <= want[r] <= T):
                raise EngineError(f"row {r}: logits wanted for {brief(want[r])} of its {T} tokens "
                                  f"(need 1..{T})", field="want")
            if seq.pos + T > self.n_ctx:
                raise EngineError(f"context of {self.n_ctx} tokens exceeded ({seq.pos} + {T})", field="n_ctx")
            parents = None if trees is None or trees[r] is None else [int(p) for p in trees[r]]
            if parents is not None and len(parents) != T:
                raise EngineError(f"row {r}: {len(parents)} parents for {T} tokens", field="trees")
            depth = range(T) if parents is None else tree_depths(parents)
            ids.append(t)
            positions.append(torch.tensor([seq.pos + d for d in depth], dtype=torch.int64))
            packed.append(Row(seq, offset, T, seq.pos, None if parents is None else tree_mask(parents)))
            offset += T
        ids_all = torch.cat(ids)
        self._check_ids(ids_all)
        return Batch(packed, ids_all, torch.cat(positions), want)

    @torch.inference_mode()
    def step(self, rows, last_only: bool = False, trees=None, want=None) -> list[torch.Tensor]:
        """ONE pass over the weights for every row: rows = [(sequence, token ids), ...], any mix of
        prefill chunks and decode tokens. -> per row logits (T_i, vocab); with last_only (1, vocab), or
        with want (per row n_i in 1..T_i) the logits of each row's last n_i tokens (n_i, vocab): the
        output head runs only on those. fp32 on the compute device. trees: per row None or parents
        (parents[j] = index of token j's parent among the row's new tokens, -1 = the last cached
        token) for draft-tree verification. A failed pass leaves every sequence as it was before it."""
        if last_only and want is None:
            want = [1] * len(rows)
        batch = self._batch(rows, want, trees)
        with self._lock:
            logits = self.net.forward(batch, self.weights)  # (N or M, vocab)
        out, o = [], 0
        for i, r in enumerate(batch.rows):  # the pass succeeded: the rows' tokens are cached
            r.seq.pos += r.T
            r.seq.tree = None if r.tree is None else (r.start, tuple(int(p) for p in trees[i]))
            n = r.T if want is None else want[i]
            out.append(logits[o:o + n])
            o += n
        return out

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size):
            raise EngineError(f"token id out of range [0, {self.spec.vocab_size})", field="token_ids")

    def prefill(self, seq: Sequence, ids) -> torch.Tensor:
        """Feed a prompt to one sequence in passes of at most PREFILL_TOKENS tokens (memory stays within
        the plan's workspace for any prompt length) -> the last token's logits (vocab,)."""
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        for c in range(0, ids.numel(), PREFILL_TOKENS):
            logits = self.step([(seq, ids[c:c + PREFILL_TOKENS])], last_only=True)[0]
        return logits[-1]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) at positions start.. of B sequences kept by the model -> logits (B, T or 1,
        vocab) fp32 on the compute device. start 0 begins new sequences; otherwise it must be at most
        the tokens they hold (later ones are dropped)."""
        tokens = torch.as_tensor(tokens)
        if tokens.ndim != 2:
            raise EngineError(f"expected a (B, T) tensor of token ids, got shape {tuple(tokens.shape)}", field="tokens")
        B = tokens.shape[0]
        if start == 0 and len(self._fwd) != B:
            for seq in self._fwd:
                seq.close()
            self._fwd = [self.open_sequence() for _ in range(B)]
        if len(self._fwd) != B or any(start > seq.pos for seq in self._fwd):
            raise EngineError(f"start {start}: the model holds {len(self._fwd)} sequence(s) of "
                              f"{self._fwd[0].pos if self._fwd else 0} tokens", field="start")
        for seq in self._fwd:
            seq.truncate(start)
        return torch.stack(self.step(list(zip(self._fwd, tokens)), last_only))

    def logits(self, token_ids) -> np.ndarray:
        """Fresh prefill of one sequence (or a (B, T) batch, its rows in shared passes) -> float32
        logits (T, vocab) / (B, T, vocab) as numpy."""
        ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
        if ids.ndim not in (1, 2) or ids.shape[-1] == 0:
            raise EngineError(f"expected a non-empty (T,) or (B, T) array of token ids, got shape {tuple(ids.shape)}",
                              field="token_ids")
        rows = ids.reshape(-1, ids.shape[-1])
        seqs = [self.open_sequence() for _ in rows]
        try:
            parts = [self.step(list(zip(seqs, rows[:, c:c + PREFILL_TOKENS])))
                     for c in range(0, rows.shape[1], PREFILL_TOKENS)]
        finally:
            for seq in seqs:
                seq.close()
        out = torch.stack([torch.cat([p[b] for p in parts]) for b in range(len(seqs))])  # (B, T, vocab)
        return out.reshape(*ids.shape, -1).cpu().numpy()

    # -- text ----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special)

    def detokenize(self, ids: Seq[int]) -> str:
        return self.tokenizer.decode(ids)

    def prompt_ids(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        if not chat:
            return self.tokenize(prompt)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special=True)
        bos = self.tokenizer.bos_id
        if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:  # template already wrote BOS
            ids = ids[1:]
        return ids

    def generate(self, prompt: str | Seq[int], max_tokens: int = 256, *, chat: bool = False,
                 system: str | None = None, draft=None, speculate: int | None = None,
                 **sampling) -> Iterator[str]:
        """Yield text pieces as they are generated. Sampling keywords: see SamplingParams.
        `draft`: speculative decoding with "prompt-lookup", a draft Model or GGUF path sharing this
        model's vocabulary (same output: see engine.serving.speculative); `speculate`: tokens verified
        per pass (default: from the cost model)."""
        from .serving import batcher, speculative

        params = SamplingParams(**sampling)
        ids = list(prompt) if not isinstance(prompt, str) else self.prompt_ids(prompt, chat, system)
        batcher.check_prompt(ids, self.n_ctx)
        drafter = None if draft is None else speculative.drafter_for(self, draft)
        try:
            depth = 1 if drafter is None else speculate if speculate is not None else \
                speculative.verify_widths(self, drafter)
            yield from batcher.generate(self, ids, params, max_tokens, drafter=drafter, depth=depth, stats=self.stats)
        finally:
            if drafter is not None and drafter is not draft:
                drafter.shutdown()
