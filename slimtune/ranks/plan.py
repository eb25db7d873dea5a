"""``allocate_ranks``: measure, allocate, and write the result as a config slimtune and PEFT both read.

    cfg = slimtune.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    cfg = slimtune.allocate_ranks(model, batches, cfg, budget="2M", method="gradient")
    slimtune.adapt(model, cfg)                # or peft.LoraConfig(r=8, lora_alpha=16, rank_pattern=cfg.rank_pattern,
                                              #                     alpha_pattern=cfg.alpha_pattern, ...)

The returned config is a copy of ``config`` with one ``rank_pattern`` entry per targeted layer — a key that matches
that layer's qualified name and no other module of the model under PEFT's rule (``re.match(rf"(.*\\.)?({key})$",
name)``; the plain name where that is already exact, else ``^`` + the escaped name) — and, with ``keep_scale``
(default, as PEFT's EVA ``adjust_scaling_factors``), an ``alpha_pattern`` that keeps each layer's scale
``alpha / r`` (rsLoRA: ``alpha / √r``) at the value ``config`` gives at rank ``config.r``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Sequence

from torch import nn

from ..core.config import AdapterConfig
from ..core.peft_format import number
from ..errors import ConfigError
from .allocate import ALLOCATORS, Candidate, allocate
from .budget import Budget, check_budget, parse_budget
from .calibration import LayerSensitivity, LossFn
from .costs import SPECTRAL_METHODS, LayerCosts, adapter_params, layer_costs
from .layers import LayerView, find_layers
from .sensitivity import METHODS, estimate_sensitivity

NO_ALPHA = ("hra",)  # methods whose alpha is unused


@dataclasses.dataclass
class LayerAllocation:
    """One layer's result: its matrix shape, sensitivity score, the rank given and the uniform rank it replaces,
    and the adapter's parameters at each."""

    name: str
    d_out: int
    d_in: int
    score: float
    rank: int
    params: int
    uniform_rank: int
    uniform_params: int


