"""Triton kernel for one chunk of :class:`~.chunked_loss.LinearCrossEntropy`: each row's cross entropy and its
gradient with respect to the logits in one launch, two reads of the float32 logits and one write of the gradient
in the model's dtype (the reference, :func:`~.chunked_loss.softmax_cross_entropy_reference`, makes about seven
passes over float32 ``[rows, vocab]`` tensors: logsumexp, gather, subtract, exp, the target's −1, the cast).

Per row: ``lse = log Σ exp(z)`` (online maximum and sum in float32), ``loss = (lse − z[y]) · keep``, and
``grad = (exp(z − lse) − onehot(y)) · keep`` rounded once to the gradient's dtype; a label outside ``[0, vocab)``
gives that row a NaN loss and gradient (the reference raises an index error). Tests:
``tests/memory/test_chunked_loss.py`` under ``TRITON_INTERPRET=1`` (float32 and float16 gradients) and
``tests/memory/test_chunked_loss_cuda.py`` on a GPU (bf16). Importing this module defines the kernel, so
``TRITON_INTERPRET=1`` (CPU tests) must be set before that.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..core.triton import launch, next_power_of_2

#: logits per loop iteration of one row (float32: 16 KiB)
BLOCK = 4096


@triton.jit
def _row_kernel(logits_ptr, labels_ptr, keep_ptr, loss_ptr, grad_ptr, vocab, stride_z, stride_g,
                HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * stride_z
    offs = tl.arange(0, BLOCK)
    peak = tl.full([BLOCK], float("-inf"), tl.float32)  # per lane: the largest logit seen, and Σ exp(z − peak)
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        ok = start + offs < vocab
        z = tl.load(z_row + start + offs, mask=ok, other=float("-inf"))
        new_peak = tl.maximum(peak, z)
        rescale = tl.where(new_peak == float("-inf"), 0.0, tl.exp(peak - new_peak))
        total = total * rescale + tl.where(ok, tl.exp(z - new_peak), 0.0)
        peak = new_peak
    top = tl.max(peak, axis=0)
    lse = top + tl.log(tl.sum(total * tl.exp(peak - top), axis=0))
    label = tl.load(labels_ptr + row)
    valid = (label >= 0) & (label < vocab)
    bad = tl.where(valid, 0.0, float("nan"))  # a label outside [0, vocab): NaN loss and gradient, never a wrong value
    keep = tl.load(keep_ptr + row).to(tl.float32) if HAS_KEEP else 1.0
    tl.store(loss_ptr + row, (lse - tl.load(z_row + tl.where(valid, label, 0))) * keep + bad)
    g_row = grad_ptr + row * stride_g
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        ok = cols < vocab
        z = tl.load(z_row + cols, mask=ok, other=0.0)
        grad = (tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)) * keep + bad
        tl.store(g_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=ok)


def softmax_cross_entropy_triton(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None,
                                 grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row losses [rows] float32, d loss / d logits [rows, vocab] in grad_dtype)`` for float32 ``logits``
    ``[rows, vocab]`` (rows contiguous), class indices ``labels`` ``[rows]`` (one outside ``[0, vocab)``: that row's
    loss and gradient are NaN) and ``keep`` ``[rows]`` bool (rows with False: zero loss and zero gradient) or None
    (every row counts)."""
    logits = logits.contiguous()  # the kernel walks a row with unit stride (the GEMM's output already is)
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty((rows, vocab), dtype=grad_dtype, device=logits.device)
    if rows:
        block = min(BLOCK, next_power_of_2(vocab))
        launch(_row_kernel, logits, (rows,), logits, labels, labels if keep is None else keep, loss, grad, vocab,
               logits.stride(0), grad.stride(0), HAS_KEEP=keep is not None, BLOCK=block, num_warps=8)
    return loss, grad
