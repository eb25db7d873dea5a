"""The configuration every adapter method shares: what to target, and per-layer rank/alpha overrides.

Name matching follows PEFT so that configs and checkpoints move between the two unchanged:

* ``target_modules`` as a list: a module matches when its qualified name equals an entry or ends with
  ``"." + entry``; as a string: a regular expression that must match the whole qualified name;
  ``"all-linear"``: every ``nn.Linear`` / transformers ``Conv1D`` except the model's output head.
* ``rank_pattern`` / ``alpha_pattern`` keys are regular expressions matched against the end of the
  qualified name at a ``.`` boundary (``re.match(rf"(.*\\.)?({key})$", name)``); the first key that
  matches wins.
* ``layers_to_transform`` / ``layers_pattern`` keep, of the modules a list (or ``"all-linear"``) selects, those
  in the numbered layers given (PEFT's rule, :func:`layer_index`); ``modules_to_save`` names modules (as a list
  of ``target_modules`` does) that get a full trainable copy, and are never targets themselves.

Every config accepts PEFT's spelling of its fields too (``LoraConfig(lora_alpha=16)`` is
``LoraConfig(alpha=16)``): the class lists them in ``peft_aliases`` and :class:`PeftSpellings` renames them.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
from typing import Any, ClassVar

import torch

from ..errors import ConfigError

ALL_LINEAR = "all-linear"
#: the heads PEFT adds to ``modules_to_save`` for ``task_type="SEQ_CLS"`` (those the model has)
CLASSIFIER_HEADS = ("classifier", "score")


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


def check_number(field: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """A finite real number in ``[low, high]`` (``(low, high]`` with ``low_open``), as a float; a ConfigError naming
    ``field`` otherwise (NaN and infinities included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{field} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        lower = f"> {low:g}" if low_open else f">= {low:g}"
        upper = "" if high == math.inf else f" and <= {high:g}"
        raise ConfigError(f"{field} must be {lower}{upper}, got {value!r}")
    return float(value)


def check_probability(field: str, value: Any) -> float:
    """A dropout-like probability in ``[0, 1)``, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{field} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{field} must be true or false, got {value!r}")
    return value


def check_layers(value: Any) -> int | list[int] | None:
    """``layers_to_transform``: None, a layer index, or a non-empty list of them (integers >= 0)."""
    if value is None:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)) or not items or any(
            isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
        raise ConfigError(f"layers_to_transform must be a layer index or a non-empty list of them (integers >= 0), "
                          f"got {value!r}")
    return value if isinstance(value, int) else list(items)


def check_names(field: str, value: Any) -> list[str] | None:
    """A list of module names (``modules_to_save``, ``layers_pattern``): None or non-empty strings; a single string
    is one name."""
    if value is None:
        return None
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple, set, frozenset)) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{field} must be a list of module names (non-empty strings), got {value!r}")
    return sorted(names) if isinstance(names, (set, frozenset)) else list(names)


def layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    """The layer number in qualified module name ``name`` as PEFT reads it: the first ``<pattern>.<digits>.``
    segment (any segment name when ``layers_pattern`` is None), e.g. 3 for ``model.layers.3.self_attn.q_proj``."""
    regexes = [r".*?\.[^.]*\.(\d+)\."] if not layers_pattern else [
        rf"(?:^|.*?\.){pattern}\.(\d+)\." for pattern in check_names("layers_pattern", layers_pattern) or []]
    for regex in regexes:
        match = re.match(regex, name)
        if match:
            return int(match.group(1))
    return None


class TaskType(str, enum.Enum):
    """PEFT's ``task_type`` values (``TaskType.CAUSAL_LM == "CAUSAL_LM"``)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def rename_peft_spellings(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with PEFT's names (``cls.peft_aliases``) replaced by slimtune's; a ConfigError when one field is
    given under both names with different values, or names no field."""
    known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
    unknown = sorted(k for k in kwargs if known is not None and k not in known and k not in cls.peft_aliases)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field {', '.join(map(repr, unknown))}: a PEFT option slimtune "
                          "does not implement, or a misspelling")
    out = dict(kwargs)
    for peft_name, name in getattr(cls, "peft_aliases", {}).items():
        if peft_name not in out:
            continue
        value = out.pop(peft_name)
        if name in out and out[name] != value:
            raise ConfigError(f"{cls.__name__}: {peft_name}={value!r} and {name}={out[name]!r} are one field "
                              f"({peft_name} is PEFT's name for {name}); give one")
        out[name] = value
    return out


class PeftSpellings(type):
    """The metaclass of :class:`AdapterConfig`: constructor keywords spelled as PEFT spells them (the class's
    ``peft_aliases``: PEFT name -> field) are renamed before the dataclass ``__init__`` sees them."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **rename_peft_spellings(cls, kwargs))


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
class AdapterConfig(metaclass=PeftSpellings):
    """Fields shared by every adapter method.

    Subclasses set ``method`` (the name :mod:`slimtune.core.registry` knows the method by) and ``peft_type``; the
    registry builds each layer's adapter (:func:`slimtune.core.registry.build_adapter`).

    ``modules_to_save``: modules trained in full (a trainable copy each, e.g. a classification head), saved with
    the adapter; ``layers_to_transform`` / ``layers_pattern``: adapt only these numbered layers (see the module
    docstring). ``task_type`` (PEFT's, e.g. ``"CAUSAL_LM"``) is recorded in the checkpoint; ``"SEQ_CLS"`` also
    trains the model's ``classifier`` / ``score`` head, as PEFT does. ``bias``: only PEFT's ``"none"``.
    ``inference_mode``: the new adapters are frozen (PEFT's meaning). ``base_model_name_or_path`` / ``revision``:
    the base model the adapter belongs to, as PEFT records it (a checkpoint writes the model's own name when it
    has one, else this; ``AutoPeftModelForCausalLM`` and ``slimtune export`` read it).
    """

    target_modules: str | list[str] | None = None
    r: int = 8
    alpha: float = 8.0
    exclude_modules: str | list[str] | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    task_type: str | None = None
    bias: str = "none"
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None

    method: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""
    #: PEFT's name -> this class's name, for the fields PEFT spells differently (see :class:`PeftSpellings`)
    peft_aliases: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        self.target_modules = _check_targets("target_modules", self.target_modules, required=True)
        self.exclude_modules = _check_targets("exclude_modules", self.exclude_modules, required=False)
        self.rank_pattern = _check_patterns("rank_pattern", self.rank_pattern)
        self.alpha_pattern = _check_patterns("alpha_pattern", self.alpha_pattern)
        self.check_rank("r", self.r)
        for key, rank in self.rank_pattern.items():
            self.check_rank(f"rank_pattern[{key!r}]", rank)
        self.check_alpha(self.spelled("alpha"), self.alpha)
        for key, alpha in self.alpha_pattern.items():
            self.check_alpha(f"alpha_pattern[{key!r}]", alpha)
        self.modules_to_save = check_names("modules_to_save", self.modules_to_save)
        self.layers_to_transform = check_layers(self.layers_to_transform)
        patterns = check_names("layers_pattern", self.layers_pattern)
        if not isinstance(self.layers_pattern, str):  # a single pattern stays a string, as PEFT writes it
            self.layers_pattern = patterns
        for pattern in patterns or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"layers_pattern {pattern!r} is not a valid regular expression: {exc}") from None
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is given without layers_to_transform: name the layer indices too")
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type).value
            except ValueError:
                raise ConfigError(f"task_type must be one of {', '.join(t.value for t in TaskType)} or None, "
                                  f"got {self.task_type!r}") from None
        check_bool("inference_mode", self.inference_mode)
        for field in ("base_model_name_or_path", "revision"):
            value = getattr(self, field)
            if isinstance(value, os.PathLike):
                setattr(self, field, value := os.fspath(value))
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{field} must be a string (a model directory or Hub id) or None, got {value!r}")
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r}: training the base layers' biases is not supported (only "
                              "bias='none'); list the layers in modules_to_save to train them whole")

    @staticmethod
    def check_rank(field: str, rank: Any) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ConfigError(f"{field} must be an integer, got {rank!r}")
        if rank <= 0:
            raise ConfigError(f"{field} must be a positive integer, got {rank}")

    @staticmethod
    def check_alpha(field: str, alpha: Any) -> None:
        """A scaling numerator: finite and > 0 (alpha = 0 would train nothing; NaN would poison the weights)."""
        check_number(field, alpha, 0.0, low_open=True)

    def spelled(self, field: str) -> str:
        """``field`` as error messages name it: with PEFT's name beside it where PEFT spells it differently."""
        peft = [alias for alias, name in self.peft_aliases.items() if name == field]
        return f"{field} ({peft[0]})" if peft else field

    def saved_modules(self) -> list[str]:
        """The ``modules_to_save`` entries, with the heads ``task_type="SEQ_CLS"`` adds (as PEFT writes them)."""
        names = list(self.modules_to_save or [])
        if self.task_type == "SEQ_CLS":
            names += [head for head in CLASSIFIER_HEADS if head not in names]
        return names

    def selects_layer(self, name: str) -> bool:
        """Whether ``layers_to_transform`` keeps the module at qualified ``name`` (always, when it is None; a list
        or ``"all-linear"`` target only: PEFT ignores the layer filter for a regex)."""
        if self.layers_to_transform is None or isinstance(self.target_modules, str) and \
                self.target_modules != ALL_LINEAR:
            return True
        index = layer_index(name, self.layers_pattern)
        wanted = self.layers_to_transform
        return index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)

    def rank_for(self, name: str) -> int:
        return pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        return pattern_value(self.alpha_pattern, name, self.alpha)

    def method_name(self) -> str:
        """The registered method this config builds (a config class may serve several: LoRA and DoRA)."""
        return self.method
