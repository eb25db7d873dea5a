"""What every sensitivity estimator shares: the calibration pass (a batch's loss and its backward) and the record
of one layer's result."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError

LossFn = Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> scalar loss


@dataclasses.dataclass
class LayerSensitivity:
    """One layer's measured sensitivity: ``score`` (the scalar s) and, for ``"gradient"`` / ``"data"``, the
    ``spectrum`` — the energy ``σ_j²`` each further rank captures, descending, float64 ``[min(d_out, d_in)]``."""

    name: str
    d_out: int
    d_in: int
    score: float
    spectrum: torch.Tensor | None = None


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch)`` for a mapping (``model(batch)`` otherwise) and its ``loss`` (a transformers output, a
    dict with ``"loss"``, or a scalar tensor)."""
    out = model(**batch) if isinstance(batch, Mapping) else model(batch)
    loss = out if isinstance(out, torch.Tensor) else getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigError("the model returned no scalar loss for a calibration batch: include the labels in each "
                          "batch (e.g. labels=input_ids for a language model) or pass loss_fn=(model, batch) -> loss")
    return loss.reshape(())


def backward_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> None:
    """One forward and backward pass of ``batch`` (the layers are tapped by the caller)."""
    loss = (loss_fn or default_loss)(model, batch)
    if not loss.requires_grad:
        raise ConfigError("the loss does not depend on any measured layer (is the model frozen in a no_grad "
                          "block, or do the targets miss the layers the loss passes through?)")
    if not torch.isfinite(loss.detach()):
        raise ConfigError(f"a calibration batch gave a non-finite loss ({loss.item()}): check the data and model")
    loss.backward()
