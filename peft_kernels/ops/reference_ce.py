"""Plain-torch ground truth for the fused linear cross-entropy (re-exported by ``ops/reference.py``).

Written for clarity and float64: the full [T, V] logits are materialised here (that is what the fused
op, ``ops/fused_ce.py``, avoids). Definitions, for hidden states h [T, H], a head W [V, H] (+ bias b [V])
and labels y [T] (``ignore_index`` rows carry no loss)::

    r   = h Wᵀ + b                                  raw logits [T, V]
    z   = c·tanh(s·r / c)   (softcap c; else z = s·r, s = logit_scale, 1 by default)
    lse_i = logsumexp_j z_ij
    ce_i  = lse_i − (1 − ε)·z_{i,y_i} − (ε / V)·Σ_j z_ij   (torch.nn.functional.cross_entropy with
                                                          label_smoothing=ε)
    zl_i  = coef·lse_i²                               (PaLM's z-loss)
    loss  = Σ_valid (ce_i + zl_i)          reduction "sum"
          = that / n_valid                 reduction "mean" (0, not NaN, when every label is ignored)

The gradient with respect to the raw logits, for a loss of "sum" with grad_output 1::

    dz_ij = p_ij·(1 + 2·coef·lse_i) − (1 − ε)·[j = y_i] − ε / V,     p = softmax_j(z)
    dr_ij = dz_ij · s · (1 − tanh²(s·r_ij / c))                      (no softcap: dz_ij · s)

and 0 on ignored rows. ``ce_rows_reference`` gives (ce, lse, dr) row by row in closed form (what the
Triton row kernel computes); ``linear_cross_entropy_reference`` builds the loss through
``F.cross_entropy`` on the full logits, so autograd gives the reference dH, dW and db.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["transform_logits", "ce_rows_reference", "linear_cross_entropy_reference"]


def transform_logits(raw: torch.Tensor, softcap: Optional[float] = None, logit_scale: float = 1.0) -> torch.Tensor:
    """z = softcap·tanh(logit_scale·raw / softcap) (or logit_scale·raw without a softcap), in raw's dtype."""
    z = raw * logit_scale if logit_scale != 1.0 else raw
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def ce_rows_reference(raw: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                      label_smoothing: float = 0.0, softcap: Optional[float] = None, logit_scale: float = 1.0,
                      z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (ce [R], lse [R], d loss_sum / d raw [R, V]) in float64, closed form (see the module docstring).

    raw: [R, V] raw logits (any float dtype, read as float64); labels: integer [R]. Ignored rows give
    ce = lse = 0 and a zero gradient row.
    """
    r = raw.double()
    v = r.shape[1]
    z = transform_logits(r, softcap, logit_scale)
    lse = torch.logsumexp(z, dim=1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    zy = z.gather(1, safe[:, None]).squeeze(1)
    eps = float(label_smoothing)
    ce = lse - (1.0 - eps) * zy - (eps / v) * z.sum(1)
    p = torch.softmax(z, dim=1)
    dz = p * (1.0 + 2.0 * z_loss * lse)[:, None] - eps / v
    dz = dz - (1.0 - eps) * F.one_hot(safe, v).double()
    dr = dz * logit_scale
    if softcap is not None:
        dr = dr * (1.0 - torch.tanh(logit_scale * r / softcap) ** 2)
    zero = torch.zeros((), dtype=torch.float64, device=r.device)
    return (torch.where(valid, ce, zero), torch.where(valid, lse, zero), dr * valid[:, None].double())


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   bias: Optional[torch.Tensor] = None, *, ignore_index: int = -100,
                                   label_smoothing: float = 0.0, softcap: Optional[float] = None,
                                   logit_scale: float = 1.0, z_loss: float = 0.0,
                                   reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, z_loss) from the full logits ``hidden @ weight.T + bias`` through ``F.cross_entropy``.

    Differentiable in hidden, weight and bias; computed in the inputs' dtype (pass float64 for a
    reference). loss includes the z-loss term; z_loss is that term alone, reduced the same way.
    """
    z = transform_logits(F.linear(hidden, weight, bias), softcap, logit_scale)
    ce = F.cross_entropy(z, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum")
    valid = labels != ignore_index
    zl = z_loss * (torch.logsumexp(z, dim=1) ** 2 * valid.to(z.dtype)).sum()
    if reduction == "mean":
        n = int(valid.sum())
        ce, zl = (ce / n, zl / n) if n else (ce * 0.0, zl * 0.0)
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return ce + zl, zl
