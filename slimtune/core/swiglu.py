"""A gated MLP's ``silu(g) ⊙ u`` as one autograd Function that saves g and u alone.

Llama-family MLPs in transformers compute ``down(act(gate(x)) * up(x))`` with SiLU as the activation. Run as two
PyTorch ops, autograd keeps g (SiLU's input), ``s = silu(g)`` and u (the product's): three ``[N, d_ff]`` tensors.
Backward needs only g and u — s is one elementwise pass away::

    h  = s ⊙ u,             s = silu(g)                  (each rounded to the activations' dtype, as PyTorch does)
    du = dh ⊙ s,            dg = silu'(g) · (dh ⊙ u)

:class:`SwigluFunction` saves g and u. On CUDA one Triton kernel runs each way (:mod:`.triton_swiglu`: SiLU's
``exp`` is Triton's, so an element can differ from PyTorch's by one unit in the last place, rarely); elsewhere the
plain ops run — forward ``F.silu(g) * u``, backward with SiLU's own backward kernel (:mod:`.aten_grads`): the plain
path's numbers bit for bit. :mod:`.lean_layers` installs it on the transformers MLP classes it knows.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .aten_grads import silu_grad
from .triton import use_triton


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) ⊙ u`` as the MLP computes it: g, u ``[..., d_ff]`` of one dtype."""
    return F.silu(g) * u


def swiglu_backward_reference(grad: torch.Tensor, g: torch.Tensor,
                              u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dg, du)`` for ``h = silu(g) ⊙ u`` given ``dh = grad`` (all ``[..., d_ff]``), as autograd computes them."""
    return silu_grad(grad * u, g), grad * F.silu(g)


def _triton_takes(g: torch.Tensor, u: torch.Tensor) -> bool:
    return use_triton(g) and u.dtype is g.dtype and u.shape == g.shape


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) ⊙ u`` (g, u ``[..., d_ff]`` of one dtype and shape) as :class:`SwigluFunction` computes it: the Triton
    kernel where it runs, else :func:`swiglu_reference`; on the meta device its shape."""
    if g.device.type == "meta":
        return torch.empty_like(g)
    if _triton_takes(g, u):
        from .triton_swiglu import swiglu_forward_triton

        return swiglu_forward_triton(g, u)
    return swiglu_reference(g, u)


class SwigluFunction(torch.autograd.Function):
    """``h = silu(g) ⊙ u`` (module docstring): g, u ``[..., d_ff]`` of one dtype and shape -> h ``[..., d_ff]``;
    saves g and u."""

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return swiglu_forward(g, u)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        g, u = ctx.saved_tensors
        if g.device.type == "meta":
            return torch.empty_like(g), torch.empty_like(u)
        if _triton_takes(g, u):
            from .triton_swiglu import swiglu_backward_triton

            return swiglu_backward_triton(grad, g, u)
        return swiglu_backward_reference(grad, g, u)
