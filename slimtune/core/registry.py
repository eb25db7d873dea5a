"""The adapter methods slimtune knows: method name -> config class, module builder, PEFT format.

Each method package (``slimtune/methods/<name>/__init__.py``) registers one :class:`Method`; importing
:mod:`slimtune.methods` registers them all (``import slimtune`` does). :func:`slimtune.adapt`, the checkpoint code
and the memory estimator build layers through :func:`build_adapter` and find formats through
:func:`format_for_type` — the config is data, the registry is the factory.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import nn

from ..errors import SlimtuneError
from .config import AdapterConfig
from .module import AdapterModule
from .peft_format import PeftFormat

Builder = Callable[[Any, str, nn.Module], AdapterModule]  # (config, qualified name, base layer) -> adapter
# (config, model, the new adapters) once they are in place -> what removes the hooks it attached to the model, or None
Finalizer = Callable[[Any, nn.Module, list], "Callable[[], None] | None"]


@dataclasses.dataclass(frozen=True)
class Method:
    """One adapter method. ``name`` is what :meth:`AdapterConfig.method_name` returns for configs that build it;
    ``build`` makes one layer's adapter (raising :class:`~slimtune.TargetError` / ``ConfigError`` for a layer it
    cannot adapt); ``finalize`` (optional) runs once the model holds its adapters (shared caches, probes) and
    returns what removes the model-level hooks it attached;
    ``peft_format``: how its config maps to PEFT's (several methods may share one, as LoRA and DoRA do);
    ``unet_lean_scale``: a UNet's lean frozen layers apply from this many times
    :data:`~slimtune.core.lean_layers.UNET_LEAN_BYTES` in a model holding this method's adapters."""

    name: str
    config_class: type[AdapterConfig]
    build: Builder
    peft_format: PeftFormat
    finalize: Finalizer | None = None
    unet_lean_scale: int = 1


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    """Make ``method`` buildable by name; a second registration under the same name replaces the first."""
    _METHODS[method.name] = method


def method_names() -> list[str]:
    return sorted(_METHODS)


def method_for(config: AdapterConfig) -> Method:
    """The registered method ``config`` builds; a :class:`SlimtuneError` naming the known ones if none."""
    name = config.method_name()
    method = _METHODS.get(name)
    if method is None or not isinstance(config, method.config_class):
        raise SlimtuneError(f"no adapter method {name!r} is registered for {type(config).__name__}; "
                            f"known: {', '.join(method_names())}")
    return method


def build_adapter(config: AdapterConfig, name: str, base: nn.Module) -> AdapterModule:
    """The adapter ``config`` puts on the layer ``base`` (qualified name ``name``), not yet in any model."""
    return method_for(config).build(config, name, base)


def finalize(config: AdapterConfig, model: nn.Module, adapters: list[AdapterModule]) -> Callable[[], None] | None:
    """Run the method's finalizer (if any) once ``adapters`` are in ``model``; returns what removes the model-level
    hooks it attached (None: none)."""
    hook = method_for(config).finalize
    return None if hook is None else hook(config, model, adapters)


def format_for_type(peft_type: Any) -> PeftFormat | None:
    """The :class:`PeftFormat` for a PEFT ``peft_type`` string, or None."""
    if not isinstance(peft_type, str):
        return None
    for method in _METHODS.values():
        if method.peft_format.peft_type == peft_type:
            return method.peft_format
    return None


def supported_peft_types() -> list[str]:
    return sorted({method.peft_format.peft_type for method in _METHODS.values()})
