"""Triton rotary position embedding in transformers' ``rotate_half`` convention, forward and backward.

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x2, x1),  x = [x1 | x2] (halves of D)

i.e. ``out1 = x1·c1 − x2·s1`` and ``out2 = x2·c2 + x1·s2`` (c1/c2, s1/s2 the halves of cos/sin, as
transformers' rotary embeddings produce them: ``cat(freqs, freqs)``, but each half is read as given).
The backward is the rotation by −θ: ``dx1 = dy1·c1 + dy2·s2``, ``dx2 = dy2·c2 − dy1·s1`` (the same
kernel with ``BACKWARD``); cos and sin get no gradient.

Layout: x is addressed as [B, H, S, D] through strides (any layout whose D stride is 1: transformers'
q/k are transposed views ``[B, S, H, D] -> [B, H, S, D]``, used as they are, no copy); cos/sin as
[B, S, D] through (b, s) strides (b stride 0 broadcasts one table over the batch). The output has its
own strides (the launcher gives it x's layout). Programs own a [BLOCK_S, D/2] tile of one (b, h).

Rounding: each product and the sum are rounded to the output dtype in the transformers expression's
order (``x*cos``, ``rotate_half(x)*sin``, their sum), so 16-bit outputs are the module's bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPES, TL_PTR, AotVariant, check_arg, check_device

BLOCK_S = 16
NUM_WARPS = 4


@triton.jit
def _rope_kernel(x_ptr, c_ptr, s_ptr, o_ptr, H, S, HALF,
                 x_sb, x_sh, x_ss, o_sb, o_sh, o_ss, c_sb, c_ss,
                 BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, HALF_PAD: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    rd = tl.arange(0, HALF_PAD)
    ok = (rs[:, None] < S) & (rd[None, :] < HALF)
    rs64 = rs.to(tl.int64)[:, None]
    xo = x_ptr + b * x_sb + h * x_sh + rs64 * x_ss + rd[None, :]
    co = b * c_sb + rs64 * c_ss + rd[None, :]
    x1 = tl.load(xo, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(xo + HALF, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(c_ptr + co, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptr + co + HALF, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr + co, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptr + co + HALF, mask=ok, other=0.0).to(tl.float32)
    dt = o_ptr.dtype.element_ty
    if BACKWARD:
        o1 = (x1 * c1).to(dt).to(tl.float32) + (x2 * s2).to(dt).to(tl.float32)
        o2 = (x2 * c2).to(dt).to(tl.float32) - (x1 * s1).to(dt).to(tl.float32)
    else:
        o1 = (x1 * c1).to(dt).to(tl.float32) - (x2 * s1).to(dt).to(tl.float32)
        o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    oo = o_ptr + b * o_sb + h * o_sh + rs64 * o_ss + rd[None, :]
    tl.store(oo, o1.to(dt), mask=ok)
    tl.store(oo + HALF, o2.to(dt), mask=ok)


def _bhs_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backward: bool = False,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rotate x [B, H, S, D] (any strides with D stride 1) by cos/sin [B or 1, S, D] (D stride 1).

    Returns a new tensor in x's layout (``torch.empty_like``) of ``out_dtype`` (default x.dtype).
    ``backward=True`` rotates by −θ (the gradient of the forward with respect to x).
    """
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16")
    if x.dim() != 4 or x.shape[-1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [B, H, S, D] with an even D and D stride 1; got shape {tuple(x.shape)}, "
                         f"strides {x.stride()}")
    bsz, heads, seq, d = x.shape
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[1:] != (seq, d) or cos.shape[0] not in (1, bsz):
        raise ValueError(f"cos and sin must be [{bsz} or 1, {seq}, {d}]; got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        raise ValueError(f"cos and sin must share strides with D stride 1; got {cos.stride()}, {sin.stride()}")
    check_device(_rope_kernel, x=x, cos=cos, sin=sin)
    out = torch.empty_like(x, dtype=out_dtype or x.dtype)
    if out.stride(-1) != 1:
        out = torch.empty(x.shape, dtype=out.dtype, device=x.device)
    if x.numel() == 0:
        return out
    c_sb = 0 if cos.shape[0] == 1 else cos.stride(0)
    half = d // 2
    grid = (triton.cdiv(seq, BLOCK_S), bsz * heads)
    _rope_kernel[grid](x, cos, sin, out, heads, seq, half, *_bhs_strides(x), *_bhs_strides(out), c_sb, cos.stride(1),
                       BACKWARD=backward, BLOCK_S=BLOCK_S, HALF_PAD=max(16, triton.next_power_of_2(half)),
                       num_warps=NUM_WARPS)
    return out


def _aot_variants() -> list[AotVariant]:
    """head_dim 128 (Llama, Mistral, Qwen) per dtype, and 64 in bf16; forward and backward (cos/sin in x's dtype)."""
    out = []
    ints = ("H", "S", "HALF", "x_sb", "x_sh", "x_ss", "o_sb", "o_sh", "o_ss", "c_sb", "c_ss")
    for dtype in FLOAT_DTYPES:
        t = TL_PTR[dtype]
        for half in ((64, 32) if dtype == torch.bfloat16 else (64,)):
            for bwd in (False, True):
                sig = {"x_ptr": t, "c_ptr": t, "s_ptr": t, "o_ptr": t, **{k: "i32" for k in ints},
                       "BACKWARD": "constexpr", "BLOCK_S": "constexpr", "HALF_PAD": "constexpr"}
                out.append(AotVariant(
                    name=f"rope_{'bwd' if bwd else 'fwd'}-{t[1:]}-d{2 * half}", kernel=_rope_kernel, signature=sig,
                    constexprs={"BACKWARD": bwd, "BLOCK_S": BLOCK_S, "HALF_PAD": half}, num_warps=NUM_WARPS,
                    num_stages=1, divisible_by_16=("x_ptr", "c_ptr", "s_ptr", "o_ptr", "HALF", "x_sb", "x_sh",
                                                   "x_ss", "o_sb", "o_sh", "o_ss", "c_ss"),
                    meta={"dtype": t[1:]}))
    return out


#: head_dim 128 x forward / backward x dtype, and head_dim 64 in bf16.
AOT_VARIANTS = _aot_variants()
