"""``IA3Linear``: (IA)³ scaling vectors over a frozen ``nn.Linear``, transformers ``Conv1D`` or 4-bit ``Linear4bit``.

Module structure and state-dict keys are those of Hugging Face PEFT 0.21's ``IA3Layer`` (so adapter files
and state dicts move both ways): ``base_layer.*`` and ``ia3_l.<adapter>`` — a float32 Parameter of shape
``[out_features, 1]`` for an output-scaling layer (keys, values) and ``[1, in_features]`` for a feed-forward
layer (PEFT's ``is_feedforward``), initialised to ones.

Forward, with ``l = Π_i l_i`` over the active adapters (PEFT multiplies several adapters' vectors)::

    output scaling   (feedforward=False):  y = base(x) ⊙ l          l [N]
    input scaling    (feedforward=True):   y = base(x ⊙ l)          l [K]

The product ``t ⊙ l`` is formed in the promoted dtype (float32 for 16-bit activations) and rounded once to
``t``'s dtype, as PEFT does, so a float32 model computes exactly PEFT's numbers.

Backward (:class:`_ScaleLastDim`): ``dt = dY ⊙ l`` and ``dl_i = Σ_rows (t ⊙ dY) · Π_{j≠i} l_j`` accumulated in
float32 (float64 for float64 inputs) over row chunks. The only activation kept for backward is ``t`` —
``base(x)`` [M, N] for output scaling, ``x`` [M, K] for input scaling — and it is kept **only when some
``l`` requires grad**; with frozen vectors (inference, or another adapter training) nothing of the
activations is saved. The base layer keeps what it keeps anyway: a frozen dense linear saves its weight
(no new memory), ``Linear4bit``'s op saves its quantized buffers and nothing of x.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ._base import INPUT_DTYPES, WrapsBase, base_kind, base_shape, check_input

MERGE_MODES = ("exact", "requantize", "dequantize")
#: Rows of (t ⊙ dY) reduced at once in the backward: bounds the float32 temporary to 16 MiB per 1M elements.
_REDUCE_CHUNK_ELEMS = 1 << 22


def _scale_product(ls: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Π_i l_i flattened to [F] in ``dtype`` (the vectors' own values, no autograd)."""
    prod = ls[0].detach().reshape(-1).to(dtype)
    for l_ in ls[1:]:
        prod = prod * l_.detach().reshape(-1).to(dtype)
    return prod


