"""The frozen base weight as an adapter's kernels see it: a dense tensor, or a handle to packed 4-bit storage.

Adapter Functions take a :data:`WeightOperand` where they used to take ``base.weight``:

- a dense ``torch.Tensor`` ``[d_out, d_in]`` — saved with ``ctx.save_for_backward``;
- a :class:`QuantizedWeight` handle (NF4 storage, ours or bitsandbytes') — kept on ``ctx`` as a plain
  attribute (it only references the module's packed buffers; :func:`save_with_weight` does either), and turned
  into a dense tensor with
  :func:`materialize` right before each GEMM that needs it. The dense copy is a local: it dies with the GEMM,
  in forward and again in backward, so no dequantised weight outlives its use.

Which layers are 4-bit is told by the storage code (:mod:`slimtune.quant` registers its NF4 layers and
bitsandbytes' ``Linear4bit`` with :func:`register_quantized_layer`), so this module knows the protocol, not the
storage.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, Union, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class QuantizedWeight(Protocol):
    """Packed storage of a frozen ``[d_out, d_in]`` weight that can produce a dense copy on demand."""

    @property
    def shape(self) -> torch.Size:
        """``[d_out, d_in]``."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype dense copies default to (e.g. bfloat16)."""
        ...

    @property
    def device(self) -> torch.device: ...

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """A fresh dense ``[d_out, d_in]`` tensor in ``dtype`` on the storage's device."""
        ...


WeightOperand = Union[torch.Tensor, QuantizedWeight]


def is_quantized(weight: WeightOperand) -> bool:
    return not isinstance(weight, torch.Tensor)


def save_with_weight(ctx, weight: WeightOperand, *tensors: torch.Tensor | None) -> None:
    """``ctx.save_for_backward(weight, *tensors)`` for a dense weight; a quantised handle goes on ``ctx`` instead (its
    slot saves None), so no dense copy is ever kept. :func:`saved_with_weight` gives both back."""
    quantized = is_quantized(weight)
    ctx.weight_handle = weight if quantized else None
    ctx.save_for_backward(None if quantized else weight, *tensors)


def saved_with_weight(ctx) -> tuple[WeightOperand, list[torch.Tensor]]:
    """``(weight, tensors)`` as :func:`save_with_weight` kept them (``weight``: the dense tensor or the handle)."""
    weight, *tensors = ctx.saved_tensors
    return (weight if ctx.weight_handle is None else ctx.weight_handle), tensors


def materialize(weight: WeightOperand, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` as a dense tensor in ``dtype``: the tensor itself when it already is one (cast if needed),
    else a transient dequantised copy that the caller must drop after its GEMM."""
    if isinstance(weight, torch.Tensor):
        return weight if weight.dtype == dtype else weight.to(dtype)
    return weight.dequantize(dtype)


def weight_shape(base: nn.Module) -> torch.Size:
    """The logical shape of ``base``'s weight (``[d_out, d_in]`` for a 4-bit layer, whose packed storage
    has another shape; the stored layout otherwise, e.g. ``[d_in, d_out]`` for transformers' Conv1D)."""
    handle = quantized_handle(base)
    return base.weight.shape if handle is None else handle.shape


def weight_dtype(base: nn.Module) -> torch.dtype:
    """The dtype ``base`` computes in: its weight's, or the compute dtype of a 4-bit layer (never uint8)."""
    handle = quantized_handle(base)
    return base.weight.dtype if handle is None else handle.dtype


HandleProvider = Callable[[nn.Module], Optional[QuantizedWeight]]
_PROVIDERS: list[HandleProvider] = []


def register_quantized_layer(provider: HandleProvider) -> Callable[[], None]:
    """Teach the adapters a kind of 4-bit layer: ``provider(module)`` returns its :class:`QuantizedWeight`
    handle, or None for a module it does not know. Returns a function that takes the registration back."""
    if provider not in _PROVIDERS:
        _PROVIDERS.append(provider)

    def unregister() -> None:
        if provider in _PROVIDERS:
            _PROVIDERS.remove(provider)

    return unregister


def quantized_handle(base: nn.Module) -> QuantizedWeight | None:
    """The :class:`QuantizedWeight` of a 4-bit layer, or None for a dense one."""
    for provider in _PROVIDERS:
        handle = provider(base)
        if handle is not None:
            return handle
    return None


def is_quantized_layer(module: nn.Module) -> bool:
    """A 4-bit Linear (slimtune's ``NF4Linear`` or bitsandbytes' ``Linear4bit``)."""
    return quantized_handle(module) is not None



def base_weight_operand(base: nn.Module) -> WeightOperand:
    """The operand for ``base``'s weight: ``base.weight`` for dense layers, a handle for 4-bit layers."""
    handle = quantized_handle(base)
    return base.weight if handle is None else handle


class _WeightMatmul(torch.autograd.Function):
    """``W @ m`` for a frozen quantised ``W`` (HRA's ``W U``).

    Backward: ``dm = Wᵀ dout`` with W dequantised again (autograd would otherwise have saved the dense copy);
    W is frozen and gets no gradient."""

    @staticmethod
    def forward(ctx, m, weight):
        ctx.weight = weight
        return materialize(weight, m.dtype) @ m

    @staticmethod
    def backward(ctx, grad):
        return materialize(ctx.weight, grad.dtype).t() @ grad, None


def weight_matmul(weight: WeightOperand, m: torch.Tensor) -> torch.Tensor:
    """``W @ m`` (``[d_out, d_in] @ [d_in, k]``) differentiable in ``m``, in m's dtype; for a quantised W the
    dense copy lives only inside forward and inside backward (autograd would otherwise save it)."""
    if isinstance(weight, torch.Tensor):
        return materialize(weight, m.dtype) @ m
    return _WeightMatmul.apply(m, weight)
