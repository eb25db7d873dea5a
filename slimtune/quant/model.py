"""Quantising a model's frozen Linear layers to NF4, and dequantising them again (for merging and export)."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..core.config import name_matches
from ..core.frozen import quantized_handle
from ..core.module import AdapterModule
from ..core.targeting import output_head
from ..errors import ConfigError, MissingDependencyError, SlimtuneError
from .linear import NF4Linear
from .nf4 import BLOCKSIZE, DQ_BLOCKSIZE

METHODS = ("nf4",)
BACKENDS = ("slimtune", "bitsandbytes")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _linears(model: nn.Module, include_head: bool, exclude: list[str] | str | None) -> Iterator[tuple[str, nn.Linear]]:
    head = None if include_head else output_head(model)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is head:
            continue
        if exclude is not None and name_matches(exclude, name):
            continue
        yield name, module


def _bnb_linear(linear: nn.Linear, compute_dtype: torch.dtype, double_quant: bool, blocksize: int) -> nn.Module:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise MissingDependencyError(f"backend='bitsandbytes' needs bitsandbytes ({exc}); "
                                     "pip install bitsandbytes, or use backend='slimtune'") from None
    device = linear.weight.device
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                              device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach(), requires_grad=False,
                                     compress_statistics=double_quant, quant_type="nf4", blocksize=blocksize)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantises on the move to the device


@torch.no_grad()
def quantize(model: nn.Module, method: str = "nf4", *, double_quant: bool = True,
             compute_dtype: torch.dtype | None = None, blocksize: int = BLOCKSIZE, include_head: bool = False,
             exclude: list[str] | str | None = None, backend: str = "slimtune") -> nn.Module:
    """Replace ``model``'s frozen ``nn.Linear`` layers by 4-bit NF4 layers, in place; returns ``model``.

    Quantise before :func:`slimtune.adapt` (the QLoRA order: 4-bit frozen base, 16-bit adapters on top).
    ``double_quant`` stores the block scales in 8 bits (blocks of 256). ``compute_dtype``: dtype of the
    dense copies and of biases (default: each layer's weight dtype). The output head (``lm_head``) stays
    dense unless ``include_head``; ``exclude`` names more layers to keep dense (a list of name suffixes or a
    regex, as ``target_modules``). ``backend``: ``"slimtune"`` (:class:`NF4Linear`, no extra dependency) or
    ``"bitsandbytes"`` (``bnb.nn.Linear4bit``, as transformers' ``BitsAndBytesConfig`` builds it); both store
    the same bits and every slimtune adapter runs on both.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown quantisation {method!r}; choose from {METHODS}")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown quantisation backend {backend!r}; choose from {BACKENDS}")
    if not isinstance(double_quant, bool):
        raise ConfigError(f"double_quant must be True or False, got {double_quant!r}")
    if any(isinstance(m, AdapterModule) for m in model.modules()):
        raise SlimtuneError("the model already has adapters: quantise first, then call slimtune.adapt")
    count = 0
    for name, linear in _linears(model, include_head, exclude):
        dtype = compute_dtype or linear.weight.dtype
        if backend == "bitsandbytes":
            layer = _bnb_linear(linear, dtype, double_quant, blocksize)
        else:
            layer = NF4Linear.from_linear(linear, dtype, blocksize, double_quant, DQ_BLOCKSIZE)
        _set_submodule(model, name, layer)
        count += 1
    if count == 0:
        raise SlimtuneError(f"{type(model).__name__} has no nn.Linear layer to quantise"
                            + ("" if exclude is None else f" outside exclude={exclude!r}"))
    return model


@torch.no_grad()
def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every 4-bit layer (slimtune's or bitsandbytes', adapters' base layers included) by a dense
    ``nn.Linear`` in ``dtype`` (default: the layer's compute dtype), in place; returns ``model``.

    The export path of QLoRA: dequantise, then :func:`slimtune.merge` folds the adapters into dense weights.
    """
    for name, module in list(model.named_modules()):
        handle = quantized_handle(module)
        if handle is None:
            continue
        out_features, in_features = handle.shape
        target = dtype or handle.dtype
        dense = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
        dense.weight = nn.Parameter(handle.dequantize(target), requires_grad=False)
        if module.bias is not None:
            dense.bias = nn.Parameter(module.bias.detach().to(target), requires_grad=False)
        _set_submodule(model, name, dense)
    return model
