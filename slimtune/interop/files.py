"""kohya / LyCORIS ``.safetensors`` files: into and out of a model, and converted to and from PEFT directories.

* :func:`save_kohya` writes an adapted model's LoRA/LoCon, DoRA, LoHa or LoKr adapters as kohya trainers and
  LyCORIS write them (``lora_unet_<module>.lora_down.weight`` ...), the file diffusers' ``load_lora_weights``
  (LoRA/LoCon, DoRA), LyCORIS and the webuis read;
* :func:`load_kohya` adapts a model (a diffusers UNet or DiT, or slimtune's ``DiffusionModel``) from such a file,
  or loads it into adapters already there — names matched against the model's own modules, as LyCORIS does;
* :func:`convert` turns a kohya file into a PEFT adapter directory and back, with no model (module names decoded
  from diffusers' vocabulary, or from ``paths`` when given); kohya -> PEFT -> kohya is bit-identical.

Only safetensors is ever read (never pickle). Errors are :class:`~slimtune.CheckpointError` naming the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..core.checkpoint import (CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, config_from_peft_fields, load_adapter_state,
                               peft_fields, read_adapter_files)
from ..core.inject import CONFIG_ATTR, adapter_modules
from ..errors import CheckpointError
from .kohya import RECORD_KEY, PeftAdapter, kohya_to_peft, peft_to_kohya
from .infer import layout_for
from .names import DEFAULT_PREFIX

FORMATS = ("peft", "kohya")


# -- files ---------------------------------------------------------------------------------------------------------
def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, on the CPU."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}, dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises SafetensorError (and OSError, ...) for foreign files
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


def write_kohya(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; a kohya file is one .safetensors file")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path


def read_peft(directory: str | os.PathLike) -> PeftAdapter:
    """A PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) as a PeftAdapter."""
    directory = Path(directory)
    raw, flat = read_adapter_files(directory)
    config = config_from_peft_fields(raw, str(directory / CONFIG_NAME))
    suffixes = sorted(layout_for(config).peft_keys, key=len, reverse=True)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        name = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in suffixes if name.endswith("." + s)), None)
        if suffix is None:
            raise CheckpointError(f"{directory / WEIGHTS_NAME}: {key!r} is no {config.peft_type} tensor")
        tensors.setdefault(name[:-len(suffix) - 1], {})[suffix] = tensor
    _, metadata = read_safetensors(directory / WEIGHTS_NAME)
    record = json.loads(metadata[RECORD_KEY]) if RECORD_KEY in metadata else {}
    return PeftAdapter(config, tensors, record)


def write_peft(directory: str | os.PathLike, adapter: PeftAdapter) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT does (the record in the metadata)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    flat = {f"{PEFT_PREFIX}{path}.{suffix}": t.contiguous() for path, tensors in adapter.tensors.items()
            for suffix, t in tensors.items()}
    metadata = {"format": "pt", **({RECORD_KEY: json.dumps(adapter.record)} if adapter.record else {})}
    save_file(flat, str(directory / WEIGHTS_NAME), metadata=metadata)
    text = json.dumps(peft_fields(adapter.config), indent=2, sort_keys=True)
    (directory / CONFIG_NAME).write_text(text, encoding="utf-8")
    return directory


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, prefix: str | None = None,
            paths: Iterable[str] | None = None, skip_text_encoder: bool = False) -> Path:
    """Convert a kohya file to a PEFT directory (``to="peft"``) or a PEFT directory to a kohya file
    (``to="kohya"``). ``paths``: the base model's module paths, for exact name decoding; ``prefix``: the kohya
    prefix to write (default: the one the file came with, else ``lora_unet``). Returns ``dst``."""
    if to not in FORMATS:
        raise CheckpointError(f"unknown format {to!r}; choose from {', '.join(FORMATS)}")
    src = Path(src)
    if to == "peft":
        if src.is_dir():
            raise CheckpointError(f"{src} is a directory (a PEFT adapter?); --to peft converts a kohya .safetensors "
                                  "file")
        state, metadata = read_safetensors(src)
        try:
            adapter = kohya_to_peft(state, metadata, paths, skip_text_encoder)
        except CheckpointError as exc:
            raise CheckpointError(f"{src}: {exc}") from None
        return write_peft(dst, adapter)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a directory; --to kohya converts a PEFT adapter directory "
                              f"({CONFIG_NAME} + {WEIGHTS_NAME})")
    adapter = read_peft(src)
    try:
        state, metadata = peft_to_kohya(adapter, prefix)
    except CheckpointError as exc:
        raise CheckpointError(f"{src}: {exc}") from None
    return write_kohya(dst, state, metadata)


# -- models --------------------------------------------------------------------------------------------------------
def denoiser_root(model: nn.Module) -> str:
    """``"unet."`` / ``"transformer."`` when ``model`` holds its denoiser as a child named by a ``denoiser`` attribute
    (slimtune's ``DiffusionModel``, whose kohya names start at the denoiser), else ``""``."""
    denoiser = getattr(model, "denoiser", None)
    if isinstance(denoiser, nn.Module):
        for name, child in model.named_children():
            if child is denoiser:
                return name + "."
    return ""


def save_kohya(model: nn.Module, path: str | os.PathLike, prefix: str = DEFAULT_PREFIX,
               dtype: torch.dtype | None = None) -> Path:
    """Write ``model``'s adapters as one kohya / LyCORIS ``.safetensors`` file (``dtype``: cast every tensor, as
    kohya trainers' ``save_precision``). HRA has no kohya format (:class:`CheckpointError`)."""
    config = getattr(model, CONFIG_ATTR, None)
    adapters = adapter_modules(model)
    if not adapters or config is None:
        raise CheckpointError(f"{type(model).__name__} has no slimtune adapters: call slimtune.adapt first")
    layout_for(config)
    root = denoiser_root(model)
    outside = [name for name, _ in adapters if not name.startswith(root)]
    if outside:
        raise CheckpointError(f"{outside[0]} is outside the denoiser ({root[:-1]}); kohya files written here hold "
                              "the denoiser's modules only")
    tensors = {name: adapter.peft_tensors() for name, adapter in adapters}
    state, metadata = peft_to_kohya(PeftAdapter(config, tensors), prefix, root=root)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return write_kohya(path, state, metadata)


def load_kohya(model: nn.Module, path: str | os.PathLike, skip_text_encoder: bool = False) -> nn.Module:
    """Adapt ``model`` from a kohya / LyCORIS file (or load the file into the adapters it already has: they must
    match it exactly); returns ``model``. The model is left unchanged when anything does not fit."""
    state, metadata = read_safetensors(path)
    root = denoiser_root(model)
    base = model.get_submodule(root[:-1]) if root else model
    names = [name for name, _ in base.named_modules()]
    try:
        adapter = kohya_to_peft(state, metadata, names, skip_text_encoder)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    flat = {f"{PEFT_PREFIX}{root}{p}.{suffix}": t for p, tensors in adapter.tensors.items()
            for suffix, t in tensors.items()}
    config = adapter.config
    if root:
        config.target_modules = [root + p for p in config.target_modules]
    return load_adapter_state(model, config, flat, str(path), str(path))
