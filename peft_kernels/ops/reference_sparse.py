"""Plain-torch ground truth for the sparse kernels (re-exported by ``ops/reference.py``).

Same rules as reference.py: written for clarity, float64-capable, the CPU path and what the
Triton kernels are tested against.

Delta layout (.notes/SPARSE_API.md), Δ [N, K]:

* unstructured (``block_size == 0``): ``indices`` int64 [nnz] flat positions ``n*K + k`` (sorted,
  unique), ``values`` [nnz];
* block (``block_size`` b in {16, 32}): ``indices`` int64 [nb] flat tile positions ``bn*ceil(K/b) + bk``,
  ``values`` [nb, b, b] with ``values[t, i, j] = Δ[bn*b + i, bk*b + j]``; tile elements outside [N, K]
  are ignored (never read, gradient 0).

Memory rule: nothing here except :func:`masked_delta_dense_reference` and
:func:`sparse_linear_dense_reference` (test-only, named so) allocates an [N, K]-sized tensor. The
products walk the entries in chunks whose temporaries stay below ``min(CHUNK_ELEMS, N*K // 4)``
elements (at least one entry or tile per chunk); the outputs themselves are [M, N] / [M, K] / like
values. Arithmetic is float32 (float64 when any operand is float64); results are cast at the end.

These functions do not validate their arguments: ``ops/sparse.py``'s wrappers do.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

__all__ = [
    "CHUNK_ELEMS", "delta_coords", "delta_matmul_nt", "delta_matmul_nn", "sampled_grad", "add_delta_",
    "masked_delta_dense_reference", "sparse_linear_dense_reference",
]

#: Upper bound on the elements of one chunk's temporaries (gathered x / dy columns or tiles).
CHUNK_ELEMS = 1 << 22

Tensor = torch.Tensor


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _acc_dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _chunks(count: int, per_item: int, n: int, k: int) -> Iterator[slice]:
    """Slices of ``count`` entries such that ``per_item * len(slice)`` stays under the chunk budget."""
    budget = min(CHUNK_ELEMS, max(1, (n * k) // 4))
    step = max(1, budget // max(1, per_item))
    for s in range(0, count, step):
        yield slice(s, min(count, s + step))


def delta_coords(indices: Tensor, block_size: int, n: int, k: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) int64 of each entry (unstructured) or (bn, bk) of each tile (block)."""
    cols = k if block_size == 0 else _cdiv(k, block_size)
    return torch.div(indices, cols, rounding_mode="floor"), indices % cols


def _tile_values(values: Tensor, bn: Tensor, bk: Tensor, b: int, n: int, k: int, dtype: torch.dtype) -> Tensor:
    """values [C, b, b] in ``dtype`` with the elements outside [N, K] set to 0 (they are ignored)."""
    v = values.to(dtype)
    if n % b == 0 and k % b == 0:
        return v
    r = torch.arange(b, device=values.device)
    ok = ((bn[:, None, None] * b + r[None, :, None]) < n) & ((bk[:, None, None] * b + r[None, None, :]) < k)
    return torch.where(ok, v, torch.zeros((), dtype=dtype, device=v.device))


def _transposed(a: Tensor, dtype: torch.dtype) -> Tensor:
    """a [M, C] -> a contiguous [C, M] copy in ``dtype`` (the size of a, not of W)."""
    return torch.empty(a.shape[1], a.shape[0], dtype=dtype, device=a.device).copy_(a.t())


def _tiles_t(a: Tensor, cols: int, b: int, dtype: torch.dtype) -> Tensor:
    """a [M, cols] -> contiguous [ceil(cols/b), M, b] in ``dtype``, zero-padded past ``cols``: tile column
    j of a as one contiguous [M, b] block, so a gather of tiles is a gather of rows."""
    m, nb = a.shape[0], _cdiv(cols, b)
    out = torch.zeros(nb, m, b, dtype=dtype, device=a.device)
    full = cols // b
    if full:
        out[:full].copy_(a[:, :full * b].reshape(m, full, b).permute(1, 0, 2))
    if cols % b:
        out[full, :, :cols % b].copy_(a[:, full * b:])
    return out


