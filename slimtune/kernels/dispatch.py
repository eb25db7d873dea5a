"""When the Triton kernels run, and how they are launched (shared by every ``*_triton.py`` module).

Triton runs for CUDA tensors in fp32 / fp16 / bf16, and on the CPU only under ``TRITON_INTERPRET=1`` (the tests:
the interpreter is right in fp32 and fp16, not in bf16); everywhere else the plain-PyTorch references run. The
kernel modules import ``triton`` at import time, so callers import them lazily, behind :func:`use_triton`.
"""
from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels take ``t``: CUDA fp32/fp16/bf16, or the CPU under ``TRITON_INTERPRET=1``."""
    if not HAS_TRITON or t.dtype not in TRITON_DTYPES:
        return False
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def launch(kernel, t: torch.Tensor, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` on ``t``'s device (switching the current device only when it differs)."""
    index = t.device.index
    if index is not None and t.is_cuda and index != torch.cuda.current_device():
        with torch.cuda.device(t.device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)
