"""NF4 storage arithmetic (the format itself, quantise/dequantise, follows in this file)."""
from __future__ import annotations

import math

BLOCKSIZE = 64  #: elements per absmax block (bitsandbytes' default for NF4)
DQ_BLOCKSIZE = 256  #: absmax values per block of the second (8-bit) quantisation


def nf4_storage_bytes(numel: int, blocksize: int = BLOCKSIZE, double_quant: bool = True,
                      dq_blocksize: int = DQ_BLOCKSIZE) -> int:
    """Bytes of a ``numel``-element weight stored as NF4, as bitsandbytes stores it.

    Packed nibbles ``ceil(numel/2)`` uint8; one absmax per ``blocksize`` block: float32 without double
    quantisation, else uint8 codes plus one float32 scale per ``dq_blocksize`` codes, the 256-entry float32
    code table and a float32 offset. (The 16-entry NF4 code table is shared and not counted.)
    """
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / dq_blocksize) + 4 * 256 + 4
