"""Triton matmuls against a blockwise 4-bit (NF4/FP4) weight W [N out, K in].

* ``matmul_4bit_nt(x, ...)``: ``y = x W^T + b``, x [M, K] -> y [M, N]  (forward)
* ``matmul_4bit_nn(dy, ...)``: ``dx = dy W``,    dy [M, N] -> dx [M, K] (grad of the input)

Execution paths, chosen by M:

* M == 1 (decode, forward only): a dot-free GEMV kernel; each program decodes a
  few rows of W in registers and multiplies them by x without a tensor-core tile.
* M <= ``FUSED_MAX_M`` (small batches, short prompts): a fused kernel dequantizes
  W tile by tile in registers and feeds ``tl.dot`` (16- or 64-row tiles).
  Both read W from HBM once, as 4-bit bytes: this regime is memory-bound, so
  reading 0.5 byte per weight instead of 2 is the win.
* larger M (training, prefill): compute-bound. W is dequantized into a reused
  workspace by the Triton dequant kernel and multiplied by cuBLAS; the dequant
  costs ~2.5 bytes per weight of traffic, amortised over M rows of GEMM work.

Inside the fused kernels, element (n, k) of W has flat index ``n*K + k``: its code
is in byte ``(n*K + k) >> 1`` (high nibble when the index is even) and its scale is
``absmax[(n*K + k) >> log2(blocksize)]``, so blocks may cross rows. When K is a
multiple of 32 (every real model) the kernel loads whole bytes, 16 per aligned
group of 32 weights with one scale per group (``K_ALIGNED``); any other K (odd K
included) takes a per-element path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPES, TL_PTR, AotVariant, check_arg, check_device, log2_blocksize
from .dequant4bit import dequantize_4bit

#: Largest M served by the fused kernels; above it: dequant into a workspace + cuBLAS.
#: Estimate, to be tuned on a GPU: the workspace path costs ~2.5 B/weight of extra traffic, which
#: a bf16 GEMM with M rows hides once M is in the hundreds; below ~64 rows it does not.
FUSED_MAX_M = 64


@dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes of one fused-kernel launch.

    nt: programs tile (M, N) and loop over K.  nn: programs tile (M, K) and loop over N.
    Every dot dimension is >= 16 (tensor-core minimum; the GEMV config has no dot); BLOCK_K is a
    multiple of 32 (K_ALIGNED groups). num_stages is 1: the kernels prefetch by hand (see the
    note above the kernels).
    """

    name: str
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


# Tile tables, chosen from what the AOT compile reports on CPU (no spills, <= ~200 registers,
# shared memory far below sm_86/sm_89's 99 KB; tests/test_triton_aot.py) and to be re-derived
# from GPU measurements (bench/). Few configs on purpose: each is compiled per dtype and arch.
#: M == 1 (decode): the dot-free GEMV kernel; 4 rows per program (N/4 programs fill any GPU),
#: 512 columns = 256 contiguous bytes of each row per tile, ~55 registers (many programs per SM).
GEMV_CONFIG = MatmulConfig("nt_gemv", 1, 4, 512, 4, 1)
#: 2 <= M <= 16: one 16-row MMA tile; 16 < M <= FUSED_MAX_M: 64-row tiles.
NT_CONFIGS = (
    MatmulConfig("nt_m16", 16, 16, 256, 8, 1),
    MatmulConfig("nt_m64", 64, 64, 32, 8, 1),
)
#: nn: programs own a K stripe of dx and walk down N. Small-M backward is rare (decode has none).
NN_CONFIGS = (
    MatmulConfig("nn_m16", 16, 128, 64, 8, 1),
    MatmulConfig("nn_m64", 64, 32, 64, 8, 1),
)
_NT = {c.name: c for c in NT_CONFIGS + (GEMV_CONFIG,)}
_NN = {c.name: c for c in NN_CONFIGS}


def pick_nt_config(m: int) -> MatmulConfig:
    """Config for y[M, N] = x W^T, by M (the GEMV kernel for M == 1)."""
    if m == 1:
        return GEMV_CONFIG
    return _NT["nt_m16"] if m <= 16 else _NT["nt_m64"]


