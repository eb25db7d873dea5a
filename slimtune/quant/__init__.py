"""Frozen base weights in 4-bit NF4 (QLoRA): storage (:mod:`.nf4`), the dequantisation kernel (:mod:`.nf4_triton`,
beside its reference), the 4-bit Linear layers (:mod:`.linear`: slimtune's and bitsandbytes', registered with
:mod:`slimtune.core.frozen` so every adapter reads them), and quantising a model (:mod:`.model`)."""
from ..core.frozen import (QuantizedWeight, WeightOperand, base_weight_operand, is_quantized, is_quantized_layer,
                           materialize, weight_dtype, weight_matmul, weight_shape)
from .linear import NF4Linear, quantized_handle
from .model import dequantize, quantize
from .nf4 import NF4Tensors, dequantize_nf4, dequantize_nf4_reference, nf4_storage_bytes, quantize_nf4

__all__ = ["NF4Linear", "NF4Tensors", "QuantizedWeight", "WeightOperand", "base_weight_operand", "dequantize",
           "dequantize_nf4", "dequantize_nf4_reference", "is_quantized", "is_quantized_layer", "materialize",
           "nf4_storage_bytes", "quantize", "quantize_nf4", "quantized_handle", "weight_dtype", "weight_matmul",
           "weight_shape"]
