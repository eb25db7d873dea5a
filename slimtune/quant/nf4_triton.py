"""Fused NF4 dequantisation in Triton: packed nibbles + double-quantised scales -> a dense weight, one pass.

Each output element ``j`` reads its byte ``packed[j // 2]`` (high nibble for even ``j``), its block's uint8
scale code, that code's nested float32 scale and the offset, and writes ``code[nibble] · absmax`` in the
output dtype — the work bitsandbytes does in two kernels (scales first, then weights) in one. The plain
PyTorch reference is :func:`slimtune.quant.nf4.dequantize_nf4_reference`; the CPU tests run this kernel under
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch

from ..core.triton import cdiv, launch
from .nf4 import NF4Tensors, nf4_code

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None

BLOCK = 2048  #: output elements per program


def triton_supports(t: NF4Tensors) -> bool:
    """Whether the kernel handles ``t``: triton present, scales blocks of at least 2 elements."""
    return triton is not None and t.blocksize >= 2 and t.dq_blocksize >= 1


if triton is not None:

    @triton.jit
    def _dequant_nf4_kernel(packed_ptr, absmax_ptr, nested_ptr, nested_code_ptr, offset_ptr, code_ptr, out_ptr,
                            numel, BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr,
                            DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(offs % 2 == 0, byte >> 4, byte & 15)
        value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
        block = offs // BLOCKSIZE
        if DOUBLE_QUANT:
            scale_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            nested = tl.load(nested_ptr + block // DQ_BLOCKSIZE, mask=mask, other=0.0)
            scale = tl.load(nested_code_ptr + scale_code, mask=mask, other=0.0) * nested + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        tl.store(out_ptr + offs, (value * scale).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_nf4_triton(t: NF4Tensors, dtype: torch.dtype, code: torch.Tensor | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight ``[*t.shape]`` in ``dtype`` (written into ``out`` when given), computed in float32."""
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed; use dequantize_nf4_reference")
    device = t.packed.device
    code = nf4_code(device) if code is None else code.to(device=device, dtype=torch.float32)
    out = torch.empty(t.shape, dtype=dtype, device=device) if out is None else out
    numel = t.numel
    if t.double_quant:
        nested, nested_code, offset = t.nested_absmax, t.nested_code, t.offset.reshape(1).float()
    else:
        nested = nested_code = offset = t.absmax  # unused
    launch(_dequant_nf4_kernel, out, (cdiv(numel, BLOCK),), t.packed, t.absmax, nested, nested_code, offset, code,
           out, numel, BLOCKSIZE=t.blocksize, DQ_BLOCKSIZE=t.dq_blocksize, DOUBLE_QUANT=t.double_quant, BLOCK=BLOCK)
    return out
