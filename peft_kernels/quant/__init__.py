"""4-bit formats: code books, QuantState, quantization, whole-model conversion and checkpoints."""
from .codes import FP4_VALUES, NF4_VALUES, QUANT_TYPES, VALID_BLOCKSIZES, code4, dynamic_map
from .quantize import quantize_4bit, quantize_blockwise_8bit
from .state import NestedStats, QuantState


def __getattr__(name):
    # model.py and checkpoint.py import nn (which imports this package): load them lazily.
    if name in ("quantize_model", "QuantizationReport"):
        from . import model
        return getattr(model, name)
    if name in ("save_quantized", "load_quantized", "CheckpointError"):
        from . import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["NF4_VALUES", "FP4_VALUES", "QUANT_TYPES", "VALID_BLOCKSIZES", "code4", "dynamic_map",
           "quantize_4bit", "quantize_blockwise_8bit", "NestedStats", "QuantState", "quantize_model",
           "QuantizationReport", "save_quantized", "load_quantized", "CheckpointError"]
