"""``SparseLinear``: a trainable sparse delta Δ over a frozen ``nn.Linear``, transformers ``Conv1D`` or 4-bit
``Linear4bit`` base (sparse fine-tuning, issue #8).

    y = x (W + Δ)ᵀ + b          W [N, K] frozen, Δ [N, K] nonzero only at the selected entries

Δ is stored in one of two layouts (``.notes/SPARSE_API.md``, shared with ``ops/sparse.py`` and the files):

* unstructured (``block_size=0``): buffer ``delta_indices`` int64 [nnz] of flat row-major positions
  ``n*K + k``, strictly increasing; Parameter ``delta_values`` [nnz];
* block (``block_size`` 16 or 32): Δ tiled into b×b tiles over a [ceil(N/b), ceil(K/b)] grid;
  ``delta_indices`` int64 [nb] flat tile positions ``bn*ceil(K/b) + bk``, strictly increasing;
  ``delta_values`` [nb, b, b] (``values[t, i, j]`` is Δ[bn*b + i, bk*b + j]); tile elements outside
  [N, K] (ragged edge) are never read and get a zero gradient.

Forward and backward are one custom op (``ops/sparse.py``): the values' gradient is a sampled dense-dense
product at the selected entries only (never a dense [N, K] gradient, never a dense copy of W or Δ) and
dX = dY (W + Δ). What autograd saves: x, nothing else new.

Growth scoring (drop-and-grow, ``methods/sparse.py``): :meth:`SparseLinear.set_grow_candidates_` gives the
layer a set of candidate positions disjoint from ``delta_indices``; while it is set, every backward adds the
signed gradient of the loss with respect to Δ at those positions into ``grow_scores`` (float32, [c] or
[c, b, b]) through the op's grow hook.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ._base import INPUT_DTYPES, WrapsBase, base_kind, base_shape, check_input, quant_args

BLOCK_SIZES = (0, 16, 32)
MERGE_MODES = ("exact", "requantize", "dequantize")


# ====================================================================== layout helpers
def check_block_size(block_size) -> int:
    """``block_size`` as an int in :data:`BLOCK_SIZES` (0: unstructured), else ValueError."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES} (0: unstructured; 16/32: b×b tiles), "
                         f"got {block_size!r}")
    return block_size


def grid_shape(n: int, k: int, block_size: int) -> tuple[int, int]:
    """Shape of the position grid indices live in: [N, K] entries, or [ceil(N/b), ceil(K/b)] tiles."""
    if block_size == 0:
        return n, k
    return -(-n // block_size), -(-k // block_size)


def num_positions(n: int, k: int, block_size: int) -> int:
    """How many distinct positions an index can name (N*K entries, or the number of tiles)."""
    r, c = grid_shape(n, k, block_size)
    return r * c


def values_shape(nnz: int, block_size: int) -> tuple[int, ...]:
    """``(nnz,)`` unstructured, ``(nnz, b, b)`` for tiles."""
    return (nnz,) if block_size == 0 else (nnz, block_size, block_size)


def check_indices(indices, n: int, k: int, block_size: int, what: str = "delta_indices",
                  require_sorted: bool = True) -> None:
    """Validate positions for an [N, K] delta: int64, 1-D, non-empty, in range, unique (strictly increasing
    when ``require_sorted``). Raises TypeError / ValueError naming ``what`` and the offending entry."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of int64 positions, got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise TypeError(f"{what} must be int64, got {str(indices.dtype).replace('torch.', '')}")
    total = num_positions(n, k, block_size)
    unit = ("entry positions n*K + k" if block_size == 0
            else f"tile positions over a {grid_shape(n, k, block_size)} grid")
    if indices.dim() != 1:
        raise ValueError(f"{what} must be 1-D ({unit}), got shape {tuple(indices.shape)}")
    if indices.numel() == 0:
        raise ValueError(f"{what} is empty: a sparse delta needs at least one selected position")
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= total:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what} holds {bad}, out of range [0, {total}) for a [{n}, {k}] weight "
                         f"({unit})")
    if indices.numel() > 1:
        step = indices[1:] - indices[:-1]
        if require_sorted:
            if (step <= 0).any():
                i = int(torch.nonzero(step <= 0)[0])
                a, b = int(indices[i]), int(indices[i + 1])
                kind = "duplicate index" if a == b else "indices not strictly increasing"
                raise ValueError(f"{what}: {kind} at positions {i}, {i + 1} ({a}, {b}); positions must be "
                                 f"sorted and unique")
        else:
            s = torch.sort(indices).values
            dup = s[1:] == s[:-1]
            if dup.any():
                raise ValueError(f"{what}: duplicate index {int(s[1:][dup][0])}; each position may be selected "
                                 f"once")


def check_values(values, nnz: int, block_size: int, what: str = "delta_values") -> None:
    """Validate delta values: a finite float tensor of shape ``values_shape(nnz, block_size)``."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(values).__name__}")
    if not values.is_floating_point():
        raise TypeError(f"{what} must be a float tensor, got {str(values.dtype).replace('torch.', '')}")
    want = values_shape(nnz, block_size)
    if tuple(values.shape) != want:
        lay = ("unstructured: one value per index" if block_size == 0
               else f"one {block_size}x{block_size} tile per index")
        raise ValueError(f"{what} has shape {tuple(values.shape)}, expected {want} ({lay})")
    if not torch.isfinite(values).all():
        raise ValueError(f"{what} contains NaN or Inf values")


