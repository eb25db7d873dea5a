"""4-bit Linear layers: slimtune's :class:`NF4Linear` and bitsandbytes' ``Linear4bit``, behind one handle.

Both store the weight in the same NF4 layout (``nf4.py``). An adapter over either reads the weight through
:func:`quantized_handle`, whose ``dequantize(dtype)`` gives a transient dense copy (the Triton kernel on CUDA).
A quantised layer used on its own (not adapted) runs :class:`FrozenLinearFunction`, which dequantises again
in backward instead of saving the dense weight.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..core.compute import compute_setting
from ..core.frozen import QuantizedWeight, register_quantized_layer
from ..core.tracing import cached_unless_traced
from ..errors import SlimtuneError
from .nf4 import BLOCKSIZE, DQ_BLOCKSIZE, NF4Tensors, dequantize_nf4, quantize_nf4


class FrozenLinearFunction(torch.autograd.Function):
    """``x Wᵀ + b`` for a frozen quantised ``W``; saves nothing but the handle.

    Backward: ``dx = dy W`` with W dequantised again (the dense copy dies with the GEMM); ``db = Σ dy``; W is
    frozen 4-bit storage and gets no gradient."""

    @staticmethod
    def forward(ctx, x, handle, bias):
        ctx.handle = handle
        return F.linear(x, handle.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        grad_x = dy @ ctx.handle.dequantize(dy.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def _as_bits(t: torch.Tensor | None) -> torch.Tensor | None:
    """float32 -> its int32 bit pattern (other dtypes, e.g. uint8 scale codes, unchanged)."""
    if t is None or t.dtype != torch.float32:
        return t
    return t.reshape(-1).view(torch.int32)


def _from_bits(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.view(torch.float32) if t is not None and t.dtype == torch.int32 else t


class NF4Linear(nn.Module):
    """A frozen Linear whose weight ``[out_features, in_features]`` is stored as NF4 (buffers, no grad).

    Buffers: ``weight`` uint8 ``[ceil(n/2), 1]`` (packed nibbles, bitsandbytes' shape), ``absmax`` (uint8
    ``[blocks]`` with double quantisation, else float32), and with double quantisation ``nested_absmax``,
    ``nested_code`` ``[256]`` and ``offset`` (float32). ``bias`` stays dense in ``compute_dtype``, frozen.
    Computation runs in the input's dtype (autocast's, when on); ``compute_dtype`` is the dtype of a dense
    copy made by :meth:`dequantize` with no dtype given.
    """

    def __init__(self, tensors: NF4Tensors, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        super().__init__()
        if len(tensors.shape) != 2:
            raise SlimtuneError(f"NF4Linear needs a 2-D weight, got shape {tuple(tensors.shape)}")
        self.out_features, self.in_features = tensors.shape
        self.compute_dtype = compute_dtype
        self.blocksize, self.dq_blocksize = tensors.blocksize, tensors.dq_blocksize
        self.register_buffer("weight", tensors.packed.reshape(-1, 1))
        # float32 state is stored as its int32 bit pattern, so that model.to(torch.bfloat16) cannot round it
        for name in ("absmax", "nested_absmax", "nested_code", "offset"):
            self.register_buffer(f"_{name}", _as_bits(getattr(tensors, name)))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.handle = NF4Handle(self)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None, blocksize: int = BLOCKSIZE,
                    double_quant: bool = True, dq_blocksize: int = DQ_BLOCKSIZE) -> "NF4Linear":
        """Quantise ``linear``'s weight (on its device); ``compute_dtype`` defaults to the weight's dtype."""
        weight = linear.weight
        tensors = quantize_nf4(weight, blocksize, double_quant, dq_blocksize)
        return cls(tensors, linear.bias, compute_dtype or weight.dtype)

    def _apply(self, fn, recurse: bool = True):
        """``model.to(dtype)`` / ``.half()`` also move ``compute_dtype`` (the packed state is integer: untouched)."""
        super()._apply(fn, recurse)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return self

    absmax = property(lambda self: _from_bits(self._absmax))
    nested_absmax = property(lambda self: _from_bits(self._nested_absmax))
    nested_code = property(lambda self: _from_bits(self._nested_code))
    offset = property(lambda self: _from_bits(self._offset))

    def nf4(self) -> NF4Tensors:
        return NF4Tensors(packed=self.weight.reshape(-1), absmax=self.absmax,
                          shape=torch.Size((self.out_features, self.in_features)), blocksize=self.blocksize,
                          nested_absmax=self.nested_absmax, nested_code=self.nested_code, offset=self.offset,
                          dq_blocksize=self.dq_blocksize)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A dense ``[out_features, in_features]`` copy in ``dtype`` (default ``compute_dtype``)."""
        return dequantize_nf4(self.nf4(), dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"NF4Linear expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        dtype = compute_setting(x)[0]
        bias = None if self.bias is None else self.bias.to(dtype)
        return FrozenLinearFunction.apply(x.to(dtype), self.handle, bias)

    def extra_repr(self) -> str:
        dq = "double-quantised " if self.nested_absmax is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{dq}NF4 blocksize={self.blocksize}, compute_dtype={self.compute_dtype}")


class NF4Handle:
    """:class:`~slimtune.core.frozen.QuantizedWeight` over an :class:`NF4Linear`'s buffers."""

    def __init__(self, module: NF4Linear) -> None:
        self._module = module  # a plain attribute: the module owns the handle, not the reverse in state

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._module.out_features, self._module.in_features))

    @property
    def dtype(self) -> torch.dtype:
        return self._module.compute_dtype

    @property
    def device(self) -> torch.device:
        return self._module.weight.device

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self._module.dequantize(dtype)


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """bitsandbytes' ``Linear4bit`` (checked without importing bitsandbytes; once per class: every adapted layer
    asks on every forward; uncached while Dynamo traces, which warns about a cache it would bypass)."""
    return cached_unless_traced(_is_bnb_linear4bit_class)(type(module))