def pick_nn_config(m: int) -> MatmulConfig:
    """Config for dx[M, K] = dy W, by M."""
    return _NN["nn_m16"] if m <= 16 else _NN["nn_m64"]


@triton.jit
def _w_load(packed_ptr, absmax_ptr, rn, k0, N, K, log2_bs,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_ALIGNED: tl.constexpr):
    """Raw bytes and scales of the W tile: rows ``rn``, columns ``k0 + [0, BLOCK_K)``; zero scale outside W.

    Kept apart from :func:`_w_decode` so that a loop issues the next tile's loads before it
    decodes the current one (the loads then overlap the decode and the dot).
    """
    if K_ALIGNED:
        # K % 32 == 0: every aligned group of 32 elements of a row is 16 whole bytes inside one
        # absmax block (blocksizes are powers of two >= 32), so load bytes as [BN, G, 16] and one
        # scale per group, [BN, G, 1], instead of one per element.
        g = tl.arange(0, BLOCK_K // 32)
        col = k0 + g[None, :, None] * 32  # first column of each group
        first = rn.to(tl.int64)[:, None, None] * K + col  # its flat index (even, 32-aligned)
        ok = (rn[:, None, None] < N) & (col < K)
        b = tl.load(packed_ptr + ((first >> 1) + tl.arange(0, 16)[None, None, :]), mask=ok, other=0)
        s = tl.load(absmax_ptr + (first >> log2_bs), mask=ok, other=0.0)
    else:
        # Any K (odd K: rows alternate between starting on a high and a low nibble): per element.
        kk = k0 + tl.arange(0, BLOCK_K)
        idx = rn.to(tl.int64)[:, None] * K + kk[None, :]
        ok = (rn[:, None] < N) & (kk[None, :] < K)
        b = tl.load(packed_ptr + (idx >> 1), mask=ok, other=0)
        s = tl.load(absmax_ptr + (idx >> log2_bs), mask=ok, other=0.0)
    return b, s


@triton.jit
def _w_decode(b, s, code_ptr, rn, k0, K,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_ALIGNED: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_K] W tile from :func:`_w_load`'s bytes and scales: ``code[q] * absmax``."""
    b = b.to(tl.int32)
    if K_ALIGNED:
        hi = tl.load(code_ptr + (b >> 4)) * s  # elements 2t of each group
        lo = tl.load(code_ptr + (b & 15)) * s  # elements 2t + 1
        w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))  # [BN, G, 16, 2] -> k = 32g + 2t + h
    else:
        kk = k0 + tl.arange(0, BLOCK_K)
        idx = rn.to(tl.int64)[:, None] * K + kk[None, :]
        shift = ((1 - (idx & 1)) * 4).to(tl.int32)  # even flat index -> high nibble
        w = tl.load(code_ptr + ((b >> shift) & 15)) * s
    # Outside W the scale is 0 (and codes are finite), so padding never pollutes the dot.
    return w


