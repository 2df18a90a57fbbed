"""Triton kernels for a sparse delta Δ [N, K] (sparse fine-tuning): the three products of its layer.

* ``delta_matmul_nt(x, ...)``:  ``y (+)= x Δᵀ``   x [M, K] -> [M, N]   (forward)
* ``delta_matmul_nn(dy, ...)``: ``dx (+)= dY Δ``  dy [M, N] -> [M, K]  (input gradient)
* ``sampled_grad(dy, x, ...)``: ``(dYᵀ x)`` at the selected entries only (SDDMM, the values' gradient),
  fp32 [nnz] or [nb, b, b]; never a dense [N, K] product.

Layouts (``.notes/SPARSE_API.md``): ``block_size`` 0 = unstructured (flat positions ``n*K + k``), 16/32 =
b x b tiles (flat tile positions ``bn*ceil(K/b) + bk``, values [nb, b, b]). Indices arrive sorted, so the
entries (tiles) of a row (block row) are contiguous: ``row_ptr`` (a CSR pointer, by ``searchsorted``) gives
each program its range. The nn product needs the entries grouped by column: a stable ``argsort`` by
column (a permutation, ``perm``; CSC order) built per call — no atomics, every program owns its output.

Block kernels (tensor cores for fp16/bf16):
* nt: one program per (block row bn, BLOCK_M rows of x): ``acc[BM, b] += x[:, bk tile] @ V[t]ᵀ`` over the
  row's tiles (``tl.dot``), then the [BM, b] tile of y is written once.
* nn: one program per (block column bk, BLOCK_M rows): the same over the column's tiles (via ``perm``).
* SDDMM: one program per tile (and per M split): ``acc[b, b] += dy[m, tile rows]ᵀ @ x[m, tile cols]``
  over M. When there are too few tiles to fill the GPU, M is split over ``split_m`` programs that
  ``atomic_add`` their fp32 partial tiles (summation order then varies run to run in the last bits).

Unstructured kernels read x and dy TRANSPOSED ([K, Mc] / [N, Mc], made per chunk of Mc rows by the
launcher): a gathered entry then loads BLOCK_M contiguous elements (one coalesced row) instead of
BLOCK_M scattered ones. The chunk is bounded (``TRANSPOSE_CHUNK_BYTES``) so the transposed copy never
costs more than a few tens of MB, whatever M is.
* nt: one program per (BLOCK_N rows of Δ, BLOCK_M rows of x). The group's entries are gathered
  BLOCK_E at a time, ``xg [BE, BM] = xᵀ[cols, m]``, and routed to their output rows by a one-hot
  matrix holding the values, ``S [BN, BE] = v_e·[row_e == n]``: ``acc[BN, BM] += S @ xg`` is a
  ``tl.dot`` (tensor cores for 16-bit inputs: the values are rounded to x's dtype there, like a dense
  W would be), and the [BM, BN] tile of y is written once (BN contiguous elements per row).
* nn: the same over column groups (entries in ``perm`` order), gathering rows of dyᵀ.
* SDDMM: one program per BLOCK_E consecutive entries (sorted by row: neighbouring entries share dyᵀ
  rows in cache): ``acc[e] += Σ_m dyᵀ[row_e, m] xᵀ[col_e, m]`` in fp32 registers, M in BLOCK_M steps.

All accumulation is fp32; inputs fp16/bf16/fp32 (values are passed as fp32). fp32 dots are IEEE (no tf32).
``accumulate`` (runtime flag): add into ``out`` instead of overwriting it (the layer adds the delta's
term to the base output in place).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPES, TL_PTR, AotVariant, check_arg, check_device

BLOCK_SIZES = (16, 32)
#: Rows of x / dy per program (nt / nn: the dot's M, 64 = one Hopper warpgroup's wgmma tile).
BLOCK_M = 64
#: SDDMM: rows of dy / x reduced per loop step (the dot's reduction dimension, not its M).
BLOCK_R = 64
#: Unstructured: rows (nt) / columns (nn) of Δ per program, entries per gather step.
BLOCK_G, BLOCK_E = 32, 32
#: Unstructured SDDMM: entries per program.
SDDMM_BLOCK_E = 64
#: Largest transposed chunk of x or dy the unstructured launchers materialise at once.
TRANSPOSE_CHUNK_BYTES = 64 << 20
NUM_WARPS, NUM_STAGES = 4, 2


# ----------------------------------------------------------------------------- block kernels
@triton.jit
def _tile_vals(vals_ptr, t, ri, row_ok, col_ok, B: tl.constexpr):
    """V[t] as an fp32 [B, B] tile (rows i = Δ rows, columns j = Δ columns); 0 outside [N, K]."""
    base = vals_ptr + tl.cast(t, tl.int64) * (B * B)
    return tl.load(base + ri[:, None] * B + ri[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _nt_block_kernel(x_ptr, tile_col_ptr, vals_ptr, row_ptr_ptr, y_ptr, M, N, K, accumulate,
                     B: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_m = tl.program_id(1)
    start = tl.load(row_ptr_ptr + pid_b)
    end = tl.load(row_ptr_ptr + pid_b + 1)
    ri = tl.arange(0, B)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    n = pid_b * B + ri
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    for t in range(start, end):
        kk = tl.load(tile_col_ptr + t) * B + ri
        xt = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
        v = _tile_vals(vals_ptr, t, ri, n < N, kk < K, B)
        acc = tl.dot(xt, tl.trans(v.to(x_ptr.dtype.element_ty)), acc, input_precision="ieee")
    ptrs = y_ptr + rm.to(tl.int64)[:, None] * N + n[None, :]
    mask = m_ok[:, None] & (n[None, :] < N)
    if accumulate != 0:
        # A block row without tiles adds nothing: leave its part of y untouched (no read-modify-write).
        mask = mask & ((rm < tl.where(end > start, M, 0))[:, None])
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nn_block_kernel(dy_ptr, perm_ptr, tile_row_ptr, vals_ptr, col_ptr_ptr, dx_ptr, M, N, K, accumulate,
                     B: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_m = tl.program_id(1)
    start = tl.load(col_ptr_ptr + pid_b)
    end = tl.load(col_ptr_ptr + pid_b + 1)
    ri = tl.arange(0, B)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    kk = pid_b * B + ri
    dy_rows = dy_ptr + rm.to(tl.int64)[:, None] * N
    acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    for q in range(start, end):
        t = tl.load(perm_ptr + q)
        n = tl.load(tile_row_ptr + t) * B + ri
        dyt = tl.load(dy_rows + n[None, :], mask=m_ok[:, None] & (n[None, :] < N), other=0.0)
        v = _tile_vals(vals_ptr, t, ri, n < N, kk < K, B)
        acc = tl.dot(dyt, v.to(dy_ptr.dtype.element_ty), acc, input_precision="ieee")
    ptrs = dx_ptr + rm.to(tl.int64)[:, None] * K + kk[None, :]
    mask = m_ok[:, None] & (kk[None, :] < K)
    if accumulate != 0:
        mask = mask & ((rm < tl.where(end > start, M, 0))[:, None])  # nothing to add: no read-modify-write
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sddmm_block_kernel(dy_ptr, x_ptr, tile_row_ptr, tile_col_ptr, g_ptr, M, N, K, m_per_split, accumulate,
                        use_atomic, B: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    m_lo = tl.program_id(1) * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    ri = tl.arange(0, B)
    n = tl.load(tile_row_ptr + t) * B + ri
    kk = tl.load(tile_col_ptr + t) * B + ri
    acc = tl.zeros((B, B), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_R):
        rm = m0 + tl.arange(0, BLOCK_R)
        m_ok = rm < m_hi
        rows = rm.to(tl.int64)[:, None]
        a = tl.load(dy_ptr + rows * N + n[None, :], mask=m_ok[:, None] & (n[None, :] < N), other=0.0)
        b = tl.load(x_ptr + rows * K + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
    ptrs = g_ptr + tl.cast(t, tl.int64) * (B * B) + ri[:, None] * B + ri[None, :]
    if use_atomic != 0:
        tl.atomic_add(ptrs, acc)  # the launcher zeroed g unless accumulating
    else:
        if accumulate != 0:
            acc += tl.load(ptrs)
        tl.store(ptrs, acc)


# ----------------------------------------------------------------------------- unstructured kernels
@triton.jit
def _nt_unstructured_kernel(xt_ptr, rows_ptr, cols_ptr, vals_ptr, row_ptr_ptr, y_ptr, MC, N, accumulate,
                            BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    # xt: [K, MC] (x transposed); y: rows m of a [*, N] row-major output.
    pid_g = tl.program_id(0)
    pid_m = tl.program_id(1)
    n0 = pid_g * BLOCK_G
    start = tl.load(row_ptr_ptr + n0)
    end = tl.load(row_ptr_ptr + tl.minimum(n0 + BLOCK_G, N))
    rg = tl.arange(0, BLOCK_G)
    re = tl.arange(0, BLOCK_E)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < MC
    acc = tl.zeros((BLOCK_M, BLOCK_G), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + re
        ok = e < end
        c = tl.load(cols_ptr + e, mask=ok, other=0)
        r = tl.load(rows_ptr + e, mask=ok, other=-1)
        v = tl.load(vals_ptr + e, mask=ok, other=0.0)
        xg = tl.load(xt_ptr + c.to(tl.int64)[:, None] * MC + rm[None, :], mask=ok[:, None] & m_ok[None, :],
                     other=0.0)  # [BE, BM]: one contiguous run of x's column per entry
        s = tl.where((r - n0)[:, None] == rg[None, :], v[:, None], 0.0)  # [BE, BG] one-hot x values
        acc = tl.dot(tl.trans(xg), s.to(xt_ptr.dtype.element_ty), acc, input_precision="ieee")
    n = n0 + rg
    ptrs = y_ptr + rm.to(tl.int64)[:, None] * N + n[None, :]
    mask = m_ok[:, None] & (n[None, :] < N)
    if accumulate != 0:
        # A row group without entries adds nothing: leave its part of y untouched (no read-modify-write).
        mask = mask & ((rm < tl.where(end > start, MC, 0))[:, None])
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nn_unstructured_kernel(dyt_ptr, perm_ptr, rows_ptr, cols_ptr, vals_ptr, col_ptr_ptr, dx_ptr, MC, K, accumulate,
                            BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    # dyt: [N, MC] (dy transposed); dx: rows m of a [*, K] row-major output; entries visited in perm order.
    pid_g = tl.program_id(0)
    pid_m = tl.program_id(1)
    k0 = pid_g * BLOCK_G
    start = tl.load(col_ptr_ptr + k0)
    end = tl.load(col_ptr_ptr + tl.minimum(k0 + BLOCK_G, K))
    rg = tl.arange(0, BLOCK_G)
    re = tl.arange(0, BLOCK_E)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < MC
    acc = tl.zeros((BLOCK_M, BLOCK_G), dtype=tl.float32)
    for q0 in range(start, end, BLOCK_E):
        q = q0 + re
        ok = q < end
        p = tl.load(perm_ptr + q, mask=ok, other=0)
        r = tl.load(rows_ptr + p, mask=ok, other=0)
        c = tl.load(cols_ptr + p, mask=ok, other=-1)
        v = tl.load(vals_ptr + p, mask=ok, other=0.0)
        dyg = tl.load(dyt_ptr + r.to(tl.int64)[:, None] * MC + rm[None, :], mask=ok[:, None] & m_ok[None, :],
                      other=0.0)
        s = tl.where((c - k0)[:, None] == rg[None, :], v[:, None], 0.0)
        acc = tl.dot(tl.trans(dyg), s.to(dyt_ptr.dtype.element_ty), acc, input_precision="ieee")
    kk = k0 + rg
    ptrs = dx_ptr + rm.to(tl.int64)[:, None] * K + kk[None, :]
    mask = m_ok[:, None] & (kk[None, :] < K)
    if accumulate != 0:
        mask = mask & ((rm < tl.where(end > start, MC, 0))[:, None])  # nothing to add: no read-modify-write
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sddmm_unstructured_kernel(dyt_ptr, xt_ptr, rows_ptr, cols_ptr, g_ptr, NNZ, MC, accumulate,
                               BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    ok = e < NNZ
    a_rows = dyt_ptr + tl.load(rows_ptr + e, mask=ok, other=0).to(tl.int64)[:, None] * MC
    b_rows = xt_ptr + tl.load(cols_ptr + e, mask=ok, other=0).to(tl.int64)[:, None] * MC
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for m0 in range(0, MC, BLOCK_R):
        rm = m0 + tl.arange(0, BLOCK_R)
        mask = ok[:, None] & (rm[None, :] < MC)
        a = tl.load(a_rows + rm[None, :], mask=mask, other=0.0)
        b = tl.load(b_rows + rm[None, :], mask=mask, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    if accumulate != 0:
        acc += tl.load(g_ptr + e, mask=ok, other=0.0)
    tl.store(g_ptr + e, acc, mask=ok)


# ----------------------------------------------------------------------------- index preparation
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _grid_cols(block_size: int, k: int) -> int:
    return k if block_size == 0 else _cdiv(k, block_size)


def _coords(indices: torch.Tensor, block_size: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 (rows, cols) of each entry / (bn, bk) of each tile."""
    cols = _grid_cols(block_size, k)
    return (torch.div(indices, cols, rounding_mode="floor").to(torch.int32), (indices % cols).to(torch.int32))


