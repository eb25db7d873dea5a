"""The Hessian sensitivity: Hutchinson's estimate of each layer's Hessian-block trace ``tr(∂²L/∂W_i²)``.

For a Rademacher probe ``v`` (independent ±1 entries, one ``v_i`` per layer) ``E[v_iᵀ (H v)_i] = tr(H_ii)``: the
other layers' probes only add zero-mean terms, so one probe serves every layer at once. The Hessian-vector product
comes from a central difference of gradients,

    v_iᵀ (H v)_i ≈ (v_i · ∂L/∂W_i(W + εv) − v_i · ∂L/∂W_i(W − εv)) / (2 ε_i),   ε_i v_i = the perturbation of W_i,

exact up to ``O(ε²)`` (third derivatives). Each pass is an ordinary forward and backward: the perturbation
``±ε_i v_i`` enters as ``y ± ε_i · layer(x; v_i)`` (a forward hook; ``v_i`` is regenerated from its seed wherever it
is needed — under activation checkpointing in backward — so no probe is kept), and ``v_i · ∂L/∂W_i = Σ g ⊙
layer(x; v_i)`` is reduced in the layer's backward (:mod:`.taps`). Memory is therefore a LoRA step's plus one
layer's probe; a double-backward Hessian-vector product (``create_graph=True``) would keep the whole first backward
graph instead. ``ε_i = eps · ‖W_i‖_F / √numel`` (so ``‖ε_i v_i‖ = eps · ‖W_i‖``). Float32 or float64 activations
are required: a difference of bf16 gradients at that scale is noise.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .calibration import LayerSensitivity, LossFn, backward_loss
from .layers import LayerView
from .taps import frozen_eval, tapped

_PRECISE = (torch.float32, torch.float64)


def rademacher(shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A ±1 tensor drawn from its own generator seeded with ``seed`` (the same tensor for the same seed)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(0.5, generator=gen).mul_(2).sub_(1)


def probe_seed(seed: int, draw: int, layer: int, layers: int) -> int:
    """The seed of layer ``layer``'s probe in draw ``draw`` (one draw per batch and probe)."""
    return (seed * 1_000_003 + draw * layers + layer) % (2**63 - 1)


def _check_precise(view: LayerView, x: torch.Tensor) -> None:
    if x.dtype not in _PRECISE:
        raise ConfigError(f"method='hessian' takes central differences of gradients, which needs float32 or "
                          f"float64 activations; {view.name} computes in {x.dtype}: estimate on a float32 copy "
                          "(model.float()) or use method='gradient' / 'data'")


def hutchinson_traces(model: nn.Module, layers: list[LayerView], batches: Iterable[Any], loss_fn: LossFn | None,
                      probes: int = 2, eps: float = 1e-3, seed: int = 0) -> list[LayerSensitivity]:
    """``tr(H_ii)`` per layer, averaged over ``probes`` probes on every batch; a negative estimate (a layer at a
    saddle, or noise) is reported as 0. The model is in eval mode with its parameters frozen (restored after)."""
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ConfigError(f"probes must be a positive integer, got {probes!r}")
    if not 0 < eps < 1:
        raise ConfigError(f"eps (the relative perturbation) must be in (0, 1), got {eps!r}")
    index = {v.name: i for i, v in enumerate(layers)}
    scale = {v.name: eps * (v.weight_norm() or 1.0) / math.sqrt(v.numel) for v in layers}
    sums = {v.name: 0.0 for v in layers}
    draws = 0
    with frozen_eval(model):
        for batch in batches:
            for _ in range(probes):
                seeds = {v.name: probe_seed(seed, draws, index[v.name], len(layers)) for v in layers}
                dots = {sign: _directional_gradients(model, layers, batch, loss_fn, seeds, scale, sign)
                        for sign in (1.0, -1.0)}
                for name in sums:
                    sums[name] += (dots[1.0].get(name, 0.0) - dots[-1.0].get(name, 0.0)) / (2 * scale[name])
                draws += 1
    if draws == 0:
        raise ConfigError("no calibration batches: pass at least one batch")
    return [LayerSensitivity(v.name, v.d_out, v.d_in, max(sums[v.name] / draws, 0.0)) for v in layers]


def _directional_gradients(model: nn.Module, layers: list[LayerView], batch: Any, loss_fn: LossFn | None,
                           seeds: dict[str, int], scale: dict[str, float], sign: float) -> dict[str, float]:
    """``v_i · ∂L/∂W_i`` at ``W + sign · ε v`` for every layer (one forward and backward)."""
    dots: dict[str, float] = {}

    def probe(view: LayerView, x: torch.Tensor) -> torch.Tensor:
        return rademacher(view.weight_shape, seeds[view.name], x.device, x.dtype)

    def perturb(view: LayerView, x: torch.Tensor) -> torch.Tensor:
        _check_precise(view, x)

        def term(inp: torch.Tensor) -> torch.Tensor:
            return view.apply(inp, probe(view, inp)) * (sign * scale[view.name])

        if x.requires_grad:  # regenerate the probe in backward rather than keep it
            return checkpoint(term, x, use_reentrant=False)
        with torch.no_grad():
            return term(x)

    def on_grad(view: LayerView, x: torch.Tensor, g: torch.Tensor) -> None:
        dot = float((g.double() * view.apply(x, probe(view, x)).double()).sum())
        dots[view.name] = dots.get(view.name, 0.0) + dot

    with tapped(layers, on_grad, perturb):
        backward_loss(model, batch, loss_fn)
    return dots
