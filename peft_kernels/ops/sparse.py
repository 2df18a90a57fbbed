"""Sparse fine-tuning ops: a trainable sparse delta Δ over a frozen dense or 4-bit W (torch.library custom ops).

Math (DESIGN.md): ``y = x (W + Δ)ᵀ + b``, Δ [N, K] nonzero only at the selected entries;
``dΔ = (dYᵀ x)`` at those entries only (a sampled dense-dense product, SDDMM) — never a dense [N, K]
gradient; ``dX = dY (W + Δ)``; ``db = Σ_m dY``. Layout of (values, indices, block_size): see
``ops/reference_sparse.py`` and ``.notes/SPARSE_API.md`` (``block_size`` 0 = unstructured, 16 or 32 =
b x b tiles).

Public functions (validated: bad input raises a ValueError/TypeError naming the problem before any
kernel runs):

    delta_matmul_nt(x [..., K], values, indices, block_size, N, K) -> [..., N]      x Δᵀ
    delta_matmul_nn(dy [..., N], values, indices, block_size, N, K) -> [..., K]    dY Δ
    sampled_grad(dy [..., N], x [..., K], indices, block_size, N, K, dtype=None) -> [nnz] | [nb, b, b]
    sparse_linear_dense(x, weight, bias, values, indices, block_size, grow_indices=None, grow_scores=None)
    sparse_linear_4bit(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                       out_features, bias, values, indices, block_size, grow_indices=None, grow_scores=None)
    indices_from_mask(mask, block_size=0, shape=None) / mask_from_indices(indices, block_size, N, K)
    check_delta(values, indices, block_size, N, K) / merge_delta_(weight, values, indices, block_size, alpha)

The two ``sparse_linear_*`` ops are differentiable (``register_autograd``): gradients for x, bias (when it
requires grad) and values, never for W. Saved for backward: x (only when values need a gradient or a
growth score is requested) plus tensors the layer already holds (W or its 4-bit buffers, values,
indices) — nothing new besides x. values may be float32 while x is fp16/bf16: cast inside, the values'
gradient is accumulated in float32 and returned in values' dtype.

Growth hook (drop-and-grow): ``grow_indices`` (same layout as ``indices``, disjoint from it) and
``grow_scores`` (float32 [c] or [c, b, b]): backward ADDS ``sampled_grad(dy, x, grow_indices)`` into
``grow_scores`` in place (signed). grow_scores is kept on ctx, not saved: the layer may zero it
between steps without tripping autograd's version check. It is an eager-mode feature (a mutation
inside the backward formula is invisible to torch.compile's graph).

Backends (``backend.select``): "triton" (CUDA tensors, or CPU under TRITON_INTERPRET=1 with
PEFT_KERNELS_BACKEND=triton) runs kernels/sparse.py for the delta and the 4-bit kernels of
kernels/matmul4bit.py (dense W: torch matmuls) for the base; everything else runs the plain-torch
reference (ops/reference_sparse.py; float64 always does). The CPU path never allocates an [N, K] (or
N*K-element) tensor: a 4-bit W is dequantized in chunks of rows aligned to whole quant blocks, a dense W
of another dtype is cast in chunks, and the delta products are chunked over the entries (what remains
scales with M*N, M*K or nnz: activations, outputs and the delta itself, never with the weight).

The index checks (sorted, unique, in range) need one host sync; they run once per indices tensor and
version counter (an in-place change re-validates) and are skipped while torch.compile traces.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch

from . import backend, reference
from . import reference_sparse as ref_sparse

Tensor = torch.Tensor

BLOCK_SIZES = (0, 16, 32)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------ validation
def _check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES} (0 = unstructured), got {block_size!r}")


def grid_size(block_size: int, n: int, k: int) -> int:
    """Number of addressable positions: N*K (unstructured) or ceil(N/b)*ceil(K/b) tiles (block)."""
    return n * k if block_size == 0 else _cdiv(n, block_size) * _cdiv(k, block_size)


_CHECKED_ATTR = "_peft_kernels_sparse_checked"


def _check_indices(indices, block_size: int, n: int, k: int, name: str = "indices") -> None:
    """int64, 1-D, strictly increasing (sorted, no duplicates), each in [0, grid). One host sync."""
    if not isinstance(indices, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {str(indices.dtype).replace('torch.', '')}")
    if indices.dim() != 1:
        raise ValueError(f"{name} must be 1-D [nnz], got shape {tuple(indices.shape)}")
    if indices.numel() == 0 or torch.compiler.is_compiling():
        return  # the value checks below read the indices on the host: done eagerly, not inside a graph
    # The value checks cost a host sync (one .tolist()): done once per (tensor, version, layout), not on
    # every forward. An in-place change bumps the version counter and re-validates; a new tensor has no mark.
    mark = (indices._version, block_size, n, k)
    if getattr(indices, _CHECKED_ATTR, None) == mark:
        return
    limit = grid_size(block_size, n, k)
    what = "flat positions n*K + k" if block_size == 0 else f"flat tile positions bn*ceil(K/{block_size}) + bk"
    d = indices[1:] - indices[:-1]
    flags = torch.stack([(d == 0).any(), (d < 0).any(), indices.min() < 0, indices.max() >= limit]).tolist()
    if flags[0]:
        pos = int((d == 0).nonzero()[0, 0])
        raise ValueError(f"{name} has duplicate entries (value {int(indices[pos])} at positions {pos} and {pos + 1})")
    if flags[1]:
        raise ValueError(f"{name} must be sorted in increasing order ({what})")
    if flags[2] or flags[3]:
        lo, hi = int(indices.min()), int(indices.max())
        raise ValueError(f"{name} out of range: values span [{lo}, {hi}] but {what} must lie in [0, {limit}) "
                         f"for N={n}, K={k}, block_size={block_size}")
    try:
        setattr(indices, _CHECKED_ATTR, mark)
    except (AttributeError, RuntimeError):  # a tensor that takes no attributes: validated again next time
        pass


def _values_shape(nnz: int, block_size: int) -> tuple[int, ...]:
    return (nnz,) if block_size == 0 else (nnz, block_size, block_size)


def _check_values(values, nnz: int, block_size: int, name: str = "values") -> None:
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if not values.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {values.dtype}")
    want = _values_shape(nnz, block_size)
    if tuple(values.shape) != want:
        layout = "[nnz]" if block_size == 0 else "[nb, b, b]"
        raise ValueError(f"{name} must have shape {want} ({layout} for {nnz} indices, block_size={block_size}), "
                         f"got {tuple(values.shape)}")


def _check_devices(**ts: Optional[Tensor]) -> None:
    devs = {name: t.device for name, t in ts.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError("tensors must be on the same device: " + ", ".join(f"{k} on {v}" for k, v in devs.items()))


def _check_dims(n, k) -> None:
    for name, v in (("N", n), ("K", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def check_delta(values: Tensor, indices: Tensor, block_size: int, n: int, k: int) -> None:
    """Validate a delta (values, indices, block_size) for a W [N, K]; raises ValueError/TypeError naming the problem."""
    _check_dims(n, k)
    _check_block_size(block_size)
    _check_indices(indices, block_size, n, k)
    _check_values(values, indices.numel(), block_size)
    _check_devices(values=values, indices=indices)


def _check_grow(grow_indices, grow_scores, indices: Tensor, block_size: int, n: int, k: int) -> None:
    if (grow_indices is None) != (grow_scores is None):
        raise ValueError("grow_indices and grow_scores must be given together (or neither)")
    if grow_indices is None:
        return
    _check_indices(grow_indices, block_size, n, k, "grow_indices")
    _check_values(grow_scores, grow_indices.numel(), block_size, "grow_scores")
    if grow_scores.dtype != torch.float32:
        raise TypeError(f"grow_scores must be float32 (scores accumulate in fp32), got {grow_scores.dtype}")
    if not grow_scores.is_contiguous():
        raise ValueError("grow_scores must be contiguous (it is updated in place)")
    _check_devices(indices=indices, grow_indices=grow_indices, grow_scores=grow_scores)
    if grow_indices.numel() and indices.numel() and not torch.compiler.is_compiling():
        pos = torch.searchsorted(indices, grow_indices).clamp_(max=indices.numel() - 1)
        if bool((indices[pos] == grow_indices).any()):
            raise ValueError("grow_indices overlaps indices: growth candidates must be positions not yet selected")


def _check_x(x, k: int, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{name}'s last dimension must be {k}, got shape {tuple(x.shape)}")


# ------------------------------------------------------------------ masks <-> indices
def indices_from_mask(mask: Tensor, block_size: int = 0, shape: Optional[tuple[int, int]] = None) -> Tensor:
    """Sorted int64 indices of the True entries of a bool mask.

    block_size 0: ``mask`` [N, K] -> flat positions n*K + k. block_size b: ``mask`` is the tile mask
    [ceil(N/b), ceil(K/b)] -> flat tile positions. ``shape`` (N, K), when given, is checked against the mask.
    """
    _check_block_size(block_size)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a 2-D bool tensor, got "
                         f"{type(mask).__name__ if not isinstance(mask, Tensor) else (mask.dtype, tuple(mask.shape))}")
    if shape is not None:
        n, k = shape
        want = (n, k) if block_size == 0 else (_cdiv(n, block_size), _cdiv(k, block_size))
        if tuple(mask.shape) != want:
            kind = "[N, K]" if block_size == 0 else f"[ceil(N/{block_size}), ceil(K/{block_size})]"
            raise ValueError(f"mask must have shape {want} ({kind} for N={n}, K={k}), got {tuple(mask.shape)}")
    return mask.reshape(-1).nonzero().squeeze(1)


def mask_from_indices(indices: Tensor, block_size: int, n: int, k: int) -> Tensor:
    """The bool mask of ``indices``: [N, K] (unstructured) or the tile mask [ceil(N/b), ceil(K/b)] (block)."""
    _check_dims(n, k)
    _check_block_size(block_size)
    _check_indices(indices, block_size, n, k)
    shape = (n, k) if block_size == 0 else (_cdiv(n, block_size), _cdiv(k, block_size))
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=indices.device)
    mask[indices] = True
    return mask.view(shape)


def merge_delta_(weight: Tensor, values: Tensor, indices: Tensor, block_size: int, alpha: float = 1.0) -> Tensor:
    """``weight += alpha * Δ`` in place for a dense W [N, K] (merge: alpha=1, unmerge: alpha=-1); no [N, K] temp."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [N, K] tensor, got {getattr(weight, 'shape', weight)!r}")
    check_delta(values, indices, block_size, *weight.shape)
    _check_devices(weight=weight, values=values)
    with torch.no_grad():
        return ref_sparse.add_delta_(weight, values, indices, block_size, alpha)


