"""HRA's WY factors for all layers of a model at once: one batched pass per group of equal shape.

Each HRA layer needs, once per forward pass, ``U`` (normalised ``hra_u``, ``[d, r]``) and ``T`` (``[r, r]``,
``H = I − U T Uᵀ``). Computed layer by layer that is ~20 tiny kernels each (norms, a Gram matrix, a
triangular solve) plus their backward, which makes a step CPU-bound; here every layer with the same
``(d, r, apply_GS, dtype, device)`` shares one stacked computation (``[B, d, r]``), so a whole model costs a
handful of kernels. Autograd flows back to each ``hra_u`` through the stack.

:class:`HraFactorCache` holds the factors of one forward pass. The root model's forward pre-hook starts a
new pass and forms every group's factors; a layer whose ``hra_u`` changed in place (its version counter moved) or
whose grad mode differs
from the cached one recomputes its group, so a stale factor is never used.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn

from ...core.autograd_state import inside_backward, tensor_version
from ...core.frozen import weight_dtype
from ...core.tracing import compiling


def batched_wy_factors(u: torch.Tensor, apply_gs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U [B, d, r], T [B, r, r])`` for stacked ``u [B, d, r]``, in float32 or wider."""
    u = u.to(torch.promote_types(u.dtype, torch.float32))
    r = u.shape[-1]
    eye = torch.eye(r, device=u.device, dtype=u.dtype)
    if apply_gs:
        q, _ = torch.linalg.qr(u)
        return q, (2.0 * eye).expand(u.shape[0], r, r)
    unit = u / torch.linalg.vector_norm(u, dim=1, keepdim=True)
    t_inv = torch.triu(unit.transpose(1, 2) @ unit, diagonal=1) + 0.5 * eye
    return unit, torch.linalg.solve_triangular(t_inv, eye.expand_as(t_inv), upper=True)


class HraFactorCache:
    """Factors ``(U, −U T)`` (``[d, r]`` each, in the layer's weight dtype) for the current forward pass, computed
    per group; a layer then needs one GEMM of its own, ``up = W (−U T)``."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self._layers = [weakref.ref(layer) for layer in layers]
        self._entries: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, tuple[torch.Tensor, torch.Tensor]]] = (
            weakref.WeakKeyDictionary())

    def __getstate__(self) -> dict:  # a copy (deepcopy, pickling) holds its own layers; the pass's factors stay
        return {"layers": [layer for layer in (ref() for ref in self._layers) if layer is not None]}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["layers"])

    def new_pass(self, *_: object) -> None:
        """The root model's forward pre-hook: forget the previous pass's factors and form this pass's, for
        every group, here — outside any gradient-checkpointed region, so a layer's recomputation sees the
        same cached factors (the same saved tensors) as its first run. Nothing under ``torch.compile`` (see
        :meth:`factors`)."""
        if compiling():
            return
        self._entries.clear()
        for layer in (ref() for ref in self._layers):
            if layer is not None and layer not in self._entries:
                self._compute_group(layer)

    @staticmethod
    def _group_key(layer: nn.Module) -> tuple:
        u = layer.hra_u
        return (tuple(u.shape), layer.apply_GS, u.dtype, u.device, weight_dtype(layer.base_layer))

    @staticmethod
    def _state(layer: nn.Module) -> tuple:
        return (torch.is_grad_enabled(), tensor_version(layer.hra_u))

    def factors(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, −U T)`` of ``layer`` for this pass: cached per group (checked by grad mode and ``hra_u``'s version);
        under ``torch.compile`` formed for the layer alone, in the graph (a version counter cannot be traced, and
        the compiled step has no per-kernel host cost for batching to save)."""
        if compiling():
            return self._factors_of([layer])[0]
        entry = self._entries.get(layer)
        state = self._state(layer)
        if entry is None or entry[0] != state or state[1] is None:
            if inside_backward():
                # reentrant checkpointing: the first run had no grad, the recomputation runs inside backward
                # and gets a private graph (a shared one would be traversed by every layer's inner backward)
                return self._factors_of([layer])[0]
            self._compute_group(layer)
            entry = self._entries[layer]
        return entry[1]

    def _compute_group(self, layer: nn.Module) -> None:
        key = self._group_key(layer)
        group = [m for m in (ref() for ref in self._layers) if m is not None and self._group_key(m) == key]
        if not any(m is layer for m in group):  # a layer this cache was not built for
            group = [layer]
        for m, factors in zip(group, self._factors_of(group)):
            self._entries[m] = (self._state(m), factors)

    def _factors_of(self, group: list[nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(U, −U T)`` for each layer of ``group`` (equal group keys), in the layers' weight dtype."""
        unit, t = batched_wy_factors(torch.stack([m.hra_u for m in group]), group[0].apply_GS)
        dtype = self._group_key(group[0])[-1]
        return list(zip(unit.to(dtype).unbind(0), torch.bmm(unit, -t).to(dtype).unbind(0)))


def attach_factor_cache(model: nn.Module, layers: list[nn.Module]) -> Callable[[], None]:
    """Give ``layers`` one shared cache, reset by ``model``'s forward pre-hook; returns the hook's remover."""
    cache = HraFactorCache(layers)
    for layer in layers:
        layer.factor_cache = cache
    return model.register_forward_pre_hook(cache.new_pass).remove
