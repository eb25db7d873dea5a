"""Online re-allocation: after some warm-up steps at uniform rank, measure again and move rank to where the model
is now most sensitive — once — keeping what the adapters have learned.

A LoRA layer's update ``ΔW = s · B A`` (rank ≤ r) moves to rank r' by its truncated SVD: with ``B = Q_B R_B`` and
``Aᵀ = Q_A R_A`` (thin QR) and ``R_B R_Aᵀ = U Σ Vᵀ`` (r × r), ``ΔW = s · (Q_B U) Σ (Q_A V)ᵀ``; the new factors keep
the ``k = min(r, r')`` largest components split evenly, ``B' = Q_B U_k √(Σ_k s/s')``, ``A' = √(Σ_k s/s') (Q_A V_k)ᵀ``,
so ``s' B' A'`` is the best rank-k approximation of ΔW and never a dense ``[d_out, d_in]`` matrix is formed. A layer
that grows keeps ΔW exactly; its new rows of A start as the method initialises them and its new columns of B at
zero (LoRA's init: the function does not change). A layer that shrinks changes its output by at most
``σ_{r'+1}(ΔW) · ‖x‖`` per token (Eckart–Young, spectral norm) — :func:`truncation_bounds` reports it. DoRA keeps its
magnitude vector as trained.

    for step, batch in enumerate(loader):
        ...; optimizer.step()
        if step + 1 == warmup_steps:
            allocation = slimtune.ranks.reallocate(model, calibration_batches, budget="2M")
            optimizer = torch.optim.AdamW(slimtune.trainable_parameters(model), lr=lr)  # new parameters
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
from torch import nn

from ..core import registry
from ..core.config import AdapterConfig
from ..core.inject import CONFIG_ATTR, adapter_modules
from ..core.module import AdapterModule
from ..errors import ConfigError
from .budget import Budget
from .calibration import LossFn
from .plan import Allocation, allocate_from
from .sensitivity import estimate_sensitivity

ONLINE_METHODS = ("lora", "dora")


@dataclasses.dataclass
class Factors:
    """``ΔW = scaling · B A`` in its SVD form: ``left [d_out, k]``, ``sigma [k]`` (descending), ``right [k, d_in]``."""

    left: torch.Tensor
    sigma: torch.Tensor
    right: torch.Tensor
    scaling: float


def svd_factors(adapter: AdapterModule) -> Factors:
    """The SVD of a LoRA layer's update from its factors alone (float64; see the module docstring)."""
    a = adapter.lora_A.detach().double().reshape(adapter.lora_A.shape[0], -1)  # [r, d_in]
    b = adapter.lora_B.detach().double().reshape(adapter.lora_B.shape[0], -1)  # [d_out, r]
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.t())
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.t())
    return Factors(q_b @ u, sigma, vh @ q_a.t(), float(adapter.scaling))


def truncation_bounds(model: nn.Module, config: AdapterConfig) -> dict[str, float]:
    """Per adapted layer, ``σ_{r'+1}(ΔW)``: the largest change of its output per unit ``‖x‖`` that moving to the rank
    ``config`` gives it causes (0 for a layer that keeps or grows its rank)."""
    out = {}
    for name, adapter in adapter_modules(model):
        factors = svd_factors(adapter)
        rank = config.rank_for(name)
        out[name] = float(factors.sigma[rank] * abs(factors.scaling)) if rank < factors.sigma.numel() else 0.0
    return out