def _untile_t(t: Tensor, cols: int, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`_tiles_t`: [nb, M, b] -> contiguous [M, cols] in ``dtype``."""
    nb, m, b = t.shape
    return t.permute(1, 0, 2).reshape(m, nb * b)[:, :cols].to(dtype).contiguous()


def delta_matmul_nt(x: Tensor, values: Tensor, indices: Tensor, block_size: int, n: int, k: int) -> Tensor:
    """``x Δᵀ``: x [M, K] -> [M, N] in x.dtype."""
    m = x.shape[0]
    acc = _acc_dtype(x, values)
    r, c = delta_coords(indices, block_size, n, k)
    # Layouts are transposed so that every entry / tile gathers and scatters contiguous rows, and
    # gathers / accumulation use index_select / index_put_(accumulate=True) on dim 0: on a loaded
    # multi-threaded CPU, advanced indexing and index_add_ measured 50-1000x slower for these sizes.
    if block_size == 0:
        xt, yt = _transposed(x, acc), torch.zeros(n, m, dtype=acc, device=x.device)
        for s in _chunks(indices.numel(), m, n, k):
            yt.index_put_((r[s],), xt.index_select(0, c[s]) * values[s].to(acc)[:, None], accumulate=True)
        return yt.t().to(x.dtype).contiguous()
    b = block_size
    xp = _tiles_t(x, k, b, acc)
    yp = torch.zeros(_cdiv(n, b), m, b, dtype=acc, device=x.device)
    for s in _chunks(indices.numel(), m * b, n, k):
        v = _tile_values(values[s], r[s], c[s], b, n, k, acc)
        yp.index_put_((r[s],), torch.bmm(xp.index_select(0, c[s]), v.transpose(1, 2)), accumulate=True)  # [C, M, b(i)]
    return _untile_t(yp, n, x.dtype)


def delta_matmul_nn(dy: Tensor, values: Tensor, indices: Tensor, block_size: int, n: int, k: int) -> Tensor:
    """``dY Δ``: dy [M, N] -> [M, K] in dy.dtype."""
    m = dy.shape[0]
    acc = _acc_dtype(dy, values)
    r, c = delta_coords(indices, block_size, n, k)
    if block_size == 0:
        dyt, dxt = _transposed(dy, acc), torch.zeros(k, m, dtype=acc, device=dy.device)
        for s in _chunks(indices.numel(), m, n, k):
            dxt.index_put_((c[s],), dyt.index_select(0, r[s]) * values[s].to(acc)[:, None], accumulate=True)
        return dxt.t().to(dy.dtype).contiguous()
    b = block_size
    dyp = _tiles_t(dy, n, b, acc)
    dxp = torch.zeros(_cdiv(k, b), m, b, dtype=acc, device=dy.device)
    for s in _chunks(indices.numel(), m * b, n, k):
        v = _tile_values(values[s], r[s], c[s], b, n, k, acc)
        dxp.index_put_((c[s],), torch.bmm(dyp.index_select(0, r[s]), v), accumulate=True)  # [C, M, b(j)]
    return _untile_t(dxp, k, dy.dtype)


def sampled_grad(dy: Tensor, x: Tensor, indices: Tensor, block_size: int, n: int, k: int,
                 dtype: Optional[torch.dtype] = None) -> Tensor:
    """``(dYᵀ x)`` at the selected entries only (SDDMM): [nnz] or [nb, b, b] in ``dtype`` (default float32).

    Accumulated in float32 (float64 when dy or x is float64). Tile elements outside [N, K] get 0.
    """
    acc = _acc_dtype(dy, x)
    out_dtype = dtype or torch.float32
    r, c = delta_coords(indices, block_size, n, k)
    m = dy.shape[0]
    if block_size == 0:
        dyt, xt = _transposed(dy, acc), _transposed(x, acc)
        g = torch.empty(indices.numel(), dtype=acc, device=dy.device)
        for s in _chunks(indices.numel(), 2 * m, n, k):
            g[s] = (dyt.index_select(0, r[s]) * xt.index_select(0, c[s])).sum(1)
        return g.to(out_dtype)
    b = block_size
    dyp, xp = _tiles_t(dy, n, b, acc), _tiles_t(x, k, b, acc)
    g = torch.empty(indices.numel(), b, b, dtype=acc, device=dy.device)
    for s in _chunks(indices.numel(), 2 * m * b, n, k):
        g[s] = torch.bmm(dyp.index_select(0, r[s]).transpose(1, 2), xp.index_select(0, c[s]))
    return g.to(out_dtype)


def add_delta_(weight: Tensor, values: Tensor, indices: Tensor, block_size: int, alpha: float = 1.0) -> Tensor:
    """``weight += alpha * Δ`` in place (merge / unmerge into a dense W [N, K]); returns ``weight``.

    Rounded once to weight.dtype per touched element; no [N, K] temporary.
    """
    n, k = weight.shape
    r, c = delta_coords(indices, block_size, n, k)
    if block_size == 0:
        w_flat = weight.view(-1) if weight.is_contiguous() else None
        if w_flat is not None:
            acc = _acc_dtype(weight, values)
            w_flat[indices] = (w_flat[indices].to(acc) + alpha * values.to(acc)).to(weight.dtype)
        else:  # e.g. a transposed view (transformers Conv1D): element-wise through (rows, cols)
            acc = _acc_dtype(weight, values)
            weight[r, c] = (weight[r, c].to(acc) + alpha * values.to(acc)).to(weight.dtype)
        return weight
    b = block_size
    acc = _acc_dtype(weight, values)
    for t in range(indices.numel()):  # one tile at a time: b x b views, no gather of W
        r0, c0 = int(r[t]) * b, int(c[t]) * b
        blk = weight[r0:r0 + b, c0:c0 + b]
        blk.copy_((blk.to(acc) + alpha * values[t, :blk.shape[0], :blk.shape[1]].to(acc)).to(weight.dtype))
    return weight


# ------------------------------------------------------------------ dense references (tests only)
def masked_delta_dense_reference(values: Tensor, indices: Tensor, block_size: int, n: int, k: int,
                                 dtype: Optional[torch.dtype] = None) -> Tensor:
    """Δ as a dense [N, K] tensor (TESTS ONLY: allocates N*K) in ``dtype`` (default values.dtype).

    Differentiable in ``values`` (index_put / tile copies), so a dense autograd graph built on it is
    the reference for the sparse ops' gradients.
    """
    dt = dtype or values.dtype
    v = values.to(dt)
    r, c = delta_coords(indices, block_size, n, k)
    if block_size == 0:
        return torch.zeros(n * k, dtype=dt, device=values.device).index_put((indices,), v).view(n, k)
    b = block_size
    nbn, nbk = _cdiv(n, b), _cdiv(k, b)
    grid = torch.zeros(nbn * nbk, b, b, dtype=dt, device=values.device).index_put((indices,), v)
    return grid.view(nbn, nbk, b, b).permute(0, 2, 1, 3).reshape(nbn * b, nbk * b)[:n, :k]


def sparse_linear_dense_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], values: Tensor,
                                  indices: Tensor, block_size: int) -> Tensor:
    """``y = x (W + Δ)ᵀ + b`` through a dense Δ (TESTS ONLY): plain autograd gives dX, db and dvalues."""
    n, k = weight.shape
    delta = masked_delta_dense_reference(values, indices, block_size, n, k, dtype=x.dtype)
    y = x @ (weight.to(x.dtype) + delta).t()
    return y if bias is None else y + bias.to(x.dtype)
