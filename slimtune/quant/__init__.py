"""Frozen base weights in 4-bit NF4 (QLoRA): storage, dequantisation kernels, and quantising a model."""
from .frozen import (QuantizedWeight, WeightOperand, base_weight_operand, is_quantized, materialize, weight_dtype,
                     weight_shape)
from .nf4 import nf4_storage_bytes

__all__ = ["QuantizedWeight", "WeightOperand", "base_weight_operand", "is_quantized", "materialize",
           "nf4_storage_bytes", "weight_dtype", "weight_shape"]
