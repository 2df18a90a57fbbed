"""Fused RMSNorm, SwiGLU and RoPE as autograd Functions with backend dispatch.

    rms_norm(x, weight, eps, gemma=False)      x [..., N], weight [N]  -> y [..., N]
    swiglu(gate, up)                            gate, up [...]           -> silu(gate) * up
    rope(x, cos, sin, unsqueeze_dim=1)          x [B, H, S, D] (or [B, S, H, D] with unsqueeze_dim=2),
                                                cos/sin [B or 1, S, D]  -> x*cos + rotate_half(x)*sin
    apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) -> (q_embed, k_embed)   (transformers' signature)

Saved for backward (and nothing else):

* rms_norm: x (the tensor given, or its contiguous copy when it was not contiguous) and rstd, one
  float32 per row: ``x.numel() * x.element_size() + 4 * rows`` bytes (the weight is a resident Parameter).
* swiglu: gate and up (silu recomputed in backward).
* rope: cos and sin only (the backward is the rotation by −θ; x is not needed). cos and sin get no
  gradient: they come from transformers' rotary embedding, computed under ``no_grad``; a cos/sin that
  requires grad is refused.

Backends (``ops/backend.py``): CUDA tensors, or ``PEFT_KERNELS_BACKEND=triton`` with ``TRITON_INTERPRET=1``,
run the Triton kernels (``kernels/rmsnorm.py``, ``swiglu.py``, ``rope.py``); CPU tensors and float64 run
``ops/reference_fused.py``, whose forwards are the transformers modules' own torch expressions (the same
bits) and whose backwards are the same closed forms the kernels compute. Without autograd (no input
requires grad, or grad mode off) the forward runs alone and nothing is saved.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backend
from . import reference_fused as ref

Tensor = torch.Tensor
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOATS = (*_KERNEL_DTYPES, torch.float64)


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected float32, float16, "
                        f"bfloat16 or float64")


def _same_device(**tensors: Tensor) -> None:
    devs = {n: t.device for n, t in tensors.items()}
    if len(set(devs.values())) > 1:
        raise ValueError("tensors must be on one device: " + ", ".join(f"{n} on {d}" for n, d in devs.items()))


def _use_triton(*ts: Tensor) -> bool:
    return all(t.dtype in _KERNEL_DTYPES for t in ts) and backend.select(ts[0].device) == "triton"


def _needs_graph(*ts: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


# The plain-torch backward works on slices of this many elements: its float32 temporaries (casts, sigmoid,
# products: about six per element) stay a few hundred KiB instead of several copies of a [T, I] activation,
# so the CPU path holds what the kernels hold — the gradients it returns (and the estimator can count that).
CPU_BACKWARD_CHUNK = 1 << 14


# ================================================================== RMSNorm
def _rms_forward(x2: Tensor, weight: Tensor, eps: float, gemma: bool) -> tuple[Tensor, Tensor]:
    """(y [M, N], rstd [M] float32/float64) for x2 [M, N] contiguous."""
    if _use_triton(x2, weight):
        from ..kernels import rmsnorm as K
        out_dtype = x2.dtype if gemma else torch.promote_types(weight.dtype, x2.dtype)
        return K.rmsnorm_forward(x2, weight.contiguous(), eps, gemma=gemma, out_dtype=out_dtype)
    y, rstd = ref.rmsnorm_forward(x2, weight, eps, gemma)
    return y, rstd.reshape(-1)


def _rms_backward(dy2: Tensor, x2: Tensor, weight: Tensor, rstd: Tensor, gemma: bool, need_dw: bool):
    if _use_triton(x2, weight) and dy2.dtype in _KERNEL_DTYPES:
        from ..kernels import rmsnorm as K
        return K.rmsnorm_backward(dy2.contiguous(), x2, weight.contiguous(), rstd, gemma=gemma, need_dw=need_dw)
    # row slices of the closed form; dw's per-slice sums add up in the accumulation dtype
    m, n = x2.shape
    rows = max(1, CPU_BACKWARD_CHUNK // max(n, 1))
    dx = torch.empty_like(x2)
    dw = None
    for r0 in range(0, m, rows):
        dx_c, dw_c = ref.rmsnorm_backward(dy2[r0:r0 + rows], x2[r0:r0 + rows], weight, rstd[r0:r0 + rows], gemma,
                                          need_dw)
        dx[r0:r0 + rows] = dx_c
        if need_dw:
            dw = dw_c if dw is None else dw.add_(dw_c)
    if need_dw and dw is None:  # no rows
        dw = torch.zeros(n, dtype=torch.float64 if x2.dtype == torch.float64 else torch.float32, device=x2.device)
    return dx, dw


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, eps, gemma):
        y, rstd = _rms_forward(x2, weight, eps, gemma)
        ctx.gemma = gemma
        ctx.save_for_backward(x2, weight, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dw = _rms_backward(dy, x2, weight, rstd, ctx.gemma, need_dw)
        return (dx if need_dx else None), (dw.to(weight.dtype) if need_dw else None), None, None


def check_rms_norm(x: Tensor, weight: Tensor, eps) -> None:
    """Clear errors for malformed RMSNorm arguments."""
    _check_float("x", x)
    _check_float("weight", weight)
    if weight.dim() != 1 or x.dim() < 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"weight must be [N] with N = x's last dim; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    _same_device(x=x, weight=weight)


def rms_norm(x: Tensor, weight: Tensor, eps: float, gemma: bool = False) -> Tensor:
    """RMSNorm of x's last dim: Llama form ``w * (x·rstd).to(x.dtype)`` (output dtype: promote(w, x)), or
    the Gemma form ``((x·rstd) * (1 + w)).to(x.dtype)``. Differentiable in x and weight."""
    check_rms_norm(x, weight, eps)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    x2 = x2 if x2.is_contiguous() else x2.contiguous()
    if _needs_graph(x, weight):
        y = _RMSNormFn.apply(x2, weight, float(eps), bool(gemma))
    else:
        y = _rms_forward(x2, weight, float(eps), bool(gemma))[0]
    return y.reshape(x.shape)


# ================================================================== SwiGLU
def _swiglu_forward(gate: Tensor, up: Tensor) -> Tensor:
    if _use_triton(gate, up):
        from ..kernels import swiglu as K
        return K.swiglu_forward(gate, up)
    return ref.swiglu_forward(gate, up)


def _swiglu_backward_sliced(dh: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """The reference closed form over flat slices of ``CPU_BACKWARD_CHUNK`` elements (gate, up contiguous)."""
    g, u, d = gate.reshape(-1), up.reshape(-1), dh.reshape(-1)
    dg, du = torch.empty_like(g), torch.empty_like(u)
    for i in range(0, g.numel(), CPU_BACKWARD_CHUNK):
        j = i + CPU_BACKWARD_CHUNK
        dg[i:j], du[i:j] = ref.swiglu_backward(d[i:j], g[i:j], u[i:j])
    return dg.view(gate.shape), du.view(up.shape)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_forward(gate, up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        if _use_triton(gate, up) and dh.dtype in _KERNEL_DTYPES:
            from ..kernels import swiglu as K
            dg, du = K.swiglu_backward(dh.contiguous(), gate, up)
        else:
            dg, du = _swiglu_backward_sliced(dh, gate, up)
        return (dg if ctx.needs_input_grad[0] else None), (du if ctx.needs_input_grad[1] else None)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` (gate, up: one shape and dtype), differentiable in both."""
    _check_float("gate", gate)
    _check_float("up", up)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"gate and up must have one dtype, got {gate.dtype} and {up.dtype}")
    _same_device(gate=gate, up=up)
    gate = gate if gate.is_contiguous() else gate.contiguous()
    up = up if up.is_contiguous() else up.contiguous()
    if _needs_graph(gate, up):
        return _SwiGLUFn.apply(gate, up)
    return _swiglu_forward(gate, up)


