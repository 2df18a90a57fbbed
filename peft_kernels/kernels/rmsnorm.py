"""Triton RMSNorm forward and backward over rows of x [M, N] (the last dim normalised).

Two output conventions (``GEMMA`` constexpr), each the exact op order of the transformers module it
replaces, computed in fp32:

* Llama (``LlamaRMSNorm``, Qwen2, Mistral, Qwen3...): ``y = w * (x·rstd).to(x.dtype)`` — normalise in
  fp32, round to x's dtype, then multiply by w in the promoted dtype of (w, x) (the output dtype);
* Gemma (``GemmaRMSNorm``): ``y = ((x·rstd) * (1 + w)).to(x.dtype)`` — multiply in fp32, then round.

``rstd = 1 / sqrt(mean(x²) + eps)`` per row (fp32).

Kernels:

* ``_rmsnorm_fwd_kernel``: one program per row, the whole row in registers (BLOCK_N = next power of two
  >= N, N <= ``MAX_N``); writes y and rstd [M] fp32 (the backward keeps x and rstd only: x is the
  residual stream, alive anyway; rstd is 4 bytes a row).
* ``_rmsnorm_bwd_kernel``: ``G`` programs, each walking rows pid, pid + G, ...; per row
  ``g = dy·w'`` (w' = w, or 1 + w), ``x̂ = x·rstd``, ``dx = rstd·(g − x̂·mean(g·x̂))``; with the weight
  training, each program sums ``dy·x̂`` (x̂ rounded to x's dtype first in the Llama form, as the
  module multiplies it) into its own row of a [G, N] fp32 buffer — plain stores, no atomics — and the
  launcher reduces the G rows in a fixed order (deterministic, and tests can poison every output).

The rounding of x̂ inside the Llama form is treated as the identity for gradients, as autograd does
through ``.to(dtype)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPES, TL_PTR, AotVariant, check_arg, check_device

#: Longest row the one-row-per-program kernels take (the row lives in registers).
MAX_N = 65536
#: Programs of the backward (each owns one row of the dW partial-sum buffer).
BWD_PROGRAMS = 256


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers allocate (a seam for tests, which fill it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _warps(block_n: int) -> int:
    return 1 if block_n <= 256 else 4 if block_n <= 2048 else 8 if block_n <= 8192 else 16


@triton.jit
def _rmsnorm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, N, eps,
                        GEMMA: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    xhat = x * rstd
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if GEMMA:
        y = xhat * (1.0 + w)
    else:
        # Round x̂ to x's dtype first, exactly as the module does before multiplying by w.
        y = xhat.to(x_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dwp_ptr, M, N,
                        GEMMA: tl.constexpr, NEED_DW: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if GEMMA:
        w = w + 1.0
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    n64 = tl.cast(N, tl.int64)  # 64-bit row offsets (M·N may pass 2^31)
    for row in range(pid, M, G):
        off = row * n64 + cols
        dy = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / N))
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        if NEED_DW:
            if GEMMA:
                dw += dy * xhat
            else:
                dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
    if NEED_DW:
        tl.store(dwp_ptr + pid.to(tl.int64) * N + cols, dw, mask=ok)


def _block_n(n: int) -> int:
    if not 0 < n <= MAX_N:
        raise ValueError(f"RMSNorm kernels take rows of 1..{MAX_N} elements, got N = {n}")
    return max(16, triton.next_power_of_2(n))


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, *, gemma: bool = False,
                    out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [M, N] in out_dtype (default x.dtype), rstd [M] float32)``.

    x: [M, N] fp32/fp16/bf16 contiguous; weight: [N] fp32/fp16/bf16 contiguous; eps: a float.
    """
    check_arg("x", x, FLOAT_DTYPES)
    check_arg("weight", weight, FLOAT_DTYPES)
    if x.dim() != 2 or tuple(weight.shape) != (x.shape[1],):
        raise ValueError(f"x must be [M, N] and weight [N]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    check_device(_rmsnorm_fwd_kernel, x=x, weight=weight)
    m, n = x.shape
    y = _empty((m, n), out_dtype or x.dtype, x.device)
    rstd = _empty((m,), torch.float32, x.device)
    if m == 0:
        return y, rstd
    bn = _block_n(n)
    _rmsnorm_fwd_kernel[(m,)](x, weight, y, rstd, n, float(eps), GEMMA=gemma, BLOCK_N=bn, num_warps=_warps(bn))
    return y, rstd


def rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, *,
                     gemma: bool = False, need_dw: bool = True, programs: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dx [M, N] in x.dtype, dw [N] float32 or None)`` of :func:`rmsnorm_forward`.

    dy: [M, N] (any float dtype, contiguous); x, weight as in the forward; rstd: [M] float32 from it.
    programs: backward programs (default ``min(M, BWD_PROGRAMS)``), each one partial-sum row of dw.
    """
    for name, t in (("dy", dy), ("x", x), ("weight", weight)):
        check_arg(name, t, FLOAT_DTYPES)
    check_arg("rstd", rstd, (torch.float32,))
    m, n = x.shape
    if tuple(dy.shape) != (m, n) or tuple(rstd.shape) != (m,):
        raise ValueError(f"dy must be {(m, n)} and rstd {(m,)}; got {tuple(dy.shape)}, {tuple(rstd.shape)}")
    check_device(_rmsnorm_bwd_kernel, dy=dy, x=x, weight=weight, rstd=rstd)
    dx = _empty((m, n), x.dtype, x.device)
    if m == 0:
        return dx, (torch.zeros(n, dtype=torch.float32, device=x.device) if need_dw else None)
    g = min(m, programs or BWD_PROGRAMS)
    dwp = _empty((g, n), torch.float32, x.device) if need_dw else rstd  # rstd: an unused placeholder pointer
    bn = _block_n(n)
    _rmsnorm_bwd_kernel[(g,)](dy, x, weight, rstd, dx, dwp, m, n, GEMMA=gemma, NEED_DW=need_dw, BLOCK_N=bn,
                              num_warps=_warps(bn))
    dw = (dwp[0].clone() if g == 1 else torch.sum(dwp, 0)) if need_dw else None  # fixed order: deterministic
    return dx, dw


# ----------------------------------------------------------------------------- AOT variants
def _aot_variants() -> list[AotVariant]:
    """BLOCK_N 4096 (N = 4096, 2560, 3072...) per dtype with a same-dtype weight; for bf16 (the training
    dtype) also BLOCK_N 8192 (N = 5120, 8192), an fp32 weight (the Llama form's output, and so dy, is
    then fp32) and the Gemma form. Other forms compile on first use."""
    out = []
    forms = [("fp32", 4096, "fp32", False), ("fp16", 4096, "fp16", False), ("bf16", 4096, "bf16", False),
             ("bf16", 8192, "bf16", False), ("bf16", 4096, "fp32", False), ("bf16", 4096, "bf16", True)]
    for t, bn, wt, gemma in forms:
        yt = t if gemma else wt if wt == "fp32" else t  # promote(w, x) in the Llama form
        tag = f"{t}-w{wt}-{'gemma' if gemma else 'llama'}-n{bn}"
        out.append(AotVariant(
            name=f"rmsnorm_fwd-{tag}", kernel=_rmsnorm_fwd_kernel,
            signature={"x_ptr": f"*{t}", "w_ptr": f"*{wt}", "y_ptr": f"*{yt}", "rstd_ptr": "*fp32", "N": "i32",
                       "eps": "fp32", "GEMMA": "constexpr", "BLOCK_N": "constexpr"},
            constexprs={"GEMMA": gemma, "BLOCK_N": bn}, num_warps=_warps(bn), num_stages=1,
            divisible_by_16=("x_ptr", "w_ptr", "y_ptr", "rstd_ptr", "N"), meta={"dtype": t}))
        out.append(AotVariant(
            name=f"rmsnorm_bwd-{tag}", kernel=_rmsnorm_bwd_kernel,
            signature={"dy_ptr": f"*{yt}", "x_ptr": f"*{t}", "w_ptr": f"*{wt}", "rstd_ptr": "*fp32",
                       "dx_ptr": f"*{t}", "dwp_ptr": "*fp32", "M": "i32", "N": "i32", "GEMMA": "constexpr",
                       "NEED_DW": "constexpr", "BLOCK_N": "constexpr"},
            constexprs={"GEMMA": gemma, "NEED_DW": True, "BLOCK_N": bn}, num_warps=_warps(bn), num_stages=1,
            divisible_by_16=("dy_ptr", "x_ptr", "w_ptr", "rstd_ptr", "dx_ptr", "dwp_ptr", "N"),
            meta={"dtype": t}))
    return out


#: Compiled forms the launchers request for the common model shapes (other N compile on first use).
AOT_VARIANTS = _aot_variants()
