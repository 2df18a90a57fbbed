"""Plain-torch ground truth for the bottleneck adapter (re-exported by ``ops/reference.py``).

Same rules as reference.py: written for clarity, float64-capable, the CPU path and what the
Triton kernels of ``kernels/adapter.py`` are tested against.

The adapter on a hidden state h [M, d] (DESIGN.md: ``h' = h + s·up(act(down(h)))``), with
W_d [r, d], b_d [r] (down), W_u [d, r], b_u [d] (up) and a scalar s::

    z   = h W_dᵀ + b_d                 [M, r]   pre-activation (the only activation saved)
    a   = act(z)                       [M, r]   recomputed in backward, never saved
    out = h + s·(a W_uᵀ + b_u)         [M, d]

Backward, given dy = ∂L/∂out [M, d] (g = dy W_u [M, r])::

    dz   = s·g ⊙ act'(z)               dh  = dy + dz W_d
    dW_u = s·dyᵀ a                     db_u = s·Σ_m dy
    dW_d = dzᵀ h                       db_d = Σ_m dz
    ds   = Σ_m (⟨a_m, g_m⟩ + ⟨dy_m, b_u⟩)          (= Σ dy ⊙ (a W_uᵀ + b_u); only for a learned s)

Activations (``ACTIVATIONS``): ``relu``; ``gelu`` (exact, with erf, torch's default); ``gelu_tanh``
(the tanh approximation, transformers' ``gelu_new`` / ``gelu_pytorch_tanh``); ``silu`` (swish).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["ADAPTER_ACTIVATIONS", "adapter_activation", "adapter_activation_grad", "adapter_forward",
           "adapter_backward", "adapter_autograd", "canonical_activation"]

#: Canonical activation names, in the order of the kernels' ``ACT`` codes.
ADAPTER_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
#: Other spellings users bring from transformers / AdapterHub configs.
_ALIASES = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
            "swish": "silu", "gelu_erf": "gelu"}
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def canonical_activation(name: str) -> str:
    """The canonical spelling of an activation name (case-insensitive; aliases resolved); ValueError otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"activation must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in ADAPTER_ACTIVATIONS:
        raise ValueError(f"unknown adapter activation {name!r}; expected one of {ADAPTER_ACTIVATIONS} "
                         f"(or an alias: {sorted(_ALIASES)})")
    return key


def adapter_activation(z: torch.Tensor, activation: str) -> torch.Tensor:
    """act(z), elementwise, in z's dtype (torch's own functions: the autograd reference uses these)."""
    act = canonical_activation(activation)
    if act == "relu":
        return F.relu(z)
    if act == "gelu":
        return F.gelu(z)
    if act == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return F.silu(z)


def adapter_activation_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    """act'(z), elementwise, in z's dtype (relu' is 0 at 0, as torch's relu backward)."""
    act = canonical_activation(activation)
    if act == "relu":
        return (z > 0).to(z.dtype)
    if act == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        return cdf + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    if act == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z)
    sig = torch.sigmoid(z)
    return sig * (1.0 + z * (1.0 - sig))


def _act_backward(grad: torch.Tensor, z: torch.Tensor, activation: str) -> torch.Tensor:
    """grad ⊙ act'(z) through torch's own fused backward kernels (one op instead of the formula's ~10;
    the CPU path's speed). Equal to ``grad * adapter_activation_grad(z)`` (tested)."""
    act = canonical_activation(activation)
    if act == "relu":
        return torch.ops.aten.threshold_backward(grad, z, 0)
    if act == "silu":
        return torch.ops.aten.silu_backward(grad, z)
    return torch.ops.aten.gelu_backward(grad, z, approximate="tanh" if act == "gelu_tanh" else "none")


def _params(dt: torch.dtype, *ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.dtype == dt else t.to(dt) for t in ts]


def adapter_forward(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
                    b_up: torch.Tensor, scale: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [M, d], z [M, r]) in h's dtype: h [M, d]; w_down [r, d]; b_down [r]; w_up [d, r]; b_up [d];
    scale a 1-element tensor. Parameters are cast to h.dtype first (computation in the input dtype)."""
    dt = h.dtype
    wd, bd, wu, bu, s = _params(dt, w_down, b_down, w_up, b_up, scale.reshape(()))
    z = F.linear(h, wd, bd)
    out = torch.addcmul(h, F.linear(adapter_activation(z, activation), wu, bu), s)  # h + u·s, one pass
    return out, z


def adapter_backward(dy: torch.Tensor, h: torch.Tensor, z: torch.Tensor, w_down: torch.Tensor,
                     w_up: torch.Tensor, b_up: torch.Tensor, scale: torch.Tensor, activation: str,
                     need_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor, Optional[torch.Tensor]]:
    """Closed-form gradients (dh, dW_d, db_d, dW_u, db_u, ds or None), all in dy's dtype.

    dy, h: [M, d]; z: [M, r] (the forward's pre-activation); a = act(z) is recomputed here. ``ds`` is a
    0-d tensor (float32, float64 for float64 dy) when ``need_scale``.
    """
    dt = dy.dtype
    wd, wu, bu, s = _params(dt, w_down, w_up, b_up, scale.reshape(()))
    z = z.to(dt)
    a = adapter_activation(z, activation)
    g = dy @ wu                                   # [M, r]
    dz = _act_backward(g * s, z, activation)      # s·g ⊙ act'(z)
    dh = torch.addmm(dy, dz, wd)
    dwu = dy.t() @ (a * s)                        # s on the [M, r] side: fewer elements than [d, r]
    acc = torch.float64 if dt == torch.float64 else torch.float32
    dy_sum = dy.sum(0, dtype=acc)
    dbu = (s.to(acc) * dy_sum).to(dt)
    dwd = dz.t() @ h.to(dt)
    dbd = dz.sum(0, dtype=acc).to(dt)
    ds = None
    if need_scale:
        ds = (a.to(acc) * g.to(acc)).sum() + (dy_sum * bu.to(acc)).sum()
    return dh, dwd, dbd, dwu, dbu, ds


def adapter_autograd(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
                     b_up: torch.Tensor, scale: torch.Tensor | float, activation: str) -> torch.Tensor:
    """The unfused module in plain torch autograd: ``h + s·up(act(down(h)))`` in h's dtype.

    Differentiable in every argument through torch's own backward formulas: the independent check of
    :func:`adapter_backward`, and the baseline the fused kernels are benchmarked against (it saves h,
    z and a — plus the up output when s is a tensor that needs a gradient).
    """
    dt = h.dtype
    wd, bd, wu, bu = _params(dt, w_down, b_down, w_up, b_up)
    s = scale.reshape(()).to(dt) if isinstance(scale, torch.Tensor) else scale
    return h + s * F.linear(adapter_activation(F.linear(h, wd, bd), activation), wu, bu)
