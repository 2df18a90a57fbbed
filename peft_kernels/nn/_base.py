"""What the wrapper layers (``LoraLinear``, ``IA3Linear``, ``BitFitLinear``, ``SparseLinear``) read off the
frozen base layer they wrap.

Three kinds of base are accepted:

* ``"linear"``: ``torch.nn.Linear``, weight [N, K] (out_features, in_features);
* ``"conv1d"``: transformers' ``Conv1D`` (GPT-2 style; recognised by its class name and its ``nf``
  attribute, so transformers need not be imported), weight stored transposed as [K, N] (PEFT's
  ``fan_in_fan_out``);
* ``"4bit"``: ``peft_kernels.nn.Linear4bit`` (packed NF4/FP4 weight plus a ``quant_state``).

Everything here is a plain function of the base layer (no state): the wrappers keep their own ``_kind``
(it changes when a 4-bit base is merged into a dense one) and pass the layer in.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._checks import FLOAT_DTYPES
from .linear4bit import Linear4bit

#: Input dtypes the wrappers accept (float64 for exact references).
INPUT_DTYPES = FLOAT_DTYPES + (torch.float64,)


def base_kind(layer: nn.Module, wrapper: str = "this layer") -> str:
    """``"4bit"``, ``"linear"`` or ``"conv1d"`` for a base layer a wrapper can hold.

    Raises TypeError naming ``wrapper`` (e.g. ``"LoraLinear"``) and the layer's class otherwise.
    """
    if isinstance(layer, Linear4bit):
        return "4bit"
    if isinstance(layer, nn.Linear):
        return "linear"
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):
        return "conv1d"
    raise TypeError(f"{wrapper} wraps nn.Linear, transformers Conv1D or peft_kernels.nn.Linear4bit, got "
                    f"{type(layer).__name__} (convert a bitsandbytes layer with Linear4bit.from_bnb first)")


def base_shape(layer: nn.Module, wrapper: str = "this layer") -> tuple[int, int]:
    """``(out_features, in_features)`` = (N, K) of a base layer (TypeError as :func:`base_kind`)."""
    if base_kind(layer, wrapper) == "conv1d":
        k, n = layer.weight.shape
        return n, k
    return layer.out_features, layer.in_features


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a dense base (``nn.Linear`` or ``Conv1D``) as [N, K]: a transposed view for Conv1D, so
    in-place writes reach the layer. Not for a 4-bit base (its ``weight`` is the packed bytes)."""
    w = layer.weight
    return w.t() if base_kind(layer) == "conv1d" else w


def storage_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype the base keeps its weight (and a new bias) in: a 4-bit base's ``weight_dtype`` (the dtype it
    was quantized from), else ``weight.dtype``."""
    return layer.weight_dtype if isinstance(layer, Linear4bit) else layer.weight.dtype


def compute_dtype(layer: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype a wrapper computes in for input ``x``: the autocast dtype when autocast is on for x's device,
    else a 4-bit base's ``compute_dtype`` when set, else x's dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    if isinstance(layer, Linear4bit) and layer.compute_dtype is not None:
        return layer.compute_dtype
    return x.dtype


def quant_args(layer: Linear4bit) -> tuple:
    """A 4-bit base's quantized weight as the leading arguments of the ``*_4bit`` ops:
    ``(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize)`` (the nested entries
    None / None / 0.0 without double quantization)."""
    qs = layer.quant_state
    n = qs.nested
    return (layer.weight, qs.absmax, qs.code, None if n is None else n.absmax, None if n is None else n.code,
            0.0 if n is None else float(n.offset), qs.blocksize)


def check_input(x, wrapper: str, out_features: int, in_features: int) -> None:
    """TypeError unless ``x`` is a float32/float16/bfloat16/float64 tensor; ValueError unless its last
    dimension is ``in_features``."""
    if not isinstance(x, torch.Tensor) or x.dtype not in INPUT_DTYPES:
        raise TypeError(f"{wrapper} input must be a float32/float16/bfloat16 (or float64) tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)} but the layer is [{out_features}, "
                         f"{in_features}]: the last dimension of x must be {in_features}")


class WrapsBase:
    """Mixin for an ``nn.Module`` wrapper that holds its frozen base as ``self.base_layer`` (put it before
    ``nn.Module`` in the bases). ``weight`` and ``bias`` read through to the base, as PEFT's layers do, for
    code that reads ``module.weight`` / ``module.bias``; the two helpers read the base through the functions
    above."""

    base_layer: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (packed bytes for a 4-bit base)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The base layer's bias (None when it has none)."""
        return self.base_layer.bias

    def _dense_weight(self) -> torch.Tensor:
        """The dense base weight as [N, K] (see :func:`dense_weight`: writes go through for Conv1D)."""
        return dense_weight(self.base_layer)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """See :func:`compute_dtype`."""
        return compute_dtype(self.base_layer, x)