def _column_dot(t: torch.Tensor, g: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Σ over all leading dims of ``t ⊙ g`` (both [..., F]) -> [F] in ``acc``, in row chunks so the
    widened temporary stays small (16-bit inputs are not rounded before they are multiplied)."""
    f = t.shape[-1]
    t2, g2 = t.reshape(-1, f), g.reshape(-1, f)
    out = torch.zeros(f, dtype=acc, device=t.device)
    step = max(1, _REDUCE_CHUNK_ELEMS // max(f, 1))
    for s in range(0, t2.shape[0], step):
        out += (t2[s:s + step].to(acc) * g2[s:s + step].to(acc)).sum(0)
    return out


class _ScaleLastDim(torch.autograd.Function):
    """``out = t ⊙ Π_i l_i`` along the last dim of ``t`` [..., F]; each ``l_i`` holds F elements.

    Saves ``t`` only when some ``l_i`` requires grad (dl needs it; dt needs only the vectors).
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor, *ls: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(t.dtype, ls[0].dtype)
        for l_ in ls[1:]:
            work = torch.promote_types(work, l_.dtype)
        prod = _scale_product(list(ls), work)
        out = torch.empty_like(t)
        # Multiplied in the promoted dtype and rounded once into t's dtype (PEFT's numbers), without a
        # promoted [M, F] temporary.
        torch.mul(t, prod, out=out)
        need_l = any(ctx.needs_input_grad[1:])
        ctx.save_for_backward(t if need_l else None, *ls)
        ctx.work = work
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        t, *ls = ctx.saved_tensors
        work = ctx.work
        grads: list[Optional[torch.Tensor]] = [None] * (1 + len(ls))
        if ctx.needs_input_grad[0]:
            g_t = torch.empty_like(grad)
            torch.mul(grad, _scale_product(ls, work), out=g_t)
            grads[0] = g_t
        if any(ctx.needs_input_grad[1:]):
            acc = torch.float64 if work == torch.float64 else torch.float32
            s = _column_dot(t, grad, acc)
            for i, l_ in enumerate(ls):
                if not ctx.needs_input_grad[1 + i]:
                    continue
                others = [o for j, o in enumerate(ls) if j != i]
                gi = s * _scale_product(others, acc) if others else s
                grads[1 + i] = gi.to(l_.dtype).reshape(l_.shape)
        return tuple(grads)


def ia3_scale(t: torch.Tensor, ls: list[torch.Tensor]) -> torch.Tensor:
    """``t ⊙ Π l_i`` along the last dim (see :class:`_ScaleLastDim`); ``t`` [..., F], each ``l_i`` F elements."""
    return _ScaleLastDim.apply(t, *ls)


class IA3Linear(WrapsBase, nn.Module):
    """A frozen linear base plus named (IA)³ scaling vectors (PEFT's ``IA3Layer`` layout).

    Args:
        base_layer: ``nn.Linear`` (weight [N, K]), transformers ``Conv1D`` (weight [K, N]; PEFT's
            ``fan_in_fan_out``) or ``peft_kernels.nn.Linear4bit``. Its parameters are frozen here.
        adapter_name: the first adapter (made active), or None for none.
        feedforward: True scales the input (``ia3_l`` [1, K]); False scales the output (``ia3_l`` [N, 1]).
        init_ia3_weights: True (ones: the layer starts as its base) or False (standard normal, for tests).

    Input x [..., K] float32/float16/bfloat16 (or float64 over a dense base); output [..., N] as the base
    layer gives it (x's dtype over a 4-bit base; the compute dtype over a dense one).

    Attributes (PEFT's names): ``ia3_l`` (ParameterDict), ``is_feedforward``, ``fan_in_fan_out``,
    ``active_adapters`` (list), ``disabled``, ``merged_adapters``.

    Merging: a dense base merges in place — output scaling multiplies W's rows and the bias by l, input
    scaling W's columns — and :meth:`unmerge` divides by the very factors it multiplied (work precision
    float32, float64 for a float64 base): the only error is the rounding of the merged weight to its dtype.
    A 4-bit base offers ``mode="requantize"`` (quantize ``dequant(W4) ⊙ l`` back into the 4-bit layer: one
    more NF4 rounding, not undoable) and ``mode="dequantize"`` (replace the base by an ``nn.Linear`` holding
    ``dequant(W4) ⊙ l``: exactly the trained function up to the 16-bit rounding; undoable to a dense base).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: Optional[str] = "default", feedforward: bool = False,
                 init_ia3_weights: bool = True):
        super().__init__()
        self._kind = base_kind(base_layer, "IA3Linear")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.is_feedforward = bool(feedforward)
        self.fan_in_fan_out = self._kind == "conv1d"
        self.out_features, self.in_features = base_shape(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.merged_adapters: list[str] = []
        # name -> the float factor [F] merged into the base (to divide by exactly that); None after requantize.
        self._merge_info: Optional[dict] = None
        if adapter_name is not None:
            self.add_adapter(adapter_name, init_ia3_weights=init_ia3_weights)
            self.set_adapter(adapter_name)

    # ------------------------------------------------------------------ base access
    # weight, bias, _dense_weight() and _compute_dtype() come from _base.WrapsBase.
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def num_features(self) -> int:
        """Length of each scaling vector: in_features (feed-forward) or out_features."""
        return self.in_features if self.is_feedforward else self.out_features

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, init_ia3_weights: bool = True,
                    dtype: torch.dtype = torch.float32) -> None:
        """Add adapter ``adapter_name`` (not made active; see :meth:`set_adapter`): ``ia3_l[adapter_name]``
        [1, K] (feed-forward) or [N, 1], ones (``init_ia3_weights=True``, PEFT's default) or N(0, 1)."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter name must be a non-empty string without '.', got {adapter_name!r}")
        if adapter_name in self.ia3_l:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer; delete it first")
        if hasattr(self.ia3_l, adapter_name):  # ia3_l is a ParameterDict (PEFT's layout): names are attributes
            raise ValueError(f"adapter name {adapter_name!r} is taken by a ParameterDict attribute; choose another")
        if not isinstance(init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights must be True or False, got {init_ia3_weights!r}")
        if dtype not in INPUT_DTYPES:
            raise TypeError(f"adapter dtype must be a float dtype, got {dtype}")
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        dev = self.base_layer.weight.device
        value = torch.ones(shape, dtype=dtype, device=dev) if init_ia3_weights else \
            torch.randn(shape, device=dev).to(dtype)
        # A new adapter trains only once it is made active (PEFT's semantics).
        self.ia3_l[adapter_name] = nn.Parameter(value, requires_grad=adapter_name in self.active_adapters)

    def _check_names(self, names) -> list[str]:
        out = list(names)
        for n in out:
            if n not in self.ia3_l:
                raise KeyError(f"unknown adapter {n!r}; this layer has {sorted(self.ia3_l)}")
        return out

    def set_adapter(self, adapter_names: Union[str, list[str]]) -> None:
        """Make these adapters the active ones (trainable; their vectors multiply); the others are frozen."""
        names = self._check_names([adapter_names] if isinstance(adapter_names, str) else adapter_names)
        self.active_adapters = names
        for n, p in self.ia3_l.items():
            p.requires_grad_(n in names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (it must not be merged)."""
        self._check_names([adapter_name])
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base; unmerge before deleting it")
        del self.ia3_l[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def scaling(self, adapter_names: Optional[list[str]] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Π l_i over ``adapter_names`` (default: the active, unmerged ones) as a detached [F] tensor."""
        names = self._check_names(adapter_names if adapter_names is not None else self._live())
        if not names:
            return torch.ones(self.num_features, dtype=dtype, device=self.base_layer.weight.device)
        return _scale_product([self.ia3_l[n] for n in names], dtype)

    def _live(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.ia3_l and a not in self.merged_adapters]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()  # PEFT's behaviour: disabling a merged layer unmerges it
            return self.base_layer(x)
        # Active adapters that are not merged still scale (PEFT returns the bare base once anything is merged).
        live = self._live()
        if not live:
            return self.base_layer(x)
        check_input(x, "IA3Linear", self.out_features, self.in_features)
        ls = [self.ia3_l[a] for a in live]
        if self.is_feedforward:
            return self.base_layer(ia3_scale(x, ls))
        return ia3_scale(self.base_layer(x), ls)

    # ------------------------------------------------------------------ merge
    def _scale_weight(self, w: torch.Tensor, f: torch.Tensor, inverse: bool) -> torch.Tensor:
        """W [N, K] (work precision) with rows (output scaling) or columns (input scaling) times f (or / f)."""
        f = f.to(w.dtype)
        f = f[None, :] if self.is_feedforward else f[:, None]
        return w / f if inverse else w * f

    @torch.no_grad()
    def merge(self, adapter_names: Optional[list[str]] = None, mode: str = "exact",
              dtype: Optional[torch.dtype] = None) -> None:
        """Merge adapters (default: the active, unmerged ones) into the base weight (and, for output
        scaling, the bias). Dense base: in place (``mode`` is irrelevant). 4-bit base: ``mode="requantize"``
        (stays 4-bit, not undoable) or ``mode="dequantize"`` (becomes an ``nn.Linear`` in ``dtype``, default
        the dtype the 4-bit weight came from)."""
        if mode not in MERGE_MODES:
            raise ValueError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")
        names = self._check_names(adapter_names if adapter_names is not None else self._live())
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return
        base = self.base_layer
        if self._kind == "4bit":
            if mode == "exact":
                raise ValueError("a 4-bit base cannot be merged exactly: use mode='dequantize' (a 16-bit base "
                                 "holding exactly what was trained) or mode='requantize' (stays 4-bit, adds "
                                 "one rounding)")
            factors = {n: self.scaling([n]) for n in names}
            f = _scale_product(list(factors.values()), torch.float32)
            w = self._scale_weight(base.dequantize(torch.float32), f, inverse=False)
            if mode == "requantize":
                base.quantize_(w.to(base.weight_dtype))
                base.weight.requires_grad_(False)
                if base.bias is not None and not self.is_feedforward:
                    base.bias.copy_((base.bias.float() * f).to(base.bias.dtype))
                self.merged_adapters = self.merged_adapters + names
                self._merge_info = None  # a rounding into NF4 cannot be divided out
                return
            dt = dtype or base.weight_dtype
            dense = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                              device=w.device, dtype=dt)
            dense.weight.copy_(w.to(dt))
            if base.bias is not None:
                b = base.bias.float() if self.is_feedforward else base.bias.float() * f
                dense.bias.copy_(b.to(dt))
            dense.requires_grad_(False)
            self.base_layer, self._kind = dense, "linear"
            keep = list(self.merged_adapters)  # requantized earlier: not undoable
            self.merged_adapters = keep + names
            self._merge_info = {"keep": keep, "factors": factors}
            return
        wv = self._dense_weight()
        work = torch.float64 if wv.dtype == torch.float64 else torch.float32
        factors = {n: self.scaling([n], work) for n in names}
        f = _scale_product(list(factors.values()), work)
        wv.copy_(self._scale_weight(wv.to(work), f, inverse=False).to(wv.dtype))
        if base.bias is not None and not self.is_feedforward:
            base.bias.copy_((base.bias.to(work) * f).to(base.bias.dtype))
        if self._merge_info is None and self.merged_adapters:
            keep, prev = list(self.merged_adapters), {}  # merged by requantize into a since-dequantized base
        else:
            keep = [] if self._merge_info is None else self._merge_info["keep"]
            prev = {} if self._merge_info is None else self._merge_info["factors"]
        self.merged_adapters = self.merged_adapters + names
        self._merge_info = {"keep": keep, "factors": {**prev, **factors}}

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` on a dense base: divide by the factors that were multiplied in. Raises for a
        requantized 4-bit base and for a factor with a zero entry (that row/column of W is gone)."""
        if not self.merged_adapters:
            return
        info = self._merge_info
        if info is None or not info["factors"]:
            raise ValueError("this layer's adapters were merged into its 4-bit base with mode='requantize'; "
                             "that cannot be undone (reload the base, or merge with mode='dequantize')")
        wv = self._dense_weight()
        work = torch.float64 if wv.dtype == torch.float64 else torch.float32
        f = _scale_product(list(info["factors"].values()), work)
        if (f == 0).any():
            raise ValueError(f"cannot unmerge: the merged scaling vector has {int((f == 0).sum())} zero entries, "
                             f"so those {'columns' if self.is_feedforward else 'rows'} of the base weight were lost")
        wv.copy_(self._scale_weight(wv.to(work), f, inverse=True).to(wv.dtype))
        bias = self.base_layer.bias
        if bias is not None and not self.is_feedforward:
            bias.copy_((bias.to(work) / f).to(bias.dtype))
        self.merged_adapters = list(info["keep"])
        self._merge_info = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"feedforward={self.is_feedforward}, adapters={list(self.ia3_l)}, active={self.active_adapters}, "
                f"merged={self.merged_adapters}, disabled={self.disabled}")
