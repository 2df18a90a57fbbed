"""Triton kernels of the bottleneck adapter ``out = h + s·(act(h W_dᵀ + b_d) W_uᵀ + b_u)``.

Shapes: h [M, d], W_d [r, d], b_d [r], W_u [d, r], b_u [d], s a float32 scalar in device memory
(a learned scale is read by the kernels, never synced to the host). Every tensor is contiguous; h is
fp32/fp16/bf16 and the parameters are in h's dtype or float32 (``nn.Adapter``'s default): float32
parameters are rounded to h's dtype as the kernels load them, so no cast kernel runs per call.
Accumulation is fp32. r <= ``MAX_R`` (the op falls back to torch above it). The math and its
backward are in ``ops/reference_adapter.py``.

Forward, two kernels:

* ``_adapter_down_kernel`` (row kernel: programs own BLOCK_M rows and walk d): ``z = h W_dᵀ + b_d``,
  the whole [BLOCK_M, r] accumulator in registers (r padded to R_PAD, a power of two >= 16 so
  ``tl.dot`` can use tensor cores). z is written once: it is the one activation the backward keeps.
* ``_adapter_up_kernel`` (tile kernel: programs own a [BLOCK_M, BLOCK_D] tile of the output):
  ``a = act(z)`` on the fly from z, ``acc = a W_uᵀ`` over r, then bias, scale and the residual
  ``h +`` in the epilogue: a = act(z) and the up product never touch global memory.

Splitting the forward at z keeps the output GEMM fully parallel (M/BLOCK_M x d/BLOCK_D programs)
while the traffic equals a single fused pass: h is read twice (once per kernel) and out written once.

Backward, two kernels plus two cuBLAS GEMMs (``adapter_backward``):

* ``_adapter_dz_kernel`` (row kernel): ``g = dy W_u`` over d; recomputes ``a = act(z)``,
  ``act'(z)`` from the saved z; writes ``dz = s·g ⊙ act'(z)`` and ``a_ext = [s·a | s | 0…]`` (the
  column of s turns the bias gradient into one more column of the weight-gradient GEMM); with a
  learned s, also the per-row ``⟨a, g⟩ + ⟨dy, b_u⟩`` (summed to ds on the host side, in torch).
* ``_adapter_dh_kernel`` (tile kernel): ``dh = dy + dz W_d`` — the residual's gradient fused into the
  epilogue of the input-gradient GEMM (one read of dy, one write of dh).
* cuBLAS: ``[dW_u | db_u] = dyᵀ a_ext`` and ``dW_d = dzᵀ h`` (reductions over M into [d, r]-sized
  outputs: split-K GEMMs, which cuBLAS already does well); ``db_d = Σ_m dz`` in torch (M·r elements).

Buffers the launchers allocate go through :func:`_empty` (tests replace it to poison them with NaN).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPES, TL_PTR, AotVariant, check_arg, check_device

#: Activation name -> the kernels' ``ACT`` constexpr (same order as reference_adapter.ADAPTER_ACTIVATIONS).
ACT_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
#: Largest bottleneck the kernels take: a row kernel holds a [BLOCK_M, R_PAD] fp32 accumulator.
MAX_R = 256
#: Rank chunk of the tile kernels' reduction over r.
BLOCK_R = 32
#: Rows per program of the row kernels at or below this M are 16 (more programs for small M).
SMALL_M = 2048


@dataclass(frozen=True)
class RowConfig:
    """Row kernels (down, dz): BLOCK_M rows per program, d walked in BLOCK_D steps, r padded to R_PAD."""

    BLOCK_M: int
    BLOCK_D: int
    R_PAD: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class TileConfig:
    """Tile kernels (up, dh): [BLOCK_M, BLOCK_D] output tiles, r walked in BLOCK_R steps."""

    BLOCK_M: int
    BLOCK_D: int
    BLOCK_R: int = BLOCK_R
    num_warps: int = 4
    num_stages: int = 2


def r_pad(r: int) -> int:
    """r rounded up to a power of two >= 16 (``tl.arange`` needs a power of two, ``tl.dot`` >= 16)."""
    return max(16, triton.next_power_of_2(r))


#: Shared memory the row kernels' pipeline may use (sm_86/89 allow 99 KB per block).
SMEM_BUDGET = 96 * 1024


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def pick_row_config(m: int, r: int, dtype: torch.dtype, w_dtype: Optional[torch.dtype] = None) -> RowConfig:
    """Row-kernel tiles for activations of ``dtype`` and weights of ``w_dtype`` (default: the same).

    Small M: 16 rows per program (M/16 programs). Large M: as many rows as keep the [BLOCK_M, R_PAD]
    fp32 accumulator at 4096 elements (32 registers a thread at 4 warps): W_d / W_u are re-read from L2
    once per program, so fewer, taller programs read less. BLOCK_D 64 for 16-bit activations, 32 for
    fp32, halved until two pipeline stages of (activation tile + weight tile) fit in ``SMEM_BUDGET``;
    three stages when they fit.
    """
    rp = r_pad(r)
    es, ew = _size(dtype), _size(w_dtype or dtype)
    block_m = 16 if m <= SMALL_M else max(16, min(64, 4096 // rp))
    block_d = 32 if es == 4 else 64
    while block_d > 16 and 2 * (block_m * es + rp * ew) * block_d > SMEM_BUDGET:
        block_d //= 2
    stage = (block_m * es + rp * ew) * block_d
    return RowConfig(block_m, block_d, rp, 4, 3 if 3 * stage <= SMEM_BUDGET else 2)


def pick_tile_config(m: int, dtype: torch.dtype) -> TileConfig:
    """Tile-kernel tiles: 64 x 128 (16-bit) or 64 x 64 (fp32, whose dots run on FMA units)."""
    return TileConfig(64, 64 if _size(dtype) == 4 else 128)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers allocate (a seam for tests, which fill it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------- kernels
@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    """act(z) in fp32 (z fp32). tanh(x) = 2·sigmoid(2x) - 1: Triton has no tanh of its own."""
    if ACT == 0:
        a = tl.maximum(z, 0.0)
    elif ACT == 1:
        a = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        t = 2.0 * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z)) - 1.0
        a = 0.5 * z * (1.0 + t)
    else:
        a = z * tl.sigmoid(z)
    return a


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """act'(z) in fp32 (relu' = 0 at 0, as torch)."""
    if ACT == 0:
        g = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:
        g = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 2:
        t = 2.0 * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z)) - 1.0
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    else:
        sg = tl.sigmoid(z)
        g = sg * (1.0 + z * (1.0 - sg))
    return g


@triton.jit
def _adapter_down_kernel(h_ptr, wd_ptr, bd_ptr, z_ptr, M, D, R,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr):
    # z[rows] = h[rows] W_dᵀ + b_d: walk d, accumulate the [BLOCK_M, R_PAD] tile in fp32. Rows of W_d
    # past R load as 0, so the padded columns stay 0 and are never stored.
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    rd = tl.arange(0, BLOCK_D)
    h_rows = h_ptr + rm.to(tl.int64)[:, None] * D
    w_rows = wd_ptr + rr.to(tl.int64)[:, None] * D
    m_ok = rm[:, None] < M
    r_ok = rr[:, None] < R
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + rd
        c_ok = cols[None, :] < D
        ht = tl.load(h_rows + cols[None, :], mask=m_ok & c_ok, other=0.0)
        wt = tl.load(w_rows + cols[None, :], mask=r_ok & c_ok, other=0.0)
        acc = tl.dot(ht, tl.trans(wt.to(h_ptr.dtype.element_ty)), acc, input_precision="ieee")
    acc += tl.load(bd_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)[None, :]
    z = z_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :]
    tl.store(z, acc.to(z_ptr.dtype.element_ty), mask=m_ok & (rr[None, :] < R))


@triton.jit
def _adapter_up_kernel(h_ptr, z_ptr, wu_ptr, bu_ptr, scale_ptr, out_ptr, M, D, R,
                       ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    # out tile = h + s·(act(z) W_uᵀ + b_u). act(z) is formed per r chunk in registers and rounded to
    # h's dtype before the dot (the unfused module's a is a tensor of that dtype too). Padded z
    # columns load as 0 and padded W_u columns as 0, so they add nothing whatever act(0) is.
    pid_d = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm[:, None] < M
    d_ok = rd[:, None] < D
    z_rows = z_ptr + rm.to(tl.int64)[:, None] * R
    w_rows = wu_ptr + rd.to(tl.int64)[:, None] * R
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, R, BLOCK_R):
        j = j0 + rr
        j_ok = j[None, :] < R
        zt = tl.load(z_rows + j[None, :], mask=m_ok & j_ok, other=0.0).to(tl.float32)
        at = _act_fwd(zt, ACT).to(h_ptr.dtype.element_ty)
        wt = tl.load(w_rows + j[None, :], mask=d_ok & j_ok, other=0.0)
        acc = tl.dot(at, tl.trans(wt.to(h_ptr.dtype.element_ty)), acc, input_precision="ieee")
    s = tl.load(scale_ptr)
    acc += tl.load(bu_ptr + rd, mask=rd < D, other=0.0).to(tl.float32)[None, :]
    offs = rm.to(tl.int64)[:, None] * D + rd[None, :]
    mask = m_ok & (rd[None, :] < D)
    ht = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (ht + s * acc).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adapter_dz_kernel(dy_ptr, wu_ptr, bu_ptr, z_ptr, scale_ptr, dz_ptr, a_ptr, ds_ptr, M, D, R, R_EXT,
                       ACT: tl.constexpr, HAS_DS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr):
    # g = dy W_u over d (the [BLOCK_M, R_PAD] accumulator stays in registers), then from the saved z:
    # dz = s·g ⊙ act'(z) and a_ext = [s·a | s | 0…] ([M, R_EXT], R < R_EXT <= R + 8). With a learned
    # scale, also the row terms of ds: ⟨a_m, g_m⟩ + ⟨dy_m, b_u⟩ (the dy tiles are in registers anyway).
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    rd = tl.arange(0, BLOCK_D)
    m_ok = rm[:, None] < M
    r_ok = rr[None, :] < R
    dy_rows = dy_ptr + rm.to(tl.int64)[:, None] * D
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    dyb = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + rd
        dyt = tl.load(dy_rows + cols[None, :], mask=m_ok & (cols[None, :] < D), other=0.0)
        wt = tl.load(wu_ptr + cols.to(tl.int64)[:, None] * R + rr[None, :], mask=(cols[:, None] < D) & r_ok,
                     other=0.0)
        acc = tl.dot(dyt, wt.to(dy_ptr.dtype.element_ty), acc, input_precision="ieee")
        if HAS_DS:
            bt = tl.load(bu_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
            dyb += tl.sum(dyt.to(tl.float32) * bt[None, :], axis=1)
    s = tl.load(scale_ptr)
    zmask = m_ok & r_ok
    z = tl.load(z_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], mask=zmask, other=0.0).to(tl.float32)
    a = _act_fwd(z, ACT)
    dz = s * acc * _act_grad(z, ACT)
    tl.store(dz_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], dz.to(dz_ptr.dtype.element_ty), mask=zmask)
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * R_EXT
    tl.store(a_rows + rr[None, :], (s * a).to(a_ptr.dtype.element_ty), mask=zmask)
    re = tl.arange(0, 8)
    tail = tl.zeros((BLOCK_M, 8), dtype=tl.float32) + tl.where(re == 0, s, 0.0)[None, :]
    tl.store(a_rows + (R + re)[None, :], tail.to(a_ptr.dtype.element_ty), mask=m_ok & ((R + re)[None, :] < R_EXT))
    if HAS_DS:
        # Padded columns: z = 0 and g = 0 there, so a·g adds 0 for every activation.
        tl.store(ds_ptr + rm, tl.sum(a * acc, axis=1) + dyb, mask=rm < M)


@triton.jit
def _adapter_dh_kernel(dy_ptr, dz_ptr, wd_ptr, dh_ptr, M, D, R,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    # dh tile = dy + dz W_d: the input-gradient GEMM with the residual's gradient in its epilogue.
    pid_d = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm[:, None] < M
    dz_rows = dz_ptr + rm.to(tl.int64)[:, None] * R
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, R, BLOCK_R):
        j = j0 + rr
        dzt = tl.load(dz_rows + j[None, :], mask=m_ok & (j[None, :] < R), other=0.0)
        wt = tl.load(wd_ptr + j.to(tl.int64)[:, None] * D + rd[None, :], mask=(j[:, None] < R) & (rd[None, :] < D),
                     other=0.0)
        acc = tl.dot(dzt, wt.to(dz_ptr.dtype.element_ty), acc, input_precision="ieee")
    offs = rm.to(tl.int64)[:, None] * D + rd[None, :]
    mask = m_ok & (rd[None, :] < D)
    dyt = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dh_ptr + offs, (dyt + acc).to(dh_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------- launchers
def _check_shapes(h: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, vectors: dict) -> tuple[int, int, int]:
    """(M, d, r) after checking h [M, d], W_d [r, d], W_u [d, r] and the 1-D vectors (name -> (tensor, len))."""
    check_arg("h", h, FLOAT_DTYPES)
    if h.dim() != 2:
        raise ValueError(f"h must be 2-D [M, d], got shape {tuple(h.shape)}")
    m, d = h.shape
    params = (h.dtype, torch.float32)  # float32 parameters are rounded to h's dtype inside the kernels
    for name, t in (("w_down", w_down), ("w_up", w_up)):
        check_arg(name, t, params)
    r = w_down.shape[0] if w_down.dim() == 2 else -1
    if w_down.dim() != 2 or w_down.shape[1] != d:
        raise ValueError(f"w_down must have shape [r, {d}], got {tuple(w_down.shape)}")
    if w_up.shape != (d, r):
        raise ValueError(f"w_up must have shape [{d}, {r}], got {tuple(w_up.shape)}")
    if not 1 <= r <= MAX_R:
        raise ValueError(f"bottleneck r must be in [1, {MAX_R}] for the Triton kernels, got {r}")
    for name, (t, n) in vectors.items():
        check_arg(name, t, params)
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
    return m, d, r


def _check_scale(scale: torch.Tensor) -> None:
    check_arg("scale", scale, (torch.float32,))
    if scale.numel() != 1:
        raise ValueError(f"scale must hold one float32 value, got shape {tuple(scale.shape)}")


def _check_buffer(name: str, t: Optional[torch.Tensor], shape: tuple, like: torch.Tensor) -> torch.Tensor:
    if t is None:
        return _empty(shape, like.dtype, like.device)
    check_arg(name, t, (like.dtype,))
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(t.shape)}")
    return t


def adapter_forward(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
                    b_up: torch.Tensor, scale: torch.Tensor, activation: str, *, out: Optional[torch.Tensor] = None,
                    z: Optional[torch.Tensor] = None, row_config: Optional[RowConfig] = None,
                    tile_config: Optional[TileConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [M, d], z [M, r]) = (h + s·(act(h W_dᵀ + b_d) W_uᵀ + b_u), h W_dᵀ + b_d), both in h.dtype.

    h [M, d]; w_down [r, d], b_down [r], w_up [d, r], b_up [d] in h.dtype or float32 (rounded to h.dtype
    on load); scale float32 [1] on the device. All contiguous. ``activation``: a key of :data:`ACT_CODES`.
    out / z: optional preallocated outputs. row_config / tile_config: force tiles (tests).
    """
    m, d, r = _check_shapes(h, w_down, w_up, {"b_down": (b_down, w_down.shape[0]), "b_up": (b_up, h.shape[1])})
    _check_scale(scale)
    act = ACT_CODES[activation]
    check_device(_adapter_down_kernel, h=h, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up, scale=scale,
                 out=out, z=z)
    out = _check_buffer("out", out, (m, d), h)
    z = _check_buffer("z", z, (m, r), h)
    if m == 0:
        return out, z
    rc = row_config or pick_row_config(m, r, h.dtype, w_down.dtype)
    tc = tile_config or pick_tile_config(m, h.dtype)
    _adapter_down_kernel[(triton.cdiv(m, rc.BLOCK_M),)](
        h, w_down, b_down, z, m, d, r, BLOCK_M=rc.BLOCK_M, BLOCK_D=rc.BLOCK_D, R_PAD=rc.R_PAD,
        num_warps=rc.num_warps, num_stages=rc.num_stages)
    _adapter_up_kernel[(triton.cdiv(d, tc.BLOCK_D), triton.cdiv(m, tc.BLOCK_M))](
        h, z, w_up, b_up, scale, out, m, d, r, ACT=act, BLOCK_M=tc.BLOCK_M, BLOCK_D=tc.BLOCK_D,
        BLOCK_R=tc.BLOCK_R, num_warps=tc.num_warps, num_stages=tc.num_stages)
    return out, z


