"""The exact float64 weight of a frozen base layer, shared by the layer tests' references.

Not collected by pytest (leading underscore).
"""
import torch
from torch import nn

from peft_kernels.nn._quant_weight import QuantizedWeight
from peft_kernels.ops import reference


def weight64(base: nn.Module) -> torch.Tensor:
    """W [N, K] in float64 as the layer computes with it: a ``Linear4bit`` (or ``Embedding4bit``, [V, H])
    dequantized from its bytes, an ``nn.Linear``'s weight, or a transformers ``Conv1D``'s weight transposed
    (it stores [K, N])."""
    if isinstance(base, QuantizedWeight):
        qs = base.quant_state
        return reference.dequantize_4bit(base.weight, qs.absmax_float(), qs.code, qs.blocksize, qs.numel,
                                         torch.float64).view(qs.shape)
    w = base.weight.detach().double()
    return w.t().contiguous() if type(base).__name__ == "Conv1D" else w
