"""Triton row kernel of the fused linear cross-entropy: loss, logsumexp and dlogits of a logits chunk, in place.

``cross_entropy_rows_(logits, labels, loss, lse, ...)`` runs one program per row of a contiguous logits
chunk [R, V] (fp32/fp16/bf16: what the head's matmul produced) and, reading the row twice:

1. pass 1: z = softcap·tanh(s·raw / softcap) (or s·raw), an online max / sum-exp over V in tiles of
   ``BLOCK_V`` (fp32), Σ_j z_j (label smoothing) and z at the label -> lse and the row's cross-entropy
   ``ce = lse − (1 − ε)·z_y − (ε/V)·Σ z`` (written to ``loss``, fp32; lse to ``lse``, fp32);
2. pass 2 (``write_grad``): d loss_sum / d raw — ``(p·(1 + 2·coef·lse) − (1 − ε)[j = y] − ε/V)``
   times the softcap derivative ``1 − tanh²``, times s and ``grad_scale`` — written over the logits
   in their own dtype (the buffer becomes dlogits: no second [R, V] tensor).

Rows whose label is ``ignore_index`` get loss = lse = 0 and a zero gradient row. Labels outside
[0, V) must be rejected by the caller (``ops/fused_ce.py`` checks them first); the kernel then treats
them as ignored rather than reading out of bounds. Math is fp32 whatever the logits' dtype; the
z-loss itself (coef·lse²) is summed by the caller from ``lse``.

The matmuls around it (logits = h Wᵀ + b, dH = dlogits W, dW = dlogitsᵀ h) stay cuBLAS or the 4-bit
kernels of ``matmul4bit.py``: this kernel is the memory-bound row work that would otherwise be a chain
of torch ops, each reading and writing the chunk (softcap, float copy, log-softmax, softmax, one-hot...).
Softcap, smoothing, z-loss and the gradient pass are runtime arguments (zero: off), so one compiled form
per dtype serves every option (see ``AOT_VARIANTS``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPES, TL_PTR, AotVariant, check_arg, check_device

#: Columns per tile (a power of two). 8 warps: 8 elements per thread per tile.
BLOCK_V = 2048
NUM_WARPS = 8


@triton.jit
def _tanh(x):
    # exp of a non-positive argument only: no overflow for large |x|.
    t = tl.exp(-2.0 * tl.abs(x))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -r, r)


@triton.jit
def _ce_rows_kernel(logits_ptr, labels_ptr, loss_ptr, lse_ptr, V, ignore_index, smoothing, softcap,
                    logit_scale, z_coef, grad_scale, write_grad, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * V
    label = tl.load(labels_ptr + row)
    valid = (label != ignore_index) & (label >= 0) & (label < V)
    cols = tl.arange(0, BLOCK_V)

    # pass 1: online logsumexp (per tile: one max, one rescale), sum of z, z at the label
    m = tl.max(tl.full((BLOCK_V,), float("-inf"), tl.float32), axis=0)
    s = tl.sum(tl.zeros((BLOCK_V,), tl.float32), axis=0)
    zsum = tl.sum(tl.zeros((BLOCK_V,), tl.float32), axis=0)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) * logit_scale
        if softcap > 0:
            z = softcap * _tanh(x / softcap)
        else:
            z = x
        zm = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zm - m_new), axis=0)
        zsum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    safe = tl.where(valid, label, 0)
    xy = tl.load(base + safe).to(tl.float32) * logit_scale
    if softcap > 0:
        zy = softcap * _tanh(xy / softcap)
    else:
        zy = xy
    ce = lse - (1.0 - smoothing) * zy - (smoothing / V) * zsum
    tl.store(loss_ptr + row, tl.where(valid, ce, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))

    # pass 2: dlogits over the logits, in place
    if write_grad != 0:
        pz = 1.0 + 2.0 * z_coef * lse
        hit = 1.0 - smoothing
        off = smoothing / V
        keep = tl.where(valid, grad_scale * logit_scale, 0.0)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) * logit_scale
            if softcap > 0:
                t = _tanh(x / softcap)
                z = softcap * t
                dcap = 1.0 - t * t
            else:
                z = x
                dcap = x * 0.0 + 1.0
            g = tl.exp(z - lse) * pz - off - tl.where(offs == label, hit, 0.0)
            tl.store(base + offs, (g * dcap * keep).to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows_(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, lse: torch.Tensor, *,
                        ignore_index: int = -100, label_smoothing: float = 0.0, softcap: float | None = None,
                        logit_scale: float = 1.0, z_loss: float = 0.0, grad_scale: float = 1.0,
                        write_grad: bool = True, block_v: int | None = None) -> None:
    """Row-wise cross-entropy of raw ``logits`` [R, V] (contiguous fp32/fp16/bf16), in place.

    labels: int64 [R]. Writes loss [R] and lse [R] (float32, contiguous; 0 on ignored rows) and, when
    ``write_grad``, replaces ``logits`` by ``grad_scale · d(Σ ce + coef·lse²)/d raw`` in their dtype.
    block_v: force the tile width (a power of two >= 16; tests), else :data:`BLOCK_V`.
    """
    check_arg("logits", logits, FLOAT_DTYPES)
    check_arg("labels", labels, (torch.int64,))
    check_arg("loss", loss, (torch.float32,))
    check_arg("lse", lse, (torch.float32,))
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [R, V], got shape {tuple(logits.shape)}")
    r, v = logits.shape
    for name, t in (("labels", labels), ("loss", loss), ("lse", lse)):
        if tuple(t.shape) != (r,):
            raise ValueError(f"{name} must have shape ({r},) (one per logits row), got {tuple(t.shape)}")
    if v == 0 or v >= 2 ** 31:
        raise ValueError(f"the vocabulary size must be in [1, 2**31), got {v}")
    bv = BLOCK_V if block_v is None else block_v
    if bv < 16 or bv & (bv - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v!r}")
    check_device(_ce_rows_kernel, logits=logits, labels=labels, loss=loss, lse=lse)
    if r == 0:
        return
    _ce_rows_kernel[(r,)](logits, labels, loss, lse, v, int(ignore_index), float(label_smoothing),
                          float(softcap or 0.0), float(logit_scale), float(z_loss), float(grad_scale),
                          int(bool(write_grad)), BLOCK_V=bv, num_warps=NUM_WARPS, num_stages=1)


# ----------------------------------------------------------------------------- AOT variants
def _aot_variants() -> list[AotVariant]:
    variants = []
    for dtype in FLOAT_DTYPES:
        t = TL_PTR[dtype]
        sig = {"logits_ptr": t, "labels_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32", "V": "i32",
               "ignore_index": "i32", "smoothing": "fp32", "softcap": "fp32", "logit_scale": "fp32",
               "z_coef": "fp32", "grad_scale": "fp32", "write_grad": "i32", "BLOCK_V": "constexpr"}
        variants.append(AotVariant(
            name=f"ce_rows-{t[1:]}", kernel=_ce_rows_kernel, signature=sig, constexprs={"BLOCK_V": BLOCK_V},
            num_warps=NUM_WARPS, num_stages=1,
            divisible_by_16=("logits_ptr", "labels_ptr", "loss_ptr", "lse_ptr"),
            meta={"config": "ce_rows", "dtype": t[1:]}))
    return variants


#: One compiled form per logits dtype: every option is a runtime argument.
AOT_VARIANTS = _aot_variants()
