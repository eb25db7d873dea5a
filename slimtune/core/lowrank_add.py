"""One LoRA member's output from its base output: ``y = base + s·h upᵀ`` (``[M, N]``; h ``[M, R]`` = ``x Aᵀ``, up = B
``[N, R]``), where a stacked chain's one GEMM gave every member's base output and h (:mod:`.stacked_rows`).

As two ops — the product, then the sum — the ``[M, N]`` product is written and read again; under ``torch.compile``
the sum is fused into the next kernel where one reads y (rotary, attention's layout copy, the residual add), but where
y itself is kept for backward (SwiGLU's gate and up, attention's v) it stands alone or writes y besides (an H100 3B
step: gate's stand-alone sum 1.07 ms, SwiGLU's forward 1.64 ms against 1.12 without adapters; RESULTS.md run 140).
The Triton kernel (:mod:`.triton_lowrank_add`) reads base and writes y once, the rank-R product in registers. It runs
for fp16 / bf16 tensors on CUDA (or the CPU interpreter), eagerly and compiled (a ``triton_op``); elsewhere
:func:`lowrank_add_reference` runs.
"""
from __future__ import annotations

import torch

from .triton import triton_takes

#: the dtypes the kernel takes (fp32 keeps cuBLAS's full-precision product: ``tl.dot`` would round to tf32)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def lowrank_add_reference(base: torch.Tensor, h: torch.Tensor, up: torch.Tensor, scaling: float) -> torch.Tensor:
    """``base + scaling · h @ up.t()`` as a new ``[M, N]`` tensor (one ``addmm``: product and sum rounded once)."""
    return torch.addmm(base, h, up.t(), alpha=scaling)


def lowrank_add_kernel_loaded(t: torch.Tensor) -> bool:
    """Whether the kernel takes tensors like ``t`` (fp16 / bf16 where Triton runs); if so, defines it (importing
    :mod:`.triton_lowrank_add` registers ``torch.ops.slimtune.lowrank_add``). Call eagerly, before tracing."""
    if t.dtype not in KERNEL_DTYPES or not triton_takes(t):
        return False
    from . import triton_lowrank_add  # noqa: F401  (registers the op)

    return True

