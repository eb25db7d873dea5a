"""The causal-LM losses of ``slimtune train``: through the output head without the ``[tokens, vocab]`` logits
(:mod:`slimtune.memory.chunked_loss`, frozen or trainable head), or from the model's logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..memory.chunked_loss import LinearCrossEntropy, chunk_rows, chunked_causal_lm_loss, shifted_targets
from .data import IGNORE

__all__ = ["LinearCrossEntropy", "chunk_rows", "fused_causal_lm_loss", "logits_causal_lm_loss", "shifted_targets"]


def fused_causal_lm_loss(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy (float32) of final hidden states ``[B, T, H]`` through ``head``."""
    return chunked_causal_lm_loss(hidden, head, labels, reduction="sum")


def logits_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy (float32) from the model's logits ``[B, T, V]``."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
                           reduction="sum")
