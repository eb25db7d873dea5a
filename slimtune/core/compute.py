"""The dtype adapter GEMMs run in, the cast helpers every Function uses, and GEMMs with a fused scale or an fp32 result."""
from __future__ import annotations

import contextlib

import torch

from . import simulation
from .tracing import compiling

_NO_CONTEXT = contextlib.nullcontext()
_MM_OUT_DTYPE: dict[torch.dtype, bool] = {}  # whether torch.mm(..., out_dtype=fp32) runs, per input dtype (CUDA)


def autocasting(x: torch.Tensor) -> bool:
    """Whether autocast is on for ``x``'s device. Meta tensors (the memory estimator's simulated step) have no
    autocast."""
    return x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)


def compute_setting(x: torch.Tensor) -> tuple[torch.dtype, contextlib.AbstractContextManager]:
    """The dtype adapter GEMMs run in (autocast's when it is on, else x's), and a context that turns autocast
    off around our own kernels (a no-op context when autocast is off: the common, cheap path)."""
    if autocasting(x):
        device = x.device.type
        return torch.get_autocast_dtype(device), torch.autocast(device, enabled=False)
    return x.dtype, _NO_CONTEXT


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (``t`` itself when it already is)."""
    return t if t.dtype == dtype else t.to(dtype)


def cast_optional(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else cast(t, dtype)


def mm_scaled(a: torch.Tensor, b: torch.Tensor, s: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``s · (a @ b)`` for 2-D ``a`` ``[M, K]``, ``b`` ``[K, N]`` as one GEMM: the scale rides in the GEMM's epilogue
    (``addmm_`` with ``beta=0`` into an uninitialised buffer, whose content is documented as ignored, NaN included),
    so no second kernel rescales ``[M, N]``. s = 1 is a plain ``a @ b``; under ``torch.compile`` it is
    ``(a @ b) · s`` (copied into ``out``), which Inductor fuses itself. ``out``: write there (``[M, N]``, strided rows
    allowed)."""
    if compiling():  # Dynamo takes no strided out= (a graph break): a product Inductor writes where it fuses
        product = a @ b if s == 1.0 else (a @ b).mul_(s)
        return out.copy_(product) if out is not None else product
    if s == 1.0:
        return torch.mm(a, b, out=out) if out is not None else a @ b
    if out is None:
        out = a.new_empty(a.shape[0], b.shape[1])
    return out.addmm_(a, b, beta=0, alpha=s)


def is_column_major(t: torch.Tensor) -> bool:
    """Whether 2-D ``t`` ``[a, b]`` is a transposed contiguous tensor (strides ``(1, a)``), b > 1: a LoRA B while a
    wide stack holds it (:mod:`.wide_rows`)."""
    return t.dim() == 2 and t.shape[1] > 1 and t.stride() == (1, t.shape[0])


def mm_scaled_as(a: torch.Tensor, b: torch.Tensor, s: float, like: torch.Tensor) -> torch.Tensor:
    """``s · (a @ b)`` laid out as ``like`` is (a parameter's gradient: column-major for a column-major parameter,
    computed as ``(bᵀ aᵀ)ᵀ``, so that autograd need not copy it into the parameter's layout)."""
    if is_column_major(like):
        return mm_scaled(b.t(), a.t(), s).t()
    return mm_scaled(a, b, s)


def add_product(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``y + alpha · (a @ b)`` for 2-D ``y`` ``[M, N]``, ``a`` ``[M, K]``, ``b`` ``[K, N]``, returned ``[M, N]``: eagerly
    in place in y (``addmm_``: the GEMM's epilogue adds). Under ``torch.compile`` out of place, the two added as
    ``[1, M, N]`` views: Inductor fuses that add into a pointwise kernel, where on an ``[M, N]`` product it makes an
    extern ``addmm``, which first copies y into its output (one device-to-device copy of ``[M, N]`` per sum: H100,
    ``benchmarks/compiled_sum_forms.py``, RESULTS.md run 121)."""
    if not compiling():
        return y.addmm_(a, b, alpha=alpha)
    return add_as_views(y, scaled_product(a, b, alpha))


def scaled_product(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha · (a @ b)`` as Inductor fuses it (the scale into the product's reader)."""
    return a @ b if alpha == 1.0 else (a @ b) * alpha


def add_as_views(y: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
    """``y + product`` (2-D, one shape), added as ``[1, M, N]`` views: the form whose add Inductor fuses into a
    pointwise kernel (:func:`add_product`)."""
    return (y.unsqueeze(0) + product.unsqueeze(0)).squeeze(0)


def fp32_out_gemm(t: torch.Tensor) -> bool:
    """Whether ``torch.mm(t, ·, out_dtype=torch.float32)`` runs: bf16/fp16 on CUDA, probed once per dtype (a GEMM
    accumulating in fp32 that writes its fp32 result, no rounded copy in between)."""
    if t.dtype not in (torch.float16, torch.bfloat16):
        return False
    if t.device.type == "meta":  # the memory estimator's simulated step: as its CUDA step would
        return simulation.mirrors_cuda()
    if not t.is_cuda:
        return False
    if t.dtype not in _MM_OUT_DTYPE:
        try:
            probe = torch.ones(1, 1, device=t.device, dtype=t.dtype)
            _MM_OUT_DTYPE[t.dtype] = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE[t.dtype] = False
    return _MM_OUT_DTYPE[t.dtype]


_ACCUMULATE = {dtype: torch.promote_types(dtype, torch.float32)
               for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def accumulate_type(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64 (``torch.promote_types(dtype, float32)``, a dispatched op, looked up in a table: it
    runs several times per adapted layer and step)."""
    acc = _ACCUMULATE.get(dtype)
    return acc if acc is not None else torch.promote_types(dtype, torch.float32)


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` ``[M, N]`` in fp32 (fp64 for fp64) from 2-D ``a`` ``[M, K]`` and ``b`` ``[K, N]``: on CUDA a
    bf16/fp16 GEMM that writes fp32 (:func:`fp32_out_gemm`); elsewhere the GEMM in a's dtype, then upcast."""
    acc = accumulate_type(a.dtype)
    if a.dtype == acc:
        return (a @ b.to(acc)).to(acc)  # .to: under autocast the GEMM itself may run (and return) in bf16
    if b.dtype == a.dtype and fp32_out_gemm(a):
        return torch.mm(a, b, out_dtype=acc)
    return (a @ b.to(a.dtype)).to(acc)
