"""``BitFitLinear``: a trainable bias over a frozen ``nn.Linear``, transformers ``Conv1D`` or 4-bit ``Linear4bit``.

BitFit (Ben Zaken et al., 2021) trains only the biases. The wrapper holds

* ``base_layer``: the original layer, frozen and otherwise left as it was (its own bias, if any, is
  kept but not used by the forward);
* ``bias``: a float32 ``nn.Parameter`` [out_features], initialised from the base's bias, or zeros when
  the base has none (Llama, Mistral and Qwen MLPs; most attention projections).

Forward: ``y = x Wᵀ + bias`` through ``peft_kernels.ops.bitfit`` (one op; nothing of x is saved for
backward, which computes only dX — when x needs it — and db). Mixed precision as ``LoraLinear``: the op
computes in the input's dtype (the autocast dtype under ``torch.autocast``, or a ``Linear4bit``'s
``compute_dtype``); the float32 bias is cast inside the op and its gradient comes back in float32.
The output has x's dtype over a 4-bit base (like ``Linear4bit``) and the compute dtype over a dense one
(like ``nn.Linear`` under autocast).

``merge_and_unload()`` writes the trained bias into the base layer (creating it when the base had none)
and returns that plain layer; ``unload()`` returns the base as it was wrapped.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.bitfit import bitfit_linear_4bit, bitfit_linear_dense
from ._base import (INPUT_DTYPES, base_kind as _base_kind, base_shape, check_input, compute_dtype, dense_weight,
                    quant_args, storage_dtype)


def base_kind(layer: nn.Module) -> str:
    """'4bit', 'linear' or 'conv1d' for a layer BitFit can wrap; TypeError naming the class otherwise."""
    return _base_kind(layer, "BitFitLinear")


class BitFitLinear(nn.Module):
    """``y = x Wᵀ + b`` with W frozen (dense or 4-bit) and only ``b`` trainable.

    Args:
        base_layer: ``nn.Linear`` (weight [N, K]), transformers ``Conv1D`` (weight [K, N]) or
            ``peft_kernels.nn.Linear4bit``. Its parameters are frozen here; the layer is not modified.
        bias_dtype: dtype of the trainable bias (default float32: the master copy an optimizer updates).

    Input x [..., K] float32/float16/bfloat16 (float64 for exact references) on the layer's device;
    output [..., N].
    """

    def __init__(self, base_layer: nn.Module, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self._kind = base_kind(base_layer)
        if bias_dtype not in INPUT_DTYPES:
            raise TypeError(f"bias_dtype must be a float dtype, got {bias_dtype}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.out_features, self.in_features = base_shape(base_layer)
        dev = base_layer.weight.device
        old = base_layer.bias
        init = (torch.zeros(self.out_features, dtype=bias_dtype, device=dev) if old is None
                else old.detach().to(device=dev, dtype=bias_dtype, copy=True))
        self.bias = nn.Parameter(init)

    # ------------------------------------------------------------------ base access
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (for code that reads ``module.weight``, as with PEFT's layers)."""
        return self.base_layer.weight

    def _dense_weight(self) -> torch.Tensor:
        """The dense base weight as [N, K] (a transposed view for Conv1D)."""
        return dense_weight(self.base_layer)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return compute_dtype(self.base_layer, x)

    def _check_input(self, x) -> None:
        check_input(x, "BitFitLinear", self.out_features, self.in_features)
        if x.device != self.bias.device:
            raise ValueError(f"x is on {x.device} but the layer is on {self.bias.device}: move one of them")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        in_dtype = x.dtype
        cdt = self._compute_dtype(x)
        xc = x if x.dtype == cdt else x.to(cdt)
        if self._kind == "4bit":
            y = bitfit_linear_4bit(xc.contiguous(), *quant_args(self.base_layer), self.out_features, self.bias)
            return y if y.dtype == in_dtype else y.to(in_dtype)
        return bitfit_linear_dense(xc, self._dense_weight(), self.bias)

    # ------------------------------------------------------------------ unwrapping
    def unload(self) -> nn.Module:
        """The original base layer, as it was wrapped (the trained bias is dropped)."""
        return self.base_layer

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Write the trained bias into the base layer (in place, in the base's parameter dtype; created when
        the base had none, frozen) and return that layer: a plain nn.Linear / Conv1D / Linear4bit."""
        base = self.base_layer
        base.bias = nn.Parameter(self.bias.detach().to(storage_dtype(base), copy=True), requires_grad=False)
        return base

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, base={self._kind}, "
                f"bias_dtype={str(self.bias.dtype).replace('torch.', '')}")
