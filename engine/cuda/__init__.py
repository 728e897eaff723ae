"""CUDA kernels for GGUF weights (fused dequant-GEMV, dequantize) and their CPU verification shim.

Importing this package never needs cupy or a GPU; launches do (see `kernels.KernelLibrary`).
"""
from .kernels import FORMATS, KernelFormat, KernelLibrary, LaunchPlan, TensorDesc, plan_dequant, plan_gemv

__all__ = ["FORMATS", "KernelFormat", "KernelLibrary", "LaunchPlan", "TensorDesc", "plan_dequant", "plan_gemv"]
