"""How much each layer's loss would gain from rank: sensitivity estimators over a few calibration batches.

Every estimator runs the frozen model forward and backward once per batch (the Hessian's twice per probe) with
the layers tapped (:mod:`.taps`): in each layer's backward it sees the input ``x`` and ``g = ∂L/∂y`` and reduces
them at once, so at most one layer's weight-sized tensor exists at a time and nothing else outlives a batch beyond
what a LoRA step keeps (the layer inputs). ``L`` is the batch's mean loss; ``G = ∂L/∂W = gᵀX`` is the batch's
weight gradient (:meth:`~.layers.LayerView.weight_gradient`).

* ``"gradient"`` — ``s = mean_b ‖G_b‖²_F`` (the batch-level empirical Fisher trace), with the spectrum
  ``σ_j(G_b)²`` (mean over batches): by Eckart–Young, a rank-r update along the gradient captures
  ``Σ_{j≤r} σ_j²`` of the first-order gain.
* ``"data"`` — the data-weighted version: a linear layer's loss change for an update ΔW is
  ``⟨G, ΔW⟩ + ½‖ΔW C^{1/2}‖²_F`` to second order (``C = XᵀX/N + λI``, the input covariance, damped), whose best
  rank-r update gains ``½ Σ_{j≤r} σ_j(G C^{-1/2})²`` (Eckart–Young in the data-weighted norm). With the thin SVD
  ``X = U S Vᵀ``, ``G C^{-1/2}`` has the singular values of ``gᵀU · diag(S/√(S²/N + λ))`` (``[d_out, k]``,
  ``k = min(N, d_in)``), so ``C`` is never formed. Tokens whose gradient is zero (padding, positions the loss never
  sees) are left out of ``X``. ``s = Σ_j σ_j²``.
* ``"hessian"`` — the trace of the layer's Hessian block ``tr(∂²L/∂W²)`` by Hutchinson's estimator with
  Hessian-vector products from central differences of gradients (:mod:`.hessian`); no spectrum.

Each batch's spectrum is the eigenvalues of a Gram matrix (``G Gᵀ`` or its data-weighted form), at most
``min(d_out, d_in)`` wide, decomposed in float64 on the model's device (:class:`_Accumulator`). Decomposing them on
host threads instead, off the device's stream, was tried and measured slower on an H200 (``benchmarks/RESULTS.md``,
session of 2026-12-05: the online allocation's measurement took 3.8-4.6 s that way, 1.3-1.6 s on the device).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..errors import ConfigError
from .calibration import LayerSensitivity, LossFn, backward_loss
from .hessian import hutchinson_traces
from .layers import LayerView, find_layers
from .taps import frozen_eval, tapped

METHODS = ("gradient", "hessian", "data")


class _Accumulator:
    """Running sums of scores and spectra per layer. Each batch's spectrum comes as a Gram matrix ``M Mᵀ``; its
    eigenvalues (the energies ``σ_j(M)²``) are taken in float64 at once."""

    def __init__(self, layers: list[LayerView]) -> None:
        self.layers = layers
        self.score = {v.name: 0.0 for v in layers}
        self.spectrum = {v.name: torch.zeros(min(v.d_out, v.d_in), dtype=torch.float64) for v in layers}

    def add(self, view: LayerView, gram: torch.Tensor | None) -> None:
        """Add one batch's Gram matrix (``None``: the batch gave this layer nothing)."""
        if gram is None:
            return
        spectrum = self.spectrum[view.name]
        energies = descending_eigvalsh(gram.double()).cpu()[: spectrum.numel()]
        spectrum[: energies.numel()] += energies
        self.score[view.name] += float(energies.sum())

    def totals(self, count: int) -> list[LayerSensitivity]:
        """Each layer's mean score and spectrum over ``count`` batches."""
        return [LayerSensitivity(v.name, v.d_out, v.d_in, self.score[v.name] / count, self.spectrum[v.name] / count)
                for v in self.layers]