# ------------------------------------------------------------------ backend choice
def _use_triton(*ts: Tensor) -> bool:
    return backend.select(ts[0].device) == "triton" and all(t.dtype in _FLOAT_DTYPES for t in ts)


def _c(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _nt_into(y: Tensor, x2: Tensor, values: Tensor, indices: Tensor, block_size: int, n: int, k: int) -> None:
    """y [M, N] += x2 Δᵀ in place."""
    if indices.numel() == 0 or x2.shape[0] == 0:
        return
    if _use_triton(x2, values):
        from ..kernels.sparse import delta_matmul_nt as kern
        kern(_c(x2), _c(values), indices, block_size, n, k, out=y, accumulate=True)
    else:
        y.add_(ref_sparse.delta_matmul_nt(x2, values, indices, block_size, n, k))


def _nn_into(dx: Tensor, dy2: Tensor, values: Tensor, indices: Tensor, block_size: int, n: int, k: int) -> None:
    """dx [M, K] += dy2 Δ in place."""
    if indices.numel() == 0 or dy2.shape[0] == 0:
        return
    if _use_triton(dy2, values):
        from ..kernels.sparse import delta_matmul_nn as kern
        kern(_c(dy2), _c(values), indices, block_size, n, k, out=dx, accumulate=True)
    else:
        dx.add_(ref_sparse.delta_matmul_nn(dy2, values, indices, block_size, n, k))


def _sampled(dy2: Tensor, x2: Tensor, indices: Tensor, block_size: int, n: int, k: int,
             dtype: torch.dtype, accumulate_into: Optional[Tensor] = None) -> Tensor:
    """SDDMM; with ``accumulate_into`` (float32, contiguous) the result is added into it in place instead."""
    if dy2.dtype != x2.dtype:  # the kernels take one input dtype: the wider of the two
        common = torch.promote_types(dy2.dtype, x2.dtype)
        dy2, x2 = dy2.to(common), x2.to(common)
    if _use_triton(dy2, x2):
        from ..kernels.sparse import sampled_grad as kern
        if accumulate_into is not None:
            return kern(_c(dy2), _c(x2), indices, block_size, n, k, out=accumulate_into, accumulate=True)
        g = kern(_c(dy2), _c(x2), indices, block_size, n, k)
        return g if g.dtype == dtype else g.to(dtype)
    g = ref_sparse.sampled_grad(dy2, x2, indices, block_size, n, k, torch.float32 if accumulate_into is not None
                                else dtype)
    return g if accumulate_into is None else accumulate_into.add_(g)


# ------------------------------------------------------------------ the three sparse products (custom ops)
@torch.library.custom_op("peft_kernels::sparse_delta_matmul_nt", mutates_args=())
def delta_matmul_nt_op(x: Tensor, values: Tensor, indices: Tensor, block_size: int, N: int, K: int) -> Tensor:
    """``x Δᵀ``: x [..., K] -> [..., N] in x.dtype (fp32 accumulation)."""
    x2 = x.reshape(-1, K)
    if _use_triton(x2, values) and indices.numel():
        from ..kernels.sparse import delta_matmul_nt as kern
        y = kern(_c(x2), _c(values), indices, block_size, N, K)
    elif indices.numel():
        y = ref_sparse.delta_matmul_nt(x2, values, indices, block_size, N, K)
    else:
        y = x2.new_zeros(x2.shape[0], N)
    return y.reshape(*x.shape[:-1], N)


@delta_matmul_nt_op.register_fake
def _(x, values, indices, block_size, N, K):
    return x.new_empty((*x.shape[:-1], N))


@torch.library.custom_op("peft_kernels::sparse_delta_matmul_nn", mutates_args=())
def delta_matmul_nn_op(dy: Tensor, values: Tensor, indices: Tensor, block_size: int, N: int, K: int) -> Tensor:
    """``dY Δ``: dy [..., N] -> [..., K] in dy.dtype (fp32 accumulation)."""
    dy2 = dy.reshape(-1, N)
    if _use_triton(dy2, values) and indices.numel():
        from ..kernels.sparse import delta_matmul_nn as kern
        dx = kern(_c(dy2), _c(values), indices, block_size, N, K)
    elif indices.numel():
        dx = ref_sparse.delta_matmul_nn(dy2, values, indices, block_size, N, K)
    else:
        dx = dy2.new_zeros(dy2.shape[0], K)
    return dx.reshape(*dy.shape[:-1], K)


@delta_matmul_nn_op.register_fake
def _(dy, values, indices, block_size, N, K):
    return dy.new_empty((*dy.shape[:-1], K))


@torch.library.custom_op("peft_kernels::sparse_sampled_grad", mutates_args=())
def sampled_grad_op(dy: Tensor, x: Tensor, indices: Tensor, block_size: int, N: int, K: int,
                    dtype: torch.dtype) -> Tensor:
    """``(dYᵀ x)`` at the selected entries: [nnz] or [nb, b, b] in ``dtype`` (fp32 accumulation)."""
    return _sampled(dy.reshape(-1, N), x.reshape(-1, K), indices, block_size, N, K, dtype)


@sampled_grad_op.register_fake
def _(dy, x, indices, block_size, N, K, dtype):
    return dy.new_empty(_values_shape(indices.shape[0], block_size), dtype=dtype)


def delta_matmul_nt(x: Tensor, values: Tensor, indices: Tensor, block_size: int, N: int, K: int) -> Tensor:
    """``x Δᵀ``: x [..., K] (fp16/bf16/fp32/fp64) -> [..., N] in x.dtype. Validated; see the module doc."""
    check_delta(values, indices, block_size, N, K)
    _check_x(x, K)
    _check_devices(x=x, values=values)
    return delta_matmul_nt_op(x, values, indices, block_size, N, K)


def delta_matmul_nn(dy: Tensor, values: Tensor, indices: Tensor, block_size: int, N: int, K: int) -> Tensor:
    """``dY Δ``: dy [..., N] -> [..., K] in dy.dtype. Validated; see the module doc."""
    check_delta(values, indices, block_size, N, K)
    _check_x(dy, N, "dy")
    _check_devices(dy=dy, values=values)
    return delta_matmul_nn_op(dy, values, indices, block_size, N, K)


def sampled_grad(dy: Tensor, x: Tensor, indices: Tensor, block_size: int, N: int, K: int,
                 dtype: Optional[torch.dtype] = None) -> Tensor:
    """``(dYᵀ x)`` at ``indices`` only: dy [..., N], x [..., K] (same leading dims) -> [nnz] or [nb, b, b].

    Accumulated in float32 (float64 for float64 inputs) and returned in ``dtype`` (default float32;
    pass values.dtype for a gradient). Tile elements outside [N, K] are 0.
    """
    _check_dims(N, K)
    _check_block_size(block_size)
    _check_indices(indices, block_size, N, K)
    _check_x(dy, N, "dy")
    _check_x(x, K)
    if dy.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"dy and x must have the same leading dims, got {tuple(dy.shape)} and {tuple(x.shape)}")
    _check_devices(dy=dy, x=x, indices=indices)
    return sampled_grad_op(dy, x, indices, block_size, N, K, dtype or torch.float32)


