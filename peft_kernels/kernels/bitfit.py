"""Triton backward of BitFit over a blockwise 4-bit (NF4/FP4) frozen weight W [N out, K in].

* ``bitfit_grad_4bit(dy, ...)``: ``dx = dy W`` and ``db = Σ_m dy`` in one pass over dy, dy [M, N] ->
  (dx [M, K] in dy.dtype, db [N] float32).

(BitFit's forward ``y = x Wᵀ + b`` is matmul4bit's ``matmul_4bit_nt`` with the bias in its epilogue.)

Execution paths, chosen by M as in ``matmul4bit``:

* M <= ``matmul4bit.FUSED_MAX_M``: one fused kernel. Programs own a [BLOCK_M, BLOCK_K] tile of dx and
  walk down the N rows of W (matmul4bit's ``_w_load`` / ``_w_decode``, imported, not copied), each
  step a ``tl.dot`` of the dy tile with the decoded W tile. The programs of the first K stripe
  (``pid_k == 0``) also reduce every dy tile they already hold in registers into fp32 column sums:
  db costs no extra read of dy. Each M tile writes its partial sums to its own row of a
  [grid_m, N] float32 buffer with plain stores; the launcher adds the rows (none to add when
  grid_m == 1, which is every automatically chosen config in this range). Against atomic adds
  into a zeroed db this is deterministic (same bits every run), needs no memset launch, and
  lets tests poison the output.
* larger M: matmul4bit's workspace path (W dequantized into the reused buffer, then cuBLAS) for dx,
  and one column reduction of dy for db (``torch.sum`` with an fp32 accumulator). At these M the
  GEMM is compute-bound and cuBLAS is the fastest thing to hand it to; the reduction reads dy once.

Without ``need_dx`` (x does not need a gradient) only the reduction runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import matmul4bit
from ._launch import FLOAT_DTYPES, TL_PTR, AotVariant, check_arg, check_device
from .matmul4bit import NN_CONFIGS, _check_out, _check_weight, _w_decode, _w_load, pick_nn_config

#: Tile tables: matmul4bit's nn configs (the K loop is the same dot; the db reduction adds only
#: BLOCK_M x BLOCK_N adds per N step to the first stripe's programs). Prefixed names for forced configs.
_NN = {"bitfit_" + c.name: c for c in NN_CONFIGS}


def pick_config(m: int) -> str:
    """Name of the fused config for dx[M, K] = dy W at this M (matmul4bit's choice)."""
    return "bitfit_" + pick_nn_config(m).name


@triton.jit
def _bitfit_nn_kernel(dy_ptr, packed_ptr, absmax_ptr, code_ptr, dx_ptr, dbp_ptr, M, N, K, log2_bs,
                      K_ALIGNED: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Programs own a [BLOCK_M, BLOCK_K] tile of dx and walk down the N rows of W (matmul4bit's nn
    # loop, written out here because the db reduction has to sit inside it, on the dy tile in registers).
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    k0 = pid_k * BLOCK_K
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rb = tl.arange(0, BLOCK_N)
    dy_rows = dy_ptr + rm.to(tl.int64)[:, None] * N
    m_ok = rm[:, None] < M
    # Row pid_m of the [grid_m, N] partial-sum buffer.
    dbp_row = dbp_ptr + pid_m.to(tl.int64) * N
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    b, s = _w_load(packed_ptr, absmax_ptr, rb, k0, N, K, log2_bs, BLOCK_N, BLOCK_K, K_ALIGNED)
    dyt = tl.load(dy_rows + rb[None, :], mask=m_ok & (rb[None, :] < N), other=0.0)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + rb
        rn_next = rn + BLOCK_N
        # Next tile first (hand prefetch; see matmul4bit's note on num_stages=1).
        b_next, s_next = _w_load(packed_ptr, absmax_ptr, rn_next, k0, N, K, log2_bs, BLOCK_N, BLOCK_K, K_ALIGNED)
        dy_next = tl.load(dy_rows + rn_next[None, :], mask=m_ok & (rn_next[None, :] < N), other=0.0)
        if pid_k == 0:
            # Masked rows of dy loaded as 0, so they add nothing; fp32 sums whatever dy's dtype.
            tl.store(dbp_row + rn, tl.sum(dyt.to(tl.float32), axis=0), mask=rn < N)
        w = _w_decode(b, s, code_ptr, rn, k0, K, BLOCK_N, BLOCK_K, K_ALIGNED)
        acc = tl.dot(dyt, w.to(dy_ptr.dtype.element_ty), acc, input_precision="ieee")
        b, s, dyt = b_next, s_next, dy_next
    rk = k0 + tl.arange(0, BLOCK_K)
    dx = dx_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rk[None, :] < K))


def _check_db_out(db_out: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if db_out is None:
        return torch.empty(n, dtype=torch.float32, device=device)
    check_arg("db_out", db_out, (torch.float32,))
    if tuple(db_out.shape) != (n,):
        raise ValueError(f"db_out must have shape ({n},), got {tuple(db_out.shape)}")
    return db_out


def bitfit_grad_4bit(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                     blocksize: int, in_features: int, *, need_dx: bool = True, dx_out: torch.Tensor | None = None,
                     db_out: torch.Tensor | None = None, config: str | None = None
                     ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """BitFit's backward over the 4-bit W [N, in_features]: ``(dx = dy W, db = Σ_m dy)``.

    dy: [M, N] fp32/fp16/bf16, contiguous. packed: uint8 (>= ceil(N*K/2) bytes); absmax: float32
    [ceil(N*K/blocksize)] (already decoded); code: float32 [16]. Returns (dx [M, K] in dy.dtype with
    fp32 accumulation, or None when ``need_dx`` is False; db [N] float32).
    dx_out / db_out: optional contiguous result buffers. config: force a fused config by name
    (``bitfit_nn_m16`` / ``bitfit_nn_m64``; tests and benchmarks), which also skips the large-M path.
    """
    check_arg("dy", dy, FLOAT_DTYPES)
    if dy.dim() != 2:
        raise ValueError(f"dy must be 2-D [M, N], got shape {tuple(dy.shape)}")
    if config is not None and config not in _NN:
        raise ValueError(f"unknown config {config!r}; expected one of {sorted(_NN)}")
    m, n = dy.shape
    k = in_features
    log2_bs = _check_weight(packed, absmax, code, n * k, blocksize)
    check_device(_bitfit_nn_kernel, dy=dy, packed=packed, absmax=absmax, code=code, dx_out=dx_out, db_out=db_out)
    db = _check_db_out(db_out, n, dy.device)
    dx = _check_out(dx_out, (m, k), dy) if need_dx else None
    fused = need_dx and m > 0 and n > 0 and k > 0 and (config is not None or m <= matmul4bit.FUSED_MAX_M)
    if not fused:
        # One reduction of dy for db; dx (if wanted) by matmul4bit (workspace + cuBLAS above FUSED_MAX_M).
        torch.sum(dy, 0, dtype=torch.float32, out=db)
        if dx is not None and m > 0 and k > 0:
            if n == 0:
                dx.zero_()
            else:
                matmul4bit.matmul_4bit_nn(dy, packed, absmax, code, blocksize, k, out=dx)
        return dx, db
    cfg = _NN[config] if config is not None else _NN[pick_config(m)]
    grid_m = triton.cdiv(m, cfg.BLOCK_M)
    # One row of partial column sums per M tile; with one M tile it is db itself.
    dbp = db if grid_m == 1 else torch.empty((grid_m, n), dtype=torch.float32, device=dy.device)
    grid = (triton.cdiv(k, cfg.BLOCK_K), grid_m)
    _bitfit_nn_kernel[grid](dy, packed, absmax, code, dx, dbp, m, n, k, log2_bs, K_ALIGNED=k % 32 == 0,
                            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if grid_m > 1:
        torch.sum(dbp, 0, out=db)  # fixed order: deterministic
    return dx, db


# ----------------------------------------------------------------------------- AOT variants
def _aot_variants() -> list[AotVariant]:
    variants = []
    for dtype in FLOAT_DTYPES:
        t = TL_PTR[dtype]
        for aligned in (True, False):
            path = "alignK" if aligned else "anyK"
            k16 = ("K",) if aligned else ()  # what the JIT sees when K % 32 == 0
            for name, cfg in _NN.items():
                sig = {"dy_ptr": t, "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "dx_ptr": t,
                       "dbp_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "log2_bs": "i32",
                       "K_ALIGNED": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                       "BLOCK_K": "constexpr"}
                cx = {"K_ALIGNED": aligned, "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K}
                variants.append(AotVariant(
                    name=f"{name}-{t[1:]}-{path}", kernel=_bitfit_nn_kernel, signature=sig, constexprs=cx,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, expect_mma=dtype != torch.float32,
                    divisible_by_16=("dy_ptr", "packed_ptr", "absmax_ptr", "code_ptr", "dx_ptr", "dbp_ptr", *k16),
                    meta={"config": name, "dtype": t[1:]}))
    return variants


#: Every compiled form the launcher can request: config x dtype x K_ALIGNED.
AOT_VARIANTS = _aot_variants()
