"""HRA (Householder reflection adaptation) in compact WY form, applied to activations; PEFT's ``HRA`` format."""
from ...core.registry import Method, register_method
from .config import HraConfig, build_hra, finalize_hra
from .format import HRA_FORMAT
from .math import hra_dense_transform, hra_low_rank_factors, wy_factors
from .module import HraLayer, orthogonality_loss

register_method(Method("hra", HraConfig, build_hra, HRA_FORMAT, finalize_hra))

__all__ = ["HRA_FORMAT", "HraConfig", "HraLayer", "build_hra", "finalize_hra", "hra_dense_transform",
           "hra_low_rank_factors", "orthogonality_loss", "wy_factors"]
