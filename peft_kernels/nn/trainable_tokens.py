"""Trainable token rows beside a frozen 4-bit table, and the 4-bit output head that can hold them.

A few token ids (new tokens after ``resize_token_embeddings``, or existing ones to re-train) get a
16/32-bit trainable row each, as Hugging Face PEFT's ``TrainableTokensLayer`` does (0.21): the rows
*replace* the frozen ones (``trainable_tokens_delta`` holds full row values, initialised from the
frozen rows, so an untrained set is a no-op), and nothing else of the table trains.

* ``trainable_token_indices``: int64 [n] buffer, sorted and unique (persistent: in ``state_dict``);
* ``trainable_tokens_delta``: Parameter [n, H] (float32 by default), row i for token
  ``trainable_token_indices[i]``.

:class:`TokenRows` is the mixin both the embedding (``nn.Embedding4bit``) and the head
(:class:`Linear4bitHead`) use. A tied embedding/head pair shares the two tensors (one Parameter, whose
gradient sums both uses, as for the tied table itself).

:class:`Linear4bitHead` is a :class:`~peft_kernels.nn.Linear4bit` (isinstance holds, its quant args are
the table's) whose logits for the trainable ids come from the trainable rows:
``y[..., idx] = x @ delta^T (+ bias[idx])``. A consumer that reads the 4-bit weight directly (a fused
linear + cross-entropy) must apply :meth:`Linear4bitHead.token_override` the same way. With trainable
rows the head keeps its input x for backward (dDelta = dY[:, idx]^T x); without, nothing of x.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._checks import FLOAT_DTYPES
from .linear4bit import Linear4bit


class TokenRows:
    """Mixin for a module with a frozen 4-bit table of ``_quant_shape() = (V, H)``: optional trainable rows."""

    trainable_token_indices: Optional[torch.Tensor]
    trainable_tokens_delta: Optional[nn.Parameter]

    def _init_token_rows(self) -> None:
        self.register_buffer("trainable_token_indices", None)
        self.register_parameter("trainable_tokens_delta", None)

    @property
    def has_trainable_tokens(self) -> bool:
        return self.trainable_token_indices is not None

    def set_trainable_tokens(self, indices, values: Optional[torch.Tensor] = None,
                             dtype: torch.dtype = torch.float32) -> None:
        """Make rows ``indices`` (ints or an int tensor, each in [0, V), unique) trainable.

        ``values`` [n, H] (in the order of the sorted indices) initialises the rows; default: the frozen rows
        dequantized (a no-op until trained). Rows become a ``dtype`` Parameter with requires_grad=True.
        Raises ValueError for empty, duplicate or out-of-range indices or a wrong ``values`` shape, and when
        rows are already set (``clear_trainable_tokens()`` first).
        """
        vocab, dim = self._quant_shape()
        if self.has_trainable_tokens:
            raise ValueError(f"{type(self).__name__} already has {self.trainable_token_indices.numel()} trainable "
                             f"token rows; clear_trainable_tokens() first")
        idx = torch.as_tensor(indices)
        if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or idx.dim() != 1 or not idx.numel():
            raise ValueError(f"token indices must be a non-empty 1-D list of ints, got {indices!r}")
        idx = idx.long().to(self.weight.device)
        if int(idx.min()) < 0 or int(idx.max()) >= vocab:
            raise ValueError(f"token indices must be in [0, {vocab}), got min {int(idx.min())}, max {int(idx.max())}")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError(f"token indices must be unique, got {idx.tolist()}")
        idx, order = idx.sort()
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"trainable token rows must be float32/float16/bfloat16, got {dtype}")
        if values is None:
            from ..ops.functional import embedding_4bit
            values = embedding_4bit(idx, self.weight, self.quant_state, torch.float32)
        else:
            if not isinstance(values, torch.Tensor) or tuple(values.shape) != (idx.numel(), dim):
                raise ValueError(f"values must be a [{idx.numel()}, {dim}] tensor, got "
                                 f"{tuple(getattr(values, 'shape', ()))}")
            values = values.detach()[order]
        self.trainable_token_indices = idx
        self.trainable_tokens_delta = nn.Parameter(values.to(self.weight.device, dtype).clone(), requires_grad=True)

    def share_trainable_tokens(self, other: "TokenRows") -> None:
        """Use ``other``'s rows (the same buffer and Parameter): a tied embedding/head pair."""
        if other._quant_shape()[1] != self._quant_shape()[1]:
            raise ValueError("tied trainable rows need the same width H")
        self.trainable_token_indices = other.trainable_token_indices
        self.trainable_tokens_delta = other.trainable_tokens_delta

    def clear_trainable_tokens(self) -> None:
        self.trainable_token_indices = None
        self.trainable_tokens_delta = None

    def token_override(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(indices int64 [n], rows [n, H])`` that replace the frozen rows, or None."""
        if not self.has_trainable_tokens:
            return None
        return self.trainable_token_indices, self.trainable_tokens_delta

    def _load_token_rows(self, state_dict, prefix) -> None:
        """Create the rows a state dict holds (so ``load_state_dict`` round-trips a model with trained rows)."""
        ik, vk = prefix + "trainable_token_indices", prefix + "trainable_tokens_delta"
        if ik in state_dict and vk in state_dict and not self.has_trainable_tokens:
            vals = state_dict[vk]
            self.set_trainable_tokens(state_dict[ik], values=vals.float(), dtype=vals.dtype)


class Linear4bitHead(TokenRows, Linear4bit):
    """The output head [V, H] in 4-bit (a ``Linear4bit``) with optional trainable token rows (module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_token_rows()

    @classmethod
    def from_linear4bit(cls, layer: Linear4bit) -> "Linear4bitHead":
        """A head over ``layer``'s very tensors (packed weight Parameter, statistics, bias)."""
        head = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, quant_type=layer.quant_type,
                   blocksize=layer.blocksize, double_quant=layer.double_quant, compute_dtype=layer.compute_dtype,
                   device="meta", dtype=layer.weight_dtype)
        head.share_quantized_weight(layer)
        head.bias = layer.bias
        head.train(layer.training)
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_trainable_tokens:
            return super().forward(x)
        if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"Linear4bitHead input must be a float32/float16/bfloat16 tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        in_dtype = x.dtype
        xc = x if self.compute_dtype is None or x.dtype == self.compute_dtype else x.to(self.compute_dtype)
        bias = self.bias
        if bias is not None and bias.dtype != xc.dtype:
            bias = bias.to(xc.dtype)
        y = _HeadWithRows.apply(xc.contiguous(), self.trainable_tokens_delta, bias, self)
        return y if y.dtype == in_dtype else y.to(in_dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._load_token_rows(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class _HeadWithRows(torch.autograd.Function):
    """``y = x W^T + b`` (W frozen 4-bit) with columns ``idx`` replaced by ``x R^T + b[idx]`` (R trainable).

    One autograd node, so the fresh logits are written in place (no second [.., V] tensor; the 4-bit op's
    output cannot be modified in place from outside). Backward: ``dX = dY W + dY[:, idx] (R - W[idx])``
    (the frozen rows' share of ``dY W`` for the replaced columns is taken back out: W[idx] is gathered from
    the 4-bit table, [n, H]), ``dR = dY[:, idx]^T x``, ``db = Σ dY``. Saved: x (only while R trains), R.
    """

    @staticmethod
    def forward(ctx, x, rows, bias, head):
        from ..ops.functional import linear_4bit
        idx = head.trainable_token_indices
        x2 = x.reshape(-1, x.shape[-1])
        y = linear_4bit(x2, head.weight, head.quant_state, bias)
        extra = torch.nn.functional.linear(x2, rows.to(x.dtype), None if bias is None else bias[idx])
        y.index_copy_(-1, idx, extra)
        ctx.head = head
        ctx.save_for_backward(x2 if rows.requires_grad else None, rows)
        ctx.x_shape, ctx.bias_dtype = x.shape, None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        from ..ops.functional import embedding_4bit
        from ..ops.linear4bit import linear4bit_grad_input_op
        from ._base import quant_args
        x2, rows = ctx.saved_tensors
        head = ctx.head
        idx = head.trainable_token_indices
        dy2 = dy.reshape(-1, dy.shape[-1])
        d_sel = dy2[:, idx]                                           # [M, n]
        dx = drows = dbias = None
        if ctx.needs_input_grad[0]:
            packed, absmax, code, nabs, ncode, noff, bs = quant_args(head)
            dx = linear4bit_grad_input_op(dy2.contiguous(), packed, absmax, code, nabs, ncode, noff, bs,
                                          head.in_features)
            frozen = embedding_4bit(idx, head.weight, head.quant_state, dy.dtype)     # W[idx], [n, H]
            dx = dx + d_sel @ (rows.to(dy.dtype) - frozen)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            drows = (d_sel.t().float() @ x2.float()).to(rows.dtype)
        if ctx.needs_input_grad[2]:
            dbias = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, drows, dbias, None
