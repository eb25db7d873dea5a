"""Tiny diffusers denoisers for the interop tests: a UNet (tiny-unet) and a Flux DiT (tiny-dit-4b: one double and
three single blocks), built once from their preset configs and copied, with their inputs."""
from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from torch import nn

from slimtune.models import workload
from slimtune.models.diffusion import DIFFUSION_PRESETS

diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()

UNET, DIT = "tiny-unet", "tiny-dit-4b"


@functools.cache
def _base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    spec = DIFFUSION_PRESETS[kind]
    if spec.family == "dit":
        return diffusers.FluxTransformer2DModel(**spec.dit_config()).eval()
    return diffusers.UNet2DConditionModel(**spec.config).eval()


def denoiser(kind: str) -> nn.Module:
    """A fresh copy of the seeded tiny denoiser (``UNET`` or ``DIT``)."""
    return copy.deepcopy(_base(kind))


@functools.cache
def inputs(kind: str) -> dict[str, Any]:
    """One sample's inputs (random latents and text conditioning, as slimtune.models.workload makes them)."""
    batch = workload.make_inputs(kind, None, 1, 0, "cpu", torch.float32, torch.Generator().manual_seed(1))
    batch.pop("target")
    return batch


def run(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(kind), return_dict=False)[0]


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every trainable (adapter) tensor moved to random values: no factor left at its zero init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.2)
    return model
