"""Seeing each measured layer's input and output gradient during backward, one layer at a time.

:func:`tapped` hooks every :class:`~slimtune.ranks.layers.LayerView`'s forward: the output goes through
:class:`_Tap`, an identity Function that saves the layer input ``x`` for backward (as a LoRA layer saves it) and,
when the gradient ``g = ∂L/∂y`` arrives, hands ``(x, g)`` to the caller's ``on_grad(view, x, g)``. Whatever that
computes from them (a weight gradient, a spectrum) lives only while that one layer's backward runs, and the saved
``x`` is released right after, as autograd releases any saved tensor.

No parameter needs to require grad: a scalar ``anchor`` that does makes every tapped output part of the graph,
so the frozen model is differentiated only along the activations — no weight gradient is ever accumulated.
A ``perturb(view, x)`` hook may add a term to each output first (the Hessian estimator's weight perturbation).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..core.inject import install_frozen_lean_layers
from .layers import LayerView

OnGrad = Callable[[LayerView, torch.Tensor, torch.Tensor], None]  # (layer, input x, ∂L/∂y)
Perturb = Callable[[LayerView, torch.Tensor], torch.Tensor]  # (layer, input x) -> a term added to y


class _Tap(torch.autograd.Function):
    """``y ↦ y``; backward passes ``∂L/∂y`` through and calls ``on_grad(x, ∂L/∂y)`` once. Inputs: ``y``, the
    ``anchor`` (gives the output a graph when ``y`` has none), the layer input ``x`` (saved), the callback."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, anchor: torch.Tensor, x: torch.Tensor,
                on_grad: Callable[[torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
        ctx.on_grad = on_grad
        ctx.save_for_backward(x)
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (x,) = ctx.saved_tensors
        on_grad, ctx.on_grad = ctx.on_grad, None
        with torch.no_grad():
            on_grad(x, grad)
        return (grad if ctx.needs_input_grad[0] else None), None, None, None


def _first_tensor(args: tuple[Any, ...]) -> torch.Tensor:
    if not args or not isinstance(args[0], torch.Tensor):
        raise TypeError("a measured layer must be called with its input tensor as the first positional argument")
    return args[0]


@contextlib.contextmanager
def tapped(layers: Sequence[LayerView], on_grad: OnGrad, perturb: Perturb | None = None) -> Iterator[None]:
    """Inside the block, every forward of a layer in ``layers`` is tapped (see the module docstring)."""
    anchor: list[torch.Tensor] = []
    handles = []

    def hook_for(view: LayerView) -> Callable[[nn.Module, tuple[Any, ...], Any], torch.Tensor]:
        def hook(_module: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"{view.name} returned {type(output).__name__}; rank allocation measures layers "
                                "that return one tensor")
            x = _first_tensor(args)
            if perturb is not None:
                output = output + perturb(view, x)
            if not anchor:
                anchor.append(torch.zeros((), device=output.device, requires_grad=True))
            # x itself, not a detached alias: where the lean layers save x as a recipe (slimtune.core.rebuild: a
            # gated MLP's product), they recognise the very tensor
            return _Tap.apply(output, anchor[0], x, lambda xs, g: on_grad(view, xs, g))
        return hook

    try:
        for view in layers:
            handles.append(view.site.register_forward_hook(hook_for(view)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad and every module is in eval mode inside the block (no dropout: the same
    function in every pass), with the lean frozen layers a training step runs (:mod:`slimtune.core.lean_layers`:
    the passes keep no more than a LoRA step does); all restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    remove_lean = None
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        remove_lean = install_frozen_lean_layers(model)
        yield
    finally:
        if remove_lean is not None:
            remove_lean()
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.train(mode)