def r_ext(r: int) -> int:
    """Columns of a_ext = [s·a | s | 0…]: r + 1 rounded up to a multiple of 8 (16-byte rows for cuBLAS)."""
    return (r + 1 + 7) // 8 * 8


def adapter_backward(dy: torch.Tensor, h: torch.Tensor, z: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor,
                     b_up: torch.Tensor, scale: torch.Tensor, activation: str, *, need_dh: bool = True,
                     need_weights: bool = True, need_scale: bool = False, dh: Optional[torch.Tensor] = None,
                     grad_dtype: Optional[torch.dtype] = None, row_config: Optional[RowConfig] = None,
                     tile_config: Optional[TileConfig] = None):
    """Gradients of :func:`adapter_forward`: (dh, dW_d, db_d, dW_u, db_u, ds).

    dy, h: [M, d]; z: [M, r] (the forward's); parameters and scale as in :func:`adapter_forward`.
    dh (h's dtype) is None without ``need_dh``; the four parameter gradients (``grad_dtype``, default
    h's dtype; computed in h's dtype, cast once) are None without ``need_weights``; ds (float32 0-d)
    is None without ``need_scale``. dh: optional preallocated output.
    """
    m, d, r = _check_shapes(h, w_down, w_up, {"b_up": (b_up, h.shape[1])})
    _check_scale(scale)
    for name, t, shape in (("dy", dy, (m, d)), ("z", z, (m, r))):
        check_arg(name, t, (h.dtype,))
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(t.shape)}")
    act = ACT_CODES[activation]
    check_device(_adapter_dz_kernel, dy=dy, h=h, z=z, w_down=w_down, w_up=w_up, b_up=b_up, scale=scale, dh=dh)
    dh = _check_buffer("dh", dh, (m, d), h) if need_dh else None
    gdt = grad_dtype or h.dtype
    if m == 0:
        zeros = [torch.zeros(s, dtype=gdt, device=h.device) for s in ((r, d), (r,), (d, r), (d,))]
        ds = torch.zeros((), dtype=torch.float32, device=h.device) if need_scale else None
        return (dh, *zeros, ds) if need_weights else (dh, None, None, None, None, ds)
    rc = row_config or pick_row_config(m, r, h.dtype, w_up.dtype)
    tc = tile_config or pick_tile_config(m, h.dtype)
    re = r_ext(r)
    dz = _empty((m, r), h.dtype, h.device)
    a_ext = _empty((m, re), h.dtype, h.device)
    ds_rows = _empty((m,), torch.float32, h.device) if need_scale else scale  # dummy pointer without ds
    _adapter_dz_kernel[(triton.cdiv(m, rc.BLOCK_M),)](
        dy, w_up, b_up, z, scale, dz, a_ext, ds_rows, m, d, r, re, ACT=act, HAS_DS=need_scale,
        BLOCK_M=rc.BLOCK_M, BLOCK_D=rc.BLOCK_D, R_PAD=rc.R_PAD, num_warps=rc.num_warps, num_stages=rc.num_stages)
    if need_dh:
        _adapter_dh_kernel[(triton.cdiv(d, tc.BLOCK_D), triton.cdiv(m, tc.BLOCK_M))](
            dy, dz, w_down, dh, m, d, r, BLOCK_M=tc.BLOCK_M, BLOCK_D=tc.BLOCK_D, BLOCK_R=tc.BLOCK_R,
            num_warps=tc.num_warps, num_stages=tc.num_stages)
    ds = ds_rows.sum() if need_scale else None
    if not need_weights:
        return dh, None, None, None, None, ds
    # [dW_u | db_u | 0…] = dyᵀ a_ext (s already folded into a_ext). The slices are copied out (and cast
    # in the same pass) so the gradients own their storage: op outputs must not alias each other.
    wu_ext = dy.t() @ a_ext
    dwu = wu_ext[:, :r].to(gdt, memory_format=torch.contiguous_format, copy=True)
    dbu = wu_ext[:, r].to(gdt, copy=True)
    dwd = (dz.t() @ h).to(gdt)
    dbd = dz.sum(0, dtype=torch.float32).to(gdt)
    return dh, dwd, dbd, dwu, dbu, ds


