"""LoKr (Kronecker product, as LyCORIS / PEFT): structured or folded per layer; PEFT's ``LOKR`` format."""
from ...core.registry import Method, register_method
from .config import LokrConfig, build_lokr
from .factors import lokr_factors
from .format import LOKR_FORMAT
from .math import factorization, lokr_delta_weight
from .module import LokrLayer

# a UNet's lean layers from 16 MiB, not 4 (benchmarks/RESULTS.md run 105: on SD-1.5 a step 5% shorter, the peak
# still 0.62 of PEFT-bf16's)
register_method(Method("lokr", LokrConfig, build_lokr, LOKR_FORMAT, unet_lean_scale=4))

__all__ = ["LOKR_FORMAT", "LokrConfig", "LokrLayer", "build_lokr", "factorization", "lokr_delta_weight",
           "lokr_factors"]
