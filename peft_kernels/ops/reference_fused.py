"""Plain-torch references of the fused RMSNorm, SwiGLU and RoPE ops: the ground truth and the CPU path.

Forwards are written with exactly the torch operations, in exactly the order, of the transformers
modules they stand for (``LlamaRMSNorm.forward``, ``GemmaRMSNorm.forward``, ``LlamaMLP``'s
``act_fn(gate) * up``, ``apply_rotary_pos_emb``), so on the same device they give the modules' bits.
Backwards are closed forms (what the Triton backward kernels compute), in float32 — float64 for
float64 inputs, which makes these the float64 references of the tests.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------ RMSNorm
def rmsnorm_forward(x: Tensor, weight: Tensor, eps: float, gemma: bool = False) -> tuple[Tensor, Tensor]:
    """(y like the module's output, rstd [..., 1] in float32/float64): x [..., N], weight [N]."""
    input_dtype = x.dtype
    hs = x.to(_acc(x))
    variance = hs.pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(variance + eps)
    if gemma:  # GemmaRMSNorm: (x̂ * (1 + w)) in fp32, then cast
        y = (hs * rstd) * (1.0 + weight.to(_acc(x)))
        return y.type_as(x), rstd
    return weight * (hs * rstd).to(input_dtype), rstd  # LlamaRMSNorm: cast x̂, then multiply


def rmsnorm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, gemma: bool = False,
                     need_dw: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """(dx in x.dtype, dw [N] in the accumulation dtype or None). rstd: [..., 1] or x's rows."""
    acc = _acc(x)
    n = x.shape[-1]
    x2 = x.reshape(-1, n).to(acc)
    r = rstd.reshape(-1, 1).to(acc)
    g2 = dy.reshape(-1, n).to(acc)
    w = weight.to(acc) + (1.0 if gemma else 0.0)
    xhat = x2 * r
    g = g2 * w
    dx = r * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dw = None
    if need_dw:
        xh = xhat if gemma else xhat.to(x.dtype).to(acc)
        dw = (g2 * xh).sum(0)
    return dx.to(x.dtype).reshape(x.shape), dw


# ------------------------------------------------------------------ SwiGLU
def swiglu_forward(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` as LlamaMLP computes it (``act_fn(gate_proj(x)) * up_proj(x)``)."""
    return F.silu(gate) * up


def swiglu_backward(dh: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(dgate, dup) in gate's dtype, silu recomputed from gate."""
    acc = _acc(gate)
    g, u, d = gate.to(acc), up.to(acc), dh.to(acc)
    sg = torch.sigmoid(g)
    return (d * u * sg * (1.0 + g * (1.0 - sg))).to(gate.dtype), (d * g * sg).to(up.dtype)


# ------------------------------------------------------------------ RoPE
def rotate_half(x: Tensor) -> Tensor:
    """transformers' ``rotate_half``: cat(-x2, x1) over the last dim."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_forward(x: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` with cos/sin [B, S, D] unsqueezed at ``unsqueeze_dim``."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (x * cos) + (rotate_half(x) * sin)


def rope_backward(dy: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1, dtype=None) -> Tensor:
    """The rotation by −θ: ``dy * cos + rotate_halfᵀ(dy * sin)``, rotate_halfᵀ(v) = cat(v2, -v1)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    v = dy * sin
    h = v.shape[-1] // 2
    dx = dy * cos + torch.cat((v[..., h:], -v[..., :h]), dim=-1)
    return dx if dtype is None else dx.to(dtype)
