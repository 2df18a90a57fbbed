"""Layers of peft-kernels-rotary (``kernels`` looks them up here by name)."""
from peft_kernels.nn.fused import FusedRotaryPosEmb as apply_rotary_transformers

__all__ = ["apply_rotary_transformers"]
