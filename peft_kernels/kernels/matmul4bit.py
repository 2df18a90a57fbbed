"""Triton matmuls against a blockwise 4-bit (NF4/FP4) weight W [N out, K in].

* ``matmul_4bit_nt(x, ...)``: ``y = x W^T + b``, x [M, K] -> y [M, N]  (forward)
* ``matmul_4bit_nn(dy, ...)``: ``dx = dy W``,    dy [M, N] -> dx [M, K] (grad of the input)

Two execution paths, chosen by M (``FUSED_MAX_M``):

* small M (decode, short prompts): a fused kernel dequantizes W tile by tile in
  registers and feeds ``tl.dot``; W is read from HBM once, as 4-bit bytes. This
  regime is memory-bound, so reading 0.5 byte per weight instead of 2 is the win.
* large M (training, prefill): compute-bound. W is dequantized into a reused
  workspace by the Triton dequant kernel and multiplied by cuBLAS; the dequant
  costs ~2.5 bytes per weight of traffic, amortised over M rows of GEMM work.

Inside the fused kernels, element (n, k) of W has flat index ``n*K + k``: its code
is in byte ``(n*K + k) >> 1`` (high nibble when the index is even) and its scale is
``absmax[(n*K + k) >> log2(blocksize)]``, so blocks may cross rows. When K is even
every row starts on a byte boundary and the kernel loads whole bytes (two weights
each, ``EVEN_K``); odd K takes a per-element path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPES, TL_PTR, AotVariant, check_arg, check_device, log2_blocksize, num_sms
from .dequant4bit import dequantize_4bit

#: Largest M served by the fused kernels; above it: dequant into a workspace + cuBLAS.
#: Estimate, to be tuned on a GPU: the workspace path costs ~2.5 B/weight of extra traffic, which
#: a bf16 GEMM with M rows hides once M is in the hundreds; below ~64 rows it does not.
FUSED_MAX_M = 64


@dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes of one fused-kernel launch.

    nt: programs tile (M, N) and loop over K.  nn: programs tile (M, K) and loop over N.
    Every dot dimension is >= 16 (tensor-core minimum).
    """

    name: str
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


# Decode (M <= 16): one row-tile of 16, W split over N, each program reading its rows once over all
# of K. Long K tiles keep many bytes in flight per program (bandwidth, not the 16x-padded MMA, is
# the limit); the N tile narrows to 16 when wider tiles would leave SMs idle. 16 < M <= 64: one
# 64x64 tile. Few configs on purpose: each one is compiled per dtype/arch (tests/test_triton_aot.py),
# and the table is meant to be re-derived from GPU measurements (bench/), not guessed wider.
NT_CONFIGS = (
    MatmulConfig("nt_m16_n16", 16, 16, 256, 4, 3),
    MatmulConfig("nt_m16_n32", 16, 32, 256, 4, 3),
    MatmulConfig("nt_m64", 64, 64, 64, 4, 3),
)
# nn: programs own a K stripe of dx (64 wide = 32 bytes of each W row: one DRAM sector) and walk
# down N. Small-M backward is rare (decode has none), so one config per M class.
NN_CONFIGS = (
    MatmulConfig("nn_m16", 16, 128, 64, 4, 3),
    MatmulConfig("nn_m64", 64, 64, 64, 4, 3),
)
_NT = {c.name: c for c in NT_CONFIGS}
_NN = {c.name: c for c in NN_CONFIGS}


def pick_nt_config(m: int, n: int, device: torch.device) -> MatmulConfig:
    """Config for y[M, N] = x W^T: by M, then (decode) the widest N tile that still fills the GPU."""
    if m > 16:
        return _NT["nt_m64"]
    if triton.cdiv(n, 32) >= 2 * num_sms(device):
        return _NT["nt_m16_n32"]
    return _NT["nt_m16_n16"]


def pick_nn_config(m: int, k: int, device: torch.device) -> MatmulConfig:
    """Config for dx[M, K] = dy W, by M."""
    return _NN["nn_m64"] if m > 16 else _NN["nn_m16"]


