"""Compute devices. Everything above this interface (stores, scheduler, model) is device-neutral."""
from __future__ import annotations

import torch

from . import cpu as cpu_kernels
from .weights import QWeight


class CpuDevice:
    """The CPU as the compute device: fused dequant-GEMV kernels on raw GGUF bytes (engine.cpu),
    falling back to dequantize + torch matmul for formats or machines the kernels do not cover."""

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
