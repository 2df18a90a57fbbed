"""4-bit formats: code books, QuantState, quantization and checkpoint conversion."""
from .codes import NF4_VALUES, FP4_VALUES, QUANT_TYPES, VALID_BLOCKSIZES, code4, dynamic_map
from .quantize import quantize_4bit, quantize_blockwise_8bit
from .state import NestedStats, QuantState

__all__ = ["NF4_VALUES", "FP4_VALUES", "QUANT_TYPES", "VALID_BLOCKSIZES", "code4", "dynamic_map",
           "quantize_4bit", "quantize_blockwise_8bit", "NestedStats", "QuantState"]
