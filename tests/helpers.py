"""Shared test helpers."""
from __future__ import annotations

import torch

FP32_TOL = 1e-4
BF16_TOL = 1e-2


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖ / ‖ref‖ computed in float64."""
    got, ref = got.detach().double(), ref.detach().double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def perturb_adapters(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Move every trainable adapter parameter away from its init (LoRA's B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * std)