def descending_eigvalsh(gram: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of a symmetric positive semi-definite matrix, descending, rounding below zero clamped."""
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def gram(m: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of ``m`` (``m mᵀ`` or ``mᵀ m``): its eigenvalues are ``σ_j(m)²``."""
    return m @ m.t() if m.shape[0] <= m.shape[1] else m.t() @ m


def gradient_gram(view: LayerView, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of the batch's weight gradient ``G = ∂L/∂W`` ``[d_out, d_in]``: its eigenvalues are
    ``σ_j(G)²``."""
    return gram(view.weight_gradient(x, g))


def data_gram(view: LayerView, x: torch.Tensor, g: torch.Tensor, damping: float) -> torch.Tensor | None:
    """The Gram matrix whose eigenvalues are ``σ_j(G C^{-1/2})²``, with ``C = XᵀX/N + λI``,
    ``λ = damping · tr(XᵀX/N)/d_in`` (see the module docstring; λ stays on the device: no read-back).

    The input's thin SVD ``X = U S Vᵀ`` comes from the eigendecomposition of its smaller Gram matrix: ``X Xᵀ = U S² Uᵀ``
    (``N ≤ d_in``; then ``gᵀ U S``) or ``Xᵀ X = V S² Vᵀ`` (then ``gᵀ U S = G V``)."""
    g2, xs = view.tokens(g, x)
    keep = g2.abs().amax(dim=1) > 0
    g2, xs = g2[keep], xs[keep]
    n = xs.shape[0]
    if n == 0:
        return None
    if n <= view.d_in:
        eig, u = torch.linalg.eigh(xs @ xs.t())
        eig = eig.clamp_min(0)
        projected = (g2.t() @ u) * eig.sqrt()  # gᵀ U S
    else:
        eig, v = torch.linalg.eigh(xs.t() @ xs)
        eig = eig.clamp_min(0)
        projected = (g2.t() @ xs) @ v  # G V = gᵀ U S
    eig = eig / n  # the eigenvalues of XᵀX/N
    lam = eig.sum() * (damping / view.d_in)
    return gram(projected / (eig + lam).clamp_min(torch.finfo(eig.dtype).tiny).sqrt())


def _spectral(model: nn.Module, layers: list[LayerView], batches: Iterable[Any], loss_fn: LossFn | None,
              batch_gram: Callable[[LayerView, torch.Tensor, torch.Tensor], torch.Tensor | None]
              ) -> list[LayerSensitivity]:
    count = 0
    acc = _Accumulator(layers)
    with frozen_eval(model), tapped(layers, lambda v, x, g: acc.add(v, batch_gram(v, x, g))):
        for batch in batches:
            backward_loss(model, batch, loss_fn)
            count += 1
    if count == 0:
        raise ConfigError("no calibration batches: pass at least one batch")
    return acc.totals(count)


def estimate_sensitivity(model: nn.Module, batches: Iterable[Any], config: AdapterConfig | None = None,
                         method: str = "gradient", *, loss_fn: LossFn | None = None, damping: float = 0.01,
                         probes: int = 2, eps: float = 1e-3, seed: int = 0) -> list[LayerSensitivity]:
    """The sensitivity of every layer ``config`` targets (every adapted layer of an adapted model), in model
    order. ``batches``: an iterable of model inputs (dicts are passed as keywords); ``loss_fn(model, batch)``:
    the scalar loss (default :func:`.calibration.default_loss`). ``damping``: the data method's λ relative to the
    mean input energy; ``probes``, ``eps``, ``seed``: the Hessian estimator's (:func:`.hessian.hutchinson_traces`).

    The model is used in eval mode with no parameter requiring grad; both are restored after."""
    if method not in METHODS:
        raise ConfigError(f"unknown sensitivity method {method!r}; choose from {', '.join(METHODS)}")
    layers = find_layers(model, config)
    if method == "hessian":
        return hutchinson_traces(model, layers, batches, loss_fn, probes=probes, eps=eps, seed=seed)
    if method == "gradient":
        return _spectral(model, layers, batches, loss_fn, gradient_gram)
    if method == "data":
        if not damping > 0:
            raise ConfigError(f"damping must be positive, got {damping!r}")
        grouped = [v.name for v in layers if v.is_conv and v.base.groups != 1]
        if grouped:
            raise ConfigError(f"method='data' needs the input patches of each layer; grouped convolutions have no "
                              f"such form: {', '.join(grouped[:5])} (use method='gradient' or exclude them)")
        return _spectral(model, layers, batches, loss_fn, lambda v, x, g: data_gram(v, x, g, damping))
    raise AssertionError(method)
