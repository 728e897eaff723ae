"""Compute devices. Everything above this interface (stores, scheduler, model) is device-neutral."""
from __future__ import annotations

import torch

from . import cpu as cpu_kernels
from .weights import QWeight


class CpuDevice:
    """The CPU as the compute device: fused dequant-GEMV kernels on raw GGUF bytes (engine.cpu). If
    they cannot be built this raises KernelError, unless ENGINE_SLOW_FALLBACK=1 opts in (logged) to
    dequantize + torch matmul."""

    name = "cpu"

    def __init__(self, threads: int | None = None):
        self.threads = threads or torch.get_num_threads()
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

    def linear_many(self, x: torch.Tensor, ws) -> list[torch.Tensor]:
        """[linear(x, w) for w in ws] (same K: q/k/v, gate/up) in one kernel call; each result is
        bit-identical to its own linear()."""
        k = ws[0].shape[1]
        x2 = x.reshape(-1, k)  # (T, K)
        if self.kernels and len(ws) <= cpu_kernels.MAX_MANY and all(
                w.shape[1] == k and w.fmt.name in cpu_kernels.SUPPORTED for w in ws):
            ys = cpu_kernels.linear_many(x2.contiguous(), [(w.data, w.fmt.name, w.shape[0]) for w in ws], k)
            return [y.view(*x.shape[:-1], w.shape[0]) for y, w in zip(ys, ws)]
        return [self.linear(x, w) for w in ws]
