"""Triton SwiGLU ``h = silu(gate) * up`` (the Llama MLP's ``act_fn(gate_proj(x)) * up_proj(x)``) and its backward.

gate, up: same shape, same dtype (fp32/fp16/bf16), contiguous; treated as flat arrays of ``numel``
elements, BLOCK elements per program.

Forward: ``s = silu(g)`` in fp32, rounded to the inputs' dtype, then ``s * u`` rounded again: the two
roundings of the transformers expression (``act_fn`` returns a tensor of gate's dtype, the product
another), so 16-bit results are the module's bits up to the last ulp of silu itself.

Backward (nothing but gate and up kept; silu recomputed): with σ = sigmoid(g),
``dgate = dy · u · σ · (1 + g·(1 − σ))`` and ``dup = dy · silu(g)``, in fp32, one pass writing both.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPES, TL_PTR, AotVariant, check_arg, check_device

BLOCK = 1024
NUM_WARPS = 4


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers allocate (a seam for tests, which fill it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(h_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + offs, (s * u).to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dh = tl.load(dh_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    sg = tl.sigmoid(g)
    tl.store(dg_ptr + offs, (dh * u * sg * (1.0 + g * (1.0 - sg))).to(dg_ptr.dtype.element_ty), mask=ok)
    tl.store(du_ptr + offs, (dh * g * sg).to(du_ptr.dtype.element_ty), mask=ok)


def _check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
    check_arg("gate", gate, FLOAT_DTYPES)
    check_arg("up", up, FLOAT_DTYPES)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must have one shape and dtype; got {tuple(gate.shape)} {gate.dtype} and "
                         f"{tuple(up.shape)} {up.dtype}")


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in gate's shape and dtype."""
    _check_pair(gate, up)
    check_device(_swiglu_fwd_kernel, gate=gate, up=up)
    h = _empty(gate.shape, gate.dtype, gate.device)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, h, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return h


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dgate, dup)`` in gate's dtype; dh: gate's shape, any float dtype, contiguous."""
    _check_pair(gate, up)
    check_arg("dh", dh, FLOAT_DTYPES)
    if dh.shape != gate.shape:
        raise ValueError(f"dh must have gate's shape {tuple(gate.shape)}, got {tuple(dh.shape)}")
    check_device(_swiglu_bwd_kernel, dh=dh, gate=gate, up=up)
    dg = _empty(gate.shape, gate.dtype, gate.device)
    du = _empty(gate.shape, gate.dtype, gate.device)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dh, gate, up, dg, du, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dg, du


def _aot_variants() -> list[AotVariant]:
    out = []
    for dtype in FLOAT_DTYPES:
        t = TL_PTR[dtype]
        out.append(AotVariant(name=f"swiglu_fwd-{t[1:]}", kernel=_swiglu_fwd_kernel,
                              signature={"g_ptr": t, "u_ptr": t, "h_ptr": t, "n": "i32", "BLOCK": "constexpr"},
                              constexprs={"BLOCK": BLOCK}, num_warps=NUM_WARPS, num_stages=1,
                              divisible_by_16=("g_ptr", "u_ptr", "h_ptr", "n"), meta={"dtype": t[1:]}))
        out.append(AotVariant(name=f"swiglu_bwd-{t[1:]}", kernel=_swiglu_bwd_kernel,
                              signature={"dh_ptr": t, "g_ptr": t, "u_ptr": t, "dg_ptr": t, "du_ptr": t, "n": "i32",
                                         "BLOCK": "constexpr"},
                              constexprs={"BLOCK": BLOCK}, num_warps=NUM_WARPS, num_stages=1,
                              divisible_by_16=("dh_ptr", "g_ptr", "u_ptr", "dg_ptr", "du_ptr", "n"),
                              meta={"dtype": t[1:]}))
    return out


#: One forward and one backward form per dtype.
AOT_VARIANTS = _aot_variants()
