"""LoRA's math as plain functions: the scaling (rsLoRA too), PEFT's inits, the dense update (merge only), and the
plain compositions the tests compare the training paths against."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.lowrank import lowrank_linear_reference
from ...errors import ConfigError

INITS = ("default", "gaussian", "random", "nora")
_CONV = {1: F.conv1d, 2: F.conv2d}

#: ``x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` through PyTorch's autograd, under LoRA's name: the reference of
#: :class:`~slimtune.core.lowrank.LowRankLinearFunction`, LoRA's training path.
lora_linear_reference = lowrank_linear_reference


def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def init_lora_(lora_a: torch.Tensor, lora_b: torch.Tensor, init: str) -> None:
    """``default``: A kaiming-uniform (a=√5, as nn.Linear), B zero; ``gaussian``: A ~ N(0, 1/r²), B zero;
    ``random`` (PEFT's ``init_lora_weights=False``): A and B both kaiming-uniform, as nn.Linear initialises them;
    ``nora`` (NoRA, PEFT 0.22; Linear layers only, as there): A kaiming-uniform, then each of its ``d_in`` columns
    ``[r]`` scaled to unit L2 norm, B zero."""
    if init == "nora" and lora_a.dim() != 2:
        raise ConfigError("init='nora' (NoRA) is for Linear layers only, as in PEFT; this layer's A is "
                          f"{lora_a.dim()}-D (a convolution's)")
    with torch.no_grad():
        if init in ("default", "random", "nora"):
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
            if init == "nora":
                lora_a.div_(lora_a.norm(dim=0, keepdim=True).clamp_min(1e-6))
        elif init == "gaussian":
            nn.init.normal_(lora_a, std=1.0 / lora_a.shape[0])
        else:
            raise ConfigError(f"unknown LoRA init {init!r}; choose from {INITS}")
        if init == "random":
            nn.init.kaiming_uniform_(lora_b, a=math.sqrt(5))
        else:
            nn.init.zeros_(lora_b)


def lora_delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s · B A``, ``[d_out, d_in]``, in float32 or wider. Used to merge, never to train."""
    dtype = torch.promote_types(lora_a.dtype, torch.float32)
    return (lora_b.to(dtype) @ lora_a.to(dtype)) * scaling


def locon_delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s · B ∘ A`` as one kernel ``[c_out, c_in, *k]`` (groups = 1 only). Used to merge, never to train."""
    dtype = torch.promote_types(lora_a.dtype, torch.float32)
    b = lora_b.to(dtype).flatten(1)  # [c_out, r]
    return torch.einsum("or,ri...->oi...", b, lora_a.to(dtype)) * scaling


def locon_reference(x: torch.Tensor, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """Plain composition, PyTorch autograd: base conv + s · up(down(x))."""
    conv = _CONV[lora_a.dim() - 2]
    h = conv(x, lora_a, None, base.stride, base.padding, base.dilation)
    return base(x) + scaling * conv(h, lora_b, None, 1, 0, 1, base.groups)
