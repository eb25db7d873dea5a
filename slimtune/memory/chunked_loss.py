"""The causal-LM loss without the ``[tokens, vocab]`` logits: the output head and cross entropy, chunk by chunk.

A language model's logits are its largest activation (Llama-3's vocabulary is 128,256 wide: at 8,192 tokens the
bf16 logits take 2 GiB, their float32 copy, log-softmax and its gradient 4 GiB each). :class:`LinearCrossEntropy`
computes ``Σ CE(h Wᵀ + b, y)`` over chunks of rows and, in the same pass, the gradients: with respect to ``h``
(``(softmax − onehot) W``, ``[rows, hidden]``) and, when the head trains, with respect to ``W``
(``Σ_chunks (softmax − onehot)ᵀ h``, accumulated into one ``[vocab, hidden]`` buffer in the weight's dtype) and
``b`` (float32). Only those gradients are kept for backward and one chunk of logits exists at a time, forward
and backward. The loss is a scalar, so backward only scales them by the incoming gradient: exact.

Each chunk's row losses and ``d CE / d logits`` come from one Triton launch on CUDA
(:mod:`.triton_cross_entropy`: two reads of the float32 logits, one write of the gradient in the model's dtype),
or from :func:`softmax_cross_entropy_reference` elsewhere, while ``torch.compile`` traces, and when a bias trains
(its gradient sums the float32 softmax).

Numerics: the softmax in float32, as transformers' loss; the logits are the head's GEMM accumulated in float32
and, on CUDA, written in float32 by the GEMM itself (no rounded copy in the model's dtype: a little more exact than
transformers' logits-then-upcast, and one pass and one ``[rows, V]`` buffer less per chunk). A head tied
to the input embeddings needs nothing special: its weight's gradient (when it trains) reaches the shared
parameter through autograd, which adds it to the embedding's.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.compute import mm_fp32
from ..core.triton import use_triton
from ..errors import ConfigError

#: the label value that carries no loss (transformers' and PyTorch's ``ignore_index``)
IGNORE_INDEX = -100
#: float32 logits per chunk (elements): 2^26 = 256 MiB per chunk
CHUNK_ELEMENTS = 1 << 26
REDUCTIONS = ("sum", "mean")
#: model families whose logits are ``head(last hidden state)`` and nothing more (no soft-capping or scale)
PLAIN_HEAD_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2")


def softmax_cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row losses [rows], d loss / d logits [rows, vocab])``, both float32, for float32 ``logits`` ``[rows,
    vocab]`` (overwritten: the gradient takes their memory), valid class indices ``labels`` ``[rows]`` and ``keep``
    ``[rows]`` bool (rows with False: zero loss and zero gradient) or None. The reference of
    :func:`~.triton_cross_entropy.softmax_cross_entropy_triton`."""
    lse = torch.logsumexp(logits, dim=-1)
    row_loss = lse - logits.gather(1, labels[:, None]).squeeze(1)
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    grad.scatter_add_(1, labels[:, None], torch.full_like(lse[:, None], -1.0))  # d CE / d logits
    if keep is not None:
        row_loss = row_loss * keep
        grad.mul_(keep[:, None])
    return row_loss, grad