# ------------------------------------------------------------------ frozen bases
def _row_step(n: int, k: int, align: int) -> int:
    """Rows per chunk: a multiple of ``align``, temporaries at most ~min(CHUNK_ELEMS, N*K/4) elements."""
    budget = min(ref_sparse.CHUNK_ELEMS, max(1, (n * k) // 4))
    return max(align, (budget // k) // align * align)


class _DenseBase:
    """W [N, K] dense (any strides: a transformers Conv1D passes its weight transposed)."""

    def __init__(self, weight: Tensor):
        self.w = weight
        self.n, self.k = weight.shape

    def _chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, int, Tensor]]:
        """(n0, n1, W[n0:n1] in dtype): one view when W already has the dtype, else cast in row chunks."""
        if self.w.dtype == dtype:
            yield 0, self.n, self.w
            return
        step = _row_step(self.n, self.k, 1)
        for n0 in range(0, self.n, step):
            n1 = min(self.n, n0 + step)
            yield n0, n1, self.w[n0:n1].to(dtype)

    def nt(self, x2: Tensor, bias: Optional[Tensor]) -> Tensor:
        """x2 Wᵀ + bias -> [M, N] in x2.dtype."""
        dt = x2.dtype
        b = None if bias is None else bias.to(dt)
        if self.w.dtype == dt:
            return torch.addmm(b, x2, self.w.t()) if b is not None else x2 @ self.w.t()
        y = x2.new_empty(x2.shape[0], self.n)
        for n0, n1, wc in self._chunks(dt):
            y[:, n0:n1] = x2 @ wc.t()
        return y if b is None else y.add_(b)

    def nn(self, dy2: Tensor) -> Tensor:
        """dy2 W -> [M, K] in dy2.dtype."""
        dx = None
        for n0, n1, wc in self._chunks(dy2.dtype):
            part = dy2[:, n0:n1] @ wc
            dx = part if dx is None else dx.add_(part)
        return dx


class _Quant4Base:
    """W [N, K] in blockwise 4-bit. Triton: the fused 4-bit kernels (workspace + cuBLAS for large M).
    Otherwise W is dequantized in chunks of whole rows whose flat start is a multiple of the quant
    blocksize (so each chunk is a self-contained slice of packed bytes and absmax), never all at once."""

    def __init__(self, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, n, k, device,
                 dtype):
        which = backend.select(device, has_cpu_impl=True)
        self.triton = which == "triton" and dtype in _FLOAT_DTYPES
        self.which = "reference" if which == "triton" and not self.triton else which
        self.packed, self.code, self.blocksize, self.n, self.k = packed, code, blocksize, n, k
        self.absmax = reference.decode_absmax(absmax, nested_absmax, nested_code, nested_offset)

    def _chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, int, Tensor]]:
        from .linear4bit import _dense_weight
        bs, k = self.blocksize, self.k
        step = _row_step(self.n, k, bs // math.gcd(k, bs))
        flat = self.packed.reshape(-1)
        for n0 in range(0, self.n, step):
            n1 = min(self.n, n0 + step)
            s, cnt = n0 * k, (n1 - n0) * k  # s is a multiple of bs (even): whole bytes, whole blocks
            w = _dense_weight(self.which, flat[s // 2:(s + cnt + 1) // 2], self.absmax[s // bs:_cdiv(s + cnt, bs)],
                              self.code, None, None, 0.0, bs, cnt, dtype)
            yield n0, n1, w.view(n1 - n0, k)

    def nt(self, x2: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self.triton:
            from ..kernels.matmul4bit import matmul_4bit_nt
            return matmul_4bit_nt(_c(x2), self.packed, self.absmax, self.code, self.blocksize, self.n, bias)
        dt = x2.dtype
        y = x2.new_empty(x2.shape[0], self.n)
        for n0, n1, wc in self._chunks(dt):
            y[:, n0:n1] = x2 @ wc.t()
        return y if bias is None else y.add_(bias.to(dt))

    def nn(self, dy2: Tensor) -> Tensor:
        if self.triton:
            from ..kernels.matmul4bit import matmul_4bit_nn
            return matmul_4bit_nn(_c(dy2), self.packed, self.absmax, self.code, self.blocksize, self.k)
        dx = dy2.new_zeros(dy2.shape[0], self.k)
        for n0, n1, wc in self._chunks(dy2.dtype):
            dx.addmm_(dy2[:, n0:n1], wc)
        return dx


# ------------------------------------------------------------------ shared forward / backward bodies
def _forward(base, x: Tensor, bias: Optional[Tensor], values: Tensor, indices: Tensor, block_size: int) -> Tensor:
    n, k = base.n, base.k
    x2 = x.reshape(-1, k)
    with torch.autocast(x.device.type, enabled=False):
        y = base.nt(x2, bias)
        _nt_into(y, x2, values, indices, block_size, n, k)
    return y.reshape(*x.shape[:-1], n)


def _setup(ctx, x, bias, values, indices, block_size, grow_indices, grow_scores, base_tensors) -> None:
    grow = grow_indices is not None
    # x is the only new memory kept alive, and only when dΔ (or a growth score) will need it.
    keep_x = values.requires_grad or grow
    ctx.save_for_backward(x if keep_x else None, values, indices, grow_indices, *base_tensors)
    ctx.grow_scores = grow_scores  # not saved: see the module doc (the layer may reset it between steps)
    ctx.block_size = block_size
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy: Tensor, base, x: Optional[Tensor], values: Tensor, indices: Tensor,
              grow_indices: Optional[Tensor], need_x: bool, need_bias: bool, need_values: bool):
    n, k, b = base.n, base.k, ctx.block_size
    dy2 = dy.reshape(-1, n)
    dx = dvalues = dbias = None
    with torch.autocast(dy.device.type, enabled=False):
        if need_x:
            dx = base.nn(dy2)
            _nn_into(dx, dy2, values, indices, b, n, k)
            dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        if x is not None:
            x2 = x.reshape(-1, k)
            if x2.dtype != dy2.dtype:
                x2 = x2.to(dy2.dtype)
            if need_values:
                dvalues = _sampled(dy2, x2, indices, b, n, k, values.dtype)
            if grow_indices is not None and grow_indices.numel():
                _sampled(dy2, x2, grow_indices, b, n, k, torch.float32, accumulate_into=ctx.grow_scores)
        if need_bias:
            dbias = dy2.sum(0, dtype=torch.float64 if dy2.dtype == torch.float64 else torch.float32).to(ctx.bias_dtype)
    return dx, dbias, dvalues


# ------------------------------------------------------------------ dense base op
@torch.library.custom_op("peft_kernels::sparse_linear_dense", mutates_args=())
def sparse_linear_dense_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], values: Tensor, indices: Tensor,
                           block_size: int, grow_indices: Optional[Tensor] = None,
                           grow_scores: Optional[Tensor] = None) -> Tensor:
    """``y = x (W + Δ)ᵀ + b``: x [..., K], W [N, K] -> y [..., N] in x.dtype.

    Unvalidated: call :func:`sparse_linear_dense`."""
    return _forward(_DenseBase(weight), x, bias, values, indices, block_size)


