"""PEFT-compatible adapter checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`save_adapter` writes the two files exactly as PEFT 0.21 writes them for the same adapter (same JSON
field set and values, same tensor keys ``base_model.model.<module path>.<suffix>``, shapes and dtypes), so
``peft.PeftModel.from_pretrained(base, directory)`` loads them; :func:`load_adapter` reads them back, and reads
directories written by PEFT's ``save_pretrained``. peft is never imported: the field set PEFT writes is
hard-coded below.

Only JSON and safetensors are ever read — never pickle. :func:`load_adapter` reads and checks everything
(config, every tensor, every key and shape against adapters planned on the side) before it touches the model,
so a failing load leaves the model as it was.

Each adapter method plugs in as one :class:`PeftFormat` (registered with its method in
:mod:`slimtune.core.registry`, found by ``peft_type``): the method's PEFT config fields with PEFT's defaults, and a
``to_peft`` / ``from_peft`` pair that maps between the slimtune config and those fields. Everything else (files,
keys, validation, injection) is shared.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import CheckpointError, SlimtuneError
from .config import AdapterConfig
from .inject import CONFIG_ATTR, adapt, adapter_modules, trained_copies
from .peft_format import PEFT_COMMON_FIELDS, PeftFormat, is_set, shared_from_peft, shared_to_peft
from .registry import build_adapter, format_for_type, supported_peft_types
from .siblings import relearn
from .targeting import find_saved_modules, find_targets

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PeftFormat", "config_from_peft_fields", "load_adapter",
           "load_adapter_state", "peft_config_dict", "peft_fields", "peft_state_dict", "read_adapter_files",
           "save_adapter", "supported_peft_types"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's pickle format: recognised only to refuse it clearly
PEFT_PREFIX = "base_model.model."


def _format_for(peft_type: Any, where: str) -> PeftFormat:
    fmt = format_for_type(peft_type)
    if fmt is None:
        raise CheckpointError(f"{where}: peft_type {peft_type!r} is not supported; "
                              f"supported: {', '.join(supported_peft_types())}")
    return fmt


# -- save ---------------------------------------------------------------------------------------------
def _name_or_path(model: nn.Module) -> str | None:
    for value in (model.__dict__.get("name_or_path"),
                  getattr(getattr(model, "config", None), "_name_or_path", None),
                  getattr(getattr(model, "config", None), "name_or_path", None)):
        if isinstance(value, (str, os.PathLike)) and str(value):
            return str(value)
    return None


def peft_config_dict(model: nn.Module) -> dict[str, Any]:
    """The ``adapter_config.json`` content PEFT would write for ``model``'s adapters."""
    adapters = adapter_modules(model)
    config = getattr(model, CONFIG_ATTR, None)
    if not adapters or not isinstance(config, AdapterConfig):
        raise CheckpointError(f"{type(model).__name__} has no slimtune adapters: call slimtune.adapt first")
    out = peft_fields(config, adapters)
    out["base_model_name_or_path"] = _name_or_path(model) or config.base_model_name_or_path
    if out["task_type"] is None:  # PEFT records the base model's class when task_type is null (for AutoPeftModel)
        out["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return out


def peft_fields(config: AdapterConfig, adapters: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` fields PEFT writes for ``config`` (``auto_mapping`` null: it describes a model;
    ``base_model_name_or_path``: the config's); ``adapters``: the adapted layers, where a field depends on them."""
    fmt = format_for_type(config.peft_type)
    if fmt is None or not isinstance(config, fmt.config_class):
        raise CheckpointError(f"saving {type(config).__name__} adapters is not supported; "
                              f"supported PEFT types: {', '.join(supported_peft_types())}")
    out = copy.deepcopy(PEFT_COMMON_FIELDS)
    out.update(copy.deepcopy(dict(fmt.fields)))
    out.update(fmt.to_peft(config, list(adapters or [])))
    out["peft_type"] = fmt.peft_type
    out.update(shared_to_peft(config))
    return out


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``base_model.model.<module path>.<suffix>`` -> tensor (contiguous, own dtype), as PEFT names them; a module
    to save holds its copy's tensors under the module's path (``base_model.model.score.weight``)."""
    out: dict[str, torch.Tensor] = {}
    for name, held in [*adapter_modules(model), *trained_copies(model)]:
        for suffix, tensor in held.peft_tensors().items():
            out[f"{PEFT_PREFIX}{name}.{suffix}"] = tensor.detach().contiguous()
    return out


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory`` as PEFT would.

    The directory loads with ``peft.PeftModel.from_pretrained(base_model, directory)`` and with
    :func:`load_adapter`. Returns the directory. A run may resume from it: the LoRA layers that run as one
    Function relearn which ones do (:func:`~slimtune.core.siblings.relearn`), as the resumed run will.
    """
    from safetensors.torch import save_file

    relearn(model)
    directory = Path(directory)
    config_dict = peft_config_dict(model)
    tensors = peft_state_dict(model)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(config_dict, indent=2, sort_keys=True)
    _write_atomic(directory / CONFIG_NAME, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return directory


# -- load ---------------------------------------------------------------------------------------------
def read_adapter_config(directory: Path) -> dict[str, Any]:
    """``adapter_config.json`` of ``directory`` as a dict; CheckpointError if it is unreadable or not an object."""
    config_path = directory / CONFIG_NAME
    try:
        fields = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"{config_path} is not valid JSON, cannot read it ({exc})") from exc
    if not isinstance(fields, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, got {type(fields).__name__}")
    return fields


def read_adapter_files(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json as a dict, the tensors of adapter_model.safetensors)``; CheckpointError if unreadable."""
    if not directory.exists():
        raise CheckpointError(f"adapter checkpoint directory {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory (expected one holding {CONFIG_NAME} and {WEIGHTS_NAME})")
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not weights_path.is_file():
        if (directory / PICKLE_WEIGHTS_NAME).exists():
            raise CheckpointError(
                f"{directory} has {PICKLE_WEIGHTS_NAME} but no {WEIGHTS_NAME}: only safetensors is supported "
                "(slimtune never unpickles); re-save it with PEFT's save_pretrained(..., safe_serialization=True)")
        raise CheckpointError(f"{weights_path} does not exist")
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} does not exist")
    fields = read_adapter_config(directory)
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(weights_path), device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError (and OSError, ...) for truncated/foreign files
        raise CheckpointError(f"{weights_path} is not a readable safetensors file "
                              f"({type(exc).__name__}: {exc})") from exc
    if not tensors:
        raise CheckpointError(f"{weights_path} holds no tensors")
    return fields, tensors


def _complete_fields(fields: dict[str, Any], fmt: PeftFormat, where: str) -> dict[str, Any]:
    """The file's fields over PEFT's defaults; unknown fields with a non-empty value are refused."""
    known = set(PEFT_COMMON_FIELDS) | set(fmt.fields) | {"runtime_config"}  # PEFT ignores runtime_config too
    unknown = {k: v for k, v in fields.items()
               if k not in known and is_set(v)}
    if unknown:
        raise CheckpointError(f"{where}: fields unknown to slimtune with non-default values: "
                              f"{', '.join(f'{k}={v!r}' for k, v in sorted(unknown.items()))} "
                              "(written by a newer PEFT, or a feature slimtune lacks)")
    out = copy.deepcopy(dict(fmt.fields))
    out.update(fields)
    return out


def _module_of(key: str, names: set[str]) -> tuple[str, str] | None:
    """Split a checkpoint key into (adapted module name, suffix), PEFT's prefix optional; None if no module."""
    candidates = [key[len(PEFT_PREFIX):], key] if key.startswith(PEFT_PREFIX) else [key]
    for candidate in candidates:
        parts = candidate.split(".")
        for i in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:i])
            if module in names:
                return module, ".".join(parts[i:])
    return None


def _canonical_suffix(suffix: str, expected: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """``lora_A.weight`` -> itself; ``lora_A.default.weight`` (adapter name kept) -> (``lora_A.weight``, name)."""
    if suffix in expected:
        return suffix, None
    parts = suffix.split(".")
    if len(parts) >= 2:
        canonical = ".".join([parts[0], *parts[2:]])
        if canonical in expected:
            return canonical, parts[1]
    return None


def _plan_tensors(where: Path | str, tensors: dict[str, torch.Tensor],
                  expected: dict[str, dict[str, tuple[int, ...]]]) -> dict[str, dict[str, torch.Tensor]]:
    """Assign every checkpoint tensor to (module, PEFT suffix); refuse extra, duplicate and missing keys."""
    names = set(expected)
    grouped: dict[str, dict[str, torch.Tensor]] = {name: {} for name in expected}
    source: dict[tuple[str, str], str] = {}
    extra: list[str] = []
    adapter_names: set[str] = set()
    for key, tensor in tensors.items():
        found = _module_of(key, names)
        canonical = _canonical_suffix(found[1], expected[found[0]]) if found else None
        if found is None or canonical is None:
            extra.append(key)
            continue
        module, (suffix, adapter_name) = found[0], canonical
        if adapter_name is not None:
            adapter_names.add(adapter_name)
        if (module, suffix) in source:
            raise CheckpointError(f"{where}: keys {source[module, suffix]!r} and {key!r} are both "
                                  f"{module}.{suffix}")
        source[module, suffix] = key
        grouped[module][suffix] = tensor
    if extra:
        adapted = sorted(names)
        raise CheckpointError(
            f"{where}: {len(extra)} unexpected key(s) that belong to no adapted module of the model or to no "
            f"parameter of its adapter: {', '.join(sorted(extra)[:5])}{' ...' if len(extra) > 5 else ''} "
            f"(adapted modules: {', '.join(adapted[:5])}{' ...' if len(adapted) > 5 else ''})")
    if len(adapter_names) > 1:
        raise CheckpointError(f"{where}: keys name several adapters ({', '.join(sorted(adapter_names))}); "
                              "a checkpoint must hold one")
    missing = [f"{PEFT_PREFIX}{module}.{suffix}" for module, params in expected.items()
               for suffix in params if suffix not in grouped[module]]
    if missing:
        raise CheckpointError(f"{where}: missing {len(missing)} tensor(s) the model's adapters need: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for module, params in expected.items():
        for suffix, shape in params.items():
            tensor, key = grouped[module][suffix], source[module, suffix]
            if tuple(tensor.shape) != tuple(shape):
                raise CheckpointError(f"{where}: shape mismatch for {key}: the checkpoint has {tuple(tensor.shape)}, "
                                      f"the model's adapter needs {tuple(shape)} (different rank or base layer size?)")
            if not tensor.is_floating_point():
                raise CheckpointError(f"{where}: {key} has dtype {tensor.dtype}; a floating-point tensor is needed")
    return grouped


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT / slimtune adapter checkpoint into ``model``; returns ``model``.

    An unadapted model is adapted with the checkpoint's config (as :func:`slimtune.adapt`), each new adapter
    taking the train/eval mode of the layer it wraps; an adapted model gets the tensors copied into its
    adapters, which must match the checkpoint exactly (keys, shapes, rank and scaling). Tensors are cast to the
    adapters' dtype. Raises :class:`CheckpointError` on any problem, with the model left unchanged.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    raw, tensors = read_adapter_files(directory)
    config = config_from_peft_fields(raw, str(config_path))
    return load_adapter_state(model, config, tensors, str(config_path), str(weights_path))


def config_from_peft_fields(raw: dict[str, Any], where: str) -> AdapterConfig:
    """The slimtune config of ``adapter_config.json``'s fields (``where`` names the file in errors)."""
    if "peft_type" not in raw:
        raise CheckpointError(f"{where} has no peft_type; supported: {', '.join(supported_peft_types())}")
    fmt = _format_for(raw["peft_type"], where)
    fields = _complete_fields(raw, fmt, where)
    try:
        return dataclasses.replace(fmt.from_peft(fields), **shared_from_peft(fields))
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    except SlimtuneError as exc:  # ConfigError from the config class's own checks
        raise CheckpointError(f"{where}: {exc}") from exc


def load_adapter_state(model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor], config_where: str,
                       weights_where: str) -> nn.Module:
    """:func:`load_adapter` from memory: ``config`` and PEFT-keyed ``tensors`` (``base_model.model.<path>.<suffix>``)
    into ``model``, checked first, the model left unchanged on any problem; ``config_where`` / ``weights_where`` name
    where they came from in errors. Other formats (:mod:`slimtune.interop`) load through it."""
    fmt = _format_for(config.peft_type, config_where)
    existing, copies = adapter_modules(model), trained_copies(model)
    expected: dict[str, dict[str, tuple[int, ...]]] = {}
    if existing:
        model_config = getattr(model, CONFIG_ATTR, None)
        if model_config is not None and not isinstance(model_config, fmt.config_class):
            raise CheckpointError(f"{config_where}: the checkpoint is {fmt.peft_type}, but the model is adapted "
                                  f"with {type(model_config).__name__}")
        for name, adapter in existing:
            if adapter.merged:
                raise CheckpointError(f"{name} is merged: unmerge the model before loading adapter weights")
            problem = fmt.check_adapter(config, name, adapter)
            if problem:
                raise CheckpointError(f"{config_where}: {problem}; load into an unadapted model instead")
        try:
            saved = sorted(name for name, _ in find_saved_modules(model, config))
        except SlimtuneError as exc:
            raise CheckpointError(f"{config_where} does not fit {type(model).__name__}: {exc}") from exc
        if saved != sorted(name for name, _ in copies):
            raise CheckpointError(f"{config_where}: modules_to_save gives {saved}, but the model trains copies of "
                                  f"{sorted(name for name, _ in copies)}; load into an unadapted model instead")
        expected = {name: {k: tuple(p.shape) for k, p in a.peft_parameters().items()} for name, a in existing}
        expected.update({name: {k: tuple(t.shape) for k, t in held.peft_tensors().items()} for name, held in copies})
        grouped = _plan_tensors(weights_where, tensors, expected)
    else:
        try:
            targets = find_targets(model, config)
            saved = find_saved_modules(model, config)
        except SlimtuneError as exc:
            raise CheckpointError(f"{config_where} does not fit {type(model).__name__}: {exc}") from exc
        expected.update({name: {k: tuple(t.shape) for k, t in module.state_dict().items() if t.is_floating_point()}
                         for name, module in saved})
        # Build each adapter on the side (this does not touch the model), one at a time, only to learn its
        # PEFT tensors' names and shapes.
        for name, module in targets:
            try:
                adapter = build_adapter(config, name, module)
            except SlimtuneError as exc:
                raise CheckpointError(f"{config_where}: cannot adapt {name}: {exc}") from exc
            expected[name] = {k: tuple(p.shape) for k, p in adapter.peft_parameters().items()}
            del adapter
        grouped = _plan_tensors(weights_where, tensors, expected)

    # Everything is read and checked: from here on nothing can fail, and the model is changed.
    if not existing:
        adapt(model, config)
        existing, copies = adapter_modules(model), trained_copies(model)
    for name, adapter in existing:
        adapter.load_peft_tensors(name, grouped[name])
    for name, held in copies:
        held.load_peft_tensors(grouped[name])
    return model