# ================================================================== RoPE
def _as_bhsd(x: Tensor, unsqueeze_dim: int) -> Tensor:
    """x as a [B, H, S, D] view (a transpose for the [B, S, H, D] layout of unsqueeze_dim=2)."""
    return x if unsqueeze_dim == 1 else x.transpose(1, 2)


def _rope_run(x: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int, backward: bool,
              out_dtype: Optional[torch.dtype]) -> Tensor:
    if _use_triton(x, cos, sin):
        from ..kernels import rope as K
        xv = _as_bhsd(x, unsqueeze_dim)
        if xv.stride(-1) != 1:
            xv = xv.contiguous()
        c = cos if cos.stride(-1) == 1 else cos.contiguous()
        s = sin if sin.stride() == c.stride() else sin.contiguous()
        if s.stride() != c.stride():
            c, s = c.contiguous(), s.contiguous()
        return _as_bhsd(K.rope_apply(xv, c, s, backward=backward, out_dtype=out_dtype), unsqueeze_dim)
    if backward:
        return ref.rope_backward(x, cos, sin, unsqueeze_dim, out_dtype)
    return ref.rope_forward(x, cos, sin, unsqueeze_dim)


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, unsqueeze_dim):
        ctx.unsqueeze_dim = unsqueeze_dim
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(cos, sin)
        return _rope_run(x, cos, sin, unsqueeze_dim, False, torch.promote_types(x.dtype, cos.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope_run(dy, cos, sin, ctx.unsqueeze_dim, True, ctx.x_dtype), None, None, None


def check_rope(x: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> None:
    """Clear errors for malformed RoPE arguments."""
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        _check_float(name, t)
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 ([B, H, S, D]) or 2 ([B, S, H, D]), got {unsqueeze_dim!r}")
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x must be 4-D with an even last dim (head_dim), got shape {tuple(x.shape)}")
    bsz, seq, d = x.shape[0], x.shape[3 - unsqueeze_dim], x.shape[-1]
    if cos.shape != sin.shape or cos.dim() != 3 or tuple(cos.shape[1:]) != (seq, d) or cos.shape[0] not in (1, bsz):
        raise ValueError(f"cos and sin must be [{bsz} or 1, {seq}, {d}] for x {tuple(x.shape)} with "
                         f"unsqueeze_dim={unsqueeze_dim}; got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("cos and sin must not require grad: the fused RoPE gives them no gradient "
                         "(transformers computes them under no_grad)")
    _same_device(x=x, cos=cos, sin=sin)


def rope(x: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` (cos/sin unsqueezed at ``unsqueeze_dim``), differentiable in x."""
    check_rope(x, cos, sin, unsqueeze_dim)
    if _needs_graph(x):
        return _RopeFn.apply(x, cos, sin, unsqueeze_dim)
    return _rope_run(x, cos, sin, unsqueeze_dim, False, torch.promote_types(x.dtype, cos.dtype))


def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
                         ) -> tuple[Tensor, Tensor]:
    """Drop-in for transformers' ``apply_rotary_pos_emb`` (same arguments, same results) on the fused op."""
    return rope(q, cos, sin, unsqueeze_dim), rope(k, cos, sin, unsqueeze_dim)


__all__ = ["rms_norm", "swiglu", "rope", "apply_rotary_pos_emb", "check_rms_norm", "check_rope"]
