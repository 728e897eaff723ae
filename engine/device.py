"""Compute devices. Everything above this interface (stores, scheduler, model) is device-neutral.

    class Device(Protocol):
        name: str                       # "cpu", "cuda:0"
        torch_device: torch.device      # where activations, the rope table, norms and KV live
        act_dtype: torch.dtype          # what the matrix kernels read activations as
        kv_dtype: torch.dtype           # the KV cache's element type
        staging                         # engine.tiers.staging hooks (None: HostStaging)
        def linear(x (..., K), w: QWeight, out=None) -> (..., N) fp32 on torch_device
        def linear_many(x (..., K), ws: Sequence[QWeight]) -> [(..., N_i)]   # q/k/v, gate/up
        def attention(q (T, H, hd), keys, vals (Hkv, L, hd), mask: AttnMask) -> (T, H, hd) fp32

`select_device` imports engine.cuda only when CUDA is requested or `auto` may find it: the CPU path
never loads the CUDA package.
"""
from __future__ import annotations

import logging
import math
from typing import Protocol, Sequence

import torch

from . import cpu as cpu_kernels
from .attention import AttnMask, attend, matmul_kernel
from .errors import ConfigError, KernelError
from .weights import QWeight

log = logging.getLogger("engine.device")

KV_DTYPES = {"f32": torch.float32, "f16": torch.float16}


class Device(Protocol):
    name: str
    torch_device: torch.device
    act_dtype: torch.dtype
    kv_dtype: torch.dtype
    staging: object | None

    def linear(self, x: torch.Tensor, w: QWeight, out: torch.Tensor | None = None) -> torch.Tensor: ...
    def linear_many(self, x: torch.Tensor, ws: Sequence[QWeight]) -> list[torch.Tensor]: ...
    def attention(self, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: AttnMask) -> torch.Tensor: ...


def kv_dtype_of(name: str, default: torch.dtype) -> torch.dtype:
    """A config's kv_cache.dtype ("auto", "f32", "f16") as a torch dtype."""
    if name == "auto":
        return default
    if name not in KV_DTYPES:
        raise ConfigError(f"unknown KV cache dtype {name!r}: expected auto, f32 or f16", field="kv_cache.dtype")
    return KV_DTYPES[name]


class CpuDevice:
    """The CPU as the compute device: fused dequant-GEMV kernels on raw GGUF bytes (engine.cpu). If
    they cannot be built this raises KernelError, unless ENGINE_SLOW_FALLBACK=1 opts in (logged) to
    dequantize + torch matmul."""

    name = "cpu"
    torch_device = torch.device("cpu")
    act_dtype = torch.float32
    staging = None

    def __init__(self, threads: int | None = None, *, kv_dtype: torch.dtype = torch.float32):
        self.threads = threads or torch.get_num_threads()
        self.kv_dtype = kv_dtype
        # torch only runs the small per-token ops (norms, rope, attention over a few heads): one thread
        # avoids its OpenMP team fighting the kernel pool for the same cores.
        torch.set_num_threads(1)
        self.kernels = cpu_kernels.available()
        if self.kernels:
            cpu_kernels.set_num_threads(self.threads)

    def linear(self, x: torch.Tensor, w: QWeight, out: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) fp32 -> (..., N) = x @ W^T, W read from its GGUF bytes."""
        n, k = w.shape
        x2 = x.reshape(-1, k)  # (T, K)
        if self.kernels and w.fmt.name in cpu_kernels.SUPPORTED:
            y = cpu_kernels.linear(x2.contiguous(), w.data, w.fmt.name, n, k, out)
        else:
            y = torch.matmul(x2, w.dequantize().T, out=out)
        return y.view(*x.shape[:-1], n)

    def linear_many(self, x: torch.Tensor, ws: Sequence[QWeight]) -> list[torch.Tensor]:
        """[linear(x, w) for w in ws] (same K: q/k/v, gate/up) in one kernel call; each result is
        bit-identical to its own linear()."""
        k = ws[0].shape[1]
        x2 = x.reshape(-1, k)  # (T, K)
        if self.kernels and len(ws) <= cpu_kernels.MAX_MANY and all(
                w.shape[1] == k and w.fmt.name in cpu_kernels.SUPPORTED for w in ws):
            ys = cpu_kernels.linear_many(x2.contiguous(), [(w.data, w.fmt.name, w.shape[0]) for w in ws], k)
            return [y.view(*x.shape[:-1], w.shape[0]) for y, w in zip(ys, ws)]
        return [self.linear(x, w) for w in ws]

    def attention(self, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: AttnMask) -> torch.Tensor:
        scale = 1.0 / math.sqrt(q.shape[-1])
        return attend(q, keys, vals, mask, lambda *a: matmul_kernel(*a, scale))


def _cuda_requested(req: str) -> bool:
    return req == "cuda" or req.startswith("cuda:")


def select_device(requested: str = "auto", *, threads: int | None = None, kv_dtype: str = "auto",
                  act_dtype: torch.dtype = torch.float16, reference: bool = False) -> Device:
    """The compute device for a config's `device`: "cpu", "cuda" / "cuda:N" (KernelError if unusable),
    or "auto": CUDA when torch sees a device and the kernels can load, else the CPU (one log line says
    why). `kv_dtype` is the config's kv_cache.dtype (auto: f32 on the CPU, f16 on CUDA)."""
    req = str(requested).strip().lower()
    if req == "cpu" or (req == "auto" and not torch.cuda.is_available()):
        if req == "auto":
            log.info("no CUDA device visible to torch; computing on the CPU")
        return CpuDevice(threads, kv_dtype=kv_dtype_of(kv_dtype, torch.float32))
    if req != "auto" and not _cuda_requested(req):
        raise KernelError(f"unknown device {requested!r}: expected auto, cpu, cuda or cuda:N", field="device")
    from .cuda.device import select_cuda  # only now: a CUDA device is requested or visible

    dev = select_cuda(req, act_dtype=act_dtype, reference=reference)
    if dev is None:  # auto, and CUDA is not usable after all
        return CpuDevice(threads, kv_dtype=kv_dtype_of(kv_dtype, torch.float32))
    dev.kv_dtype = kv_dtype_of(kv_dtype, torch.float16)
    return dev
