"""Triton LoRA / DoRA kernels over a blockwise 4-bit (NF4/FP4) frozen weight W [N out, K in].

* ``lora_matmul_4bit_nt(x, ..., xa_scaled, lora_B, bias)``: ``y = x W^T + xa_scaled B^T + b`` (forward)
* ``lora_matmul_4bit_nn(dy, ..., dyb_scaled, lora_A)``:    ``dx = dy W + dyb_scaled A``     (grad of the input)
* ``dora_weight_norm_4bit`` / ``dora_weight_norm_dense``:  ``||W[n, :] + s (B A)[n, :]||_2`` per row

The matmuls are the concatenated GEMMs ``[x | xa_s] [W | B]^T`` and ``[dy | dyb_s] [W ; A]``: the
fused kernels run matmul4bit's K loop (``_gemv_rows`` / ``_nt_tile`` / ``_nn_tile``, imported, not
copied) and then a short tail loop over r into the same fp32 accumulator, so the output is written
once and rounded once. The paths follow matmul4bit's split by M:

* M == 1 (decode): the dot-free GEMV plus r-long dot products per row (reads r·N more elements).
* M <= ``matmul4bit.FUSED_MAX_M``: fused dequant-in-``tl.dot`` tiles; the tail is one or more
  ``tl.dot`` on [BLOCK_M, 16] x [16, BLOCK_N] tiles (r is padded to a multiple of 16 by masking).
* larger M: matmul4bit's dequant workspace + cuBLAS for the base GEMM (bias in its epilogue), then
  the rank-r term as a second cuBLAS GEMM accumulating into the same output (``addmm_``, beta = 1).

The low-rank operands (xa_scaled, lora_B / dyb_scaled, lora_A) and the bias are used in x's dtype
(cast by the launcher when they differ, as the reference does): one operand dtype per compiled
variant. The DoRA norm kernels decode W tile by tile in fp32, form the matching tile of B A with
``tl.dot`` (fp32 accumulation) and accumulate squares: neither W nor B A is materialised.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import matmul4bit
from ._launch import FLOAT_DTYPES, TL_PTR, AotVariant, check_arg, check_device
from .matmul4bit import (GEMV_CONFIG, MatmulConfig, NN_CONFIGS, NT_CONFIGS, _check_out, _check_weight,
                         _dequant_to_workspace, _gemv_rows, _nn_tile, _nt_tile, _w_decode, _w_load,
                         pick_nn_config, pick_nt_config)

#: Rank chunk of the tail loops: the tensor-core minimum (r = 8 is padded to 16 by masking, r = 12 too,
#: r = 64 takes 4 trips). The tail is r/K of the K loop's work, so a larger chunk would buy nothing.
BLOCK_R = 16

#: DoRA norm tiles: programs own BLOCK_N rows (16: N/16 programs fill any GPU for N >= 2048) and walk K.
#: BLOCK_N and BLOCK_R are >= 16 (dot dims); BLOCK_K a multiple of 32 (matmul4bit's K_ALIGNED groups).
NORM_CONFIG = MatmulConfig("dora_norm", 1, 16, 128, 4, 1)

# Same tile tables as matmul4bit (the K loop is its code); the names get a prefix so AOT variants and
# forced configs are unambiguous.
_NT = {"lora_" + c.name: c for c in NT_CONFIGS + (GEMV_CONFIG,)}
_NN = {"lora_" + c.name: c for c in NN_CONFIGS}


# ----------------------------------------------------------------------------------- kernels
@triton.jit
def _lora_tail_nt(acc, xa_ptr, b_ptr, rm, rn, M, N, R, BLOCK_R: tl.constexpr):
    """acc [BM, BN] += xa[rm, :] B[rn, :]^T; xa [M, R], B [N, R] row-major, operands in x's dtype."""
    rr = tl.arange(0, BLOCK_R)
    xa_rows = xa_ptr + rm.to(tl.int64)[:, None] * R
    b_rows = b_ptr + rn.to(tl.int64)[:, None] * R
    for j0 in range(0, R, BLOCK_R):
        j = j0 + rr
        xat = tl.load(xa_rows + j[None, :], mask=(rm[:, None] < M) & (j[None, :] < R), other=0.0)
        bt = tl.load(b_rows + j[None, :], mask=(rn[:, None] < N) & (j[None, :] < R), other=0.0)
        acc = tl.dot(xat, tl.trans(bt), acc, input_precision="ieee")
    return acc