@functools.lru_cache(maxsize=None)
def _is_bnb_linear4bit_class(cls: type) -> bool:
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in cls.__mro__)


class BnbHandle:
    """:class:`~slimtune.core.frozen.QuantizedWeight` over a bitsandbytes ``Linear4bit``: NF4 weights are read
    in place by slimtune's dequantisation (same layout); FP4 goes through bitsandbytes itself."""

    def __init__(self, module: nn.Module) -> None:
        self._module = module

    def _state(self):
        state = getattr(self._module.weight, "quant_state", None)
        if state is None:
            raise SlimtuneError(
                "this bitsandbytes Linear4bit is not quantised yet (bitsandbytes quantises when the layer is "
                "moved to its device): call .to(device) on the model before adapting or running it")
        return state

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._state().shape)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self._module, "compute_dtype", None) or self._state().dtype

    @property
    def device(self) -> torch.device:
        return self._module.weight.device

    def nf4(self) -> NF4Tensors | None:
        """The weight as :class:`NF4Tensors` (views, no copy); ``None`` for FP4."""
        s = self._state()
        if s.quant_type != "nf4":
            return None
        t = NF4Tensors(packed=self._module.weight.data.reshape(-1), absmax=s.absmax, shape=torch.Size(s.shape),
                       blocksize=s.blocksize)
        if s.nested:
            t.nested_absmax, t.nested_code, t.offset = s.state2.absmax, s.state2.code, s.offset
            t.dq_blocksize = s.state2.blocksize
        return t

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        tensors = self.nf4()
        if tensors is not None:
            return dequantize_nf4(tensors, dtype, code=self._state().code)
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self._module.weight.data, self._state()).to(dtype)


def quantized_handle(base: nn.Module) -> QuantizedWeight | None:
    """A :class:`~slimtune.core.frozen.QuantizedWeight` for a 4-bit layer (slimtune's or bitsandbytes'), or ``None``
    for any other module. Registered with :func:`slimtune.core.frozen.register_quantized_layer`, so the adapters
    read these layers' weights through it."""
    if isinstance(base, NF4Linear):
        return base.handle
    if is_bnb_linear4bit(base):
        handle = base.__dict__.get("_slimtune_handle")
        if handle is None:
            handle = base.__dict__["_slimtune_handle"] = BnbHandle(base)
        return handle
    return None


register_quantized_layer(quantized_handle)
