"""Mixed-adapter LoRA over a frozen dense or 4-bit base: each row of x picks its adapter from stacked slots.

    peft_kernels::multi_lora_4bit(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                                  out_features, bias, lora_A, lora_B, scales, ranks, slots, seg_rows) -> y
    peft_kernels::multi_lora_dense(x, weight, bias, lora_A, lora_B, scales, ranks, slots, seg_rows) -> y

x [M, K]; W [N, K] (4-bit or dense); slot tensors as in ``kernels/multi_lora.py``: lora_A [S, R, K],
lora_B [S, N, R] (zero-padded beyond each slot's rank), scales float32 [S], ranks int32 [S], slots int32
[M / seg_rows]: one slot per segment of ``seg_rows`` consecutive rows (1: one per row; T: one per sequence of
x [B, T, K] flattened), -1: the base alone. Row m computes, with s = slots[m // seg_rows] and r = ranks[s]::

    y[m] = x[m] Wᵀ + b + scales[s] · (x[m] A_s[:r]ᵀ) B_s[:, :r]ᵀ          (the LoRA term absent for s = -1)

Inference only: no autograd is registered (serving; training uses ``ops/lora.py``). Dropout does not
apply (eval), LoRA biases and DoRA are not served here.

Backends:

* Triton (CUDA tensors, or ``PEFT_KERNELS_BACKEND=triton`` with ``TRITON_INTERPRET=1``): the base product
  by matmul4bit's kernels (or cuBLAS for a dense W), then the shrink and expand kernels: SGMV (``tl.dot``
  tiles over a segment) when segments have >= ``SGMV_MIN_ROWS`` rows (prefill), else BGMV (per row).
* CPU (and ``reference``): bit-identical, row by row, to the single-adapter path of ``ops/lora.py`` (what
  ``LoraLinear`` computes with that one adapter active, on the same batch) and to the base alone for
  rows without an adapter. CPU GEMM results depend on the number of rows in the call (oneDNN/MKL pick
  kernels and blockings by M), so a sub-batch GEMM over only the rows of one adapter would differ from
  the single-adapter run in the last bits; instead each adapter present in the batch runs its r-wide
  GEMMs over all M rows, exactly as the single-adapter call does, and its rows are kept. This costs
  (#adapters in the batch) x the LoRA work — r/K of the base product per adapter.

:func:`multi_lora_reference` is the ground truth (plain torch, one row at a time, in the input's dtype:
pass float64 for an exact reference).
"""
from __future__ import annotations

from typing import Optional

import torch

from .lora import _DenseBase, _QuantBase

Tensor = torch.Tensor


def multi_lora_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                         scales: Tensor, ranks: Tensor, slots: Tensor) -> Tensor:
    """Row-by-row definition in x.dtype (float64 for an exact reference); weight is the dense [N, K] W."""
    dt = x.dtype
    w = weight.to(dt)
    out = []
    for m in range(x.shape[0]):
        y = x[m] @ w.t()
        if bias is not None:
            y = y + bias.to(dt)
        s = int(slots[m])
        if s >= 0:
            r = int(ranks[s])
            xa = x[m] @ lora_A[s, :r].to(dt).t()
            y = y + float(scales[s]) * (xa @ lora_B[s, :, :r].to(dt).t())
        out.append(y)
    return torch.stack(out) if out else x.new_empty((0, weight.shape[0]))


def check_slots(lora_A: Tensor, lora_B: Tensor, scales: Tensor, ranks: Tensor, slots: Tensor, m: int, n: int,
                k: int, seg_rows: int = 1) -> None:
    """Shapes, dtypes and devices of the slot tensors for x [m, k], W [n, k] and one slot per ``seg_rows`` rows;
    ValueError/TypeError naming the
    problem. Slot index values are checked only for CPU tensors (a device-side check would synchronise every
    layer of every decode step; the pool builds the indices from checked names)."""
    if lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(f"lora_A must be [S, R, K] and lora_B [S, N, R]; got {tuple(lora_A.shape)} and "
                         f"{tuple(lora_B.shape)}")
    s_, r_, k_ = lora_A.shape
    if k_ != k or tuple(lora_B.shape) != (s_, n, r_):
        raise ValueError(f"for x [.., {k}] and W [{n}, {k}] the slots must be lora_A [S, R, {k}] and lora_B "
                         f"[S, {n}, R]; got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    if not lora_A.is_floating_point() or lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_A and lora_B must share one float dtype, got {lora_A.dtype} and {lora_B.dtype}")
    if scales.dtype != torch.float32 or tuple(scales.shape) != (s_,):
        raise ValueError(f"scales must be float32 [{s_}], got {scales.dtype} {tuple(scales.shape)}")
    if ranks.dtype != torch.int32 or tuple(ranks.shape) != (s_,):
        raise ValueError(f"ranks must be int32 [{s_}], got {ranks.dtype} {tuple(ranks.shape)}")
    if slots.dtype != torch.int32 or slots.dim() != 1 or slots.shape[0] * seg_rows != m:
        raise ValueError(f"slots must be int32 [{m // max(seg_rows, 1)}] (one slot per {seg_rows} row(s) of the {m}), "
                         f"got {slots.dtype} {tuple(slots.shape)}")
    devs = {t.device for t in (lora_A, lora_B, scales, ranks, slots)}
    if len(devs) != 1:
        raise ValueError(f"slot tensors must be on one device, got {sorted(map(str, devs))}")
    if slots.device.type == "cpu" and not torch.compiler.is_compiling() and slots.numel():
        lo, hi = int(slots.min()), int(slots.max())
        if lo < -1 or hi >= s_:
            raise ValueError(f"slot indices must be in [-1, {s_}) (-1: no adapter), got values in [{lo}, {hi}]")
    if ranks.device.type == "cpu" and not torch.compiler.is_compiling() and s_:
        if int(ranks.min()) < 0 or int(ranks.max()) > r_:
            raise ValueError(f"ranks must be in [0, {r_}] (the slot size), got {ranks.tolist()}")


