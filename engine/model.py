"""The user-facing model: load a GGUF, run prefill/decode, tokenize, generate text."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from .cuda.device import select_device
from .errors import EngineError, ModelFormatError, PlanError, brief
from .gguf_file import GGUFFile
from .models.llama import KVCache, Llama
from .sampling import Sampler, SamplingParams
from .spec import ModelSpec
from .tiers.config import MAX_COMPUTE_THREADS, load_config
from .tiers.io import open_reader
from .tiers.runtime import Placement, build_weights, head_info
from .tiers.trace import Tracer
from .weights import layer_layout

DEFAULT_CTX = 4096


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


class Model:
    def __init__(self, f: GGUFFile, spec: ModelSpec, device, weights, glob, tokenizer, n_ctx: int,
                 load_s: float, reader, plan=None, tracer=None):
        self.file, self.spec, self.device, self.weights = f, spec, device, weights
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.plan, self.reader, self.tracer = plan, reader, tracer
        self.net = Llama(spec, glob, device, n_ctx)
        self.stats = GenerationStats(load_s=load_s)
        self._cache: KVCache | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, config=None, *, n_ctx: int | None = None, threads: int | None = None,
             trace: str | None = None, placement: Placement | None = None, rank: int = 0) -> "Model":
        """Open, validate, plan and load. `placement` overrides the planner (tests and tools); `rank` n
        takes the planner's (n+1)-th best placement instead of its best (benchmarks checking its ranking)."""
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
        n_ctx = min(n_ctx or cfg.kv_cache.max_context or DEFAULT_CTX, spec.context_length)
        plan = None
        if placement is None:
            from .plan import hardware_for
            from .tiers.footprint import footprint_from_gguf
            from .tiers.planner import Workload
            from .tiers.planner import ranked

            cfg = dataclasses.replace(cfg, kv_cache=dataclasses.replace(cfg.kv_cache, max_context=n_ctx))
            prompt = max(1, min(512, n_ctx // 2))
            work = Workload(prompt_tokens=prompt, gen_tokens=max(0, min(512, n_ctx - prompt)))
            plans = ranked(footprint_from_gguf(f, spec), hardware_for(cfg), cfg, work, rank + 1)
            if rank >= len(plans):
                raise PlanError(f"rank {rank}: the planner has only {len(plans)} placements that fit",
                                path=cfg.source, field="rank")
            plan = plans[rank]
            placement = Placement.from_plan(plan, layouts, head_info(f, spec))
        device = select_device(cfg.device, threads=threads or cfg.compute_threads)
        tracer = Tracer(trace) if trace else None
        if plan is not None:  # the backend and thread count the plan's prediction assumed
            reader = open_reader(f.path, plan.io_backend, threads=plan.io_threads)
        else:
            reader = open_reader(f.path, cfg.io_backend, threads=cfg.io_threads or 2)
        reader.tracer = tracer
        try:
            weights, glob = build_weights(f, spec, layouts, placement, reader, device, tracer,
                                          cpu_threads=threads or cfg.compute_threads)
        except BaseException:
            reader.close()
            raise
        model = cls(f, spec, device, weights, glob, tok, n_ctx, time.perf_counter() - t0, reader, plan, tracer)
        model.config = cfg
        return model

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
        if len(parts) == 1 and not n_ring:
            return f"all resident ({w.resident.nbytes / 2**20:.0f} MiB)"
        return ", ".join(parts)

    def close(self) -> None:
        self.weights.close()
        self.reader.close()
        if self.tracer:
            self.tracer.write()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- raw forward ---------------------------------------------------------------------------
    def _kv(self, batch: int) -> KVCache:
        if self._cache is None or self._cache.batch != batch:
            self._cache = KVCache(self.spec, batch, self.n_ctx)
        return self._cache

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size):
            raise EngineError(f"token id out of range [0, {self.spec.vocab_size})", field="token_ids")

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) at positions start.. -> logits (B, T or 1, vocab) float32 (KV cache kept)."""
        B, T = tokens.shape
        if start + T > self.n_ctx:
            raise EngineError(f"context of {self.n_ctx} tokens exceeded ({start} + {T})", field="n_ctx")
        self._check_ids(tokens)
        return self.net.forward(tokens, start, self._kv(B), self.weights, last_only)

    def logits(self, token_ids) -> np.ndarray:
        """Fresh prefill of one sequence (or a (B, T) batch) -> float32 logits (T, vocab) / (B, T, vocab)."""
        ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
        if ids.ndim not in (1, 2) or ids.shape[-1] == 0:
            raise EngineError(f"expected a non-empty (T,) or (B, T) array of token ids, got shape {tuple(ids.shape)}",
                              field="token_ids")
        out = self.forward(ids.reshape(-1, ids.shape[-1]), 0)
        return out.reshape(*ids.shape, -1).numpy()

    # -- text ----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special)

    def detokenize(self, ids: Sequence[int]) -> str:
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

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, *, chat: bool = False,
                 system: str | None = None, draft=None, speculate: int | None = None,
                 **sampling) -> Iterator[str]:
        """Yield text pieces as they are generated. Sampling keywords: see SamplingParams.
        `draft`: speculative decoding with "prompt-lookup", a draft Model or GGUF path sharing this
        model's vocabulary (same output: see engine.serving.speculative); `speculate`: tokens verified
        per pass (default: from the cost model)."""
        params = SamplingParams(**sampling)
        ids = list(prompt) if not isinstance(prompt, str) else self.prompt_ids(prompt, chat, system)
        if not ids:
            raise EngineError("the prompt is empty (no tokens)", field="prompt")
        if len(ids) >= self.n_ctx:
            raise EngineError(f"prompt of {len(ids)} tokens does not fit the context of {self.n_ctx}", field="prompt")
        if draft is None:
            yield from _Generation(self, ids, params, max_tokens).run()
            return
        from .serving import batcher, speculative

        drafter = speculative.drafter_for(self, draft)
        try:
            depth = speculate if speculate is not None else speculative.verify_widths(self, drafter)
            yield from batcher.generate(self, ids, params, max_tokens, drafter=drafter, depth=depth, stats=self.stats)
        finally:
            if drafter is not draft:
                drafter.shutdown()


@dataclass(slots=True)
class _Generation:
    model: Model
    ids: list[int]
    params: SamplingParams
    max_tokens: int
    history: list[int] = field(default_factory=list)

    def run(self) -> Iterator[str]:
        m, p = self.model, self.params
        st = m.stats
        sampler, dec = Sampler(p), m.tokenizer.decoder()
        stops, stop_ids = p.stop, m.tokenizer.stop_ids
        hold = max((len(s) for s in stops), default=1) - 1  # chars held back while a stop may be forming
        self.history = list(self.ids)
        t0 = time.perf_counter()
        logits = m.forward(torch.tensor([self.ids]), 0, last_only=True)[0, -1]
        st.prompt_tokens, st.prompt_s = len(self.ids), time.perf_counter() - t0
        st.decode_tokens, st.decode_s, st.finish_reason = 0, 0.0, "length"
        pos, pending, cut = len(self.ids), "", -1
        t1 = time.perf_counter()
        try:
            for _ in range(self.max_tokens):
                tok = sampler(logits, self.history)
                st.decode_tokens += 1
                if tok in stop_ids:
                    st.finish_reason = "stop"
                    break
                self.history.append(tok)
                pending += dec.push(tok)
                cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    st.finish_reason = "stop"
                    pending = pending[:cut]
                    break
                if len(pending) > hold:
                    out, pending = (pending[:len(pending) - hold], pending[len(pending) - hold:]) if hold else (pending, "")
                    yield out
                if pos + 1 >= m.n_ctx:
                    st.finish_reason = "context"
                    break
                logits = m.forward(torch.tensor([[tok]]), pos, last_only=True)[0, -1]
                pos += 1
            if cut < 0:  # not ended by a stop string: release the bytes the decoder held back
                pending += dec.flush()
            if pending:
                yield pending
        finally:
            st.decode_s = time.perf_counter() - t1