class LinearCrossEntropy(torch.autograd.Function):
    """``Σ_i CE(hidden_i Wᵀ + b, labels_i)`` (float32 scalar). ``hidden`` ``[N, H]``, ``weight`` ``[V, H]``,
    ``bias`` ``[V]`` or None, ``labels`` ``[N]`` int64, ``chunk`` rows at a time. ``masked`` (on CUDA): rows labelled
    :data:`IGNORE_INDEX` are among them and carry no loss and no gradient (shapes that do not depend on the labels,
    as a CUDA graph's capture needs); otherwise every label is valid (:func:`shifted_targets` dropped the rest).
    ``kernel``: False keeps to the plain-PyTorch chunk where the Triton kernel would run (a benchmark's switch).
    Saves the gradients of the inputs that need one (computed in forward): ``[N, H]``, ``[V, H]``, ``[V]``;
    nothing ``[N, V]``."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                chunk: int, masked: bool = False, kernel: bool = True) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)  # a head of another dtype: cast once
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None  # autograd casts it to the weight's dtype
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if need_b else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            keep = None
            if masked:
                keep = y != IGNORE_INDEX
                y = torch.where(keep, y, 0)  # an ignored row's index: any class (its loss and gradient are zeroed)
            logits = mm_fp32(h, w.t())  # [c, V] fp32 (on CUDA written by the GEMM itself: no rounded copy)
            if bias is not None:
                logits += bias
            if not (need_h or need_w or need_b):
                row_loss = torch.logsumexp(logits, dim=-1) - logits.gather(1, y[:, None]).squeeze(1)
                total += (row_loss if keep is None else row_loss * keep).sum()
                continue
            if kernel and grad_b is None and use_triton(logits):  # one launch: row losses, gradient in h's dtype
                from .triton_cross_entropy import softmax_cross_entropy_triton

                row_loss, d_logits = softmax_cross_entropy_triton(logits, y, keep, h.dtype)
            else:
                row_loss, probs = softmax_cross_entropy_reference(logits, y, keep)
                if grad_b is not None:
                    grad_b += probs.sum(0)
                d_logits = probs.to(h.dtype)
            total += row_loss.sum()
            if grad_h is not None:
                torch.matmul(d_logits, w, out=grad_h[start:start + chunk])
            if grad_w is not None:
                grad_w.addmm_(d_logits.t(), h)
            del logits, d_logits
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors

        def scaled(grad: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
            return None if grad is None else (grad * grad_total.to(grad.dtype)).to(dtype or grad.dtype)

        return scaled(grad_h), scaled(grad_w), scaled(grad_b, ctx.bias_dtype), None, None, None, None


def plain_head(model: nn.Module) -> bool:
    """Whether ``model``'s loss can skip its logits: a transformers causal LM of a listed family whose output head
    is a plain ``nn.Linear`` (frozen, trained or tied to the embeddings) on its base model's last hidden state."""
    config = getattr(model, "config", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return (getattr(config, "model_type", None) in PLAIN_HEAD_FAMILIES and type(head) is nn.Linear
            and getattr(model, "base_model", model) is not model)


def final_hidden_state(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """A :func:`plain_head` model's last hidden state ``[B, T, H]`` for ``input_ids`` ``[B, T]``: the model's own
    forward runs (its hooks too: an adapter's per-pass caches are reset by the root's pre-hook) with the logits
    of the last position only (``logits_to_keep=1``), and its base model's output is taken by a forward hook."""
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: object, output: object) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        captured.append(hidden if hidden is not None else output[0])  # type: ignore[index]

    handle = model.base_model.register_forward_hook(keep)
    try:
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


def model_causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                         reduction: str = "sum") -> torch.Tensor:
    """The causal-LM loss of a :func:`plain_head` model on ``input_ids`` ``[B, T]``: its last hidden state
    (:func:`final_hidden_state`) through :func:`chunked_causal_lm_loss` (no ``[B·T, V]`` logits)."""
    return chunked_causal_lm_loss(final_hidden_state(model, input_ids), model.get_output_embeddings(), labels,
                                  reduction)


def chunk_rows(vocab: int) -> int:
    """Rows per chunk so that a chunk's float32 logits hold about :data:`CHUNK_ELEMENTS` elements."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def shifted_targets(hidden: torch.Tensor, labels: torch.Tensor, drop: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden rows [n, H], next-token labels [n])`` of the positions that carry loss: position t predicts label
    t+1; positions whose next label is -100 are dropped (``drop=False``: kept, for a shape that does not depend on
    the labels). ``hidden`` ``[B, T, H]``, ``labels`` ``[B, T]``."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    if y.is_meta or not drop:  # the estimator's simulated step: no values, every position counts (the most memory)
        return h, y
    keep = y != IGNORE_INDEX
    return h[keep], y[keep]


def chunked_causal_lm_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, reduction: str = "sum",
                           chunk: int | None = None) -> torch.Tensor:
    """Next-token cross entropy (float32 scalar) of final hidden states ``hidden`` ``[B, T, H]`` through the
    output ``head`` (an ``nn.Linear``-like module with ``weight`` ``[V, H]`` and ``bias``; frozen, trainable or
    tied to the input embeddings) against ``labels`` ``[B, T]`` (int64, -100: no loss), without the full
    ``[B·T, V]`` logits forward or backward.

    ``reduction``: ``"sum"`` over the targets, or ``"mean"`` (transformers' ``model(..., labels=...).loss``;
    0 when no position has a target). ``chunk``: rows per chunk (default: about 256 MiB of float32 logits).
    A label outside ``[0, V)`` other than -100 raises (an index error) on the CPU and makes the loss NaN on CUDA
    (checking it there would wait on the host every step).
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown reduction {reduction!r}; choose from {', '.join(REDUCTIONS)}")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ConfigError(f"the output head {type(head).__name__} has no 2-D weight: the chunked loss needs a "
                          "linear head")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2] or hidden.shape[-1] != weight.shape[1]:
        raise ConfigError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must be [B, T, H] and "
                          f"[B, T] with H = the head's input width {weight.shape[1]}")
    rows = chunk if chunk is not None else chunk_rows(weight.shape[0])
    # On CUDA the ignored rows stay, masked: dropping them (a boolean index) reads their count back to the host, a
    # synchronisation in the middle of the step that stops the host from queueing ahead of the GPU (and that a CUDA
    # graph's capture cannot hold). The price: the head's GEMMs run for the ignored rows too.
    masked = hidden.is_cuda
    h, y = shifted_targets(hidden, labels, drop=not masked)
    loss = LinearCrossEntropy.apply(h, weight, getattr(head, "bias", None), y, rows, masked)
    if reduction == "sum":
        return loss
    return loss / ((y != IGNORE_INDEX).sum().clamp_min(1) if masked else max(1, y.numel()))
