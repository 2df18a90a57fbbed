"""Fused linear cross-entropy: the loss of ``h Wᵀ + b`` against labels without the [T, V] logits.

    loss = fused_linear_cross_entropy(hidden, head, labels)             # hidden [T, H], labels [T]
    loss, z = fused_linear_cross_entropy(hidden, lm_head, labels, label_smoothing=0.1, softcap=30.0,
                                         z_loss=1e-4, reduction="sum", return_z_loss=True)

``head`` is an ``nn.Linear`` (its weight and bias; trainable or frozen), a weight tensor [V, H] (with
``bias=``), or a 4-bit ``peft_kernels.nn.Linear4bit`` (frozen; its bias may train). The loss is exactly
``F.cross_entropy(transform(h Wᵀ + b), labels, ignore_index, label_smoothing)`` (+ the z-loss), with the
logit transform ``softcap·tanh(logit_scale·x / softcap)`` (Gemma-2's final soft-capping; Cohere's /
Granite's logit scaling): see ``ops/reference_ce.py`` for the definitions.

How (the Liger / Unsloth approach): the FORWARD walks the valid tokens in chunks of rows. Per chunk it
computes the logits into one reused buffer [T_c, V] (cuBLAS for a dense head; the project's 4-bit matmul
over vocabulary slices of the packed weight for a 4-bit head), runs the row work in place (Triton
``kernels/cross_entropy.py`` on CUDA, the same algorithm in plain torch on CPU): loss, logsumexp, and
dlogits written over the logits; then immediately ``dH_chunk = dlogits W`` (and ``dW += dlogitsᵀ h``,
``db += Σ dlogits`` for a trainable head). BACKWARD only multiplies the stored dH (dW, db) by the
incoming scalar gradient. Under ``torch.no_grad`` (or when nothing requires grad) the gradient pass,
its matmuls and its buffers are skipped.

Memory (e = bytes per element of the compute dtype, n = valid rows, T_c = chunk rows; see
docs/training/fused_cross_entropy.md for the whole formula):

* the logits chunk buffer T_c·V·e, T_c = max(1, chunk_bytes // (V·e)) (``chunk_bytes``: default 128 MiB
  on CUDA, 32 MiB on CPU where the plain-torch row work holds about four float32 copies of the chunk);
* a vocabulary slice of W in the compute dtype (a 4-bit head, or a dense head of another dtype than the
  compute dtype, e.g. fp32 weights under bf16 autocast): V_s·H·e with V_s·H·e <= chunk_bytes, plus the
  slice's logits T_c·V_s·e; never a whole dense copy of W;
* saved for backward: dH float32 [n, H] (+ dW float32 [V, H], db float32 [V] when they train) — nothing
  else, no logits; the rows of ignored labels are skipped altogether (no matmul work, no storage).

Compute dtype: what the head itself would use — for a dense head the autocast dtype when autocast is on
(else hidden's dtype, which must be the weight's), for ``Linear4bit`` its ``compute_dtype`` or hidden's
dtype (it ignores autocast, as its forward does). Loss math is float32 (float64 for float64 inputs).
fp16 dlogits are stored times :data:`FP16_GRAD_SCALE` (so small probabilities do not underflow) and
divided back in float32.

Bad input (shapes, dtypes, devices, labels outside [0, V) other than ignore_index, option values) raises
a clear TypeError/ValueError before any work. Every label ignored: the loss is 0 (with a warning for
reduction "mean", where F.cross_entropy would give NaN) and every gradient is zero.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .._checks import FLOAT_DTYPES
from . import backend

Tensor = torch.Tensor

#: Default byte budget of one logits chunk (and of one vocabulary slice of W) on CUDA / on CPU.
DEFAULT_CHUNK_BYTES = {"cuda": 128 << 20, "cpu": 32 << 20}
#: fp16 dlogits are stored times this (|dlogits| <= ~2, so no overflow; p down to ~1e-10 stays normal).
FP16_GRAD_SCALE = 256.0
REDUCTIONS = ("sum", "mean")
_FLOATS = FLOAT_DTYPES + (torch.float64,)


def default_chunk_bytes(device: torch.device) -> int:
    """The default ``chunk_bytes`` for tensors on ``device``."""
    return DEFAULT_CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]


# ====================================================================== options
@dataclass(frozen=True)
class CEOptions:
    """What the loss computes (see ``ops/reference_ce.py``); :meth:`check` validates every field."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    softcap: Optional[float] = None
    logit_scale: float = 1.0
    z_loss: float = 0.0
    reduction: str = "mean"

    def check(self) -> "CEOptions":
        def num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if not num(self.label_smoothing) or not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be a number in [0, 1], got {self.label_smoothing!r}")
        if self.softcap is not None and (not num(self.softcap) or self.softcap <= 0):
            raise ValueError(f"softcap must be None or a finite number > 0, got {self.softcap!r}")
        if not num(self.logit_scale) or self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be a finite number > 0, got {self.logit_scale!r}")
        if not num(self.z_loss) or self.z_loss < 0:
            raise ValueError(f"z_loss must be a finite number >= 0, got {self.z_loss!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        return self


# ====================================================================== the head
class LinearHead:
    """The output head as the loss reads it: a dense weight [V, H] (+ bias [V]) or a 4-bit ``Linear4bit``.

    Built by :func:`resolve_head`. Holds no copies: the module's own tensors.
    """

    def __init__(self, weight: Optional[Tensor], bias: Optional[Tensor], layer4=None):
        self.weight, self.bias, self.layer4 = weight, bias, layer4
        if layer4 is not None:
            self.vocab, self.hidden = layer4.out_features, layer4.in_features
            self.device = layer4.weight.device
        else:
            self.vocab, self.hidden = weight.shape
            self.device = weight.device

    @property
    def is_4bit(self) -> bool:
        return self.layer4 is not None

    def compute_dtype(self, hidden: Tensor) -> torch.dtype:
        """The dtype the head's own forward would multiply ``hidden`` in (see the module docstring)."""
        if self.is_4bit:
            return self.layer4.compute_dtype or hidden.dtype
        dev = hidden.device.type
        if hidden.dtype != torch.float64 and torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        if hidden.dtype != self.weight.dtype:
            raise TypeError(f"hidden is {_name(hidden.dtype)} but the head weight is {_name(self.weight.dtype)}: "
                            f"cast one to the other, or run under torch.autocast")
        return hidden.dtype

    # ------------------------------------------------------------ vocabulary slices
    def slices(self, cd: torch.dtype, budget: int) -> list[tuple[int, int]]:
        """[v0, v1) ranges of W rows used per matmul: one range when the dense weight is already in the
        compute dtype (one GEMM), else slices of <= ``budget`` bytes of W in ``cd`` whose starts fall on
        4-bit block (and nested-statistics group) boundaries."""
        v, h = self.vocab, self.hidden
        if not self.is_4bit and self.weight.dtype == cd:
            return [(0, v)]
        unit = 1
        if self.is_4bit:
            qs = self.layer4.quant_state
            span = qs.blocksize * (qs.nested.blocksize if qs.nested is not None else 1)
            unit = span // math.gcd(h, span)  # rows whose element count is a multiple of span
        rows = max(unit, (budget // max(1, h * _size(cd))) // unit * unit)
        return [(v0, min(v, v0 + rows)) for v0 in range(0, v, rows)]

    def _slice4(self, v0: int, v1: int) -> tuple:
        """The 4-bit op arguments of W rows [v0, v1) (views of the module's tensors)."""
        from ..nn._base import quant_args

        packed, absmax, code, nabs, ncode, noff, bs = quant_args(self.layer4)
        h = self.hidden
        e0, e1 = v0 * h, v1 * h
        b0, b1 = e0 // bs, -(-e1 // bs)
        packed = packed.reshape(-1)[e0 // 2:(e1 + 1) // 2]
        if nabs is not None:
            nb = self.layer4.quant_state.nested.blocksize
            nabs = nabs[b0 // nb:-(-b1 // nb)]
        return packed, absmax[b0:b1], code, nabs, ncode, noff, bs

    def _dense_slice(self, v0: int, v1: int, cd: torch.dtype) -> Tensor:
        w = self.weight[v0:v1]
        return w if w.dtype == cd else w.to(cd)

    def _bias(self, v0: int, v1: int, cd: torch.dtype) -> Optional[Tensor]:
        if self.bias is None:
            return None
        b = self.bias[v0:v1]
        return b if b.dtype == cd else b.to(cd)

    # ------------------------------------------------------------ products
    def _slice_logits(self, h: Tensor, v0: int, v1: int, cd: torch.dtype, out: Optional[Tensor]) -> Tensor:
        b = self._bias(v0, v1, cd)
        if self.is_4bit:
            from .linear4bit import linear4bit_op

            y = linear4bit_op(h, *self._slice4(v0, v1), v1 - v0, b)
            return y if out is None else out.copy_(y)
        w = self._dense_slice(v0, v1, cd)
        if b is None:
            return torch.mm(h, w.t(), out=out) if out is not None else torch.mm(h, w.t())
        return torch.addmm(b, h, w.t(), out=out) if out is not None else torch.addmm(b, h, w.t())

    def logits_into(self, h: Tensor, out: Tensor, cd: torch.dtype, slices: list) -> Tensor:
        """out [n, V] (contiguous, ``cd``) = h Wᵀ + b for h [n, H] in ``cd``."""
        if len(slices) == 1:
            return self._slice_logits(h, 0, self.vocab, cd, out)
        for v0, v1 in slices:
            out[:, v0:v1].copy_(self._slice_logits(h, v0, v1, cd, None))
        return out

    def grad_input_into(self, dl: Tensor, out: Tensor, cd: torch.dtype, slices: list) -> Tensor:
        """out [n, H] (float32/float64) = dl W for dl [n, V] in ``cd``."""
        for i, (v0, v1) in enumerate(slices):
            part = dl if len(slices) == 1 else dl[:, v0:v1]
            if self.is_4bit:
                from .linear4bit import linear4bit_grad_input_op

                y = linear4bit_grad_input_op(part, *self._slice4(v0, v1), self.hidden)
            elif cd == out.dtype and i > 0:
                out.addmm_(part, self._dense_slice(v0, v1, cd))
                continue
            else:
                y = torch.mm(part, self._dense_slice(v0, v1, cd))
            if i == 0:
                out.copy_(y)
            else:
                out.add_(y)
        return out


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_weight(w: Tensor) -> Tensor:
    if w.dtype not in _FLOATS:
        raise TypeError(f"the head weight must be a float tensor (float32/float16/bfloat16/float64), got "
                        f"{_name(w.dtype)} (a bitsandbytes 4-bit layer: convert it with Linear4bit.from_bnb)")
    if w.dim() != 2 or 0 in w.shape:
        raise ValueError(f"the head weight must be a non-empty 2-D [V, H] tensor, got shape {tuple(w.shape)}")
    return w


def resolve_head(head, bias: Optional[Tensor] = None) -> LinearHead:
    """A :class:`LinearHead` from an ``nn.Linear``, a ``Linear4bit`` or a weight tensor [V, H] (+ ``bias``).

    Raises TypeError for anything else (a head that is not a plain linear map: compute its logits
    yourself) and ValueError for a malformed weight or bias.
    """
    from ..nn.linear4bit import Linear4bit

    if isinstance(head, Linear4bit):
        if bias is not None:
            raise ValueError("bias= is for a weight tensor; a Linear4bit head brings its own bias")
        if head.weight.device.type == "meta" or head.weight.numel() == 0:
            raise ValueError("the Linear4bit head holds no quantized weight (meta device or not loaded)")
        out = LinearHead(None, head.bias, head)
    elif isinstance(head, nn.Linear):
        if bias is not None:
            raise ValueError("bias= is for a weight tensor; an nn.Linear head brings its own bias")
        out = LinearHead(_check_weight(head.weight), head.bias)
    elif isinstance(head, torch.Tensor):
        out = LinearHead(_check_weight(head), bias)
    else:
        raise TypeError(f"head must be an nn.Linear, a peft_kernels.nn.Linear4bit or a weight tensor [V, H], got "
                        f"{type(head).__name__}")
    b = out.bias
    if b is not None:
        if not isinstance(b, torch.Tensor) or b.dtype not in _FLOATS:
            raise TypeError(f"the head bias must be a float tensor, got {getattr(b, 'dtype', type(b).__name__)}")
        if tuple(b.shape) != (out.vocab,):
            raise ValueError(f"the head bias must have shape ({out.vocab},) (one per vocabulary entry), got "
                             f"{tuple(b.shape)}")
        if b.device != out.device:
            raise ValueError(f"the head bias is on {b.device} but its weight on {out.device}")
    return out


# ====================================================================== validation
def _check_inputs(hidden: Tensor, head: LinearHead, labels: Tensor, ignore_index: int) -> tuple[Tensor, int]:
    """(labels as contiguous int64, number of labels that are not ignore_index); raises on bad input."""
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dtype not in _FLOATS:
        raise TypeError(f"hidden must be float32/float16/bfloat16 (or float64), got {_name(hidden.dtype)}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [T, H] (flatten batch and sequence first), got shape "
                         f"{tuple(hidden.shape)}")
    if hidden.shape[1] != head.hidden:
        raise ValueError(f"hidden has {hidden.shape[1]} features but the head is [{head.vocab}, {head.hidden}]: "
                         f"the last dimension of hidden must be {head.hidden}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (class indices), got {_name(labels.dtype)}")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels must be 1-D [T] with T = {hidden.shape[0]} (one per hidden row), got shape "
                         f"{tuple(labels.shape)}")
    where = {"hidden": hidden.device, "labels": labels.device, "head": head.device}
    if len(set(where.values())) > 1:
        raise ValueError("hidden, labels and the head must be on one device: "
                         + ", ".join(f"{k} on {d}" for k, d in where.items()))
    labels = labels.long().contiguous()
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= head.vocab))
    n_valid, n_bad = torch.stack([valid.sum(), bad.sum()]).tolist()
    if n_bad:
        first = int(labels[bad][0])
        raise ValueError(f"{n_bad} label(s) outside [0, {head.vocab}) (the vocabulary) and not ignore_index="
                         f"{ignore_index}, e.g. {first}")
    return labels, int(n_valid)


# ====================================================================== row work
def _rows_torch_(lg: Tensor, lab: Tensor, loss: Tensor, lse: Tensor, o: CEOptions, grad_scale: float,
                 write_grad: bool) -> None:
    """The row kernel's computation in plain torch (CPU path; float64 too): see kernels/cross_entropy.py."""
    acc = torch.float64 if lg.dtype == torch.float64 else torch.float32
    v = lg.shape[1]
    x = lg.to(acc) * o.logit_scale  # a new tensor: lg is overwritten only at the end
    t = None
    if o.softcap is not None:
        t = torch.tanh(x / o.softcap)
        z = t * o.softcap
    else:
        z = x
    lse_all = torch.logsumexp(z, dim=1)
    valid = lab != o.ignore_index
    safe = torch.where(valid, lab, torch.zeros_like(lab))
    ce = lse_all - (1.0 - o.label_smoothing) * z.gather(1, safe[:, None]).squeeze(1)
    if o.label_smoothing:
        ce = ce - (o.label_smoothing / v) * z.sum(1)
    zero = torch.zeros((), dtype=acc, device=lg.device)
    loss.copy_(torch.where(valid, ce, zero))
    lse.copy_(torch.where(valid, lse_all, zero))
    if not write_grad:
        return
    g = z.sub_(lse_all[:, None]).exp_()  # p, in z's storage
    if o.z_loss:
        g.mul_((1.0 + 2.0 * o.z_loss * lse_all)[:, None])
    if o.label_smoothing:
        g.sub_(o.label_smoothing / v)
    g.scatter_add_(1, safe[:, None], torch.full_like(ce, o.label_smoothing - 1.0)[:, None])
    if t is not None:
        g.mul_(t.mul_(t).neg_().add_(1.0))
    g.mul_((valid.to(acc) * (o.logit_scale * grad_scale))[:, None])
    lg.copy_(g)


def _rows_(lg: Tensor, lab: Tensor, loss: Tensor, lse: Tensor, o: CEOptions, grad_scale: float,
           write_grad: bool) -> None:
    if lg.dtype in FLOAT_DTYPES and loss.dtype == torch.float32 and backend.select(lg.device) == "triton":
        from ..kernels.cross_entropy import cross_entropy_rows_

        cross_entropy_rows_(lg, lab, loss, lse, ignore_index=o.ignore_index, label_smoothing=o.label_smoothing,
                            softcap=o.softcap, logit_scale=o.logit_scale, z_loss=o.z_loss, grad_scale=grad_scale,
                            write_grad=write_grad)
    else:
        _rows_torch_(lg, lab, loss, lse, o, grad_scale, write_grad)


# ====================================================================== the chunked computation
@dataclass
class _Result:
    loss: Tensor          # scalar: ce + z-loss, reduced
    z: Tensor             # scalar: the z-loss part, reduced the same way
    dh: Optional[Tensor]  # [n, H] float32/64: d(sum loss)/d h of the valid rows, times grad_scale
    idx: Optional[Tensor]  # long [n]: the valid rows of hidden (None: all rows)
    dw: Optional[Tensor]  # [V, H] float32/64
    db: Optional[Tensor]  # [V] float32/64
    scale: float          # what backward multiplies the stored gradients by (1/grad_scale, 1/n for "mean")


def _compute(hidden: Tensor, head: LinearHead, labels: Tensor, n_valid: int, o: CEOptions, chunk_bytes: int,
             need_h: bool, need_w: bool, need_b: bool) -> _Result:
    cd = head.compute_dtype(hidden)
    acc = torch.float64 if cd == torch.float64 else torch.float32
    dev = hidden.device
    t_rows, v, h = hidden.shape[0], head.vocab, head.hidden
    grad = need_h or need_w or need_b
    idx = None
    if n_valid < t_rows:  # ignored rows cost nothing: no logits, no matmuls, no storage
        idx = (labels != o.ignore_index).nonzero().squeeze(1)
        hidden, labels = hidden.index_select(0, idx), labels.index_select(0, idx)
    n = n_valid
    gs = FP16_GRAD_SCALE if cd == torch.float16 else 1.0
    loss_rows = torch.empty(n, dtype=acc, device=dev)
    lse_rows = torch.empty(n, dtype=acc, device=dev)
    dh = torch.empty(n, h, dtype=acc, device=dev) if need_h else None
    dw = torch.zeros(v, h, dtype=acc, device=dev) if need_w else None
    db = torch.zeros(v, dtype=acc, device=dev) if need_b else None
    rows = max(1, chunk_bytes // (v * _size(cd)))
    slices = head.slices(cd, chunk_bytes)
    with torch.autocast(dev.type, enabled=False):  # dtypes are explicit here
        buf = torch.empty(min(rows, max(n, 1)), v, dtype=cd, device=dev) if n else None
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            hc = hidden[r0:r1]
            hc = hc if hc.dtype == cd else hc.to(cd)
            lg = head.logits_into(hc, buf[:r1 - r0], cd, slices)
            _rows_(lg, labels[r0:r1], loss_rows[r0:r1], lse_rows[r0:r1], o, gs, grad)
            if need_h:
                head.grad_input_into(lg, dh[r0:r1], cd, slices)
            if need_w:
                if cd == acc:
                    dw.addmm_(lg.t(), hc)
                elif cd == torch.float16:  # a 16-bit dW product over T_c rows could overflow
                    dw.addmm_(lg.t().to(acc), hc.to(acc))
                else:
                    dw.add_(torch.mm(lg.t(), hc))
            if need_b:
                db.add_(lg.sum(0, dtype=acc))
    ce = loss_rows.sum()
    z = (lse_rows * lse_rows).sum() * o.z_loss
    total = ce + z
    scale = 1.0 / gs
    if o.reduction == "mean" and n:
        total, z, scale = total / n, z / n, scale / n
    return _Result(total, z, dh, idx, dw, db, scale)


class _FusedLinearCE(torch.autograd.Function):
    """Forward computes the loss and, right away, the gradients; backward scales what forward stored."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, head, n_valid, opts, chunk_bytes, needs):
        res = _compute(hidden, head, labels, n_valid, opts, chunk_bytes, *needs)
        ctx.save_for_backward(res.dh, res.idx, res.dw, res.db)
        ctx.hidden_meta = (hidden.shape, hidden.dtype)
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.scale = res.scale
        ctx.mark_non_differentiable(res.z)
        return res.loss, res.z

    @staticmethod
    def backward(ctx, g_loss, g_z):
        dh, idx, dw, db = ctx.saved_tensors
        (shape, hdtype), (wdtype, bdtype) = ctx.hidden_meta, ctx.param_dtypes
        gh = gw = gb = None
        if g_loss is not None:
            s = g_loss.to(dh.dtype if dh is not None else torch.float32) * ctx.scale
            if ctx.needs_input_grad[0] and dh is not None:
                part = (dh * s).to(hdtype)
                if idx is None:
                    gh = part
                else:
                    gh = torch.zeros(shape, dtype=hdtype, device=part.device).index_copy_(0, idx, part)
            if ctx.needs_input_grad[1] and dw is not None:
                gw = (dw * s.to(dw.dtype)).to(wdtype)
            if ctx.needs_input_grad[2] and db is not None:
                gb = (db * s.to(db.dtype)).to(bdtype)
        return gh, gw, gb, None, None, None, None, None, None


# ====================================================================== public entry points
def fused_linear_cross_entropy(hidden: Tensor, head, labels: Tensor, *, bias: Optional[Tensor] = None,
                               ignore_index: int = -100, label_smoothing: float = 0.0,
                               softcap: Optional[float] = None, logit_scale: float = 1.0, z_loss: float = 0.0,
                               reduction: str = "mean", chunk_bytes: Optional[int] = None,
                               return_z_loss: bool = False):
    """Cross-entropy of ``transform(hidden Wᵀ + b)`` against ``labels`` without materialising the logits.

    Args:
        hidden: [T, H] float32/float16/bfloat16 (float64 on CPU for references); differentiable.
        head: ``nn.Linear`` (weight [V, H], bias [V] or None; each trains if it requires grad), a weight
            tensor [V, H] (with ``bias``), or ``peft_kernels.nn.Linear4bit`` (frozen 4-bit weight).
        labels: integer [T]; ``ignore_index`` marks rows without a loss; every other value in [0, V).
        label_smoothing: ε in [0, 1], as ``torch.nn.functional.cross_entropy``.
        softcap: Gemma-2's final logit soft-capping, ``softcap·tanh(x / softcap)`` (None: off).
        logit_scale: multiplies the logits before the soft-cap (Cohere ``logit_scale``; Granite
            ``1 / logits_scaling``).
        z_loss: coefficient of PaLM's ``lse²`` term (added to the loss; returned separately too).
        reduction: "mean" (over the labels that are not ignored) or "sum".
        chunk_bytes: byte budget of one logits chunk [T_c, V] and of one W slice (default
            :func:`default_chunk_bytes`).
        return_z_loss: also return the z-loss term alone (detached).

    Returns the loss (a float32 scalar; float64 for float64 inputs), or (loss, z_loss).
    """
    opts = CEOptions(ignore_index, label_smoothing, softcap, logit_scale, z_loss, reduction).check()
    spec = resolve_head(head, bias)
    labels, n_valid = _check_inputs(hidden, spec, labels, ignore_index)
    if chunk_bytes is None:
        chunk_bytes = default_chunk_bytes(hidden.device)
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    if n_valid == 0 and reduction == "mean":
        warnings.warn("fused_linear_cross_entropy: every label is ignore_index; the mean loss is 0 (not NaN) and "
                      "every gradient is zero", stacklevel=2)
    weight = spec.weight
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight is not None and weight.requires_grad,
             grad_on and spec.bias is not None and spec.bias.requires_grad)
    if any(needs):
        loss, z = _FusedLinearCE.apply(hidden, weight, spec.bias, labels, spec, n_valid, opts, chunk_bytes, needs)
    else:
        res = _compute(hidden, spec, labels, n_valid, opts, chunk_bytes, False, False, False)
        loss, z = res.loss, res.z
    return (loss, z) if return_z_loss else loss


def head_logits(hidden: Tensor, head, *, bias: Optional[Tensor] = None, softcap: Optional[float] = None,
                logit_scale: float = 1.0) -> Tensor:
    """The transformed logits [T, V] (float32; float64 for float64 inputs) of a few rows, computed as the
    fused loss computes them (same compute dtype, same head product). Not differentiable; for checks."""
    from .reference_ce import transform_logits

    spec = resolve_head(head, bias)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or hidden.shape[1] != spec.hidden:
        raise ValueError(f"hidden must be [T, {spec.hidden}], got {tuple(getattr(hidden, 'shape', ()))}")
    cd = spec.compute_dtype(hidden)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        hc = hidden if hidden.dtype == cd else hidden.to(cd)
        out = torch.empty(hidden.shape[0], spec.vocab, dtype=cd, device=hidden.device)
        spec.logits_into(hc, out, cd, spec.slices(cd, default_chunk_bytes(hidden.device)))
        acc = torch.float64 if cd == torch.float64 else torch.float32
        return transform_logits(out.to(acc), softcap, logit_scale)


__all__ = ["fused_linear_cross_entropy", "head_logits", "resolve_head", "LinearHead", "CEOptions",
           "DEFAULT_CHUNK_BYTES", "FP16_GRAD_SCALE", "default_chunk_bytes"]
