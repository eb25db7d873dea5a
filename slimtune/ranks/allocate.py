"""Spending a budget across layers: the closed form and the greedy marginal-benefit allocator.

The loss a layer keeps at rank r is modelled as

* ``s / r`` from the scalar sensitivity s alone — minimising ``Σ s_i / r_i`` subject to ``Σ c_i r_i = P`` (``c_i``:
  the layer's cost per rank, ``d_i + k_i`` for LoRA) gives the closed form ``r_i = P · √(s_i / c_i) / Σ_j √(s_j c_j)``
  (``r_i ∝ √s_i / √(d_i + k_i)``, LoRAMBo's rule), clipped to ``[min_rank, max_rank]`` by water-filling;
* ``−Σ_{j≤r} σ_j²`` where a spectrum is known (the energy the best rank-r update captures, Eckart–Young).

:func:`greedy` starts every layer at its smallest candidate rank and repeatedly grows, by one granule, the layer
whose next step gains most per unit of budget, while a step fits — so the budget is met within one step of the
cheapest layer still growing (spectral gains are concave, so the greedy is optimal up to that granule).
:func:`closed_form` rounds the closed form's continuous ranks down to the granule grid and spends what is left on
the layers furthest below their continuous rank. Ties (equal gains, e.g. a spectrum already exhausted) go to the
``s / r`` model.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Callable, Sequence

import torch

from .budget import Budget
from .costs import LayerCosts

ALLOCATORS = ("greedy", "closed-form")


@dataclasses.dataclass
class Candidate:
    """One layer's allocation problem: its cost table, scalar sensitivity and (optional) spectrum ``σ_j²``."""

    costs: LayerCosts
    score: float
    spectrum: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self._captured = None if self.spectrum is None else torch.cumsum(self.spectrum.double(), 0).tolist()

    def captured(self, rank: int) -> float:
        """``Σ_{j≤rank} σ_j²`` (needs a spectrum)."""
        assert self._captured is not None
        if not self._captured:
            return 0.0
        return self._captured[min(rank, len(self._captured)) - 1]

    def scalar_gain(self, rank: int, nxt: int) -> float:
        """What the ``s / r`` model gains from ``rank`` to ``nxt``."""
        return self.score * (1.0 / rank - 1.0 / nxt)


Priority = Callable[[int, Candidate, int, int, int], tuple[float, ...]]  # (layer, cand, rank, next, cost) -> key


def _fill(candidates: Sequence[Candidate], budget: Budget, start: list[int], priority: Priority) -> list[int]:
    """Grow layers from grid positions ``start`` one step at a time, highest ``priority`` first, while a step fits."""
    index = list(start)
    left = budget.amount - sum(budget.cost(c.costs, c.costs.ranks[i]) for c, i in zip(candidates, index))
    heap: list[tuple[tuple[float, ...], int]] = []

    def push(layer: int) -> None:
        cand, i = candidates[layer], index[layer]
        ranks = cand.costs.ranks
        if i + 1 < len(ranks):
            step = budget.cost(cand.costs, ranks[i + 1]) - budget.cost(cand.costs, ranks[i])
            key = priority(layer, cand, ranks[i], ranks[i + 1], step)
            heapq.heappush(heap, (tuple(-k for k in key) + (layer,), layer))

    for layer in range(len(candidates)):
        push(layer)
    while heap:
        _, layer = heapq.heappop(heap)
        cand = candidates[layer]
        ranks = cand.costs.ranks
        step = budget.cost(cand.costs, ranks[index[layer] + 1]) - budget.cost(cand.costs, ranks[index[layer]])
        if step > left:
            continue  # it cannot grow any more; costs only rise along its grid
        left -= step
        index[layer] += 1
        push(layer)
    return [c.costs.ranks[i] for c, i in zip(candidates, index)]


def greedy(candidates: Sequence[Candidate], budget: Budget) -> list[int]:
    """Marginal-benefit allocation (see the module docstring); one rank per candidate."""
    def priority(_layer: int, cand: Candidate, rank: int, nxt: int, step: int) -> tuple[float, float]:
        scalar = cand.scalar_gain(rank, nxt) / step
        if cand.spectrum is None:
            return scalar, scalar
        return (cand.captured(nxt) - cand.captured(rank)) / step, scalar

    return _fill(candidates, budget, [0] * len(candidates), priority)


def continuous_ranks(candidates: Sequence[Candidate], budget: Budget) -> list[float]:
    """The closed form's real-valued ranks, clipped to each layer's grid by water-filling (bisection on the common
    factor ``P / Σ√(s c)``)."""
    slopes, offsets, lows, highs, weights = [], [], [], [], []
    for cand in candidates:
        ranks = cand.costs.ranks
        lo_cost, hi_cost = budget.cost(cand.costs, ranks[0]), budget.cost(cand.costs, ranks[-1])
        slope = (hi_cost - lo_cost) / (ranks[-1] - ranks[0]) if len(ranks) > 1 else lo_cost / ranks[0]
        slopes.append(slope)
        offsets.append(lo_cost - slope * ranks[0])
        lows.append(float(ranks[0]))
        highs.append(float(ranks[-1]))
        weights.append(math.sqrt(max(cand.score, 0.0) / slope))

    def ranks_at(t: float) -> list[float]:
        return [min(max(t * w, lo), hi) for w, lo, hi in zip(weights, lows, highs)]

    def spend(t: float) -> float:
        return sum(o + s * r for o, s, r in zip(offsets, slopes, ranks_at(t)))

    top = max((hi / w for w, hi in zip(weights, highs) if w > 0), default=0.0)
    if spend(top) <= budget.amount:
        return ranks_at(top)
    low, high = 0.0, top
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if spend(mid) <= budget.amount else (low, mid)
    return ranks_at(low)


def closed_form(candidates: Sequence[Candidate], budget: Budget) -> list[int]:
    """LoRAMBo's closed form on the granule grid (see the module docstring); one rank per candidate."""
    targets = continuous_ranks(candidates, budget)
    start = [max(sum(r <= t + 1e-9 for r in c.costs.ranks) - 1, 0) for c, t in zip(candidates, targets)]
    if sum(budget.cost(c.costs, c.costs.ranks[i]) for c, i in zip(candidates, start)) > budget.amount:
        start = [0] * len(candidates)  # costs far from affine (LoKr): grow from the bottom towards the targets

    def priority(layer: int, cand: Candidate, rank: int, nxt: int, step: int) -> tuple[float, float]:
        return (targets[layer] - rank) / (nxt - rank), cand.scalar_gain(rank, nxt) / step

    return _fill(candidates, budget, start, priority)


def allocate(candidates: Sequence[Candidate], budget: Budget, allocator: str = "greedy") -> list[int]:
    """The ranks ``allocator`` (``"greedy"`` or ``"closed-form"``) gives; the budget must cover every layer's
    smallest rank (:func:`.budget.check_budget`)."""
    return greedy(candidates, budget) if allocator == "greedy" else closed_form(candidates, budget)
