"""LoRA's math as plain functions: the scaling (rsLoRA too), PEFT's inits, the dense update (merge only), and the
plain compositions the tests compare the training paths against."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.lowrank import lowrank_linear_reference
from ...errors import ConfigError

INITS = ("default", "gaussian", "random", "nora", "orthogonal")
#: the inits PEFT supports for Linear layers only (a convolution's LoRA refuses them)
LINEAR_ONLY_INITS = ("nora", "orthogonal")
_CONV = {1: F.conv1d, 2: F.conv2d}

#: ``x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` through PyTorch's autograd, under LoRA's name: the reference of
#: :class:`~slimtune.core.lowrank.LowRankLinearFunction`, LoRA's training path.
lora_linear_reference = lowrank_linear_reference


def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def init_lora_(lora_a: torch.Tensor, lora_b: torch.Tensor, init: str) -> None:
    """``default``: A kaiming-uniform (a=√5, as nn.Linear), B zero; ``gaussian``: A ~ N(0, 1/r²), B zero;
    ``random`` (PEFT's ``init_lora_weights=False``): A and B both kaiming-uniform, as nn.Linear initialises them;
    ``nora`` (NoRA, PEFT 0.22): A kaiming-uniform, then each of its ``d_in`` columns ``[r]`` scaled to unit L2 norm, B
    zero; ``orthogonal`` (PEFT's, even r): :func:`_orthogonal_pair`. The last two for Linear layers only, as in
    PEFT."""
    if init in LINEAR_ONLY_INITS and lora_a.dim() != 2:
        raise ConfigError(f"init={init!r} is for Linear layers only, as in PEFT; this layer's A is "
                          f"{lora_a.dim()}-D (a convolution's)")
    if init == "orthogonal":
        _orthogonal_pair(lora_a, lora_b)
        return
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


def _orthogonal_pair(lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """PEFT's ``init_lora_weights="orthogonal"``: Q an orthogonal ``[r, r]`` (QR of a Gaussian),
    A = (G_A Q_odd)ᵀ / 10 ``[r, d_in]`` and B = G_B Q_even / 10 ``[d_out, r]`` from Gaussian ``G_A`` ``[d_in, r/2]``,
    ``G_B`` ``[d_out, r/2]``, where Q_odd / Q_even are Q's rows 0, 2, … / 1, 3, …: B A = G_B Q_even Q_oddᵀ G_Aᵀ / 100
    = 0 (the rows are orthogonal), so the adapter starts as the identity up to rounding, with neither factor zero."""
    rank = lora_a.shape[0]
    if rank % 2:
        raise ConfigError(f"init='orthogonal' needs an even rank (A and B take half of an orthogonal basis each); "
                          f"got r={rank}")
    f64 = torch.float64  # Q's rows orthogonal to float64's rounding, then A and B rounded once to their dtype
    q, _ = torch.linalg.qr(torch.randn(rank, rank, dtype=f64))
    with torch.no_grad():
        lora_a.copy_((torch.randn(lora_a.shape[1], rank // 2, dtype=f64) @ q[0::2]).t() / 10.0)
        lora_b.copy_(torch.randn(lora_b.shape[0], rank // 2, dtype=f64) @ q[1::2] / 10.0)


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