def _cpu_forward(base, x: Tensor, bias: Optional[Tensor], lora_A, lora_B, scales, ranks, slots) -> Tensor:
    """Each adapter's rows as ``ops/lora.py``'s single-adapter CPU path computes them (see the module doc)."""
    dt = x.dtype
    bias_c = None if bias is None else bias.to(dt)
    y = base.nt(x, None, None, bias_c)
    present = [int(s) for s in torch.unique(slots).tolist() if s >= 0]
    if not present:
        return y
    out = y.clone()
    rks, scs = ranks.tolist(), scales.tolist()
    for s in present:
        r = int(rks[s])
        rows = (slots == s).nonzero().view(-1)
        if r == 0:
            continue  # an empty slot, or an adapter that does not cover this layer: the base alone
        a, b = lora_A[s, :r], lora_B[s, :, :r]  # views with the layouts of LoraLinear's [r, K] and [N, r]
        xa_s = (x @ a.to(dt).t()) * scs[s]
        # Out-of-place addmm (beta = 1): the same GEMM as the single-adapter path's in-place addmm_.
        out[rows] = torch.addmm(y, xa_s, b.to(dt).t())[rows]
    return out


def _per_row(slots: Tensor, seg_rows: int) -> Tensor:
    return slots if seg_rows == 1 else slots.repeat_interleave(seg_rows)


def _triton_forward(y: Tensor, x: Tensor, lora_A, lora_B, scales, ranks, slots, seg_rows: int) -> Tensor:
    from ..kernels import multi_lora as K
    dt = x.dtype
    # The kernels take the slots in the compute dtype; a pool allocated in another dtype pays a cast here.
    a = (lora_A if lora_A.dtype == dt else lora_A.to(dt)).contiguous()
    b = (lora_B if lora_B.dtype == dt else lora_B.to(dt)).contiguous()
    if seg_rows >= K.SGMV_MIN_ROWS:
        xa = K.sgmv_shrink(x, a, scales, ranks, slots, seg_rows)
        return K.sgmv_expand_(y, xa, b, ranks, slots, seg_rows)
    rows = _per_row(slots, seg_rows)
    xa = K.bgmv_shrink(x, a, scales, ranks, rows)
    return K.bgmv_expand_(y, xa, b, ranks, rows)


@torch.library.custom_op("peft_kernels::multi_lora_4bit", mutates_args=())
def multi_lora_4bit_op(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                       nested_code: Optional[Tensor], nested_offset: float, blocksize: int, out_features: int,
                       bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scales: Tensor, ranks: Tensor,
                       slots: Tensor, seg_rows: int) -> Tensor:
    """y [M, N] in x.dtype (see the module doc); x [M, K] contiguous."""
    base = _QuantBase(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features,
                      x.shape[1], x.device)
    if base.triton:
        bias_c = None if bias is None else bias.to(x.dtype)
        y = base.nt(x, None, None, bias_c)
        return _triton_forward(y, x, lora_A, lora_B, scales, ranks, slots, seg_rows)
    return _cpu_forward(base, x, bias, lora_A, lora_B, scales, ranks, _per_row(slots, seg_rows))


@multi_lora_4bit_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias, lora_A,
      lora_B, scales, ranks, slots, seg_rows):
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("peft_kernels::multi_lora_dense", mutates_args=())
def multi_lora_dense_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                        scales: Tensor, ranks: Tensor, slots: Tensor, seg_rows: int) -> Tensor:
    """y [M, N] in x.dtype over a dense W [N, K] (any strides)."""
    from . import backend
    base = _DenseBase(weight, x.dtype)
    if backend.select(x.device) == "triton":
        bias_c = None if bias is None else bias.to(x.dtype)
        y = base.nt(x, None, None, bias_c)
        return _triton_forward(y.contiguous(), x, lora_A, lora_B, scales, ranks, slots, seg_rows)
    return _cpu_forward(base, x, bias, lora_A, lora_B, scales, ranks, _per_row(slots, seg_rows))


@multi_lora_dense_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scales, ranks, slots, seg_rows):
    return x.new_empty((x.shape[0], weight.shape[0]))
