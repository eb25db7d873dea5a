"""NF4 (4-bit NormalFloat, Dettmers et al. 2023) with double quantisation, in bitsandbytes' bit layout.

Layout of a weight ``W`` (any shape, ``n`` elements, flattened row-major):

* ``packed`` — uint8 ``[ceil(n/2)]``: element ``2i`` in the high nibble of byte ``i``, element ``2i+1`` in the
  low nibble; a nibble is an index into :data:`NF4_CODE` (16 float32 values in [-1, 1]).
* one scale per block of ``blocksize`` (64) elements, ``absmax_b = max |W_block|``, so that
  ``W[j] ≈ NF4_CODE[nibble_j] · absmax[j // blocksize]``.
* double quantisation stores those scales in 8 bits: ``offset = mean(absmax)``, and ``absmax - offset`` is
  quantised blockwise (``dq_blocksize`` = 256 scales per block) to uint8 indices into the signed dynamic map
  :func:`dynamic_map` with one float32 ``nested_absmax`` per block:
  ``absmax ≈ DYNAMIC[absmax_q] · nested_absmax[b // 256] + offset``.

That is ``4 + 8/64 + 32/(64·256) ≈ 4.127`` bits per weight (:func:`nf4_storage_bytes`). The tensors match
bitsandbytes' ``quantize_4bit(..., quant_type="nf4", compress_statistics=True)`` bit for bit (tests check
it where bitsandbytes is installed), so weights quantised by either one dequantise with either one.
:func:`dequantize_nf4_reference` is the plain-PyTorch reference of the Triton kernel in ``nf4_triton.py``.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ..core.simulation import count
from ..core.tracing import compiling
from ..errors import ConfigError

BLOCKSIZE = 64  #: elements per absmax block (bitsandbytes' default for NF4)
DQ_BLOCKSIZE = 256  #: absmax values per block of the second (8-bit) quantisation

#: The 16 NF4 values: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA, appendix E).
NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230731010437, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """:data:`NF4_CODE` as a float32 tensor ``[16]`` on ``device`` (one cached copy per device: no host-to-device
    copy per dequantisation)."""
    return _nf4_code(torch.device(device))


@functools.lru_cache(maxsize=None)
def _nf4_code(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    values = [0.0, 1.0]
    for i in range(7):  # decades 1e-6 .. 1: 2^i linearly spaced means per decade, both signs
        edges = torch.linspace(0.1, 1.0, 2 ** i + 1)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (i - 6)
        values += (scale * means).tolist() + (-scale * means).tolist()  # scaled in float32, as stored
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic-exponent map (256 sorted float32 values in [-1, 1]) used for the scales."""
    return _dynamic_map_cpu().to(device)


def nf4_storage_bytes(numel: int, blocksize: int = BLOCKSIZE, double_quant: bool = True,
                      dq_blocksize: int = DQ_BLOCKSIZE) -> int:
    """Bytes of a ``numel``-element weight stored as NF4, as bitsandbytes stores it.

    Packed nibbles ``ceil(numel/2)`` uint8; one absmax per ``blocksize`` block: float32 without double
    quantisation, else uint8 codes plus one float32 scale per ``dq_blocksize`` codes, the 256-entry float32
    map and a float32 offset. (The 16-entry NF4 table is shared and not counted.)
    """
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / dq_blocksize) + 4 * 256 + 4


