"""4-bit Linear layers: slimtune's own NF4Linear and bitsandbytes' Linear4bit, behind one handle."""
from __future__ import annotations

from torch import nn


def quantized_handle(base: nn.Module):
    """A :class:`~slimtune.quant.frozen.QuantizedWeight` for a 4-bit layer, or ``None`` for a dense one."""
    return None