@triton.jit
def _w_tile(packed_ptr, absmax_ptr, code_ptr, rn, k0, N, K, log2_bs,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_K] tile of W: rows ``rn``, columns ``k0 + arange(BLOCK_K)``; 0 out of bounds."""
    if EVEN_K:
        # Row n starts at byte n*K/2: load BLOCK_K/2 whole bytes per row, decode both nibbles
        # with one shared absmax (blocksizes are even), interleave them back into k order.
        kb = K // 2
        jb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = rn.to(tl.int64)[:, None] * kb + jb[None, :]
        mask = (rn[:, None] < N) & (jb[None, :] < kb)
        b = tl.load(packed_ptr + byte, mask=mask, other=0).to(tl.int32)
        s = tl.load(absmax_ptr + (byte >> (log2_bs - 1)), mask=mask, other=0.0)
        hi = tl.load(code_ptr + (b >> 4)) * s
        lo = tl.load(code_ptr + (b & 15)) * s
        w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))
    else:
        # Odd K: rows alternate between starting on a high and a low nibble; decode per element.
        kk = k0 + tl.arange(0, BLOCK_K)
        idx = rn.to(tl.int64)[:, None] * K + kk[None, :]
        mask = (rn[:, None] < N) & (kk[None, :] < K)
        b = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
        shift = ((1 - (idx & 1)) * 4).to(tl.int32)  # even flat index -> high nibble
        s = tl.load(absmax_ptr + (idx >> log2_bs), mask=mask, other=0.0)
        w = tl.load(code_ptr + ((b >> shift) & 15)) * s
    # Masked entries: absmax 0 times a finite code -> 0, so padding never pollutes the dot.
    return w


@triton.jit
def _matmul4bit_nt_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, y_ptr, M, N, K, log2_bs,
                          HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # N on grid axis 0 (up to 2**31 programs); M tiles are few on this path.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
    m_ok = rm[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        xt = tl.load(x_rows + kk[None, :], mask=m_ok & (kk[None, :] < K), other=0.0)
        w = _w_tile(packed_ptr, absmax_ptr, code_ptr, rn, k0, N, K, log2_bs, BLOCK_N, BLOCK_K, EVEN_K)
        # W rounded to x's dtype first, as the reference does; fp32 stays IEEE (no tf32).
        acc = tl.dot(xt, tl.trans(w.to(x_ptr.dtype.element_ty)), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok & (rn[None, :] < N))


@triton.jit
def _matmul4bit_nn_kernel(dy_ptr, packed_ptr, absmax_ptr, code_ptr, dx_ptr, M, N, K, log2_bs,
                          EVEN_K: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    k0 = pid_k * BLOCK_K
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = k0 + tl.arange(0, BLOCK_K)
    dy_rows = dy_ptr + rm.to(tl.int64)[:, None] * N
    m_ok = rm[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        dyt = tl.load(dy_rows + rn[None, :], mask=m_ok & (rn[None, :] < N), other=0.0)
        w = _w_tile(packed_ptr, absmax_ptr, code_ptr, rn, k0, N, K, log2_bs, BLOCK_N, BLOCK_K, EVEN_K)
        acc = tl.dot(dyt, w.to(dy_ptr.dtype.element_ty), acc, input_precision="ieee")
    dx = dx_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=m_ok & (rk[None, :] < K))


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
    in fp32 on the fused path). Returns y [M, N] in x.dtype, fp32 accumulation.
    out: optional preallocated [M, N] result. config: force a fused config by name (tests/benchmarks;
    it also forces the fused path).
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
    device = check_device(_matmul4bit_nt_kernel, x=x, packed=packed, absmax=absmax, code=code, bias=bias, out=out)
    if config is None and m > FUSED_MAX_M:
        w = _dequant_to_workspace(packed, absmax, code, blocksize, n, k, x.dtype)
        if bias is None:
            return torch.matmul(x, w.t(), out=out)
        # addmm fuses the bias into the GEMM epilogue (added to the fp32 accumulator on cuBLAS).
        return torch.addmm(bias.to(x.dtype).view(-1), x, w.t(), out=out)
    y = _check_out(out, (m, n), x)
    if m == 0 or n == 0:
        return y
    if bias is not None and bias.dtype not in (x.dtype, torch.float32):
        bias = bias.float()  # keep the compiled variants to bias in {x.dtype, fp32} (see AOT_VARIANTS)
    cfg = _NT[config] if config is not None else pick_nt_config(m, n, device)
    grid = (triton.cdiv(n, cfg.BLOCK_N), triton.cdiv(m, cfg.BLOCK_M))
    _matmul4bit_nt_kernel[grid](x, packed, absmax, code, bias if bias is not None else x, y, m, n, k, log2_bs,
                                HAS_BIAS=bias is not None, EVEN_K=k % 2 == 0,
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
    device = check_device(_matmul4bit_nn_kernel, dy=dy, packed=packed, absmax=absmax, code=code, out=out)
    if config is None and m > FUSED_MAX_M:
        w = _dequant_to_workspace(packed, absmax, code, blocksize, n, k, dy.dtype)
        return torch.matmul(dy, w, out=out)
    dx = _check_out(out, (m, k), dy)
    if m == 0 or k == 0:
        return dx
    if n == 0:
        return dx.zero_()
    cfg = _NN[config] if config is not None else pick_nn_config(m, k, device)
    grid = (triton.cdiv(k, cfg.BLOCK_K), triton.cdiv(m, cfg.BLOCK_M))
    _matmul4bit_nn_kernel[grid](dy, packed, absmax, code, dx, m, n, k, log2_bs, EVEN_K=k % 2 == 0,
                                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dx


# ----------------------------------------------------------------------------- AOT variants
def _aot_variants() -> list[AotVariant]:
    variants = []
    for dtype in FLOAT_DTYPES:
        t = TL_PTR[dtype]
        mma = dtype != torch.float32  # fp32 dots are IEEE (FMA), not tensor-core
        for even_k in (True, False):
            for cfg in NT_CONFIGS:
                # Without a bias the launcher passes x as a dummy bias pointer.
                for bias_dtype in dict.fromkeys((None, dtype, torch.float32)):
                    sig = {"x_ptr": t, "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
                           "bias_ptr": TL_PTR[bias_dtype or dtype], "y_ptr": t, "M": "i32", "N": "i32",
                           "K": "i32", "log2_bs": "i32", "HAS_BIAS": "constexpr", "EVEN_K": "constexpr",
                           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
                    cx = {"HAS_BIAS": bias_dtype is not None, "EVEN_K": even_k, "BLOCK_M": cfg.BLOCK_M,
                          "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K}
                    bias_name = "nobias" if bias_dtype is None else f"bias{TL_PTR[bias_dtype][1:]}"
                    variants.append(AotVariant(
                        name=f"{cfg.name}-{t[1:]}-{'even' if even_k else 'odd'}K-{bias_name}",
                        kernel=_matmul4bit_nt_kernel, signature=sig, constexprs=cx, num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages, expect_mma=mma, meta={"config": cfg.name, "dtype": t[1:]}))
            for cfg in NN_CONFIGS:
                sig = {"dy_ptr": t, "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "dx_ptr": t,
                       "M": "i32", "N": "i32", "K": "i32", "log2_bs": "i32", "EVEN_K": "constexpr",
                       "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
                cx = {"EVEN_K": even_k, "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K}
                variants.append(AotVariant(
                    name=f"{cfg.name}-{t[1:]}-{'even' if even_k else 'odd'}K",
                    kernel=_matmul4bit_nn_kernel, signature=sig, constexprs=cx, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages, expect_mma=mma, meta={"config": cfg.name, "dtype": t[1:]}))
    return variants


#: Every compiled form the launchers can request: config x dtype x EVEN_K (x bias dtype for nt).
AOT_VARIANTS = _aot_variants()
