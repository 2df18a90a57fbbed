"""``Linear4bit``: a drop-in ``nn.Linear`` whose frozen weight is stored in 4-bit NF4/FP4.

Storage is bitsandbytes-compatible: ``weight`` is the packed uint8 tensor
``[(N*K + 1) // 2, 1]`` (a frozen Parameter, as in bitsandbytes), the block
statistics are buffers, and ``state_dict()`` writes the very keys transformers
writes for a bitsandbytes 4-bit layer (``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``), so checkpoints move both ways.
Loading a dense ``weight`` [N, K] into the layer quantizes it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import FLOAT_DTYPES
from ..ops.functional import linear_4bit
from ..quant.state import NestedStats, QuantState
from ._quant_weight import QuantizedWeight


class Linear4bit(QuantizedWeight, nn.Module):
    """``y = x W^T + b`` with W [out_features, in_features] frozen in 4-bit.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        quant_type: 'nf4' (default) or 'fp4'.
        blocksize: elements per absmax block, 32..4096 (default 64).
        double_quant: quantize absmax to 8 bits (saves ~0.37 bit/parameter).
        compute_dtype: dtype the matmul runs in (inputs are cast to it and the
            output cast back); None computes in the input's dtype.
        dtype: dtype of the bias and of the weight before quantization.

    Input x [..., in_features] in fp32/fp16/bf16; output [..., out_features] in x.dtype.
    Backward gives the input gradient (and the bias gradient when the bias trains);
    the weight has no gradient and nothing of x is saved.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                 device=None, dtype: torch.dtype | None = None):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self._init_quantized_weight(quant_type, blocksize, double_quant, device, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=self.weight_dtype)) if bias else None
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def _quant_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation, then quantization."""
        w = torch.empty(self.out_features, self.in_features, device=self.weight.device, dtype=self.weight_dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.quantize_(w)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    # ----------------------------------------------------------- construction
    @classmethod
    def from_linear(cls, linear: nn.Module, *, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        """Quantize an ``nn.Linear`` (or a transformers ``Conv1D``, whose weight is [in, out])."""
        weight, bias = _dense_weight_and_bias(linear)
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bias=bias is not None, quant_type=quant_type, blocksize=blocksize,
                    double_quant=double_quant, compute_dtype=compute_dtype, device="meta", dtype=weight.dtype)
        layer.weight_dtype = weight.dtype
        layer.quantize_(weight)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return layer

    @classmethod
    def from_bnb(cls, bnb_layer: nn.Module, *, compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        """Reuse the bytes of a ``bitsandbytes.nn.Linear4bit`` (no requantization, no copy of the weight)."""
        w = bnb_layer.weight
        qs = getattr(w, "quant_state", None)
        if qs is None:
            raise ValueError("the bitsandbytes layer is not quantized yet (its weight has no quant_state): "
                             "move it to a device or call its quantization first")
        if getattr(w, "packing_format_for_cpu", False):
            raise ValueError("the bitsandbytes layer was repacked into its CPU-only layout (bitsandbytes does "
                             "this after an eval-mode CPU forward); its bytes are no longer the NF4 format")
        packed = w.data
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        nested = None
        if qs.nested:
            nested = NestedStats(absmax=qs.state2.absmax, code=qs.state2.code, offset=float(qs.offset),
                                 blocksize=qs.state2.blocksize)
        state = QuantState(quant_type=qs.quant_type, blocksize=qs.blocksize, shape=torch.Size(qs.shape),
                           dtype=qs.dtype, absmax=qs.absmax, code=qs.code.float(), nested=nested)
        out_f, in_f = state.shape
        layer = cls(in_f, out_f, bias=bnb_layer.bias is not None, quant_type=state.quant_type,
                    blocksize=state.blocksize, double_quant=nested is not None,
                    compute_dtype=compute_dtype if compute_dtype is not None else getattr(bnb_layer, "compute_dtype", None),
                    device="meta", dtype=state.dtype)
        layer.set_quantized(packed.reshape(-1, 1), state)
        if bnb_layer.bias is not None:
            layer.bias = nn.Parameter(bnb_layer.bias.detach().clone(), requires_grad=bnb_layer.bias.requires_grad)
        return layer

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], prefix: str = "", *,
                        compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        """Build from a transformers 4-bit checkpoint's tensors for one layer (keys ``prefix + 'weight'``...)."""
        packed, state = QuantState.from_checkpoint(tensors, prefix + "weight")
        bias = tensors.get(prefix + "bias")
        out_f, in_f = state.shape
        layer = cls(in_f, out_f, bias=bias is not None, quant_type=state.quant_type, blocksize=state.blocksize,
                    double_quant=state.nested is not None, compute_dtype=compute_dtype, device="meta",
                    dtype=state.dtype)
        layer.set_quantized(packed, state)
        if bias is not None:
            layer.bias = nn.Parameter(bias.clone())
        return layer

    # ----------------------------------------------------------------- use
    # quant_state, set_quantized, quantize_, dequantize, bits_per_parameter, the state-dict keys and the
    # dtype-preserving _apply come from QuantizedWeight.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"Linear4bit input must be a float32/float16/bfloat16 tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        in_dtype = x.dtype
        if self.compute_dtype is not None and x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        # Drop-in semantics: nn.Linear accepts strided inputs, so make them dense
        # here; the functional op below rejects non-contiguous input.
        y = linear_4bit(x.contiguous(), self.weight, self.quant_state, bias)
        return y if y.dtype == in_dtype else y.to(in_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")


def _dense_weight_and_bias(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias) of an nn.Linear or a transformers Conv1D (stored [in, out])."""
    if isinstance(layer, nn.Linear):
        return layer.weight, layer.bias
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):
        return layer.weight.t(), layer.bias
    raise TypeError(f"cannot quantize a {type(layer).__name__}: expected nn.Linear or transformers Conv1D")
