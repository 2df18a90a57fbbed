"""Ops: torch.library custom ops with autograd, backend dispatch, and the plain-torch reference."""
from . import backend, reference
from .functional import dequantize, linear_4bit

__all__ = ["backend", "reference", "dequantize", "linear_4bit"]