def _row_ptr(indices: torch.Tensor, block_size: int, n: int, k: int) -> torch.Tensor:
    """int32 [rows + 1]: entries of (block) row r are indices[row_ptr[r]:row_ptr[r + 1]] (indices sorted)."""
    rows = n if block_size == 0 else _cdiv(n, block_size)
    cols = _grid_cols(block_size, k)
    starts = torch.arange(rows + 1, device=indices.device, dtype=torch.int64) * cols
    return torch.searchsorted(indices, starts).to(torch.int32)


def _col_order(cols: torch.Tensor, ncols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm int32: entries in column order, col_ptr int32 [ncols + 1] into perm)."""
    perm = torch.argsort(cols, stable=True)
    sorted_cols = cols[perm].to(torch.int64)
    ptr = torch.searchsorted(sorted_cols, torch.arange(ncols + 1, device=cols.device, dtype=torch.int64))
    return perm.to(torch.int32), ptr.to(torch.int32)


def _check_common(name: str, a: torch.Tensor, values: torch.Tensor | None, indices: torch.Tensor,
                  block_size: int) -> None:
    check_arg(name, a, FLOAT_DTYPES)
    if a.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(a.shape)}")
    if block_size not in (0, *BLOCK_SIZES):
        raise ValueError(f"block_size must be 0, 16 or 32, got {block_size!r}")
    if indices.dtype != torch.int64 or indices.dim() != 1:
        raise TypeError(f"indices must be a 1-D int64 tensor, got {indices.dtype} {tuple(indices.shape)}")
    if indices.numel() >= 2 ** 31:
        raise ValueError(f"at most 2**31 - 1 entries, got {indices.numel()}")
    if values is not None:
        want = (indices.numel(),) if block_size == 0 else (indices.numel(), block_size, block_size)
        if tuple(values.shape) != want:
            raise ValueError(f"values must have shape {want}, got {tuple(values.shape)}")
        check_arg("values", values, FLOAT_DTYPES)


def _out(out: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_arg("out", out, (dtype,))
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    return out


def _m_chunk(m: int, width: int, elem: int) -> int:
    """Rows per transposed chunk: a multiple of BLOCK_M with chunk bytes <= TRANSPOSE_CHUNK_BYTES."""
    rows = max(BLOCK_M, (TRANSPOSE_CHUNK_BYTES // max(1, width * elem)) // BLOCK_M * BLOCK_M)
    return min(m, rows)


# ----------------------------------------------------------------------------- launchers
def delta_matmul_nt(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, block_size: int, n: int, k: int,
                    *, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """``x Δᵀ`` -> [M, N] in x.dtype (``out += x Δᵀ`` with accumulate=True).

    x: [M, K] fp16/bf16/fp32, contiguous. values: [nnz] or [nb, b, b] (any float dtype; used as fp32).
    indices: int64, sorted and unique (validated by ops/sparse.py). out: contiguous [M, N] of x.dtype.
    """
    _check_common("x", x, values, indices, block_size)
    m = x.shape[0]
    if x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    check_device(_nt_block_kernel, x=x, values=values, indices=indices, out=out)
    y = _out(out, (m, n), x.dtype, x.device)
    if m == 0:
        return y
    if indices.numel() == 0:
        return y if accumulate else y.zero_()
    vals = values.float().contiguous()
    acc_flag = int(bool(accumulate))
    if block_size:
        _, bk = _coords(indices, block_size, k)
        row_ptr = _row_ptr(indices, block_size, n, k)
        grid = (_cdiv(n, block_size), _cdiv(m, BLOCK_M))
        _nt_block_kernel[grid](x, bk, vals, row_ptr, y, m, n, k, acc_flag, B=block_size, BLOCK_M=BLOCK_M,
                               num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        return y
    rows, cols = _coords(indices, 0, k)
    row_ptr = _row_ptr(indices, 0, n, k)
    step = _m_chunk(m, k, x.element_size())
    for m0 in range(0, m, step):
        xt = x[m0:m0 + step].t().contiguous()
        mc = xt.shape[1]
        grid = (_cdiv(n, BLOCK_G), _cdiv(mc, BLOCK_M))
        _nt_unstructured_kernel[grid](xt, rows, cols, vals, row_ptr, y[m0:], mc, n, acc_flag, BLOCK_G=BLOCK_G,
                                      BLOCK_E=BLOCK_E, BLOCK_M=BLOCK_M, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return y


def delta_matmul_nn(dy: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, block_size: int, n: int, k: int,
                    *, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """``dY Δ`` -> [M, K] in dy.dtype (``out += dY Δ`` with accumulate=True). dy: [M, N]; rest as delta_matmul_nt."""
    _check_common("dy", dy, values, indices, block_size)
    m = dy.shape[0]
    if dy.shape[1] != n:
        raise ValueError(f"dy must be [M, {n}], got {tuple(dy.shape)}")
    check_device(_nn_block_kernel, dy=dy, values=values, indices=indices, out=out)
    dx = _out(out, (m, k), dy.dtype, dy.device)
    if m == 0:
        return dx
    if indices.numel() == 0:
        return dx if accumulate else dx.zero_()
    vals = values.float().contiguous()
    acc_flag = int(bool(accumulate))
    if block_size:
        bn, bk = _coords(indices, block_size, k)
        perm, col_ptr = _col_order(bk, _cdiv(k, block_size))
        grid = (_cdiv(k, block_size), _cdiv(m, BLOCK_M))
        _nn_block_kernel[grid](dy, perm, bn, vals, col_ptr, dx, m, n, k, acc_flag, B=block_size, BLOCK_M=BLOCK_M,
                               num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        return dx
    rows, cols = _coords(indices, 0, k)
    perm, col_ptr = _col_order(cols, k)
    step = _m_chunk(m, n, dy.element_size())
    for m0 in range(0, m, step):
        dyt = dy[m0:m0 + step].t().contiguous()
        mc = dyt.shape[1]
        grid = (_cdiv(k, BLOCK_G), _cdiv(mc, BLOCK_M))
        _nn_unstructured_kernel[grid](dyt, perm, rows, cols, vals, col_ptr, dx[m0:], mc, k, acc_flag,
                                      BLOCK_G=BLOCK_G, BLOCK_E=BLOCK_E, BLOCK_M=BLOCK_M, num_warps=NUM_WARPS,
                                      num_stages=NUM_STAGES)
    return dx


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: any small number


def sampled_grad(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, block_size: int, n: int, k: int, *,
                 out: torch.Tensor | None = None, accumulate: bool = False,
                 split_m: int | None = None) -> torch.Tensor:
    """``(dYᵀ x)`` at ``indices``: fp32 [nnz] or [nb, b, b] (``out +=`` with accumulate=True).

    dy [M, N] and x [M, K]: fp16/bf16/fp32, same dtype, contiguous. Tile elements outside [N, K] are 0.
    split_m (block layout): programs per tile along M (default: enough to give every SM a few
    programs); > 1 accumulates with fp32 atomics.
    """
    _check_common("dy", dy, None, indices, block_size)
    check_arg("x", x, (dy.dtype,))
    m = dy.shape[0]
    if dy.shape[1] != n or tuple(x.shape) != (m, k):
        raise ValueError(f"dy must be [M, {n}] and x [M, {k}] with the same M, got {tuple(dy.shape)} and "
                         f"{tuple(x.shape)}")
    check_device(_sddmm_block_kernel, dy=dy, x=x, indices=indices, out=out)
    shape = (indices.numel(),) if block_size == 0 else (indices.numel(), block_size, block_size)
    g = _out(out, shape, torch.float32, dy.device)
    if not g.is_contiguous():
        raise ValueError("out must be contiguous")
    nnz = indices.numel()
    if nnz == 0:
        return g
    if m == 0:
        return g if accumulate else g.zero_()
    if block_size:
        bn, bk = _coords(indices, block_size, k)
        if split_m is None:
            want = 4 * _sm_count(dy.device)
            split_m = max(1, min(_cdiv(want, nnz), _cdiv(m, 4 * BLOCK_R)))
        m_per = _cdiv(_cdiv(m, split_m), BLOCK_R) * BLOCK_R
        splits = _cdiv(m, m_per)
        atomic = splits > 1
        if atomic and not accumulate:
            g.zero_()
        _sddmm_block_kernel[(nnz, splits)](dy, x, bn, bk, g, m, n, k, m_per, int(bool(accumulate)), int(atomic),
                                           B=block_size, BLOCK_R=BLOCK_R, num_warps=NUM_WARPS,
                                           num_stages=NUM_STAGES)
        return g
    rows, cols = _coords(indices, 0, k)
    step = _m_chunk(m, max(n, k), dy.element_size())
    for i, m0 in enumerate(range(0, m, step)):
        dyt = dy[m0:m0 + step].t().contiguous()
        xt = x[m0:m0 + step].t().contiguous()
        mc = dyt.shape[1]
        _sddmm_unstructured_kernel[(_cdiv(nnz, SDDMM_BLOCK_E),)](
            dyt, xt, rows, cols, g, nnz, mc, int(bool(accumulate) or i > 0), BLOCK_E=SDDMM_BLOCK_E, BLOCK_R=BLOCK_R,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return g


# ----------------------------------------------------------------------------- AOT variants
def _aot_variants() -> list[AotVariant]:
    out = []
    i32, f32 = "i32", "*fp32"
    for dtype in FLOAT_DTYPES:
        t = TL_PTR[dtype]
        name = t[1:]
        mma = dtype != torch.float32  # fp32 dots are IEEE FMA, not tensor cores
        for b in BLOCK_SIZES:
            cx = {"B": b, "BLOCK_M": BLOCK_M}
            sig = {"x_ptr": t, "tile_col_ptr": "*i32", "vals_ptr": f32, "row_ptr_ptr": "*i32", "y_ptr": t,
                   "M": i32, "N": i32, "K": i32, "accumulate": i32, "B": "constexpr", "BLOCK_M": "constexpr"}
            out.append(AotVariant(f"sparse_nt_b{b}-{name}", _nt_block_kernel, sig, cx, NUM_WARPS, NUM_STAGES,
                                  expect_mma=mma, divisible_by_16=("x_ptr", "vals_ptr", "y_ptr"),
                                  meta={"dtype": name}))
            sig = {"dy_ptr": t, "perm_ptr": "*i32", "tile_row_ptr": "*i32", "vals_ptr": f32, "col_ptr_ptr": "*i32",
                   "dx_ptr": t, "M": i32, "N": i32, "K": i32, "accumulate": i32, "B": "constexpr",
                   "BLOCK_M": "constexpr"}
            out.append(AotVariant(f"sparse_nn_b{b}-{name}", _nn_block_kernel, sig, cx, NUM_WARPS, NUM_STAGES,
                                  expect_mma=mma, divisible_by_16=("dy_ptr", "vals_ptr", "dx_ptr"),
                                  meta={"dtype": name}))
            sig = {"dy_ptr": t, "x_ptr": t, "tile_row_ptr": "*i32", "tile_col_ptr": "*i32", "g_ptr": f32,
                   "M": i32, "N": i32, "K": i32, "m_per_split": i32, "accumulate": i32, "use_atomic": i32,
                   "B": "constexpr", "BLOCK_R": "constexpr"}
            out.append(AotVariant(f"sparse_sddmm_b{b}-{name}", _sddmm_block_kernel, sig, {"B": b, "BLOCK_R": BLOCK_R},
                                  NUM_WARPS, NUM_STAGES,
                                  expect_mma=mma, divisible_by_16=("dy_ptr", "x_ptr", "g_ptr"),
                                  meta={"dtype": name}))
        cx = {"BLOCK_G": BLOCK_G, "BLOCK_E": BLOCK_E, "BLOCK_M": BLOCK_M}
        sig = {"xt_ptr": t, "rows_ptr": "*i32", "cols_ptr": "*i32", "vals_ptr": f32, "row_ptr_ptr": "*i32",
               "y_ptr": t, "MC": i32, "N": i32, "accumulate": i32, "BLOCK_G": "constexpr", "BLOCK_E": "constexpr",
               "BLOCK_M": "constexpr"}
        out.append(AotVariant(f"sparse_nt_unstructured-{name}", _nt_unstructured_kernel, sig, cx, NUM_WARPS,
                              NUM_STAGES, expect_mma=mma, divisible_by_16=("xt_ptr", "vals_ptr", "y_ptr"),
                              meta={"dtype": name}))
        sig = {"dyt_ptr": t, "perm_ptr": "*i32", "rows_ptr": "*i32", "cols_ptr": "*i32", "vals_ptr": f32,
               "col_ptr_ptr": "*i32", "dx_ptr": t, "MC": i32, "K": i32, "accumulate": i32, "BLOCK_G": "constexpr",
               "BLOCK_E": "constexpr", "BLOCK_M": "constexpr"}
        out.append(AotVariant(f"sparse_nn_unstructured-{name}", _nn_unstructured_kernel, sig, cx, NUM_WARPS,
                              NUM_STAGES, expect_mma=mma, divisible_by_16=("dyt_ptr", "vals_ptr", "dx_ptr"),
                              meta={"dtype": name}))
        sig = {"dyt_ptr": t, "xt_ptr": t, "rows_ptr": "*i32", "cols_ptr": "*i32", "g_ptr": f32, "NNZ": i32,
               "MC": i32, "accumulate": i32, "BLOCK_E": "constexpr", "BLOCK_R": "constexpr"}
        out.append(AotVariant(f"sparse_sddmm_unstructured-{name}", _sddmm_unstructured_kernel, sig,
                              {"BLOCK_E": SDDMM_BLOCK_E, "BLOCK_R": BLOCK_R}, NUM_WARPS, NUM_STAGES,
                              divisible_by_16=("dyt_ptr", "xt_ptr", "g_ptr"), meta={"dtype": name}))
    return out


#: Every compiled form the launchers request: kernel x dtype (x block size for the block kernels).
AOT_VARIANTS = _aot_variants()
