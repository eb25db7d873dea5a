"""The configuration every adapter method shares: what to target, and per-layer rank/alpha overrides.

Name matching follows PEFT so that configs and checkpoints move between the two unchanged:

* ``target_modules`` as a list: a module matches when its qualified name equals an entry or ends with
  ``"." + entry``; as a string: a regular expression that must match the whole qualified name;
  ``"all-linear"``: every ``nn.Linear`` / transformers ``Conv1D`` except the model's output head.
* ``rank_pattern`` / ``alpha_pattern`` keys are regular expressions matched against the end of the
  qualified name at a ``.`` boundary (``re.match(rf"(.*\\.)?({key})$", name)``); the first key that
  matches wins.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import torch

from ..errors import ConfigError

ALL_LINEAR = "all-linear"


def _check_patterns(field: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{field} must be a dict of name pattern -> value, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{field} keys must be strings, got {key!r}")
        try:
            re.compile(key)
        except re.error as exc:
            raise ConfigError(f"{field} key {key!r} is not a valid regular expression: {exc}") from None
    return dict(value)


def _check_targets(field: str, value: Any, required: bool) -> str | list[str] | None:
    if value is None:
        if required:
            raise ConfigError(f"{field} is required: a list of module name suffixes, a regex, or 'all-linear'")
        return None
    if isinstance(value, str):
        if value.lower() == ALL_LINEAR:
            return ALL_LINEAR
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"{field} {value!r} is not a valid regular expression: {exc}") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = list(value)
        if not names:
            raise ConfigError(f"{field} is empty")
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            raise ConfigError(f"{field} entries must be non-empty strings, got {bad!r}")
        return sorted(set(names)) if isinstance(value, (set, frozenset)) else names
    raise ConfigError(f"{field} must be a list of names, a regex string or 'all-linear', got {type(value).__name__}")


def resolve_adapter_dtype(value: Any) -> Any:
    """``adapter_dtype``: ``None`` (the base weight's dtype), a floating ``torch.dtype`` or its name."""
    if isinstance(value, str):
        value = getattr(torch, value, value)
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ConfigError(f"adapter_dtype must be a floating torch dtype or None, got {value!r}")
    return value


def check_probability(field: str, value: Any) -> float:
    """A dropout-like probability in ``[0, 1)``, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{field} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{field} must be true or false, got {value!r}")
    return value


def name_matches(spec: str | list[str], name: str) -> bool:
    """Whether qualified module ``name`` is selected by a target spec (list = suffixes, str = full regex)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """The value of the first pattern key that matches the end of ``name``, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclasses.dataclass
class AdapterConfig:
    """Fields shared by every adapter method.

    Subclasses set ``method`` (the name :mod:`slimtune.core.registry` knows the method by) and ``peft_type``; the
    registry builds each layer's adapter (:func:`slimtune.core.registry.build_adapter`).
    """

    target_modules: str | list[str] | None = None
    r: int = 8
    alpha: float = 8.0
    exclude_modules: str | list[str] | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

    method: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.target_modules = _check_targets("target_modules", self.target_modules, required=True)
        self.exclude_modules = _check_targets("exclude_modules", self.exclude_modules, required=False)
        self.rank_pattern = _check_patterns("rank_pattern", self.rank_pattern)
        self.alpha_pattern = _check_patterns("alpha_pattern", self.alpha_pattern)
        self.check_rank("r", self.r)
        for key, rank in self.rank_pattern.items():
            self.check_rank(f"rank_pattern[{key!r}]", rank)
        self.check_alpha("alpha", self.alpha)
        for key, alpha in self.alpha_pattern.items():
            self.check_alpha(f"alpha_pattern[{key!r}]", alpha)

    @staticmethod
    def check_rank(field: str, rank: Any) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ConfigError(f"{field} must be an integer, got {rank!r}")
        if rank <= 0:
            raise ConfigError(f"{field} must be a positive integer, got {rank}")

    @staticmethod
    def check_alpha(field: str, alpha: Any) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ConfigError(f"{field} must be a number, got {alpha!r}")

    def rank_for(self, name: str) -> int:
        return pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        return pattern_value(self.alpha_pattern, name, self.alpha)

    def method_name(self) -> str:
        """The registered method this config builds (a config class may serve several: LoRA and DoRA)."""
        return self.method