@triton.jit
def _lora_nt_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr,
                    M, N, K, R, log2_bs,
                    HAS_BIAS: tl.constexpr, K_ALIGNED: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    # As matmul4bit's nt kernel, with the rank-r tail added to the accumulator before the epilogue.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _nt_tile(x_ptr, packed_ptr, absmax_ptr, code_ptr, rm, rn, M, N, K, log2_bs,
                   K_ALIGNED, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = _lora_tail_nt(acc, xa_ptr, b_ptr, rm, rn, M, N, R, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _lora_gemv_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr, N, K, R, log2_bs,
                      HAS_BIAS: tl.constexpr, K_ALIGNED: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    # M == 1: matmul4bit's GEMV, then y[n] += B[n, :] . xa in registers (no dot, as the GEMV): the
    # extra traffic is r elements of B per output row, contiguous per row.
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _gemv_rows(x_ptr, packed_ptr, absmax_ptr, code_ptr, rn, N, K, log2_bs, K_ALIGNED, BLOCK_N, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    b_rows = b_ptr + rn.to(tl.int64)[:, None] * R
    for j0 in range(0, R, BLOCK_R):
        j = j0 + rr
        bt = tl.load(b_rows + j[None, :], mask=(rn[:, None] < N) & (j[None, :] < R), other=0.0)
        xav = tl.load(xa_ptr + j, mask=j < R, other=0.0)
        acc += tl.sum(bt.to(tl.float32) * xav.to(tl.float32)[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _lora_nn_kernel(dy_ptr, packed_ptr, absmax_ptr, code_ptr, dyb_ptr, a_ptr, dx_ptr, M, N, K, R, log2_bs,
                    K_ALIGNED: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    # As matmul4bit's nn kernel (programs own a [BLOCK_M, BLOCK_K] tile of dx and walk down N), then
    # acc += dyb[rm, :] A[:, rk]: the tail of the concatenated reduction over N + r.
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    k0 = pid_k * BLOCK_K
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = k0 + tl.arange(0, BLOCK_K)
    acc = _nn_tile(dy_ptr, packed_ptr, absmax_ptr, code_ptr, rm, k0, M, N, K, log2_bs,
                   K_ALIGNED, BLOCK_M, BLOCK_N, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    dyb_rows = dyb_ptr + rm.to(tl.int64)[:, None] * R
    for j0 in range(0, R, BLOCK_R):
        j = j0 + rr
        dybt = tl.load(dyb_rows + j[None, :], mask=(rm[:, None] < M) & (j[None, :] < R), other=0.0)
        at = tl.load(a_ptr + j.to(tl.int64)[:, None] * K + rk[None, :],
                     mask=(j[:, None] < R) & (rk[None, :] < K), other=0.0)
        acc = tl.dot(dybt, at, acc, input_precision="ieee")
    dx = dx_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit
def _ba_tile(a_ptr, b_ptr, rn, k0, N, K, R, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_K] tile of B A (rows rn, columns k0 + [0, BLOCK_K)); A [R, K], B [N, R]."""
    rk = k0 + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    ba = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # B's [BLOCK_N, r] rows are re-read for every K tile: a few KB that stay in L1, cheaper than
    # holding up to 256 columns in registers across the loop.
    for j0 in range(0, R, BLOCK_R):
        j = j0 + rr
        bt = tl.load(b_ptr + rn.to(tl.int64)[:, None] * R + j[None, :],
                     mask=(rn[:, None] < N) & (j[None, :] < R), other=0.0)
        at = tl.load(a_ptr + j.to(tl.int64)[:, None] * K + rk[None, :],
                     mask=(j[:, None] < R) & (rk[None, :] < K), other=0.0)
        ba = tl.dot(bt, at, ba, input_precision="ieee")
    return ba


@triton.jit
def _dora_norm4bit_kernel(packed_ptr, absmax_ptr, code_ptr, a_ptr, b_ptr, out_ptr, N, K, R, scale, log2_bs,
                          K_ALIGNED: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    # Squares accumulate elementwise in a [BLOCK_N, BLOCK_K] fp32 tile and are reduced once at the end
    # (one cross-thread reduction per program instead of one per K tile). W tiles are prefetched by
    # hand as in matmul4bit (num_stages=1).
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    sq = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    b, s = _w_load(packed_ptr, absmax_ptr, rn, 0, N, K, log2_bs, BLOCK_N, BLOCK_K, K_ALIGNED)
    for k0 in range(0, K, BLOCK_K):
        b_next, s_next = _w_load(packed_ptr, absmax_ptr, rn, k0 + BLOCK_K, N, K, log2_bs, BLOCK_N, BLOCK_K,
                                 K_ALIGNED)
        w = _w_decode(b, s, code_ptr, rn, k0, K, BLOCK_N, BLOCK_K, K_ALIGNED)  # 0 outside W
        v = w + scale * _ba_tile(a_ptr, b_ptr, rn, k0, N, K, R, BLOCK_N, BLOCK_K, BLOCK_R)
        sq += v * v
        b, s = b_next, s_next
    tl.store(out_ptr + rn, tl.sqrt(tl.sum(sq, axis=1)), mask=rn < N)


@triton.jit
def _dora_norm_dense_kernel(w_ptr, a_ptr, b_ptr, out_ptr, N, K, R, stride_wn, stride_wk, scale,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    # W is read through strides: a transposed weight (GPT-2 Conv1D stores [K, N]) needs no copy.
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    sq = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_rows + rk.to(tl.int64)[None, :] * stride_wk,
                    mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0).to(tl.float32)
        v = w + scale * _ba_tile(a_ptr, b_ptr, rn, k0, N, K, R, BLOCK_N, BLOCK_K, BLOCK_R)
        sq += v * v
    tl.store(out_ptr + rn, tl.sqrt(tl.sum(sq, axis=1)), mask=rn < N)


# ----------------------------------------------------------------------------------- launchers
def _low_rank(name: str, t: torch.Tensor, rows: int, dtype: torch.dtype, r: int | None = None) -> torch.Tensor:
    """A 2-D [rows, r] low-rank operand in ``dtype`` (cast when it differs; N*r or M*r elements)."""
    check_arg(name, t, FLOAT_DTYPES)
    if t.dim() != 2 or t.shape[0] != rows or (r is not None and t.shape[1] != r):
        want = f"[{rows}, {'r' if r is None else r}]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    return t if t.dtype == dtype else t.to(dtype)


def lora_matmul_4bit_nt(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                        blocksize: int, out_features: int, xa_scaled: torch.Tensor, lora_B: torch.Tensor,
                        bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                        config: str | None = None) -> torch.Tensor:
    """``y = x W^T + xa_scaled B^T + bias`` with W the 4-bit weight [out_features, K].

    x: [M, K] fp32/fp16/bf16, contiguous. packed/absmax/code as in ``matmul_4bit_nt``.
    xa_scaled: [M, r] (``s * drop(x) A^T``, scale applied), lora_B: [N, r], bias: [N]; any float
    dtype, used in x.dtype (cast here if needed). Returns y [M, N] in x.dtype, fp32 accumulation.
    out: optional contiguous [M, N] buffer. config: force a fused config by name (``lora_nt_gemv``
    for M == 1, ``lora_nt_m16``, ``lora_nt_m64``; tests and benchmarks), which skips the workspace path.
    """
    check_arg("x", x, FLOAT_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    n = out_features
    log2_bs = _check_weight(packed, absmax, code, n * k, blocksize)
    xa = _low_rank("xa_scaled", xa_scaled, m, x.dtype)
    r = xa.shape[1]
    b_w = _low_rank("lora_B", lora_B, n, x.dtype, r)
    if bias is not None:
        check_arg("bias", bias, FLOAT_DTYPES)
        if bias.numel() != n:
            raise ValueError(f"bias must have {n} elements, got {bias.numel()}")
        bias = bias.reshape(n).to(x.dtype)  # the reference's rounding; one compiled bias dtype
    check_device(_lora_nt_kernel, x=x, packed=packed, absmax=absmax, code=code, xa_scaled=xa,
                 lora_B=b_w, bias=bias, out=out)
    y = _check_out(out, (m, n), x)
    if config is None and m > matmul4bit.FUSED_MAX_M:
        w = _dequant_to_workspace(packed, absmax, code, blocksize, n, k, x.dtype)
        if bias is None:
            torch.matmul(x, w.t(), out=y)
        else:
            torch.addmm(bias, x, w.t(), out=y)
        # Second GEMM with beta = 1: one more read + write of y, no [M, N] temporary.
        return y.addmm_(xa, b_w.t())
    if m == 0 or n == 0:
        return y
    cfg = _NT[config] if config is not None else _NT["lora_" + pick_nt_config(m).name]
    k_aligned = k % 32 == 0
    bias_arg = bias if bias is not None else x  # dummy pointer when HAS_BIAS is False
    if cfg is GEMV_CONFIG:
        if m != 1:
            raise ValueError(f"config 'lora_{cfg.name}' is for M == 1, got M={m}")
        _lora_gemv_kernel[(triton.cdiv(n, cfg.BLOCK_N),)](
            x, packed, absmax, code, xa, b_w, bias_arg, y, n, k, r, log2_bs,
            HAS_BIAS=bias is not None, K_ALIGNED=k_aligned, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
            BLOCK_R=BLOCK_R, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return y
    grid = (triton.cdiv(n, cfg.BLOCK_N), triton.cdiv(m, cfg.BLOCK_M))
    _lora_nt_kernel[grid](x, packed, absmax, code, xa, b_w, bias_arg, y, m, n, k, r, log2_bs,
                          HAS_BIAS=bias is not None, K_ALIGNED=k_aligned,
                          BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_R=BLOCK_R,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def lora_matmul_4bit_nn(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                        blocksize: int, in_features: int, dyb_scaled: torch.Tensor, lora_A: torch.Tensor, *,
                        out: torch.Tensor | None = None, config: str | None = None) -> torch.Tensor:
    """``dx = dy W + dyb_scaled A`` with W the 4-bit weight [N, in_features].

    dy: [M, N] fp32/fp16/bf16, contiguous. dyb_scaled: [M, r] (``s * dy B``), lora_A: [r, K]; any
    float dtype, used in dy.dtype. Returns dx [M, K] in dy.dtype, fp32 accumulation.
    out/config as in :func:`lora_matmul_4bit_nt` (configs ``lora_nn_m16``, ``lora_nn_m64``).
    """
    check_arg("dy", dy, FLOAT_DTYPES)
    if dy.dim() != 2:
        raise ValueError(f"dy must be 2-D [M, N], got shape {tuple(dy.shape)}")
    m, n = dy.shape
    k = in_features
    log2_bs = _check_weight(packed, absmax, code, n * k, blocksize)
    check_arg("lora_A", lora_A, FLOAT_DTYPES)
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"lora_A must have shape [r, {k}], got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    dyb = _low_rank("dyb_scaled", dyb_scaled, m, dy.dtype, r)
    a_w = lora_A if lora_A.dtype == dy.dtype else lora_A.to(dy.dtype)
    check_device(_lora_nn_kernel, dy=dy, packed=packed, absmax=absmax, code=code, dyb_scaled=dyb,
                 lora_A=a_w, out=out)
    dx = _check_out(out, (m, k), dy)
    if config is None and m > matmul4bit.FUSED_MAX_M:
        w = _dequant_to_workspace(packed, absmax, code, blocksize, n, k, dy.dtype)
        torch.matmul(dy, w, out=dx)
        return dx.addmm_(dyb, a_w)
    if m == 0 or k == 0:
        return dx
    cfg = _NN[config] if config is not None else _NN["lora_" + pick_nn_config(m).name]
    grid = (triton.cdiv(k, cfg.BLOCK_K), triton.cdiv(m, cfg.BLOCK_M))
    # N == 0 or r == 0 need no special case: the loops run zero trips and the tile is stored as 0 + the rest.
    _lora_nn_kernel[grid](dy, packed, absmax, code, dyb, a_w, dx, m, n, k, r, log2_bs, K_ALIGNED=k % 32 == 0,
                          BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_R=BLOCK_R,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dx


def _norm_operands(lora_A: torch.Tensor, lora_B: torch.Tensor, n: int, k: int,
                   allowed: tuple[torch.dtype, ...]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A [r, K], B [N, r] in one dtype from ``allowed`` (else both fp32; an exact upcast)."""
    check_arg("lora_A", lora_A, FLOAT_DTYPES)
    check_arg("lora_B", lora_B, FLOAT_DTYPES)
    if lora_A.dim() != 2 or lora_A.shape[1] != k or lora_B.dim() != 2 or lora_B.shape != (n, lora_A.shape[0]):
        raise ValueError(f"lora_A must be [r, {k}] and lora_B [{n}, r]; got {tuple(lora_A.shape)} and "
                         f"{tuple(lora_B.shape)}")
    dt = lora_A.dtype if lora_A.dtype == lora_B.dtype and lora_A.dtype in allowed else torch.float32
    return lora_A.to(dt), lora_B.to(dt), lora_A.shape[0]


def _norm_out(out: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(n, dtype=torch.float32, device=like.device)
    check_arg("out", out, (torch.float32,))
    if tuple(out.shape) != (n,):
        raise ValueError(f"out must have shape ({n},), got {tuple(out.shape)}")
    return out


def dora_weight_norm_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                          out_features: int, in_features: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
                          scale: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``||W[n, :] + scale * (B A)[n, :]||_2`` for the 4-bit W [N, K] -> float32 [N].

    lora_A: [r, K], lora_B: [N, r], fp32/fp16/bf16 (one dtype; mixed dtypes are upcast to fp32).
    W is decoded in fp32, B A formed by ``tl.dot`` with fp32 accumulation (IEEE for fp32), the sum of
    squares in fp32. Neither W nor B A is materialised. out: optional float32 [N] buffer.
    """
    n, k = out_features, in_features
    log2_bs = _check_weight(packed, absmax, code, n * k, blocksize)
    a_w, b_w, r = _norm_operands(lora_A, lora_B, n, k, FLOAT_DTYPES)
    check_device(_dora_norm4bit_kernel, packed=packed, absmax=absmax, code=code, lora_A=a_w, lora_B=b_w, out=out)
    res = _norm_out(out, n, packed)
    if n == 0:
        return res
    cfg = NORM_CONFIG
    _dora_norm4bit_kernel[(triton.cdiv(n, cfg.BLOCK_N),)](
        packed, absmax, code, a_w, b_w, res, n, k, r, float(scale), log2_bs, K_ALIGNED=k % 32 == 0,
        BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_R=BLOCK_R, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return res


def dora_weight_norm_dense(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, *,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """``||W[n, :] + scale * (B A)[n, :]||_2`` for a dense W [N, K] -> float32 [N].

    weight: [N, K] fp32/fp16/bf16, any strides (``conv1d_weight.t()`` works without a copy).
    lora_A [r, K], lora_B [N, r]: used in weight's dtype or fp32 (other combinations upcast to fp32).
    Computed as :func:`dora_weight_norm_4bit`, with W loaded and converted to fp32.
    """
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES or weight.dim() != 2:
        raise TypeError(f"weight must be a 2-D fp32/fp16/bf16 tensor, got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    n, k = weight.shape
    a_w, b_w, r = _norm_operands(lora_A, lora_B, n, k, (weight.dtype, torch.float32))
    check_device(_dora_norm_dense_kernel, weight=weight, lora_A=a_w, lora_B=b_w, out=out)
    res = _norm_out(out, n, weight)
    if n == 0:
        return res
    cfg = NORM_CONFIG
    _dora_norm_dense_kernel[(triton.cdiv(n, cfg.BLOCK_N),)](
        weight, a_w, b_w, res, n, k, r, weight.stride(0), weight.stride(1), float(scale),
        BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_R=BLOCK_R, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return res


# ----------------------------------------------------------------------------------- AOT variants
def _aot_variants() -> list[AotVariant]:
    variants = []
    w_args = ("packed_ptr", "absmax_ptr", "code_ptr")
    for dtype in FLOAT_DTYPES:
        t = TL_PTR[dtype]
        mma = dtype != torch.float32  # fp32 dots are IEEE (FMA), not tensor-core
        for aligned in (True, False):
            path = "alignK" if aligned else "anyK"
            k16 = ("K",) if aligned else ()
            for name, cfg in _NT.items():
                gemv = cfg is GEMV_CONFIG
                for has_bias in (False, True):  # the bias is always in x's dtype (the launcher casts it)
                    sig = {"x_ptr": t, "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
                           "xa_ptr": t, "b_ptr": t, "bias_ptr": t, "y_ptr": t}
                    sig.update({"N": "i32", "K": "i32"} if gemv else {"M": "i32", "N": "i32", "K": "i32"})
                    sig.update({"R": "i32", "log2_bs": "i32", "HAS_BIAS": "constexpr", "K_ALIGNED": "constexpr"})
                    cx = {"HAS_BIAS": has_bias, "K_ALIGNED": aligned}
                    if not gemv:
                        sig["BLOCK_M"] = "constexpr"
                        cx["BLOCK_M"] = cfg.BLOCK_M
                    sig.update({"BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_R": "constexpr"})
                    cx.update({"BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K, "BLOCK_R": BLOCK_R})
                    variants.append(AotVariant(
                        name=f"{name}-{t[1:]}-{path}-{'bias' if has_bias else 'nobias'}",
                        kernel=_lora_gemv_kernel if gemv else _lora_nt_kernel, signature=sig, constexprs=cx,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, expect_mma=mma and not gemv,
                        divisible_by_16=("x_ptr", *w_args, "xa_ptr", "b_ptr", "bias_ptr", "y_ptr", *k16),
                        meta={"config": name, "dtype": t[1:]}))
            for name, cfg in _NN.items():
                sig = {"dy_ptr": t, "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
                       "dyb_ptr": t, "a_ptr": t, "dx_ptr": t, "M": "i32", "N": "i32", "K": "i32", "R": "i32",
                       "log2_bs": "i32", "K_ALIGNED": "constexpr", "BLOCK_M": "constexpr",
                       "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_R": "constexpr"}
                cx = {"K_ALIGNED": aligned, "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N,
                      "BLOCK_K": cfg.BLOCK_K, "BLOCK_R": BLOCK_R}
                variants.append(AotVariant(
                    name=f"{name}-{t[1:]}-{path}", kernel=_lora_nn_kernel, signature=sig, constexprs=cx,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, expect_mma=mma,
                    divisible_by_16=("dy_ptr", *w_args, "dyb_ptr", "a_ptr", "dx_ptr", *k16),
                    meta={"config": name, "dtype": t[1:]}))
            # DoRA norm of a 4-bit W: `dtype` is the dtype of A and B.
            cfg = NORM_CONFIG
            blocks = {"BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K, "BLOCK_R": BLOCK_R}
            sig = {"packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "a_ptr": t, "b_ptr": t,
                   "out_ptr": "*fp32", "N": "i32", "K": "i32", "R": "i32", "scale": "fp32", "log2_bs": "i32",
                   "K_ALIGNED": "constexpr", **{b: "constexpr" for b in blocks}}
            variants.append(AotVariant(
                name=f"dora_norm4bit-{t[1:]}-{path}", kernel=_dora_norm4bit_kernel, signature=sig,
                constexprs={"K_ALIGNED": aligned, **blocks}, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                expect_mma=mma, divisible_by_16=(*w_args, "a_ptr", "b_ptr", "out_ptr", *k16),
                meta={"config": cfg.name, "dtype": t[1:]}))
        # Dense DoRA norm: (weight dtype, A/B dtype) in {(d, d), (d, fp32)}. Compiled for a row-major
        # weight (the JIT specializes stride_wk == 1 to a constant); K and stride_wn unhinted.
        for ab in dict.fromkeys((dtype, torch.float32)):
            cfg = NORM_CONFIG
            blocks = {"BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K, "BLOCK_R": BLOCK_R}
            sig = {"w_ptr": t, "a_ptr": TL_PTR[ab], "b_ptr": TL_PTR[ab], "out_ptr": "*fp32", "N": "i32",
                   "K": "i32", "R": "i32", "stride_wn": "i32", "stride_wk": "constexpr", "scale": "fp32",
                   **{b: "constexpr" for b in blocks}}
            variants.append(AotVariant(
                name=f"dora_norm_dense-{t[1:]}-ab{TL_PTR[ab][2:]}", kernel=_dora_norm_dense_kernel,
                signature=sig, constexprs={"stride_wk": 1, **blocks}, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                expect_mma=ab != torch.float32, divisible_by_16=("w_ptr", "a_ptr", "b_ptr", "out_ptr"),
                meta={"config": cfg.name, "dtype": t[1:]}))
    return variants


#: Every compiled form the launchers can request: config x dtype x K_ALIGNED (x HAS_BIAS for nt;
#: x A/B dtype for the norms).
AOT_VARIANTS = _aot_variants()
