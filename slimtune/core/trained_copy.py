"""``modules_to_save``: a module trained in full, as a trainable copy beside its frozen original.

PEFT's ``modules_to_save`` (e.g. a classification head that a new task needs from scratch). :func:`slimtune.adapt`
puts a :class:`TrainedCopy` where each such module was; the forward pass runs the copy, or the original while the
adapters are disabled. Checkpoints hold the copy's tensors under the module's own names, as PEFT writes them
(``base_model.model.score.weight`` for a module ``score``); unloading puts the trained copy in the module's place.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class TrainedCopy(nn.Module):
    """``original_module`` (frozen, kept for :func:`slimtune.disable_adapters`) and ``trained_module``, a deep copy
    of it whose parameters train."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.trained_module = copy.deepcopy(original)
        self.trained_module.requires_grad_(True)
        self.disabled = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.original_module if self.disabled else self.trained_module)(*args, **kwargs)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The copy's floating-point tensors by their names in the module (``weight``, ``bias``, ...)."""
        return {key: t.detach() for key, t in self.trained_module.state_dict().items() if t.is_floating_point()}

    @torch.no_grad()
    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (checked beforehand: the keys and shapes of :meth:`peft_tensors`) into the copy."""
        own = self.trained_module.state_dict()
        for key, tensor in tensors.items():
            own[key].copy_(tensor)
