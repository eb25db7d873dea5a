"""The causal-LM loss without the ``[tokens, vocab]`` logits: the output head and cross entropy, chunk by chunk.

A language model's logits are its largest activation (Llama-3's vocabulary is 128,256 wide: at 8,192 tokens the
bf16 logits take 2 GiB, their float32 copy, log-softmax and its gradient 4 GiB each). :class:`LinearCrossEntropy`
computes ``Σ CE(h Wᵀ + b, y)`` over chunks of rows and, in the same pass, the gradient with respect to ``h``
(``(softmax − onehot) W``), so that only ``[rows, hidden]`` is kept for backward and one chunk of logits exists
at a time. The head must be frozen (it is for adapter training). Numerics follow transformers' loss: logits in
the model's dtype, upcast to float32 for the softmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE

#: float32 logits per chunk (elements): 2^26 = 256 MiB per chunk
CHUNK_ELEMENTS = 1 << 26


class LinearCrossEntropy(torch.autograd.Function):
    """``Σ_i CE(hidden_i Wᵀ + b, labels_i)`` (float32 scalar). ``hidden`` ``[N, H]``, ``weight`` ``[V, H]`` (frozen),
    ``bias`` ``[V]`` or None, ``labels`` ``[N]`` int64, all valid (no ignored rows). Saves ``d loss / d hidden``
    ``[N, H]`` (computed in forward), nothing ``[N, V]``."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            logits = F.linear(h, weight, bias).float()  # [c, V]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(len(y), device=y.device), y] -= 1.0
                torch.matmul(probs.to(h.dtype), weight, out=grad[start:start + chunk])
            del logits
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad.float() * grad_total).to(grad.dtype), None, None, None, None


def chunk_rows(vocab: int) -> int:
    """Rows per chunk so that a chunk's float32 logits hold about :data:`CHUNK_ELEMENTS` elements."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def shifted_targets(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden rows [n, H], next-token labels [n])`` of the positions that carry loss: position t predicts label
    t+1; positions whose next label is -100 are dropped. ``hidden`` ``[B, T, H]``, ``labels`` ``[B, T]``."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE
    return h[keep], y[keep]


def fused_causal_lm_loss(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy (float32) of final hidden states ``[B, T, H]`` through the frozen ``head``."""
    h, y = shifted_targets(hidden, labels)
    return LinearCrossEntropy.apply(h, head.weight, head.bias, y, chunk_rows(head.weight.shape[0]))


def logits_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy (float32) from the model's logits ``[B, T, V]``."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
                           reduction="sum")
