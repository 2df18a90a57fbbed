"""Plain-torch ground truth for BitFit (bias-only fine-tuning), re-exported by ``ops/reference.py``.

Same rules as reference.py: written for clarity, float64-capable, the CPU path (``reference``
backend) and what the Triton kernels of ``kernels/bitfit.py`` are tested against.

BitFit over a frozen W [N out, K in] with a trainable bias b [N] (DESIGN.md)::

    y  = x Wᵀ + b            x [M, K] -> y [M, N]
    dX = dY W                 (only when x needs a gradient)
    db = Σ_m dY[m, :]         accumulated in float32 (float64 for float64 dY)

Nothing about x enters the backward: that is why BitFit saves no activation of its own.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["bitfit_forward_dense", "bitfit_backward_dense", "bitfit_forward_4bit", "bitfit_backward_4bit",
           "bitfit_bias_grad"]


def bitfit_bias_grad(dy: torch.Tensor) -> torch.Tensor:
    """``db = Σ_m dY``: dy [..., N] -> [N], float32 (float64 when dy is float64)."""
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    return dy.reshape(-1, dy.shape[-1]).sum(0, dtype=acc)


def bitfit_forward_dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``y = x Wᵀ + b``: x [M, K], weight [N, K] (any strides), bias [N] -> y [M, N] in x.dtype.

    W and b are cast to x.dtype first (the bias is rounded to x.dtype, as nn.Linear under autocast).
    """
    return torch.nn.functional.linear(x, weight.to(x.dtype), bias.to(x.dtype))


def bitfit_backward_dense(dy: torch.Tensor, weight: torch.Tensor, need_x: bool = True
                          ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(dX = dY W or None, db = Σ_m dY): dy [M, N], weight [N, K] -> ([M, K] in dy.dtype, [N] float32)."""
    dx = dy @ weight.to(dy.dtype) if need_x else None
    return dx, bitfit_bias_grad(dy)


def _w4(packed, absmax, code, blocksize, n, k, dtype):
    from .reference import dequantize_4bit  # late: reference.py imports this module at its end
    return dequantize_4bit(packed, absmax, code, blocksize, n * k, dtype).view(n, k)


def bitfit_forward_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                        blocksize: int, out_features: int, bias: torch.Tensor) -> torch.Tensor:
    """``y = x Wᵀ + b`` with W the 4-bit weight [out_features, K] (absmax float32, already decoded):
    x [M, K] -> [M, N] in x.dtype (W dequantized to x.dtype)."""
    w = _w4(packed, absmax, code, blocksize, out_features, x.shape[-1], x.dtype)
    return torch.nn.functional.linear(x, w, bias.to(x.dtype))


def bitfit_backward_4bit(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int, in_features: int, need_x: bool = True
                         ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(dX = dY W or None, db = Σ_m dY) for the 4-bit W [N, in_features]: dy [M, N] ->
    ([M, in_features] in dy.dtype, [N] float32)."""
    dx = None
    if need_x:
        dx = dy @ _w4(packed, absmax, code, blocksize, dy.shape[-1], in_features, dy.dtype)
    return dx, bitfit_bias_grad(dy)