# ----------------------------------------------------------------------------------- AOT variants
def _aot_variants() -> list[AotVariant]:
    """A representative compile of every kernel (the full product dtype x weight dtype x activation x
    R_PAD x BLOCK_M would be ~600 compiles of the same code):

    * every kernel for each activation dtype with float32 weights (``nn.Adapter``'s default; for fp32
      activations the only case), at r = 64 with large-M row tiles;
    * every kernel for bf16 activations with bf16 weights (a model cast with ``.to(bfloat16)``);
    * the other row tiles — 16 rows, and R_PAD = 256 (the register and shared-memory extreme) — for
      bf16 activations with float32 weights; each activation at least once per activation kernel, and the
      learned-scale form of the dz kernel.
    """
    variants: list[AotVariant] = []
    f32 = torch.float32

    def row_sig(t: str, w: str, kernel: str) -> dict:
        if kernel == "down":
            return {"h_ptr": t, "wd_ptr": w, "bd_ptr": w, "z_ptr": t, "M": "i32", "D": "i32", "R": "i32",
                    "BLOCK_M": "constexpr", "BLOCK_D": "constexpr", "R_PAD": "constexpr"}
        return {"dy_ptr": t, "wu_ptr": w, "bu_ptr": w, "z_ptr": t, "scale_ptr": "*fp32", "dz_ptr": t, "a_ptr": t,
                "ds_ptr": "*fp32", "M": "i32", "D": "i32", "R": "i32", "R_EXT": "i32", "ACT": "constexpr",
                "HAS_DS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr", "R_PAD": "constexpr"}

    def tag(dtype, w_dtype) -> str:
        return TL_PTR[dtype][1:] + ("" if w_dtype == dtype else "-w" + TL_PTR[w_dtype][1:])

    def add_row(dtype, w_dtype, kernel, m, r, act="relu", has_ds=False):
        t, w = TL_PTR[dtype], TL_PTR[w_dtype]
        rc = pick_row_config(m, r, dtype, w_dtype)
        cx = {"BLOCK_M": rc.BLOCK_M, "BLOCK_D": rc.BLOCK_D, "R_PAD": rc.R_PAD}
        name = f"adapter_{kernel}-{tag(dtype, w_dtype)}-m{rc.BLOCK_M}-r{rc.R_PAD}"
        ptrs = ("h_ptr", "wd_ptr", "bd_ptr", "z_ptr") if kernel == "down" else \
            ("dy_ptr", "wu_ptr", "bu_ptr", "z_ptr", "dz_ptr", "a_ptr")
        if kernel == "dz":
            cx.update(ACT=ACT_CODES[act], HAS_DS=has_ds)
            name += f"-{act}" + ("-ds" if has_ds else "")
        variants.append(AotVariant(
            name=name, kernel=_adapter_down_kernel if kernel == "down" else _adapter_dz_kernel,
            signature=row_sig(t, w, kernel), constexprs=cx, num_warps=rc.num_warps, num_stages=rc.num_stages,
            expect_mma=dtype != f32, divisible_by_16=(*ptrs, "D"),
            meta={"config": f"row-m{rc.BLOCK_M}-r{rc.R_PAD}-d{rc.BLOCK_D}", "dtype": t[1:]}))

    def add_tile(dtype, w_dtype, kernel, act="relu"):
        t, w = TL_PTR[dtype], TL_PTR[w_dtype]
        tc = pick_tile_config(8192, dtype)
        cx = {"BLOCK_M": tc.BLOCK_M, "BLOCK_D": tc.BLOCK_D, "BLOCK_R": tc.BLOCK_R}
        if kernel == "up":
            sig = {"h_ptr": t, "z_ptr": t, "wu_ptr": w, "bu_ptr": w, "scale_ptr": "*fp32", "out_ptr": t,
                   "M": "i32", "D": "i32", "R": "i32", "ACT": "constexpr"}
            cx = {"ACT": ACT_CODES[act], **cx}
            ptrs = ("h_ptr", "z_ptr", "wu_ptr", "bu_ptr", "out_ptr")
            name = f"adapter_up-{tag(dtype, w_dtype)}-{act}"
        else:
            sig = {"dy_ptr": t, "dz_ptr": t, "wd_ptr": w, "dh_ptr": t, "M": "i32", "D": "i32", "R": "i32"}
            ptrs = ("dy_ptr", "dz_ptr", "wd_ptr", "dh_ptr")
            name = f"adapter_dh-{tag(dtype, w_dtype)}"
        sig.update({"BLOCK_M": "constexpr", "BLOCK_D": "constexpr", "BLOCK_R": "constexpr"})
        variants.append(AotVariant(
            name=name, kernel=_adapter_up_kernel if kernel == "up" else _adapter_dh_kernel, signature=sig,
            constexprs=cx, num_warps=tc.num_warps, num_stages=tc.num_stages, expect_mma=dtype != f32,
            divisible_by_16=(*ptrs, "D"), meta={"config": f"tile-m{tc.BLOCK_M}-d{tc.BLOCK_D}", "dtype": t[1:]}))

    act_for = {torch.float16: "gelu", torch.bfloat16: "gelu_tanh", f32: "silu"}
    for dtype, w_dtype in ((torch.float16, f32), (torch.bfloat16, f32), (f32, f32),
                           (torch.bfloat16, torch.bfloat16)):
        act = act_for[dtype] if w_dtype == f32 else "gelu"
        add_row(dtype, w_dtype, "down", 8192, 64)
        add_row(dtype, w_dtype, "dz", 8192, 64, act, has_ds=dtype == torch.bfloat16 and w_dtype == f32)
        add_tile(dtype, w_dtype, "up", act)
        add_tile(dtype, w_dtype, "dh")
    add_row(torch.bfloat16, f32, "down", 512, 64)
    add_row(torch.bfloat16, f32, "down", 8192, 256)
    add_row(torch.bfloat16, f32, "dz", 8192, 256, "relu")
    add_tile(torch.bfloat16, f32, "up", "relu")
    return variants


#: The compiled forms checked ahead of time (tests/test_triton_aot.py): see :func:`_aot_variants`.
AOT_VARIANTS = _aot_variants()