@dataclasses.dataclass
class NF4Tensors:
    """The stored tensors of one NF4 weight. ``absmax`` is float32 ``[blocks]`` without double quantisation,
    else uint8 ``[blocks]`` with ``nested_absmax`` float32 ``[ceil(blocks/dq_blocksize)]``, ``nested_code``
    float32 ``[256]`` and ``offset`` (float32 scalar tensor)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    blocksize: int = BLOCKSIZE
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    dq_blocksize: int = DQ_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _nearest(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest ``table`` entry (sorted ascending) for each of ``values`` (int64)."""
    mid = (table[1:] + table[:-1]) / 2
    return torch.bucketize(values, mid)


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flat padded to whole blocks and viewed [blocks, blocksize], absmax [blocks])``, float32."""
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    return blocks, blocks.abs().amax(dim=1)


def _check_blocksize(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value & (value - 1):
        raise ConfigError(f"{name} must be a power of two >= 2, got {value!r}")


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, blocksize: int = BLOCKSIZE, double_quant: bool = True,
                 dq_blocksize: int = DQ_BLOCKSIZE) -> NF4Tensors:
    """Quantise ``weight`` (any shape, floating point) to NF4 in bitsandbytes' layout (see module docstring)."""
    _check_blocksize("blocksize", blocksize)
    _check_blocksize("dq_blocksize", dq_blocksize)
    if not weight.is_floating_point():
        raise ConfigError(f"only floating-point weights can be quantised, got {weight.dtype}")
    if weight.numel() == 0:
        raise ConfigError("cannot quantise an empty weight")
    flat = weight.detach().reshape(-1).float()
    if not torch.isfinite(flat).all():
        raise ConfigError("weight has NaN or infinite values; NF4 cannot represent them")
    blocks, absmax = _blockwise_absmax(flat, blocksize)
    normed = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    index = _nearest(normed.reshape(-1)[: flat.numel()], nf4_code(flat.device)).to(torch.uint8)
    if index.numel() % 2:
        index = torch.cat([index, index.new_full((1,), NF4_CODE.index(0.0))])  # pad with the zero code
    packed = (index[0::2] << 4) | index[1::2]
    result = NF4Tensors(packed=packed, absmax=absmax, shape=weight.shape, blocksize=blocksize,
                        dq_blocksize=dq_blocksize)
    if double_quant:
        offset = absmax.mean()
        nested_blocks, nested_absmax = _blockwise_absmax(absmax - offset, dq_blocksize)
        code = dynamic_map(flat.device)
        normed = nested_blocks / nested_absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        result.absmax = _nearest(normed.reshape(-1)[: absmax.numel()], code).to(torch.uint8)
        result.nested_absmax, result.nested_code, result.offset = nested_absmax, code, offset
    return result


def block_scales(t: NF4Tensors) -> torch.Tensor:
    """The float32 absmax of every block ``[blocks]`` (undoing double quantisation when present)."""
    if not t.double_quant:
        return t.absmax.float()
    nested = t.nested_absmax.repeat_interleave(t.dq_blocksize)[: t.absmax.numel()]
    return t.nested_code[t.absmax.long()] * nested + t.offset


def dequantize_nf4_reference(t: NF4Tensors, dtype: torch.dtype = torch.float32,
                             code: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight ``[*t.shape]`` in ``dtype``: ``code[nibble] · absmax`` computed in float32, then cast.

    ``code`` overrides the 16-value table (bitsandbytes keeps its own copy in the quant state)."""
    code = nf4_code(t.packed.device) if code is None else code.float()
    packed = t.packed.reshape(-1)
    index = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: t.numel].long()
    scales = block_scales(t).repeat_interleave(t.blocksize)[: t.numel]
    return (code[index] * scales).to(dtype).reshape(t.shape)


def dequantize_nf4(t: NF4Tensors, dtype: torch.dtype, code: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight in ``dtype``: the fused Triton kernel on CUDA (eager), the PyTorch reference elsewhere. On
    the meta device (the memory estimator's simulated step) only the kernel's output is allocated, as on CUDA, and
    its traffic is counted (:mod:`slimtune.core.simulation`)."""
    if t.packed.device.type == "meta":
        count(dequant_bytes=t.numel * (0.5 + torch.empty((), dtype=dtype).element_size()))
        return torch.empty(tuple(t.shape), dtype=dtype, device="meta")
    if t.packed.is_cuda and not compiling():  # under torch.compile the reference, which Inductor fuses itself
        from .nf4_triton import dequantize_nf4_triton, triton_supports  # imports triton (optional)

        if triton_supports(t):
            return dequantize_nf4_triton(t, dtype, code)
    return dequantize_nf4_reference(t, dtype, code)
