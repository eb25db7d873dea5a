"""What every adapter module shares: the frozen base layer, merge/unmerge, enable/disable, PEFT tensor I/O.

Each method (``slimtune/methods/<name>/``) subclasses :class:`AdapterModule` and provides ``forward``,
``delta_weight`` (the dense update, used only to merge) and ``peft_parameters`` (PEFT key suffix ->
parameter).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError, SlimtuneError
from .frozen import quantized_handle
from .rebuild import keeps_recipes

_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bit equality (so that -0.0 vs 0.0 and NaN payloads count as different)."""
    view = _INT_VIEW.get(a.dtype)
    if view is None:
        return a == b
    return a.contiguous().view(view) == b.contiguous().view(view)


class AdapterModule(nn.Module):
    """A ``base_layer`` (frozen by :func:`slimtune.adapt`) plus trainable adapter parameters.

    ``merged``: the update is folded into ``base_layer.weight`` and ``forward`` runs the base alone.
    ``disabled``: ``forward`` runs the base alone (see :func:`slimtune.disable_adapters`).
    """

    #: set by a class (beside its own ``forward``) whose Functions keep an offered input's recipe themselves
    #: (:func:`~.rebuild.keep_input`), so that its ``forward`` runs without :func:`~.rebuild.keeps_recipes`' hooks
    keeps_recipes_itself = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Each method's ``forward`` keeps a recipe for its input where a block offers one
        (:func:`~.rebuild.keeps_recipes`: the input is a LayerNorm's, GEGLU's or GroupNorm + SiLU's output the block
        can rebuild from tensors kept anyway), unless the class sets ``keeps_recipes_itself`` beside that
        ``forward`` (a subclass with a ``forward`` of its own is wrapped again)."""
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__ and not cls.__dict__.get("keeps_recipes_itself", False):
            cls.forward = keeps_recipes(cls.__dict__["forward"])

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged = False
        self.disabled = False
        self._merge_fix: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- to be provided by each method -------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The dense additive update in the layout of ``base_layer.weight``, float32 or wider. Merge only."""
        raise NotImplementedError

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with the adapter folded in (``weight`` in float32 or wider). Additive by default."""
        return weight + self.delta_weight().to(device=weight.device, dtype=weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`merged_weight`, up to rounding."""
        return weight - self.delta_weight().to(device=weight.device, dtype=weight.dtype)

    def peft_parameters(self) -> dict[str, nn.Parameter]:
        """PEFT key suffix (e.g. ``"lora_A.weight"``) -> the parameter stored under it."""
        raise NotImplementedError

    def explain(self, x: torch.Tensor) -> list:
        """The variants this layer chooses for a training input like ``x`` (:class:`slimtune.core.explain.Choice`
        each, with every option's FLOP and byte counts); empty where the layer always takes one path."""
        return []

    # -- merge / unmerge -----------------------------------------------------------------------------
    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight, remembering what an exact restore needs.

        ``unmerge`` applies the inverse again; the few elements where rounding keeps that from giving
        back the original bits are recorded here (index + original value), so the restore is bit-exact in
        every dtype as long as the adapter parameters are unchanged in between.
        """
        if self.merged:
            raise SlimtuneError(f"{type(self).__name__} is already merged")
        if quantized_handle(self.base_layer) is not None:
            raise SlimtuneError(
                f"{type(self).__name__} sits on a 4-bit base layer, which cannot hold a merged update: call "
                "slimtune.dequantize(model) first (dense base layers), then merge")
        weight = self.base_weight
        compute = torch.promote_types(weight.dtype, torch.float32)
        merged = self.merged_weight(weight.to(compute)).to(weight.dtype)
        restored = self.unmerged_weight(merged.to(compute)).to(weight.dtype)
        wrong = (~_same_bits(restored, weight)).flatten().nonzero().squeeze(1)
        self._merge_fix = (wrong, weight.flatten()[wrong].clone())
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise SlimtuneError(f"{type(self).__name__} is not merged")
        weight = self.base_weight
        compute = torch.promote_types(weight.dtype, torch.float32)
        restored = self.unmerged_weight(weight.to(compute)).to(weight.dtype)
        if self._merge_fix is not None:
            index, values = self._merge_fix
            restored.view(-1)[index] = values
        weight.copy_(restored)
        self._merge_fix = None
        self.merged = False

    # -- PEFT tensors -------------------------------------------------------------------------------
    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {key: p.detach() for key, p in self.peft_parameters().items()}

    def check_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Raise :class:`CheckpointError` unless ``tensors`` has exactly this adapter's keys and shapes."""
        expected = self.peft_parameters()
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise CheckpointError(f"checkpoint has no tensor for {name}: missing {', '.join(missing)}")
        for key, param in expected.items():
            got = tensors[key]
            if tuple(got.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"shape mismatch for {name}.{key}: checkpoint has {tuple(got.shape)}, "
                    f"the model needs {tuple(param.shape)} (different rank or base layer size?)")
            if not (got.is_floating_point()):
                raise CheckpointError(f"{name}.{key} has dtype {got.dtype}; a floating-point tensor is needed")

    @torch.no_grad()
    def load_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.merged:
            raise SlimtuneError(f"{name} is merged: unmerge before loading adapter weights")
        self.check_peft_tensors(name, tensors)
        for key, param in self.peft_parameters().items():
            param.copy_(tensors[key])
