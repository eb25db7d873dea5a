"""A rank budget: trainable parameters or bytes of adapter weights, read from a number or a string, and checked
against what the layers can take."""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from ..errors import ConfigError
from .costs import LayerCosts

_PARAM_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BYTE_SCALE = {"b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BUDGET = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?(?:e[+-]?\d+)?|[+-]?\.\d+)\s*([a-z]*)\s*$", re.I)


@dataclasses.dataclass(frozen=True)
class Budget:
    """``amount`` of ``unit`` (``"params"``: trainable adapter parameters; ``"bytes"``: their bytes in the adapter
    dtype)."""

    amount: int
    unit: str = "params"

    def cost(self, layer: LayerCosts, rank: int) -> int:
        """What ``layer`` at ``rank`` spends of this budget."""
        params = layer.params_at(rank)
        return params * layer.bytes_per_param if self.unit == "bytes" else params

    def describe(self, amount: int | None = None) -> str:
        value = self.amount if amount is None else amount
        return f"{value:,} bytes" if self.unit == "bytes" else f"{value:,} parameters"


def parse_budget(value: int | float | str | Budget) -> Budget:
    """A :class:`Budget` from ``12_000_000`` or ``"12M"`` / ``"1.5k"`` (parameters; k, M, G = 10³, 10⁶, 10⁹) or
    ``"48MB"`` / ``"48MiB"`` (bytes of adapter weights; KB, MB, GB = KiB, MiB, GiB). Must be positive."""
    if isinstance(value, Budget):
        budget = value
    elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"budget must be a number of parameters or a string like '12M' or '48MB', got {value!r}")
    elif isinstance(value, (int, float)):
        budget = Budget(int(value))
    else:
        match = _BUDGET.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or (unit not in _PARAM_SCALE and unit not in _BYTE_SCALE):
            raise ConfigError(f"cannot read the budget {value!r}: write parameters as 12000000, 12M or 1.5k, or "
                              "bytes of adapter weights as 48MB or 48MiB")
        number = float(match.group(1))
        if unit in _PARAM_SCALE:
            budget = Budget(int(number * _PARAM_SCALE[unit]))
        else:
            budget = Budget(int(number * _BYTE_SCALE[unit]), "bytes")
    if budget.unit not in ("params", "bytes"):
        raise ConfigError(f"budget unit must be 'params' or 'bytes', got {budget.unit!r}")
    if budget.amount <= 0:
        raise ConfigError(f"the budget must be positive, got {value!r}")
    return budget


def check_budget(budget: Budget, layers: Sequence[LayerCosts], full_params: Sequence[int], min_rank: int) -> None:
    """A clear error for a budget the layers cannot spend: larger than fine-tuning the targeted weights fully
    (``full_params``: their sizes), or smaller than every layer at its smallest rank."""
    full = sum(n * (layer.bytes_per_param if budget.unit == "bytes" else 1) for n, layer in zip(full_params, layers))
    if budget.amount > full:
        raise ConfigError(f"the budget ({budget.describe()}) is larger than fine-tuning the {len(layers)} targeted "
                          f"weights fully ({budget.describe(full)}): fine-tune them fully, or lower the budget")
    least = sum(budget.cost(layer, layer.ranks[0]) for layer in layers)
    if budget.amount < least:
        raise ConfigError(f"the budget ({budget.describe()}) is smaller than the {len(layers)} layers need at the "
                          f"minimum rank {min_rank} ({budget.describe(least)}): raise the budget, lower min_rank, "
                          "or target fewer layers")