# Both kernels prefetch the next tile into registers by hand and run with num_stages=1. Triton's
# software pipeliner would stage every load of the loop through shared memory with 4-byte cp.async,
# the per-element code-book gathers included: >99 KB of shared memory for the decode tiles (over the
# per-block limit of sm_86/sm_89) for data that is mostly L1-resident.
@triton.jit
def _nt_tile(x_ptr, packed_ptr, absmax_ptr, code_ptr, rm, rn, M, N, K, log2_bs,
             K_ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tile of ``x W^T`` for rows ``rm`` of x and rows ``rn`` of W (the whole K loop).

    Shared with the LoRA kernels (kernels/lora.py), which add their low-rank term to the result.
    """
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
    m_ok = rm[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b, s = _w_load(packed_ptr, absmax_ptr, rn, 0, N, K, log2_bs, BLOCK_N, BLOCK_K, K_ALIGNED)
    xt = tl.load(x_rows + rk[None, :], mask=m_ok & (rk[None, :] < K), other=0.0)
    for k0 in range(0, K, BLOCK_K):
        # Next tile (all masked off after the last one: no memory traffic).
        kn = k0 + BLOCK_K
        b_next, s_next = _w_load(packed_ptr, absmax_ptr, rn, kn, N, K, log2_bs, BLOCK_N, BLOCK_K, K_ALIGNED)
        x_next = tl.load(x_rows + (kn + rk)[None, :], mask=m_ok & ((kn + rk)[None, :] < K), other=0.0)
        w = _w_decode(b, s, code_ptr, rn, k0, K, BLOCK_N, BLOCK_K, K_ALIGNED)
        # W rounded to x's dtype first, as the reference does; fp32 stays IEEE (no tf32).
        acc = tl.dot(xt, tl.trans(w.to(x_ptr.dtype.element_ty)), acc, input_precision="ieee")
        b, s, xt = b_next, s_next, x_next
    return acc


@triton.jit
def _matmul4bit_nt_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, y_ptr, M, N, K, log2_bs,
                          HAS_BIAS: tl.constexpr, K_ALIGNED: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # N on grid axis 0 (up to 2**31 programs); M tiles are few on this path.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _nt_tile(x_ptr, packed_ptr, absmax_ptr, code_ptr, rm, rn, M, N, K, log2_bs,
                   K_ALIGNED, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _gemv_rows(x_ptr, packed_ptr, absmax_ptr, code_ptr, rn, N, K, log2_bs,
               K_ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_N]: ``W[rn, :] . x`` for one row x (the whole K loop; see _gemv4bit_kernel).

    Shared with the LoRA GEMV (kernels/lora.py).
    """
    if K_ALIGNED:
        # Per 32-element group: sum(code[q] * x) first, times the group's one scale after, so the
        # scale costs one multiply per group instead of one per weight. x is loaded [1, G, 32] in
        # the shape of the decoded codes, so it needs no layout conversion.
        xo = tl.arange(0, BLOCK_K // 32)[None, :, None] * 32 + tl.arange(0, 32)[None, None, :]
        acc3 = tl.zeros((BLOCK_N, BLOCK_K // 32, 1), dtype=tl.float32)
        b, s = _w_load(packed_ptr, absmax_ptr, rn, 0, N, K, log2_bs, BLOCK_N, BLOCK_K, K_ALIGNED)
        xv = tl.load(x_ptr + xo, mask=xo < K, other=0.0)
        for k0 in range(0, K, BLOCK_K):
            kn = k0 + BLOCK_K
            b_next, s_next = _w_load(packed_ptr, absmax_ptr, rn, kn, N, K, log2_bs, BLOCK_N, BLOCK_K, K_ALIGNED)
            x_next = tl.load(x_ptr + kn + xo, mask=(kn + xo) < K, other=0.0)
            bi = b.to(tl.int32)
            c = tl.reshape(tl.join(tl.load(code_ptr + (bi >> 4)), tl.load(code_ptr + (bi & 15))),
                           (BLOCK_N, BLOCK_K // 32, 32))  # k = 32g + 2t + h, as x
            acc3 += tl.sum(c * xv.to(tl.float32), axis=2, keep_dims=True) * s
            b, s, xv = b_next, s_next, x_next
        acc = tl.sum(tl.sum(acc3, axis=2), axis=1)
    else:
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b, s = _w_load(packed_ptr, absmax_ptr, rn, 0, N, K, log2_bs, BLOCK_N, BLOCK_K, K_ALIGNED)
        xv = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
        for k0 in range(0, K, BLOCK_K):
            kn = k0 + BLOCK_K
            b_next, s_next = _w_load(packed_ptr, absmax_ptr, rn, kn, N, K, log2_bs, BLOCK_N, BLOCK_K, K_ALIGNED)
            x_next = tl.load(x_ptr + kn + rk, mask=(kn + rk) < K, other=0.0)
            w = _w_decode(b, s, code_ptr, rn, k0, K, BLOCK_N, BLOCK_K, K_ALIGNED)
            acc += tl.sum(w * xv.to(tl.float32)[None, :], axis=1)
            b, s, xv = b_next, s_next, x_next
    return acc


@triton.jit
def _gemv4bit_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, y_ptr, N, K, log2_bs,
                     HAS_BIAS: tl.constexpr, K_ALIGNED: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # M == 1 (decode): no tl.dot. A 16-row MMA tile would be 15/16 padding, and moving W into the
    # dot-operand layout costs a shared-memory round trip per weight; here each thread multiplies
    # the codes it decoded by x in registers. Few rows per program (BLOCK_N) and long K tiles:
    # many programs, long contiguous byte runs per row. W stays fp32 (it is not rounded to x's
    # dtype as on the dot path): slightly more exact than the reference, never less.
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _gemv_rows(x_ptr, packed_ptr, absmax_ptr, code_ptr, rn, N, K, log2_bs, K_ALIGNED, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _nn_tile(dy_ptr, packed_ptr, absmax_ptr, code_ptr, rm, k0, M, N, K, log2_bs,
             K_ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_K] tile of ``dy W``: rows ``rm`` of dy, columns ``k0 + [0, BLOCK_K)`` of W.

    Walks down the N rows of W; shared with the LoRA kernels (kernels/lora.py).
    """
    rb = tl.arange(0, BLOCK_N)
    dy_rows = dy_ptr + rm.to(tl.int64)[:, None] * N
    m_ok = rm[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    b, s = _w_load(packed_ptr, absmax_ptr, rb, k0, N, K, log2_bs, BLOCK_N, BLOCK_K, K_ALIGNED)
    dyt = tl.load(dy_rows + rb[None, :], mask=m_ok & (rb[None, :] < N), other=0.0)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + rb
        rn_next = rn + BLOCK_N
        b_next, s_next = _w_load(packed_ptr, absmax_ptr, rn_next, k0, N, K, log2_bs, BLOCK_N, BLOCK_K, K_ALIGNED)
        dy_next = tl.load(dy_rows + rn_next[None, :], mask=m_ok & (rn_next[None, :] < N), other=0.0)
        w = _w_decode(b, s, code_ptr, rn, k0, K, BLOCK_N, BLOCK_K, K_ALIGNED)
        acc = tl.dot(dyt, w.to(dy_ptr.dtype.element_ty), acc, input_precision="ieee")
        b, s, dyt = b_next, s_next, dy_next
    return acc


@triton.jit
def _matmul4bit_nn_kernel(dy_ptr, packed_ptr, absmax_ptr, code_ptr, dx_ptr, M, N, K, log2_bs,
                          K_ALIGNED: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Programs own a [BLOCK_M, BLOCK_K] tile of dx and walk down the N rows of W.
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    k0 = pid_k * BLOCK_K
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = k0 + tl.arange(0, BLOCK_K)
    acc = _nn_tile(dy_ptr, packed_ptr, absmax_ptr, code_ptr, rm, k0, M, N, K, log2_bs,
                   K_ALIGNED, BLOCK_M, BLOCK_N, BLOCK_K)
    dx = dx_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rk[None, :] < K))


# ----------------------------------------------------------------------------- workspace path
# Large M dequantizes W into a buffer kept per (device, dtype, stream) and grown on demand, instead
# of a fresh [N, K] allocation per call: in training every linear layer does this on every forward
# and backward, and one buffer sized for the largest layer bounds the extra memory to that layer
# (fresh per-call buffers of different sizes fragment the caching allocator and raise peak memory).
# Safe because the buffer is consumed by the GEMM that immediately follows on the same stream, and
# no returned tensor aliases it. Not safe to share across streams (hence the stream in the key) or to
# grow while a CUDA graph is being captured (warm it up before capture).
_WORKSPACES: dict[tuple, torch.Tensor] = {}


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, dtype, stream)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACES.pop(key, None)  # drop the old one first so its memory can be reused
        buf = torch.empty(numel, dtype=dtype, device=device)
        _WORKSPACES[key] = buf
    return buf[:numel]


def clear_workspace() -> None:
    """Release the cached dequantization buffers (e.g. before switching from training to inference)."""
    _WORKSPACES.clear()


def _dequant_to_workspace(packed, absmax, code, blocksize, n, k, dtype) -> torch.Tensor:
    ws = _workspace(n * k, dtype, packed.device)
    return dequantize_4bit(packed, absmax, code, blocksize, n * k, dtype, out=ws).view(n, k)


# ----------------------------------------------------------------------------- launchers
def _check_weight(packed, absmax, code, numel: int, blocksize: int) -> int:
    check_arg("packed", packed, (torch.uint8,))
    check_arg("absmax", absmax, (torch.float32,))
    check_arg("code", code, (torch.float32,))
    log2_bs = log2_blocksize(blocksize)
    if packed.numel() < (numel + 1) // 2 or absmax.numel() < -(-numel // blocksize) or code.numel() != 16:
        raise ValueError(f"a 4-bit weight of {numel} elements in blocks of {blocksize} needs >= "
                         f"{(numel + 1) // 2} packed bytes, >= {-(-numel // blocksize)} absmax and 16 codes; "
                         f"got {packed.numel()}, {absmax.numel()} and {code.numel()}")
    return log2_bs


def _check_out(out: torch.Tensor | None, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    check_arg("out", out, (like.dtype,))
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    return out


def matmul_4bit_nt(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                   blocksize: int, out_features: int, bias: torch.Tensor | None = None, *,
                   out: torch.Tensor | None = None, config: str | None = None) -> torch.Tensor:
    """``y = x W^T + bias`` with W the 4-bit weight [out_features, K].

    x: [M, K] fp32/fp16/bf16, contiguous. packed: uint8 (>= ceil(N*K/2) bytes). absmax: float32
    [ceil(N*K/blocksize)] (already decoded). code: float32 [16]. bias: [N], any float dtype (added
    in fp32). Returns y [M, N] in x.dtype, fp32 accumulation.
    out: optional contiguous [M, N] result buffer. config: force a kernel config by name
    (``nt_gemv`` for M == 1, ``NT_CONFIGS``; tests and benchmarks), which also skips the
    workspace path.
    """
    check_arg("x", x, FLOAT_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    n = out_features
    log2_bs = _check_weight(packed, absmax, code, n * k, blocksize)
    if bias is not None:
        check_arg("bias", bias, FLOAT_DTYPES)
        if bias.numel() != n:
            raise ValueError(f"bias must have {n} elements, got {bias.numel()}")
    check_device(_matmul4bit_nt_kernel, x=x, packed=packed, absmax=absmax, code=code, bias=bias, out=out)
    y = _check_out(out, (m, n), x)
    if config is None and m > FUSED_MAX_M:
        w = _dequant_to_workspace(packed, absmax, code, blocksize, n, k, x.dtype)
        if bias is None:
            return torch.matmul(x, w.t(), out=y)
        # addmm fuses the bias into the GEMM epilogue (cuBLAS adds it to the fp32 accumulator;
        # the bias is rounded to x.dtype first, as in the reference).
        return torch.addmm(bias.to(x.dtype).view(-1), x, w.t(), out=y)
    if m == 0 or n == 0:
        return y
    if bias is not None and bias.dtype not in (x.dtype, torch.float32):
        bias = bias.float()  # keep the compiled variants to bias in {x.dtype, fp32} (see AOT_VARIANTS)
    cfg = _NT[config] if config is not None else pick_nt_config(m)
    k_aligned = k % 32 == 0
    if cfg is GEMV_CONFIG:
        if m != 1:
            raise ValueError(f"config {cfg.name!r} is for M == 1, got M={m}")
        _gemv4bit_kernel[(triton.cdiv(n, cfg.BLOCK_N),)](
            x, packed, absmax, code, bias if bias is not None else x, y, n, k, log2_bs,
            HAS_BIAS=bias is not None, K_ALIGNED=k_aligned, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return y
    grid = (triton.cdiv(n, cfg.BLOCK_N), triton.cdiv(m, cfg.BLOCK_M))
    _matmul4bit_nt_kernel[grid](x, packed, absmax, code, bias if bias is not None else x, y, m, n, k, log2_bs,
                                HAS_BIAS=bias is not None, K_ALIGNED=k_aligned,
                                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def matmul_4bit_nn(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                   blocksize: int, in_features: int, *,
                   out: torch.Tensor | None = None, config: str | None = None) -> torch.Tensor:
    """``dx = dy W`` with W the 4-bit weight [N, in_features].

    dy: [M, N] fp32/fp16/bf16, contiguous. packed/absmax/code as in :func:`matmul_4bit_nt`.
    Returns dx [M, in_features] in dy.dtype, fp32 accumulation. out/config as in matmul_4bit_nt.
    """
    check_arg("dy", dy, FLOAT_DTYPES)
    if dy.dim() != 2:
        raise ValueError(f"dy must be 2-D [M, N], got shape {tuple(dy.shape)}")
    m, n = dy.shape
    k = in_features
    log2_bs = _check_weight(packed, absmax, code, n * k, blocksize)
    check_device(_matmul4bit_nn_kernel, dy=dy, packed=packed, absmax=absmax, code=code, out=out)
    dx = _check_out(out, (m, k), dy)
    if config is None and m > FUSED_MAX_M:
        w = _dequant_to_workspace(packed, absmax, code, blocksize, n, k, dy.dtype)
        return torch.matmul(dy, w, out=dx)
    if m == 0 or k == 0:
        return dx
    if n == 0:
        return dx.zero_()
    cfg = _NN[config] if config is not None else pick_nn_config(m)
    grid = (triton.cdiv(k, cfg.BLOCK_K), triton.cdiv(m, cfg.BLOCK_M))
    _matmul4bit_nn_kernel[grid](dy, packed, absmax, code, dx, m, n, k, log2_bs, K_ALIGNED=k % 32 == 0,
                                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dx


# ----------------------------------------------------------------------------- AOT variants
def _aot_variants() -> list[AotVariant]:
    variants = []
    w_args = ("packed_ptr", "absmax_ptr", "code_ptr")
    for dtype in FLOAT_DTYPES:
        t = TL_PTR[dtype]
        mma = dtype != torch.float32  # fp32 dots are IEEE (FMA), not tensor-core
        for aligned in (True, False):
            path = "alignK" if aligned else "anyK"
            # What the JIT sees in practice: 16-byte aligned tensors, and K % 16 == 0 when K % 32 == 0.
            k16 = ("K",) if aligned else ()
            for cfg in NT_CONFIGS + (GEMV_CONFIG,):
                gemv = cfg is GEMV_CONFIG
                # Without a bias the launcher passes x as a dummy bias pointer.
                for bias_dtype in dict.fromkeys((None, dtype, torch.float32)):
                    sig = {"x_ptr": t, "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
                           "bias_ptr": TL_PTR[bias_dtype or dtype], "y_ptr": t}
                    sig.update({"N": "i32", "K": "i32"} if gemv else {"M": "i32", "N": "i32", "K": "i32"})
                    sig.update({"log2_bs": "i32", "HAS_BIAS": "constexpr", "K_ALIGNED": "constexpr"})
                    cx = {"HAS_BIAS": bias_dtype is not None, "K_ALIGNED": aligned}
                    if not gemv:
                        sig["BLOCK_M"] = "constexpr"
                        cx["BLOCK_M"] = cfg.BLOCK_M
                    sig.update({"BLOCK_N": "constexpr", "BLOCK_K": "constexpr"})
                    cx.update({"BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K})
                    bias_name = "nobias" if bias_dtype is None else f"bias{TL_PTR[bias_dtype][1:]}"
                    variants.append(AotVariant(
                        name=f"{cfg.name}-{t[1:]}-{path}-{bias_name}",
                        kernel=_gemv4bit_kernel if gemv else _matmul4bit_nt_kernel, signature=sig, constexprs=cx,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, expect_mma=mma and not gemv,
                        divisible_by_16=("x_ptr", *w_args, "bias_ptr", "y_ptr", *k16),
                        meta={"config": cfg.name, "dtype": t[1:]}))
            for cfg in NN_CONFIGS:
                sig = {"dy_ptr": t, "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "dx_ptr": t,
                       "M": "i32", "N": "i32", "K": "i32", "log2_bs": "i32", "K_ALIGNED": "constexpr",
                       "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
                cx = {"K_ALIGNED": aligned, "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K}
                variants.append(AotVariant(
                    name=f"{cfg.name}-{t[1:]}-{path}",
                    kernel=_matmul4bit_nn_kernel, signature=sig, constexprs=cx, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages, expect_mma=mma, divisible_by_16=("dy_ptr", *w_args, "dx_ptr", *k16),
                    meta={"config": cfg.name, "dtype": t[1:]}))
    return variants


#: Every compiled form the launchers can request: config x dtype x K_ALIGNED (x bias dtype for nt).
AOT_VARIANTS = _aot_variants()