@sparse_linear_dense_op.register_fake
def _(x, weight, bias, values, indices, block_size, grow_indices=None, grow_scores=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _dense_setup(ctx, inputs, output):
    x, weight, bias, values, indices, block_size, grow_indices, grow_scores = inputs
    _setup(ctx, x, bias, values, indices, block_size, grow_indices, grow_scores, (weight,))


def _dense_backward(ctx, dy):
    x, values, indices, grow_indices, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dbias, dvalues = _backward(ctx, dy, _DenseBase(weight), x, values, indices, grow_indices,
                                   need[0], ctx.bias_dtype is not None and need[2], need[3])
    return dx, None, dbias, dvalues, None, None, None, None


sparse_linear_dense_op.register_autograd(_dense_backward, setup_context=_dense_setup)


def sparse_linear_dense(x: Tensor, weight: Tensor, bias: Optional[Tensor], values: Tensor, indices: Tensor,
                        block_size: int, grow_indices: Optional[Tensor] = None,
                        grow_scores: Optional[Tensor] = None) -> Tensor:
    """``y = x (W + Δ)ᵀ + b`` over a frozen dense W [N, K] (any strides); x [..., K] -> y [..., N] in x.dtype.

    bias [N] or None; values/indices/block_size: the delta (module doc). Differentiable in x, bias, values.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [N, K] tensor, got shape {tuple(getattr(weight, 'shape', ()))}")
    n, k = weight.shape
    check_delta(values, indices, block_size, n, k)
    _check_x(x, k)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    _check_grow(grow_indices, grow_scores, indices, block_size, n, k)
    _check_devices(x=x, weight=weight, bias=bias, values=values, indices=indices)
    return sparse_linear_dense_op(x, weight, bias, values, indices, block_size, grow_indices, grow_scores)


# ------------------------------------------------------------------ 4-bit base op
@torch.library.custom_op("peft_kernels::sparse_linear_4bit", mutates_args=())
def sparse_linear_4bit_op(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                          nested_code: Optional[Tensor], nested_offset: float, blocksize: int, out_features: int,
                          bias: Optional[Tensor], values: Tensor, indices: Tensor, block_size: int,
                          grow_indices: Optional[Tensor] = None, grow_scores: Optional[Tensor] = None) -> Tensor:
    """``y = x (W + Δ)ᵀ + b`` with W the 4-bit weight [out_features, K] (unvalidated: use sparse_linear_4bit)."""
    base = _Quant4Base(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features,
                       x.shape[-1], x.device, x.dtype)
    return _forward(base, x, bias, values, indices, block_size)


@sparse_linear_4bit_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias, values,
      indices, block_size, grow_indices=None, grow_scores=None):
    return x.new_empty((*x.shape[:-1], out_features))


def _q4_setup(ctx, inputs, output):
    (x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias, values,
     indices, block_size, grow_indices, grow_scores) = inputs
    _setup(ctx, x, bias, values, indices, block_size, grow_indices, grow_scores,
           (packed, absmax, code, nested_absmax, nested_code))
    ctx.q4 = (nested_offset, blocksize, out_features)


def _q4_backward(ctx, dy):
    x, values, indices, grow_indices, packed, absmax, code, nested_absmax, nested_code = ctx.saved_tensors
    nested_offset, blocksize, out_features = ctx.q4
    base = _Quant4Base(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features,
                       ctx.x_shape[-1], dy.device, dy.dtype)
    need = ctx.needs_input_grad
    dx, dbias, dvalues = _backward(ctx, dy, base, x, values, indices, grow_indices, need[0],
                                   ctx.bias_dtype is not None and need[9], need[10])
    return dx, None, None, None, None, None, None, None, None, dbias, dvalues, None, None, None, None


sparse_linear_4bit_op.register_autograd(_q4_backward, setup_context=_q4_setup)


def sparse_linear_4bit(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                       nested_code: Optional[Tensor], nested_offset: float, blocksize: int, out_features: int,
                       bias: Optional[Tensor], values: Tensor, indices: Tensor, block_size: int,
                       grow_indices: Optional[Tensor] = None, grow_scores: Optional[Tensor] = None) -> Tensor:
    """``y = x (W + Δ)ᵀ + b`` over a frozen 4-bit W [out_features, K] (quantized tensors as in ops/linear4bit.py).

    x [..., K] -> y [..., out_features] in x.dtype. Differentiable in x, bias, values.
    """
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features <= 0:
        raise ValueError(f"out_features must be a positive int, got {out_features!r}")
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError("x must be a tensor [..., K]")
    n, k = out_features, x.shape[-1]
    check_delta(values, indices, block_size, n, k)
    _check_x(x, k)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.numel() < (n * k + 1) // 2:
        raise ValueError(f"packed must be uint8 with >= {(n * k + 1) // 2} bytes for a [{n}, {k}] 4-bit weight, got "
                         f"{getattr(packed, 'dtype', None)} with {getattr(packed, 'numel', lambda: '?')()} elements")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two, got {blocksize!r}")
    if absmax.numel() < _cdiv(n * k, blocksize):
        raise ValueError(f"absmax must have >= {_cdiv(n * k, blocksize)} blocks for a [{n}, {k}] weight in blocks of "
                         f"{blocksize}, got {absmax.numel()}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    _check_grow(grow_indices, grow_scores, indices, block_size, n, k)
    _check_devices(x=x, packed=packed, absmax=absmax, code=code, bias=bias, values=values, indices=indices)
    return sparse_linear_4bit_op(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                                 out_features, bias, values, indices, block_size, grow_indices, grow_scores)