def normalize_delta(indices, values, n: int, k: int, block_size: int, dtype: torch.dtype,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked ``(indices, values)`` on ``device``, sorted by position (values permuted with them);
    ``values=None`` gives zeros in ``dtype``. Everything is checked before anything is returned."""
    check_block_size(block_size)
    check_indices(indices, n, k, block_size, require_sorted=False)
    nnz = indices.numel()
    if values is not None:
        check_values(values, nnz, block_size)
    idx = indices.detach().to(device)
    if idx.numel() > 1 and bool((idx[1:] <= idx[:-1]).any()):
        idx, order = torch.sort(idx)
        if values is not None:
            values = values.detach().to(device)[order]
    if values is None:
        vals = torch.zeros(values_shape(nnz, block_size), dtype=dtype, device=device)
    else:
        vals = values.detach().to(device=device, dtype=dtype).clone()
    return idx.contiguous(), vals.contiguous()


def indices_from_mask(mask, n: int, k: int, block_size: int = 0) -> torch.Tensor:
    """Sorted int64 positions of the True entries of a bool ``mask``: [N, K] unstructured, or the tile grid
    [ceil(N/b), ceil(K/b)] for ``block_size`` b. Wrong shape, non-bool or all-False masks are errors."""
    check_block_size(block_size)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {str(mask.dtype).replace('torch.', '')}")
    want = grid_shape(n, k, block_size)
    if tuple(mask.shape) != want:
        what = "[N, K]" if block_size == 0 else f"the {block_size}x{block_size} tile grid [ceil(N/b), ceil(K/b)]"
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {want} ({what} of a [{n}, {k}] weight)")
    idx = torch.nonzero(mask.reshape(-1)).reshape(-1)
    if idx.numel() == 0:
        raise ValueError("mask selects no entries (all False)")
    return idx


def element_coords(indices: torch.Tensor, block_size: int, n: int, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(rows, cols, which) of the in-range weight entries a delta covers.

    Unstructured: rows/cols [nnz] and ``which`` None (entry i is values[i]). Block: the tiles' elements
    inside [N, K] only; ``which`` indexes ``values.reshape(-1)``. Memory O(nnz) (or nb*b*b), never N*K.
    """
    if block_size == 0:
        return indices // k, indices % k, None
    b = block_size
    gk = -(-k // b)
    off = torch.arange(b, device=indices.device)
    r = ((indices // gk) * b)[:, None, None] + off[None, :, None]        # [nb, b, 1]
    c = ((indices % gk) * b)[:, None, None] + off[None, None, :]         # [nb, 1, b]
    r, c = torch.broadcast_tensors(r, c)
    valid = ((r < n) & (c < k)).reshape(-1)
    which = torch.nonzero(valid).reshape(-1)
    return r.reshape(-1)[which], c.reshape(-1)[which], which


def _ops():
    from ..ops import sparse as sparse_ops  # imported on first use: ops never import nn
    return sparse_ops


# ====================================================================== the layer
class SparseLinear(WrapsBase, nn.Module):
    """A frozen linear base plus a trainable sparse delta: ``y = x (W + Δ)ᵀ + b``.

    Args:
        base_layer: ``nn.Linear`` (weight [N, K]), transformers ``Conv1D`` (weight [K, N]) or
            ``peft_kernels.nn.Linear4bit``. Its parameters are frozen here.
        indices: int64 [nnz] positions (see the module docstring for both layouts); any order, no
            duplicates — they are sorted, with ``values`` permuted alongside.
        values: float [nnz] or [nb, b, b] initial delta values; None: zeros (the layer starts as its base).
        block_size: 0 (unstructured), 16 or 32 (tiles).
        dtype: dtype of ``delta_values`` (float32 default, like PEFT's adapter weights under mixed precision).

    Input x [..., K] float32/float16/bfloat16 (float64 on a dense base); output [..., N] in x's dtype over
    a 4-bit base (like ``Linear4bit``), in the compute dtype over a dense one (like ``nn.Linear``).

    State: buffer ``delta_indices`` (persistent), Parameter ``delta_values``; non-persistent buffers
    ``grow_indices`` / ``grow_scores`` (None unless growth scoring is on). ``merged``: the delta is in
    the base weight and forward is the base alone; ``disabled``: forward is the base alone.
    """

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor, values: Optional[torch.Tensor] = None,
                 block_size: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self._kind = base_kind(base_layer, "SparseLinear")
        if dtype not in INPUT_DTYPES:
            raise TypeError(f"delta dtype must be a float dtype, got {dtype}")
        self.out_features, self.in_features = self._shape(base_layer)
        self.block_size = check_block_size(block_size)
        idx, vals = normalize_delta(indices, values, self.out_features, self.in_features, block_size, dtype,
                                    base_layer.weight.device)
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.register_buffer("delta_indices", idx)
        self.delta_values = nn.Parameter(vals)
        self.register_buffer("grow_indices", None, persistent=False)
        self.register_buffer("grow_scores", None, persistent=False)
        self.merged = False
        self.disabled = False
        self._unmerge_values: Optional[torch.Tensor] = None

    @classmethod
    def from_mask(cls, base_layer: nn.Module, mask: torch.Tensor, values: Optional[torch.Tensor] = None,
                  block_size: int = 0, dtype: torch.dtype = torch.float32) -> "SparseLinear":
        """Build from a bool ``mask`` ([N, K], or the tile grid for ``block_size`` > 0); ``values`` are in
        the mask's row-major order of True entries."""
        n, k = cls._shape(base_layer)
        return cls(base_layer, indices_from_mask(mask, n, k, block_size), values, block_size, dtype)

    # ------------------------------------------------------------------ base access
    # weight, bias, _dense_weight() and _compute_dtype() come from _base.WrapsBase.
    @staticmethod
    def _shape(base: nn.Module) -> tuple[int, int]:
        """(N, K) of a base layer this class can wrap (TypeError otherwise)."""
        return base_shape(base, "SparseLinear")

    @property
    def nnz(self) -> int:
        """Number of selected positions (entries, or tiles with ``block_size`` > 0)."""
        return self.delta_indices.numel()

    @property
    def num_entries(self) -> int:
        """Weight entries the delta can change (tile elements outside [N, K] excluded)."""
        if self.block_size == 0:
            return self.nnz
        return element_coords(self.delta_indices, self.block_size, self.out_features, self.in_features)[0].numel()

    @property
    def density(self) -> float:
        """``num_entries / (N*K)``."""
        return self.num_entries / (self.out_features * self.in_features)

    # ------------------------------------------------------------------ delta management
    @torch.no_grad()
    def set_delta_(self, indices: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
        """Replace the selection (and values; None: zeros) in place, everything checked first.

        With the same nnz the existing ``delta_indices`` buffer and ``delta_values`` Parameter storages are
        overwritten (optimizers, compiled graphs holding them stay valid; their per-entry state is the
        caller's to permute, see ``methods.sparse.DropAndGrow``). A different nnz re-points the same
        Parameter object at new storage (``.data``); optimizer state for it must then be reset.
        Clears growth candidates (they may overlap the new selection).
        """
        if self.merged:
            raise ValueError("the delta is merged into the base weight; unmerge before changing it")
        p = self.delta_values
        idx, vals = normalize_delta(indices, values, self.out_features, self.in_features, self.block_size, p.dtype,
                                    p.device)
        if idx.shape == self.delta_indices.shape:
            self.delta_indices.copy_(idx)
            p.copy_(vals)
        else:
            self.delta_indices = idx
            p.data = vals
            p.grad = None
        self.clear_grow_candidates_()

    @torch.no_grad()
    def set_grow_candidates_(self, indices: torch.Tensor) -> None:
        """Start growth scoring: ``indices`` int64 [c] positions (same layout as ``delta_indices``), sorted,
        unique and disjoint from the selection. ``grow_scores`` becomes float32 zeros [c] (or [c, b, b])
        and every later backward adds dL/dΔ at those positions into it."""
        check_indices(indices, self.out_features, self.in_features, self.block_size, what="grow candidates")
        idx = indices.to(self.delta_indices.device)
        if torch.isin(idx, self.delta_indices).any():
            bad = int(idx[torch.isin(idx, self.delta_indices)][0])
            raise ValueError(f"grow candidate {bad} is already selected; candidates must be disjoint from "
                             f"delta_indices")
        self.grow_indices = idx.contiguous()
        self.grow_scores = torch.zeros(values_shape(idx.numel(), self.block_size), dtype=torch.float32,
                                       device=idx.device)

    def clear_grow_candidates_(self) -> None:
        """Stop growth scoring (forward no longer passes the grow hook)."""
        self.grow_indices = None
        self.grow_scores = None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        check_input(x, "SparseLinear", self.out_features, self.in_features)
        if x.numel() == 0:
            return self.base_layer(x)
        in_dtype = x.dtype
        cdt = self._compute_dtype(x)
        xc = x if x.dtype == cdt else x.to(cdt)
        base = self.base_layer
        bias = base.bias
        if bias is not None and bias.dtype != cdt:
            bias = bias.to(cdt)
        grow = {}
        if self.grow_indices is not None and torch.is_grad_enabled():
            grow = {"grow_indices": self.grow_indices, "grow_scores": self.grow_scores}
        ops = _ops()
        if self._kind == "4bit":
            y = ops.sparse_linear_4bit(xc, *quant_args(base), self.out_features, bias, self.delta_values,
                                       self.delta_indices, self.block_size, **grow)
            return y if y.dtype == in_dtype else y.to(in_dtype)
        # A base weight in another dtype than the compute dtype (autocast over an fp32 base) is cast by the
        # op in row chunks, so no [N, K] copy is made here.
        return ops.sparse_linear_dense(xc, self._dense_weight(), bias, self.delta_values, self.delta_indices,
                                       self.block_size, **grow)

    # ------------------------------------------------------------------ merge
    def _entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, values) of the in-range delta entries (values detached, in delta_values' dtype)."""
        r, c, which = element_coords(self.delta_indices, self.block_size, self.out_features, self.in_features)
        v = self.delta_values.detach().reshape(-1)
        return r, c, (v if which is None else v[which])

    @torch.no_grad()
    def merge(self, mode: str = "exact", dtype: Optional[torch.dtype] = None) -> None:
        """Add Δ into the base weight; afterwards forward is the base alone.

        Dense base (any ``mode``): ``W[n, k] = round(W[n, k] + Δ[n, k])`` in W's dtype, only at the selected
        entries (the sum is formed in float64, then rounded once), undoable by :meth:`unmerge` (the replaced
        entries are kept: O(nnz) memory). 4-bit base: ``mode="requantize"`` quantizes ``dequant(W4) + Δ``
        back into the 4-bit layer (one more NF4 rounding; not undoable); ``mode="dequantize"`` replaces the
        base by an ``nn.Linear`` in ``dtype`` (default: the dtype W4 was quantized from) holding
        ``dequant(W4) + Δ`` — what was trained, up to that dtype's rounding. ``"exact"`` is refused there.
        """
        if mode not in MERGE_MODES:
            raise ValueError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")
        if self.merged:
            return
        rows, cols, v = self._entries()
        if self._kind == "4bit":
            if mode == "exact":
                raise ValueError("a 4-bit base cannot be merged exactly: use mode='dequantize' (a 16-bit base "
                                 "holding exactly what was trained) or mode='requantize' (stays 4-bit, adds one "
                                 "rounding)")
            base = self.base_layer
            w = base.dequantize(torch.float32)  # merging needs the whole weight once (not a training step)
            if mode == "requantize":
                w.index_put_((rows, cols), (w[rows, cols].double() + v.double()).float())
                base.quantize_(w.to(base.weight_dtype))
                base.weight.requires_grad_(False)
                self.merged, self._unmerge_values = True, None
                return
            dt = dtype or base.weight_dtype
            dense = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=w.device,
                              dtype=dt)
            dense.weight.copy_(w.to(dt))
            if base.bias is not None:
                dense.bias.copy_(base.bias.detach().to(dt))
            dense.requires_grad_(False)
            if base.bias is not None and base.bias.requires_grad:
                dense.bias.requires_grad_(True)
            self.base_layer, self._kind = dense, "linear"
        wv = self._dense_weight()
        old = wv[rows, cols].clone()
        wv.index_put_((rows, cols), (old.double() + v.double()).to(wv.dtype))
        self._unmerge_values = old
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` exactly (the original entries are written back). A 4-bit base merged with
        ``mode="requantize"`` cannot be unmerged; after ``"dequantize"`` the base stays the dense layer
        holding ``dequant(W4)``."""
        if not self.merged:
            return
        if self._unmerge_values is None:
            raise ValueError("this delta was merged into its 4-bit base with mode='requantize'; that cannot be "
                             "undone (reload the base, or merge with mode='dequantize')")
        rows, cols, _ = self._entries()
        self._dense_weight().index_put_((rows, cols), self._unmerge_values)
        self._unmerge_values = None
        self.merged = False

    def unwrap(self) -> nn.Module:
        """The base layer (after :meth:`merge` it holds W + Δ; otherwise the delta is dropped)."""
        return self.base_layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"nnz={self.nnz}, density={self.density:.4g}, merged={self.merged}")


def default_nnz(n: int, k: int, density: float, block_size: int) -> int:
    """Positions to select for ``density``: ``max(1, round(density * P))`` with P = N*K entries or the number
    of tiles (so a block layout selects ``density`` of the tile grid)."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not math.isfinite(density) \
            or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    total = num_positions(n, k, block_size)
    return min(total, max(1, round(density * total)))