@dataclasses.dataclass
class Allocation:
    """What :func:`plan_ranks` decided: the new ``config``, one :class:`LayerAllocation` per layer (model order),
    the ``budget`` and what was ``used`` of it (in its unit), and how (``method``, ``allocator``)."""

    config: AdapterConfig
    layers: list[LayerAllocation]
    budget: Budget
    used: int
    method: str
    allocator: str

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def uniform_params(self) -> int:
        return sum(layer.uniform_params for layer in self.layers)

    def ranks(self) -> dict[str, int]:
        return {layer.name: layer.rank for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the patterns to paste into a slimtune or PEFT config, and the per-layer table."""
        cfg = self.config
        return {"adapter": cfg.method_name(), "r": cfg.r, "alpha": number(float(cfg.alpha)),
                "target_modules": cfg.target_modules, "rank_pattern": dict(cfg.rank_pattern),
                "alpha_pattern": dict(cfg.alpha_pattern), "method": self.method, "allocator": self.allocator,
                "budget": self.budget.amount, "budget_unit": self.budget.unit, "used": self.used,
                "params": self.params, "uniform_params": self.uniform_params,
                "layers": [dataclasses.asdict(layer) for layer in self.layers]}


def pattern_key(name: str, names: Sequence[str]) -> str:
    """A ``rank_pattern`` key that matches module ``name`` and none of the other ``names`` under PEFT's rule."""
    if re.fullmatch(r"[\w.]+", name) and not any(
            other != name and re.match(rf"(.*\.)?({name})$", other) for other in names):
        return name
    return "^" + re.escape(name)


def scaled_alpha(config: AdapterConfig, rank: int) -> float | int:
    """The alpha that keeps ``config``'s scale at rank ``rank`` (``alpha · r_i / r``; rsLoRA ``alpha · √(r_i / r)``)."""
    ratio = rank / config.r
    alpha = config.alpha * (math.sqrt(ratio) if getattr(config, "rslora", False) else ratio)
    return number(round(float(alpha), 6))


def allocated_config(config: AdapterConfig, ranks: dict[str, int], names: Sequence[str],
                     keep_scale: bool = True) -> AdapterConfig:
    """A copy of ``config`` with a ``rank_pattern`` entry per layer of ``ranks`` (and an ``alpha_pattern`` entry
    where ``keep_scale`` changes the alpha); ``names``: every module name of the model (for exact keys)."""
    rank_pattern, alpha_pattern = {}, {}
    for name, rank in ranks.items():
        key = pattern_key(name, names)
        rank_pattern[key] = rank
        if keep_scale and config.method_name() not in NO_ALPHA:
            alpha = scaled_alpha(config, rank)
            if alpha != config.alpha:
                alpha_pattern[key] = alpha
    return dataclasses.replace(config, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def _check_grid(min_rank: int | None, max_rank: int | None, granule: int) -> int:
    for field, value in (("granule", granule), ("min_rank", min_rank), ("max_rank", max_rank)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{field} must be a positive integer, got {value!r}")
    min_rank = granule if min_rank is None else min_rank
    if max_rank is not None and max_rank < min_rank:
        raise ConfigError(f"max_rank ({max_rank}) is below min_rank ({min_rank})")
    return min_rank


@dataclasses.dataclass
class _Problem:
    """What an allocation needs besides the sensitivities: the layers, their cost tables and uniform ranks, and
    the budget (checked)."""

    layers: list[LayerView]
    costs: list[LayerCosts]
    uniform: list[int]
    uniform_params: list[int]
    budget: Budget


def _problem(model: nn.Module, config: AdapterConfig, budget: int | str | Budget | None, allocator: str,
             min_rank: int | None, max_rank: int | None, granule: int) -> tuple[_Problem, int]:
    """The checked problem and the resolved ``min_rank``; every error a bad budget or option can give is raised
    here, before anything is measured."""
    if allocator not in ALLOCATORS:
        raise ConfigError(f"unknown allocator {allocator!r}; choose from {', '.join(ALLOCATORS)}")
    min_rank = _check_grid(min_rank, max_rank, granule)
    layers = find_layers(model, config)
    costs = layer_costs(config, layers, min_rank, max_rank, granule)
    uniform = [config.rank_for(v.name) for v in layers]
    uniform_params = [adapter_params(config, v, r) for v, r in zip(layers, uniform)]
    budget = Budget(sum(uniform_params)) if budget is None else parse_budget(budget)
    check_budget(budget, costs, [v.numel for v in layers], min_rank)
    return _Problem(layers, costs, uniform, uniform_params, budget), min_rank


def _decide(model: nn.Module, config: AdapterConfig, problem: _Problem, sensitivities: Sequence[LayerSensitivity],
            allocator: str, keep_scale: bool, method: str) -> Allocation:
    layers, costs, budget = problem.layers, problem.costs, problem.budget
    if [s.name for s in sensitivities] != [v.name for v in layers]:
        raise ConfigError("the sensitivities do not belong to this model and config (their layer names differ)")
    if not any(s.score > 0 for s in sensitivities):
        raise ConfigError("every layer measured a sensitivity of 0: the loss does not change with these layers on "
                          "the calibration batches (check the batches' labels and the targets)")
    spectral = config.method_name() in SPECTRAL_METHODS
    candidates = [Candidate(c, s.score, s.spectrum if spectral else None) for c, s in zip(costs, sensitivities)]
    ranks = allocate(candidates, budget, allocator)
    new = allocated_config(config, {v.name: r for v, r in zip(layers, ranks)},
                           [n for n, _ in model.named_modules()], keep_scale)
    rows = [LayerAllocation(v.name, v.d_out, v.d_in, s.score, r, c.params_at(r), u, up)
            for v, s, r, c, u, up in zip(layers, sensitivities, ranks, costs, problem.uniform, problem.uniform_params)]
    used = sum(budget.cost(c, r) for c, r in zip(costs, ranks))
    return Allocation(new, rows, budget, used, method, allocator)


def allocate_from(model: nn.Module, config: AdapterConfig, sensitivities: Sequence[LayerSensitivity],
                  budget: int | str | Budget | None = None, allocator: str = "greedy", *, min_rank: int | None = None,
                  max_rank: int | None = None, granule: int = 8, keep_scale: bool = True,
                  method: str = "given") -> Allocation:
    """Allocate from measured ``sensitivities`` (one per layer of :func:`.layers.find_layers`, in order): the part
    of :func:`plan_ranks` after measuring, to try several budgets or allocators on one measurement."""
    problem, _ = _problem(model, config, budget, allocator, min_rank, max_rank, granule)
    return _decide(model, config, problem, sensitivities, allocator, keep_scale, method)


def plan_ranks(model: nn.Module, batches: Iterable[Any], config: AdapterConfig,
               budget: int | str | Budget | None = None, method: str = "gradient", allocator: str = "greedy", *,
               min_rank: int | None = None, max_rank: int | None = None, granule: int = 8, keep_scale: bool = True,
               loss_fn: LossFn | None = None, damping: float = 0.01, probes: int = 2, eps: float = 1e-3,
               seed: int = 0) -> Allocation:
    """Measure each targeted layer's sensitivity on ``batches`` and spend ``budget`` where it is largest.

    ``budget``: trainable adapter parameters (``12_000_000``, ``"12M"``) or bytes of adapter weights (``"48MB"``);
    default: what ``config`` costs as given (the same budget as uniform ranks). ``method``: ``"gradient"``,
    ``"hessian"`` or ``"data"`` (:mod:`.sensitivity`); ``allocator``: ``"greedy"`` or ``"closed-form"``
    (:mod:`.allocate`). Ranks are ``min_rank`` (default ``granule``) or multiples of ``granule`` up to ``max_rank``
    (default each layer's full rank). ``loss_fn(model, batch)``: the loss (default ``model(**batch).loss``).
    ``damping``, ``probes``, ``eps``, ``seed``: see :func:`.sensitivity.estimate_sensitivity`.

    Raises :class:`~slimtune.ConfigError` — before measuring anything — for a budget that is not positive, larger
    than fully fine-tuning the targeted weights, or smaller than every layer at ``min_rank``.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown sensitivity method {method!r}; choose from {', '.join(METHODS)}")
    problem, _ = _problem(model, config, budget, allocator, min_rank, max_rank, granule)
    sensitivities = estimate_sensitivity(model, batches, config, method, loss_fn=loss_fn, damping=damping,
                                         probes=probes, eps=eps, seed=seed)
    return _decide(model, config, problem, sensitivities, allocator, keep_scale, method)


def allocate_ranks(model: nn.Module, batches: Iterable[Any], config: AdapterConfig,
                   budget: int | str | Budget | None = None, method: str = "gradient", **options: Any
                   ) -> AdapterConfig:
    """A copy of ``config`` whose ``rank_pattern`` (and ``alpha_pattern``) spend ``budget`` where the model is
    most sensitive; see :func:`plan_ranks` for the options and :class:`Allocation` for the full result."""
    return plan_ranks(model, batches, config, budget, method, **options).config


__all__ = ["Allocation", "LayerAllocation", "LayerCosts", "LayerView", "allocate_from", "allocate_ranks",
           "allocated_config", "pattern_key", "plan_ranks", "scaled_alpha"]
