"""Triton BGMV kernels for mixed-adapter batches: every row of x uses its own LoRA adapter (or none).

The adapters live in stacked, rank-padded slot tensors (one set per layer, see ``serving/pool.py``)::

    lora_A   [S, R, K]   slot s holds A_s [r_s, K] in rows [0, r_s); rows >= r_s are ignored
    lora_B   [S, N, R]   slot s holds B_s [N, r_s] in columns [0, r_s)
    scales   float32 [S] s_s = alpha/r (or alpha/sqrt(r))
    ranks    int32 [S]   r_s (0: an empty slot)
    slots    int32 [M]   the slot of each row; -1 = no adapter

* ``bgmv_shrink(x, lora_A, scales, ranks, slots)``: ``xa[m] = s_{slot m} · x[m] A_{slot m}ᵀ`` as float32
  partials [P, M, R] over P slices of K (zero for rows without an adapter and beyond each row's rank).
* ``bgmv_expand_(y, xa, lora_B, ranks, slots)``: ``y[m] += (Σ_p xa[p, m]) B_{slot m}ᵀ`` in place (rows without an
  adapter are not touched): the low-rank term added to a base output ``y`` [M, N] (x W^T + b, already
  computed by matmul4bit's kernels over the NF4 weight, or by cuBLAS over a dense one).

For prefill, where the rows come in segments of ``T`` consecutive rows sharing one adapter (the tokens
of one sequence), the SGMV kernels (segmented gather matmul) take one slot per segment and run
``tl.dot`` tiles over the segment's rows instead (the shrink on tensor cores for 16-bit x):

* ``sgmv_shrink(x, lora_A, scales, ranks, seg_slots, seg_rows)`` / ``sgmv_expand_(y, xa, lora_B, ranks,
  seg_slots, seg_rows)``: as above with ``slots[m] = seg_slots[m // seg_rows]``.

"BGMV" (batched gather matrix-vector, as in Punica / S-LoRA): one program per (row, block of the output
dimension) gathers its row's adapter by the slot index, so a batch of 64 rows over 64 distinct adapters
costs one launch per stage and reads each adapter once. Both stages are memory-bound (r << K, N): the
shrink reads r_s·K elements of A per row, the expand r_s elements of B per output element. The per-slot
rank masks the loads, so an r = 4 adapter in an R = 16 slot reads a quarter of the slot's A.

Why two kernels and not an epilogue of the NF4 GEMM: in a [BLOCK_M, BLOCK_N] tile every row gathers a
different B, so the epilogue is an [BLOCK_M, BLOCK_N, r] gather (no tensor cores), and xa must exist
before any N tile starts (a separate pass anyway). The separate expand costs one more read + write of y
(M·N elements: 3.7 MB at M = 64, N = 14336, bf16) next to the 29 MB NF4 weight and the up to
M·r·(K + N) adapter elements both variants read.

Operands: x and lora_A in one dtype (fp32/fp16/bf16), y and lora_B in one dtype; products accumulate
in float32; xa is float32 (scaled once, rounded never before the expand).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPES, TL_PTR, AotVariant, check_arg, check_device

#: Rank chunk (rows of A / columns of B per step): any R works (masked), R = 16 is one step.
BLOCK_R = 16
#: Shrink: K elements per step (x row chunk and a [BLOCK_R, BLOCK_K] tile of A). 4 warps. K is split into
#: P = cdiv(K, KP) partials, KP >= SHRINK_K_PER_PROGRAM (a multiple of SHRINK_BLOCK_K) and P <= SHRINK_MAX_SPLIT:
#: K = 4096 -> 8 programs per row (512 for a 64-row decode batch).
SHRINK_BLOCK_K = 256
SHRINK_K_PER_PROGRAM = 512
SHRINK_MAX_SPLIT = 32
#: Expand: output columns per program (a [BLOCK_N, BLOCK_R] tile of B: 8 KB bf16 contiguous).
EXPAND_BLOCK_N = 256
NUM_WARPS = 4


@triton.jit
def _slot(slot_ptr, i, rank_ptr):
    """(slot index, clamped int64 slot, its rank) of row / segment i; rank 0 when the slot is -1 (no adapter),
    so every load masked by the rank reads nothing."""
    slot = tl.load(slot_ptr + i)
    s = tl.maximum(slot, 0).to(tl.int64)  # always a real slot: loads through it stay in bounds
    rank = tl.where(slot >= 0, tl.load(rank_ptr + s), 0)
    return slot, s, rank


@triton.jit
def _bgmv_shrink_kernel(x_ptr, a_ptr, scale_ptr, rank_ptr, slot_ptr, xa_ptr, M, K, R, KP,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grid (M, cdiv(R, BLOCK_R), P): split K. Program p sums columns [p*KP, (p+1)*KP) (KP a multiple of
    # BLOCK_K) into partial p of xa [P, M, R]; the expand adds the P partials in a fixed order (deterministic,
    # no atomics). One program per row alone would stream a whole r x K A with one tile in flight: latency-
    # bound; P programs per row keep P tiles in flight. A row without an adapter masks every load: zeros.
    m = tl.program_id(0)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    k_base = tl.program_id(2) * KP
    slot, s, rank = _slot(slot_ptr, m, rank_ptr)
    valid = slot >= 0
    r_ok = rr < rank
    a_rows = a_ptr + s * R * K + rr.to(tl.int64)[:, None] * K
    x_row = x_ptr + m.to(tl.int64) * K
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, KP, BLOCK_K):
        kk = k_base + k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        xv = tl.load(x_row + kk, mask=k_ok, other=0.0).to(tl.float32)
        at = tl.load(a_rows + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += at * xv[None, :]
    scale = tl.where(valid, tl.load(scale_ptr + s), 0.0)
    out = tl.sum(acc, axis=1) * scale
    out = tl.where(r_ok, out, 0.0)
    part = tl.program_id(2).to(tl.int64) * M * R
    tl.store(xa_ptr + part + m.to(tl.int64) * R + rr, out, mask=rr < R)


@triton.jit
def _bgmv_expand_kernel(y_ptr, xa_ptr, b_ptr, rank_ptr, slot_ptr, M, N, R, P,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    # Grid (M, cdiv(N, BLOCK_N)). y[m, rn] += sum_j xa[m, j] B_s[rn, j] for j < rank, xa[m] = the sum of the
    # shrink's P partials (P*r floats per program); B_s is [N, R] row-major, so the tile's rows are contiguous
    # runs of R elements (the whole tile is one run).
    m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot, s, rank = _slot(slot_ptr, m, rank_ptr)
    n_ok = rn < N
    b_rows = b_ptr + s * N * R + rn.to(tl.int64)[:, None] * R
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j0 in range(0, R, BLOCK_R):
        j = j0 + tl.arange(0, BLOCK_R)
        j_ok = j < rank
        xav = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for p in range(0, P):
            xav += tl.load(xa_ptr + (p * M + m).to(tl.int64) * R + j, mask=j_ok, other=0.0)
        bt = tl.load(b_rows + j[None, :], mask=n_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(bt * xav[None, :], axis=1)
    y = y_ptr + m.to(tl.int64) * N + rn
    ok = n_ok & ((rn * 0 + slot) >= 0)  # (a vector mask: scalar & vector masks trip the interpreter)
    yv = tl.load(y, mask=ok, other=0.0).to(tl.float32)
    tl.store(y, (yv + acc).to(y_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers
def _check_slot_meta(lora: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor) -> None:
    check_arg("scales", scales, (torch.float32,))
    check_arg("ranks", ranks, (torch.int32,))
    n_slots = lora.shape[0]
    if scales.shape != (n_slots,) or ranks.shape != (n_slots,):
        raise ValueError(f"scales and ranks must have shape [{n_slots}] (one per slot), got "
                         f"{tuple(scales.shape)} and {tuple(ranks.shape)}")


def _check_slots_args(lora: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor, slots: torch.Tensor,
                      m: int) -> None:
    _check_slot_meta(lora, scales, ranks)
    check_arg("slots", slots, (torch.int32,))
    if slots.shape != (m,):
        raise ValueError(f"slots must have shape [{m}] (one slot index per row), got {tuple(slots.shape)}")


def _check_shrink(x: torch.Tensor, lora_A: torch.Tensor, out: torch.Tensor | None,
                  shape: tuple[int, ...]) -> torch.Tensor:
    """x [M, K] and lora_A [S, R, K] in one dtype; returns the float32 output of ``shape`` (``out`` or new)."""
    check_arg("x", x, FLOAT_DTYPES)
    check_arg("lora_A", lora_A, (x.dtype,))
    if x.dim() != 2 or lora_A.dim() != 3 or lora_A.shape[2] != x.shape[1]:
        raise ValueError(f"x must be [M, K] and lora_A [S, R, K]; got {tuple(x.shape)} and {tuple(lora_A.shape)}")
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=x.device)
    if out.dtype != torch.float32 or tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 {list(shape)} tensor, got {out.dtype} {tuple(out.shape)}")
    return out


def _check_expand(y: torch.Tensor, xa: torch.Tensor, lora_B: torch.Tensor, ranks: torch.Tensor,
                  xa_dims: int) -> None:
    """y [M, N] and lora_B [S, N, R] in one dtype, xa float32 [(P,) M, R], ranks int32 [S]."""
    check_arg("y", y, FLOAT_DTYPES)
    check_arg("xa", xa, (torch.float32,))
    check_arg("lora_B", lora_B, (y.dtype,))
    if y.dim() != 2 or lora_B.dim() != 3 or lora_B.shape[1] != y.shape[1] or xa.dim() != xa_dims \
            or xa.shape[-2:] != (y.shape[0], lora_B.shape[2]):
        want = "[P, M, R]" if xa_dims == 3 else "[M, R]"
        raise ValueError(f"y must be [M, N], xa {want} and lora_B [S, N, R]; got {tuple(y.shape)}, "
                         f"{tuple(xa.shape)} and {tuple(lora_B.shape)}")
    check_arg("ranks", ranks, (torch.int32,))
    if ranks.shape != (lora_B.shape[0],):
        raise ValueError(f"ranks must have shape [{lora_B.shape[0]}], got {tuple(ranks.shape)}")


def shrink_split(k: int) -> tuple[int, int]:
    """(P, KP): the shrink's K split for in_features k (see SHRINK_K_PER_PROGRAM)."""
    kp = max(SHRINK_K_PER_PROGRAM, -(-k // SHRINK_MAX_SPLIT))
    kp = -(-kp // SHRINK_BLOCK_K) * SHRINK_BLOCK_K
    return max(1, -(-k // kp)), kp


def bgmv_shrink(x: torch.Tensor, lora_A: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor,
                slots: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Partials of ``xa[m] = scales[s] * x[m] A_s[:ranks[s]]ᵀ`` with ``s = slots[m]`` (zero for s = -1).

    x: [M, K] contiguous, lora_A: [S, R, K] contiguous in x.dtype, scales float32 [S], ranks int32 [S]
    (each <= R), slots int32 [M] in [-1, S) (not range-checked here: the caller's job, see
    ``ops/multi_lora.py``). Returns float32 [P, M, R] with ``P = shrink_split(K)[0]``: ``xa = out.sum(0)``
    (:func:`bgmv_expand_` takes the partials as they are).
    """
    m, k = x.shape if x.dim() == 2 else (0, 0)
    r = lora_A.shape[1] if lora_A.dim() == 3 else 0
    n_split, kp = shrink_split(k)
    out = _check_shrink(x, lora_A, out, (n_split, m, r))
    _check_slots_args(lora_A, scales, ranks, slots, m)
    check_device(_bgmv_shrink_kernel, x=x, lora_A=lora_A, scales=scales, ranks=ranks, slots=slots, out=out)
    if m == 0 or r == 0:
        return out.zero_()
    _bgmv_shrink_kernel[(m, triton.cdiv(r, BLOCK_R), n_split)](
        x, lora_A, scales, ranks, slots, out, m, k, r, kp, BLOCK_R=BLOCK_R, BLOCK_K=SHRINK_BLOCK_K,
        num_warps=NUM_WARPS, num_stages=1)
    return out


def bgmv_expand_(y: torch.Tensor, xa: torch.Tensor, lora_B: torch.Tensor, ranks: torch.Tensor,
                 slots: torch.Tensor) -> torch.Tensor:
    """``y[m] += xa[m, :r] B_s[:, :r]ᵀ`` in place with ``s = slots[m]``, ``r = ranks[s]`` (rows with s = -1 untouched).

    y: [M, N] contiguous fp32/fp16/bf16, xa: float32 [P, M, R] (the partials of :func:`bgmv_shrink`, summed
    here), lora_B: [S, N, R] contiguous in y.dtype, ranks int32 [S], slots int32 [M]. Returns y.
    """
    _check_expand(y, xa, lora_B, ranks, 3)
    m, n = y.shape
    r = lora_B.shape[2]
    check_arg("slots", slots, (torch.int32,))
    if slots.shape != (m,):
        raise ValueError(f"slots must have shape [{m}], got {tuple(slots.shape)}")
    check_device(_bgmv_expand_kernel, y=y, xa=xa, lora_B=lora_B, ranks=ranks, slots=slots)
    if m == 0 or n == 0 or r == 0:
        return y
    _bgmv_expand_kernel[(m, triton.cdiv(n, EXPAND_BLOCK_N))](y, xa, lora_B, ranks, slots, m, n, r, xa.shape[0],
                                                             BLOCK_N=EXPAND_BLOCK_N, BLOCK_R=BLOCK_R,
                                                             num_warps=NUM_WARPS, num_stages=1)
    return y


# ----------------------------------------------------------------------------- SGMV (segments)
#: SGMV tiles: rows of a segment per program (shrink: 32, so a 2048-row prefill has 64 programs per
#: rank chunk; expand: 64 x 64 output tiles). Estimates, to be tuned on a GPU (bench/gpu_suite.py n).
SGMV_SHRINK_BLOCK_M, SGMV_SHRINK_BLOCK_K = 32, 128
SGMV_EXPAND_BLOCK_M, SGMV_EXPAND_BLOCK_N = 64, 64
#: Segments at least this long take the SGMV kernels (shorter: the per-row BGMV kernels).
SGMV_MIN_ROWS = 16


@triton.jit
def _sgmv_shrink_kernel(x_ptr, a_ptr, scale_ptr, rank_ptr, slot_ptr, xa_ptr, T, K, R,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    # Grid (segments, cdiv(T, BLOCK_M), cdiv(R, BLOCK_R)): segment g is rows [g*T, (g+1)*T), one slot.
    g = tl.program_id(0)
    tm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot, s, rank = _slot(slot_ptr, g, rank_ptr)
    valid = slot >= 0
    rows = g.to(tl.int64) * T + tm
    m_ok = tm < T
    r_ok = rr < rank
    a_rows = a_ptr + s * R * K + rr.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        xt = tl.load(x_ptr + rows[:, None] * K + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_rows + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(at), acc, input_precision="ieee")
    scale = tl.where(valid, tl.load(scale_ptr + s), 0.0)
    tl.store(xa_ptr + rows[:, None] * R + rr[None, :], acc * scale, mask=m_ok[:, None] & (rr[None, :] < R))


@triton.jit
def _sgmv_expand_kernel(y_ptr, xa_ptr, b_ptr, rank_ptr, slot_ptr, T, N, R,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    # Grid (segments, cdiv(T, BLOCK_M), cdiv(N, BLOCK_N)). xa stays float32 (B is widened to it): an IEEE
    # fp32 dot of depth r, r/K of the base GEMM's work.
    g = tl.program_id(0)
    tm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot, s, rank = _slot(slot_ptr, g, rank_ptr)
    rows = g.to(tl.int64) * T + tm
    m_ok = tm < T
    n_ok = rn < N
    b_rows = b_ptr + s * N * R + rn.to(tl.int64)[:, None] * R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, R, BLOCK_R):
        j = j0 + tl.arange(0, BLOCK_R)
        j_ok = j < rank
        xat = tl.load(xa_ptr + rows[:, None] * R + j[None, :], mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        bt = tl.load(b_rows + j[None, :], mask=n_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(xat, tl.trans(bt), acc, input_precision="ieee")
    ok = m_ok[:, None] & n_ok[None, :] & ((tm * 0 + slot) >= 0)[:, None]
    y = y_ptr + rows[:, None] * N + rn[None, :]
    yv = tl.load(y, mask=ok, other=0.0).to(tl.float32)
    tl.store(y, (yv + acc).to(y_ptr.dtype.element_ty), mask=ok)


def _segments(m: int, seg_slots: torch.Tensor, seg_rows: int) -> int:
    if isinstance(seg_rows, bool) or not isinstance(seg_rows, int) or seg_rows <= 0:
        raise ValueError(f"seg_rows must be a positive integer, got {seg_rows!r}")
    check_arg("seg_slots", seg_slots, (torch.int32,))
    if seg_slots.dim() != 1 or seg_slots.shape[0] * seg_rows != m:
        raise ValueError(f"seg_slots [G] with seg_rows={seg_rows} must cover the {m} rows (G * seg_rows == M), "
                         f"got shape {tuple(seg_slots.shape)}")
    return seg_slots.shape[0]


def sgmv_shrink(x: torch.Tensor, lora_A: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor,
                seg_slots: torch.Tensor, seg_rows: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`bgmv_shrink` for rows in segments: row m uses slot ``seg_slots[m // seg_rows]`` (-1: none).

    x [M, K] with M = G * seg_rows; seg_slots int32 [G]. Returns float32 xa [M, R]."""
    m, k = x.shape if x.dim() == 2 else (0, 0)
    out = _check_shrink(x, lora_A, out, (m, lora_A.shape[1] if lora_A.dim() == 3 else 0))
    r = lora_A.shape[1]
    n_seg = _segments(m, seg_slots, seg_rows)
    _check_slot_meta(lora_A, scales, ranks)
    check_device(_sgmv_shrink_kernel, x=x, lora_A=lora_A, scales=scales, ranks=ranks, seg_slots=seg_slots, out=out)
    if m == 0 or r == 0:
        return out
    grid = (n_seg, triton.cdiv(seg_rows, SGMV_SHRINK_BLOCK_M), triton.cdiv(r, BLOCK_R))
    _sgmv_shrink_kernel[grid](x, lora_A, scales, ranks, seg_slots, out, seg_rows, k, r,
                              BLOCK_M=SGMV_SHRINK_BLOCK_M, BLOCK_K=SGMV_SHRINK_BLOCK_K, BLOCK_R=BLOCK_R,
                              num_warps=NUM_WARPS, num_stages=1)
    return out


def sgmv_expand_(y: torch.Tensor, xa: torch.Tensor, lora_B: torch.Tensor, ranks: torch.Tensor,
                 seg_slots: torch.Tensor, seg_rows: int) -> torch.Tensor:
    """:func:`bgmv_expand_` for rows in segments (see :func:`sgmv_shrink`); in place, returns y."""
    _check_expand(y, xa, lora_B, ranks, 2)
    m, n = y.shape
    r = lora_B.shape[2]
    n_seg = _segments(m, seg_slots, seg_rows)
    check_device(_sgmv_expand_kernel, y=y, xa=xa, lora_B=lora_B, ranks=ranks, seg_slots=seg_slots)
    if m == 0 or n == 0 or r == 0:
        return y
    grid = (n_seg, triton.cdiv(seg_rows, SGMV_EXPAND_BLOCK_M), triton.cdiv(n, SGMV_EXPAND_BLOCK_N))
    _sgmv_expand_kernel[grid](y, xa, lora_B, ranks, seg_slots, seg_rows, n, r,
                              BLOCK_M=SGMV_EXPAND_BLOCK_M, BLOCK_N=SGMV_EXPAND_BLOCK_N, BLOCK_R=BLOCK_R,
                              num_warps=NUM_WARPS, num_stages=1)
    return y


# ----------------------------------------------------------------------------- AOT variants
def _aot_variants() -> list[AotVariant]:
    out = []
    for dtype in FLOAT_DTYPES:
        t = TL_PTR[dtype]
        out.append(AotVariant(
            name=f"bgmv_shrink-{t[1:]}", kernel=_bgmv_shrink_kernel,
            signature={"x_ptr": t, "a_ptr": t, "scale_ptr": "*fp32", "rank_ptr": "*i32", "slot_ptr": "*i32",
                       "xa_ptr": "*fp32", "M": "i32", "K": "i32", "R": "i32", "KP": "i32", "BLOCK_R": "constexpr",
                       "BLOCK_K": "constexpr"},
            constexprs={"BLOCK_R": BLOCK_R, "BLOCK_K": SHRINK_BLOCK_K}, num_warps=NUM_WARPS, num_stages=1,
            divisible_by_16=("x_ptr", "a_ptr", "scale_ptr", "rank_ptr", "slot_ptr", "xa_ptr", "K", "R", "KP"),
            meta={"config": "bgmv_shrink", "dtype": t[1:]}))
        out.append(AotVariant(
            name=f"bgmv_expand-{t[1:]}", kernel=_bgmv_expand_kernel,
            signature={"y_ptr": t, "xa_ptr": "*fp32", "b_ptr": t, "rank_ptr": "*i32", "slot_ptr": "*i32",
                       "M": "i32", "N": "i32", "R": "i32", "P": "i32", "BLOCK_N": "constexpr", "BLOCK_R": "constexpr"},
            constexprs={"BLOCK_N": EXPAND_BLOCK_N, "BLOCK_R": BLOCK_R}, num_warps=NUM_WARPS, num_stages=1,
            divisible_by_16=("y_ptr", "xa_ptr", "b_ptr", "rank_ptr", "slot_ptr", "N", "R"),
            meta={"config": "bgmv_expand", "dtype": t[1:]}))
        out.append(AotVariant(
            name=f"sgmv_shrink-{t[1:]}", kernel=_sgmv_shrink_kernel,
            signature={"x_ptr": t, "a_ptr": t, "scale_ptr": "*fp32", "rank_ptr": "*i32", "slot_ptr": "*i32",
                       "xa_ptr": "*fp32", "T": "i32", "K": "i32", "R": "i32", "BLOCK_M": "constexpr",
                       "BLOCK_K": "constexpr", "BLOCK_R": "constexpr"},
            constexprs={"BLOCK_M": SGMV_SHRINK_BLOCK_M, "BLOCK_K": SGMV_SHRINK_BLOCK_K, "BLOCK_R": BLOCK_R},
            num_warps=NUM_WARPS, num_stages=1, expect_mma=dtype != torch.float32,
            divisible_by_16=("x_ptr", "a_ptr", "scale_ptr", "rank_ptr", "slot_ptr", "xa_ptr", "K", "R"),
            meta={"config": "sgmv_shrink", "dtype": t[1:]}))
        out.append(AotVariant(
            name=f"sgmv_expand-{t[1:]}", kernel=_sgmv_expand_kernel,
            signature={"y_ptr": t, "xa_ptr": "*fp32", "b_ptr": t, "rank_ptr": "*i32", "slot_ptr": "*i32",
                       "T": "i32", "N": "i32", "R": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                       "BLOCK_R": "constexpr"},
            constexprs={"BLOCK_M": SGMV_EXPAND_BLOCK_M, "BLOCK_N": SGMV_EXPAND_BLOCK_N, "BLOCK_R": BLOCK_R},
            num_warps=NUM_WARPS, num_stages=1,
            divisible_by_16=("y_ptr", "xa_ptr", "b_ptr", "rank_ptr", "slot_ptr", "N", "R"),
            meta={"config": "sgmv_expand", "dtype": t[1:]}))
    return out


#: Every compiled form the launchers request: (BGMV, SGMV) x (shrink, expand) x dtype. BGMV has no dots
#: (memory-bound GEMVs); SGMV's shrink uses tensor cores for 16-bit x, its expand an fp32 dot.
AOT_VARIANTS = _aot_variants()
