"""Frozen base weights in 4-bit NF4 (QLoRA): storage, dequantisation kernels, and quantising a model."""
from .frozen import (QuantizedWeight, WeightOperand, base_weight_operand, is_quantized, materialize, weight_dtype,
                     weight_matmul, weight_shape)
from .linear import NF4Linear, quantized_handle
from .model import dequantize, is_quantized_layer, quantize
from .nf4 import NF4Tensors, dequantize_nf4, dequantize_nf4_reference, nf4_storage_bytes, quantize_nf4

__all__ = ["NF4Linear", "NF4Tensors", "QuantizedWeight", "WeightOperand", "base_weight_operand", "dequantize",
           "dequantize_nf4", "dequantize_nf4_reference", "is_quantized", "is_quantized_layer", "materialize",
           "nf4_storage_bytes", "quantize", "quantize_nf4", "quantized_handle", "weight_dtype", "weight_matmul",
           "weight_shape"]