def _check(model: nn.Module) -> AdapterConfig:
    config = getattr(model, CONFIG_ATTR, None)
    adapters = adapter_modules(model)
    if not adapters or not isinstance(config, AdapterConfig):
        raise ConfigError(f"{type(model).__name__} has no slimtune adapters: online re-allocation needs a model "
                          "adapted with slimtune.adapt")
    if config.method_name() not in ONLINE_METHODS:
        raise ConfigError(f"online re-allocation keeps the update through a truncated SVD of B·A; "
                          f"{config.method_name()} adapters have no such factors (supported: LoRA, DoRA)")
    for name, adapter in adapters:
        if adapter.merged:
            raise ConfigError(f"{name} is merged: unmerge the model before re-allocating its ranks")
        if getattr(adapter.base_layer, "groups", 1) != 1:
            raise ConfigError(f"{name}: a grouped convolution's LoRA update is not one matrix; cannot move its rank")
    return config


@torch.no_grad()
def _moved(adapter: AdapterModule, new: AdapterModule) -> AdapterModule:
    """``new`` (built at its rank) holding ``adapter``'s update truncated to that rank, and its other parameters."""
    factors = svd_factors(adapter)
    k = min(new.lora_A.shape[0], factors.sigma.numel())
    split = (factors.sigma[:k] * (factors.scaling / new.scaling)).sqrt()
    b = new.lora_B.reshape(new.lora_B.shape[0], -1)
    a = new.lora_A.reshape(new.lora_A.shape[0], -1)
    b[:, :k] = (factors.left[:, :k] * split).to(b.dtype)
    b[:, k:] = 0
    a[:k] = (split[:, None] * factors.right[:k]).to(a.dtype)
    for key, param in adapter.named_parameters(recurse=False):  # DoRA's magnitude
        if key not in ("lora_A", "lora_B"):
            getattr(new, key).copy_(param)
    return new


def transfer_ranks(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Rebuild every adapter of ``model`` whose rank or alpha ``config`` changes, keeping its update (truncated
    where the rank shrinks); ``config`` becomes the model's. Returns the names of the rebuilt layers; their
    parameters are new objects, so build the optimizer again."""
    old = _check(model)
    if type(config) is not type(old) or config.method_name() != old.method_name():
        raise ConfigError(f"the new config ({type(config).__name__}, {config.method_name()}) must be of the model's "
                          f"method ({type(old).__name__}, {old.method_name()})")
    rebuilt = []
    for name, adapter in adapter_modules(model):
        if config.rank_for(name) == adapter.r and config.alpha_for(name) == adapter.alpha:
            continue
        new = registry.build_adapter(config, name, adapter.base_layer).train(adapter.training)
        model.set_submodule(name, _moved(adapter, new))
        rebuilt.append(new)
    registry.finalize(config, model, rebuilt)
    setattr(model, CONFIG_ATTR, config)
    return [name for name, adapter in adapter_modules(model) if any(adapter is r for r in rebuilt)]


def reallocate(model: nn.Module, batches: Iterable[Any], budget: int | str | Budget | None = None,
               method: str = "gradient", allocator: str = "greedy", *, loss_fn: LossFn | None = None,
               **options: Any) -> Allocation:
    """Measure the adapted ``model`` at its current weights (each layer's effective weight ``W + ΔW``), allocate
    ``budget`` (default: what the adapters cost now) and move every adapter to its new rank
    (:func:`transfer_ranks`). ``options``: ``min_rank``, ``max_rank``, ``granule``, ``keep_scale`` (see
    :func:`.plan.plan_ranks`) and the estimator's ``damping``, ``probes``, ``eps``, ``seed``. Returns the
    :class:`~.plan.Allocation`; rebuild the optimizer after."""
    config = _check(model)
    measure = {k: options.pop(k) for k in ("damping", "probes", "eps", "seed") if k in options}
    if budget is None:
        budget = Budget(sum(p.numel() for _, a in adapter_modules(model) for p in a.parameters() if p.requires_grad))
    sensitivities = estimate_sensitivity(model, batches, config, method, loss_fn=loss_fn, **measure)
    base = dataclasses.replace(config, rank_pattern={}, alpha_pattern={})
    allocation = allocate_from(model, base, sensitivities, budget, allocator, method=method, **options)
    transfer_ranks(model, allocation.config)
    return allocation
