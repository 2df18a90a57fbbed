"""LoRA / DoRA over a frozen dense or 4-bit base: torch.library custom ops with autograd.

One op call computes a whole LoRA layer — the base product and every active
adapter — so the backward can fuse the adapters' input-gradient term into the
base's ``dY W`` (the concatenated GEMM ``[dY | s*dY B] [W | A]``):

    peft_kernels::lora_linear_dense(x, weight, bias, <adapters>) -> (y, xa)
    peft_kernels::lora_linear_4bit(x, packed, absmax, code, nested_absmax, nested_code, nested_offset,
                                   blocksize, out_features, bias, <adapters>) -> (y, xa)

where ``<adapters>`` are parallel lists, one entry per active adapter i:

    lora_A[i]      [r_i, K]       any float dtype (cast to x.dtype inside; grads come back in its dtype)
    lora_B[i]      [N, r_i]
    lora_bias[i]   [N] or empty   PEFT's ``lora_B`` bias (scaled by s_i like the rest of the branch)
    scales[i]      float          s_i = alpha/r (or alpha/sqrt(r), rsLoRA)
    masks[i]       bool [..., K] or empty   dropout keep-mask (drawn by the caller; empty: no dropout)
    dropout_p[i]   float          the dropout probability of that mask (kept values are scaled 1/(1-p))
    dora_scale[i]  float32 [N] or empty     DoRA: g = m / ||W + s B A||_row (the norm detached, by the caller)

"Empty" is a tensor with no elements (``NONE``-like placeholder, see :func:`absent`): torch.library's
autograd flattens a list argument into per-tensor gradients only when every entry is a tensor, so
optional entries are encoded as empty tensors instead of None.

Math (x [M, K], W [N, K] frozen, xd_i = drop_i(x), xa_i = xd_i A_iᵀ, L_i = s_i (xa_i B_iᵀ + b_i)):

    y = x Wᵀ + b + Σ_i L_i + Σ_{DoRA j} (g_j - 1) ⊙ (xd_j Wᵀ + L_j)

For one DoRA adapter this is exactly PEFT 0.21's ``(g-1)·drop(x)Wᵀ + g·L`` added to the base output
(and ``g ⊙ (x Wᵀ + L) + b`` without dropout). Backward, with dY_i = g_i ⊙ dY for DoRA (else dY):

    dX  = dY W + Σ_i D_i[s_i (dY_i B_i) A_i] + Σ_{DoRA j} D_j[((g_j - 1) ⊙ dY) W]      (D_i: the dropout mask)
    dA_i = s_i (dY_i B_i)ᵀ xd_i     dB_i = s_i dY_iᵀ xa_i     db_i = s_i Σ_m dY_i     db = Σ_m dY
    dg_j = Σ_m dY ⊙ (xd_j Wᵀ + L_j)   (recomputed in backward: one more base product per DoRA adapter)

Saved for backward: x, the masks (bool) and ``xa`` (the second output, [M, Σ r_i], unscaled), plus the
layer's own parameters and buffers (no new memory) — never a dequantized W and never dY-sized products.

Callers use :func:`lora_linear_dense` / :func:`lora_linear_4bit`: eagerly a ``torch.autograd.Function`` that
runs the same op bodies and saves the same tensors without the torch.library dispatch (per-call overhead that
matters on CPU at small M); under torch.compile the custom ops themselves.

Backends: CPU tensors run plain torch (the ``reference`` computation; the 4-bit W dequantized by the CPU C
library when it loads, bit-identical to the reference's); CUDA tensors (or ``PEFT_KERNELS_BACKEND=triton``
with ``TRITON_INTERPRET=1``) run the fused 4-bit Triton kernels of ``kernels/lora.py``. A dense base
always uses torch matmuls (cuBLAS on a GPU): ``addmm`` for the base and a second ``addmm_`` into the same
output for the LoRA term.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backend, decode_dispatch, reference

Tensor = torch.Tensor


# ------------------------------------------------------------------ the two base products
class _DenseBase:
    """W [N, K] dense (any strides; a transformers Conv1D passes its weight transposed)."""

    def __init__(self, weight: Tensor, dtype: torch.dtype):
        self.w = weight if weight.dtype == dtype else weight.to(dtype)

    def nt(self, x: Tensor, xa_s: Optional[Tensor], b: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        """x Wᵀ + xa_s Bᵀ + bias -> [M, N]."""
        y = torch.addmm(bias, x, self.w.t()) if bias is not None else x @ self.w.t()
        return y if xa_s is None else y.addmm_(xa_s, b.t())

    def nn(self, dy: Tensor, dyb_s: Optional[Tensor], a: Optional[Tensor]) -> Tensor:
        """dY W + dyb_s A -> [M, K]."""
        dx = dy @ self.w
        return dx if dyb_s is None else dx.addmm_(dyb_s, a)


class _QuantBase:
    """W [N, K] in blockwise 4-bit. Triton: the kernels dequantize W inside the GEMM (or into one reused
    workspace for large M). CPU: few float32 rows go through the CPU C library's fused GEMV (W decoded
    span by span, never whole); otherwise W is dequantized once per op call (by the CPU C library when it
    loads, else the reference; both give the same bits) and multiplied by torch."""

    def __init__(self, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, n, k, device):
        self.packed, self.code, self.blocksize, self.n, self.k = packed, code, blocksize, n, k
        self.stats = (absmax, nested_absmax, nested_code, nested_offset)
        self.which = backend.select(device, has_cpu_impl=True)
        self.triton = self.which == "triton"
        self._absmax = None
        self._w: dict = {}

    @property
    def absmax(self) -> Tensor:
        """float32 decoded scales, computed on first use (the CUDA C decode GEMV never needs them)."""
        if self._absmax is None:
            self._absmax = reference.decode_absmax(*self.stats)
        return self._absmax

    def _dense(self, dtype: torch.dtype) -> Tensor:
        """Dequantized W [N, K] in ``dtype`` (non-Triton backends), cached for this call."""
        if dtype not in self._w:
            from .linear4bit import _dense_weight
            absmax, nabs, ncode, noff = self.stats
            self._w[dtype] = _dense_weight(self.which, self.packed, absmax, self.code, nabs, ncode, noff,
                                           self.blocksize, self.n * self.k, dtype).view(self.n, self.k)
        return self._w[dtype]

    def _gemv(self, kind: str, a: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        """The CPU C library's fused product for few float32 rows (``linear4bit.cpu_gemv``), else None."""
        if self.which != "cpu" or self._w:  # W already dequantized in this call: multiply it
            return None
        from .linear4bit import cpu_gemv
        absmax, nabs, ncode, noff = self.stats
        return cpu_gemv(kind, a, self.packed, absmax, self.code, nabs, ncode, noff, self.blocksize, self.n, self.k,
                        bias)

    def nt(self, x, xa_s, b, bias):
        if self.triton and 1 <= x.shape[0] <= decode_dispatch.MAX_M:  # decode: the per-shape kernel table
            from .decode import gemv_4bit
            absmax, nabs, ncode, noff = self.stats
            return gemv_4bit(x.contiguous(), self.packed, absmax, self.code, nabs, ncode, noff, self.blocksize,
                             self.n, bias, xa_s, b, absmax_f=lambda: self.absmax)
        if self.triton:
            if xa_s is None:
                from ..kernels.matmul4bit import matmul_4bit_nt
                return matmul_4bit_nt(x.contiguous(), self.packed, self.absmax, self.code, self.blocksize, self.n,
                                      bias)
            from ..kernels.lora import lora_matmul_4bit_nt
            return lora_matmul_4bit_nt(x.contiguous(), self.packed, self.absmax, self.code, self.blocksize, self.n,
                                       xa_s.contiguous(), b.contiguous(), bias)
        y = self._gemv("nt", x, bias)
        if y is None:
            w = self._dense(x.dtype)
            y = torch.addmm(bias, x, w.t()) if bias is not None else x @ w.t()
        return y if xa_s is None else y.addmm_(xa_s, b.t())

    def nn(self, dy, dyb_s, a):
        if self.triton:
            if dyb_s is None:
                from ..kernels.matmul4bit import matmul_4bit_nn
                return matmul_4bit_nn(dy.contiguous(), self.packed, self.absmax, self.code, self.blocksize, self.k)
            from ..kernels.lora import lora_matmul_4bit_nn
            return lora_matmul_4bit_nn(dy.contiguous(), self.packed, self.absmax, self.code, self.blocksize, self.k,
                                       dyb_s.contiguous(), a.contiguous())
        dx = self._gemv("nn", dy, None)
        if dx is None:
            dx = dy @ self._dense(dy.dtype)
        return dx if dyb_s is None else dx.addmm_(dyb_s, a)


# ------------------------------------------------------------------ shared math
def absent(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The placeholder for "no tensor" in the ops' list arguments: an empty tensor on ``like``'s device."""
    return like.new_empty((0,), dtype=dtype or like.dtype)


def _acc(dt: torch.dtype) -> torch.dtype:
    """Accumulation dtype for the elementwise DoRA scalings and reductions: float32 (float64 stays)."""
    return torch.float64 if dt == torch.float64 else torch.float32


def _opt(ts: list[Tensor]) -> list[Optional[Tensor]]:
    return [t if t.numel() else None for t in ts]


def _cat(ts: list[Tensor], dim: int) -> Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


def _dropped(x2: Tensor, mask: Optional[Tensor], p: float) -> Tensor:
    """drop(x) = x * mask / (1 - p) (x itself without a mask)."""
    if mask is None:
        return x2
    return (x2 * (1.0 / (1.0 - p))).mul_(mask.reshape(x2.shape))


def _scaled_bias(lora_bias: list, scales: list[float], idx, dt) -> Optional[Tensor]:
    """Σ_{i in idx} s_i b_i in dtype dt (None when no adapter in idx has a bias)."""
    out = None
    for i in idx:
        if lora_bias[i] is not None:
            t = lora_bias[i].to(dt) * scales[i]
            out = t if out is None else out + t
    return out


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None:
        return b
    return a if b is None else a + b


def _xa_parts(x2: Tensor, lora_A: list, masks: list, dropout_p: list) -> tuple[list[Tensor], list[Tensor]]:
    """(xa_i = drop_i(x) A_iᵀ, drop_i(x)) for every adapter; adapters without dropout share one GEMM over x."""
    dt = x2.dtype
    parts: list[Optional[Tensor]] = [None] * len(lora_A)
    xds = [_dropped(x2, m, p) for m, p in zip(masks, dropout_p)]
    plain = [i for i, m in enumerate(masks) if m is None]
    if plain:
        xa = x2 @ _cat([lora_A[i].to(dt) for i in plain], 0).t()
        for i, t in zip(plain, xa.split([lora_A[i].shape[0] for i in plain], 1)):
            parts[i] = t
    for i, m in enumerate(masks):
        if m is not None:
            parts[i] = xds[i] @ lora_A[i].to(dt).t()
    return parts, xds


def _lora_forward(base, x: Tensor, bias, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale):
    n_out = base.n if isinstance(base, _QuantBase) else base.w.shape[0]
    dt, k = x.dtype, x.shape[-1]
    x2 = x.reshape(-1, k)
    bias_c = None if bias is None else bias.to(dt)
    parts, xds = _xa_parts(x2, lora_A, masks, dropout_p)
    xa = _cat(parts, 1)
    # Scale the xa columns per adapter (s_i on its r_i columns) and concatenate B along r: every adapter
    # then rides in the same GEMM as the base, [x | s*xa] [W | B]ᵀ.
    xa_s = _cat([p * s for p, s in zip(parts, scales)], 1)
    b_cat = _cat([b.to(dt) for b in lora_B], 1)
    n_ad = len(lora_A)
    dora = [i for i in range(n_ad) if dora_scale[i] is not None]
    if n_ad == 1 and dora and masks[0] is None:
        # A single DoRA adapter without dropout: y = g ⊙ (x Wᵀ + s(xa Bᵀ + b_B)) + b, one fused pass.
        z = base.nt(x2, xa_s, b_cat, _scaled_bias(lora_bias, scales, [0], dt))
        acc = _acc(dt)
        y32 = z.to(acc).mul_(dora_scale[0].to(acc))
        y = (y32 if bias_c is None else y32.add_(bias_c.to(acc))).to(dt)
    else:
        y = base.nt(x2, xa_s, b_cat, _add(bias_c, _scaled_bias(lora_bias, scales, range(n_ad), dt)))
        for j in dora:
            zd = base.nt(xds[j], parts[j] * scales[j], lora_B[j].to(dt),
                         _scaled_bias(lora_bias, scales, [j], dt))
            y.add_(zd.to(_acc(dt)).mul_(dora_scale[j].to(_acc(dt)) - 1).to(dt))
    return y.reshape(*x.shape[:-1], n_out), xa


def _lora_backward(base, dy: Tensor, x: Optional[Tensor], xa: Tensor, lora_A, lora_B, lora_bias, scales, masks,
                   dropout_p, dora_scale, *, need_x: bool, need_w: bool, need_bias: bool, k: int):
    """Gradients (dx, dW, db, dA list, dB list, dlora_bias list, dg list) — see the module doc."""
    dt = dy.dtype
    n_ad = len(lora_A)
    dy2 = dy.reshape(-1, dy.shape[-1])
    if dy2.dtype != dt:
        dy2 = dy2.to(dt)
    a_c = [a.to(dt) for a in lora_A]
    b_c = [b.to(dt) for b in lora_B]
    rs = [a.shape[0] for a in lora_A]
    xa_p = list(xa.split(rs, 1))
    x2 = None if x is None else x.reshape(-1, k)
    dora = [i for i in range(n_ad) if dora_scale[i] is not None]
    acc = _acc(dt)
    g32 = [None if g is None else g.to(acc) for g in dora_scale]
    # dY_i = g_i ⊙ dY for DoRA adapters; the others share dY and one GEMM for dY B.
    dyh = [dy2 if g32[i] is None else (dy2.to(acc) * g32[i]).to(dt) for i in range(n_ad)]
    dyb: list[Optional[Tensor]] = [None] * n_ad
    plain = [i for i in range(n_ad) if g32[i] is None]
    if plain:
        t = dy2 @ _cat([b_c[i] for i in plain], 1)
        for i, part in zip(plain, t.split([rs[i] for i in plain], 1)):
            dyb[i] = part
    for j in dora:
        dyb[j] = dyh[j] @ b_c[j]

    xds = None
    if x2 is not None:
        xds = [_dropped(x2, masks[i], dropout_p[i]) for i in range(n_ad)]
    d_a: list[Optional[Tensor]] = [None] * n_ad
    d_b: list[Optional[Tensor]] = [None] * n_ad
    # Plain adapters (no DoRA, no dropout) share one GEMM for all their dA and one for all their dB.
    grouped = [i for i in plain if masks[i] is None] if len(plain) > 1 else []
    if grouped:
        rg = [rs[i] for i in grouped]
        dyb_g = _cat([dyb[i] * scales[i] for i in grouped], 1)
        if x2 is not None:
            for i, t in zip(grouped, (dyb_g.t() @ x2).split(rg, 0)):
                d_a[i] = t.to(lora_A[i].dtype, copy=True)  # op outputs may not alias each other
        xa_g = _cat([xa_p[i] * scales[i] for i in grouped], 1)
        for i, t in zip(grouped, (dy2.t() @ xa_g).split(rg, 1)):
            d_b[i] = t.to(lora_B[i].dtype, memory_format=torch.contiguous_format, copy=True)
    d_lb, d_g = [], []
    for i in range(n_ad):
        if i not in grouped:
            d_a[i] = None if xds is None else ((dyb[i] * scales[i]).t() @ xds[i]).to(lora_A[i].dtype)
            d_b[i] = (dyh[i].t() @ xa_p[i]).mul_(scales[i]).to(lora_B[i].dtype)
        d_lb.append(None if lora_bias[i] is None else
                    (dyh[i].sum(0, dtype=acc) * scales[i]).to(lora_bias[i].dtype))
        if g32[i] is None or xds is None:
            d_g.append(None)
        else:
            zd = base.nt(xds[i], xa_p[i] * scales[i], b_c[i], _scaled_bias(lora_bias, scales, [i], dt))
            d_g.append((dy2.to(acc) * zd.to(acc)).sum(0).to(dora_scale[i].dtype))

    # The base rows see G ⊙ dY where G = 1 + Σ (g_j - 1) over DoRA adapters without dropout.
    plain_dora = [j for j in dora if masks[j] is None]
    dy_g = dy2
    if plain_dora:
        g_tot = 1 + sum(g32[j] - 1 for j in plain_dora)
        dy_g = (dy2.to(acc) * g_tot).to(dt)

    dx = None
    if need_x:
        nomask = [i for i in range(n_ad) if masks[i] is None]
        dyb_s = _cat([dyb[i] * scales[i] for i in nomask], 1) if nomask else None
        a_nm = _cat([a_c[i] for i in nomask], 0) if nomask else None
        dx = base.nn(dy_g, dyb_s, a_nm)
        keep = lambda i: masks[i].reshape(dx.shape)  # noqa: E731
        for i in range(n_ad):
            if masks[i] is None:
                continue
            if g32[i] is None:
                term = (dyb[i] * scales[i]) @ a_c[i]
            else:
                term = base.nn((dy2.to(acc) * (g32[i] - 1)).to(dt), dyb[i] * scales[i], a_c[i])
            dx.add_(term.mul_(keep(i)).mul_(1.0 / (1.0 - dropout_p[i])))
        dx = dx.reshape(*dy.shape[:-1], k)

    d_w = None
    if need_w and x2 is not None:
        d_w = dy_g.t() @ x2
        for j in dora:
            if masks[j] is not None:
                d_w.add_((dy2.to(acc) * (g32[j] - 1)).to(dt).t() @ xds[j])
    d_bias = dy2.sum(0, dtype=acc) if need_bias else None
    return dx, d_w, d_bias, d_a, d_b, d_lb, d_g


# ------------------------------------------------------------------ op bodies (plain functions)
# The custom ops below and the eager autograd.Functions (:func:`lora_linear_dense` / :func:`lora_linear_4bit`)
# both run exactly these.
def _dense_forward_impl(x, weight, bias, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale):
    with torch.autocast(x.device.type, enabled=False):
        return _lora_forward(_DenseBase(weight, x.dtype), x, bias, lora_A, lora_B, _opt(lora_bias), scales,
                             _opt(masks), dropout_p, _opt(dora_scale))


def _q4_forward_impl(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features,
                     bias, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale):
    base = _QuantBase(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features,
                      x.shape[-1], x.device)
    with torch.autocast(x.device.type, enabled=False):
        return _lora_forward(base, x, bias, lora_A, lora_B, _opt(lora_bias), scales, _opt(masks), dropout_p,
                             _opt(dora_scale))


# ------------------------------------------------------------------ dense base op
@torch.library.custom_op("peft_kernels::lora_linear_dense", mutates_args=())
def lora_linear_dense_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: list[Tensor],
                         lora_B: list[Tensor], lora_bias: list[Tensor], scales: list[float],
                         masks: list[Tensor], dropout_p: list[float],
                         dora_scale: list[Tensor]) -> tuple[Tensor, Tensor]:
    """LoRA over a dense W [N, K]: x [..., K] -> (y [..., N] in x.dtype, xa [M, Σr] in x.dtype)."""
    return _dense_forward_impl(x, weight, bias, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale)


@lora_linear_dense_op.register_fake
def _(x, weight, bias, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale):
    m = x.numel() // x.shape[-1]
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((m, sum(a.shape[0] for a in lora_A)))


# ------------------------------------------------------------------ 4-bit base op
@torch.library.custom_op("peft_kernels::lora_linear_4bit", mutates_args=())
def lora_linear_4bit_op(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                        nested_code: Optional[Tensor], nested_offset: float, blocksize: int, out_features: int,
                        bias: Optional[Tensor], lora_A: list[Tensor], lora_B: list[Tensor],
                        lora_bias: list[Tensor], scales: list[float], masks: list[Tensor],
                        dropout_p: list[float], dora_scale: list[Tensor]) -> tuple[Tensor, Tensor]:
    """LoRA over a 4-bit W [out_features, K]: x [..., K] -> (y [..., N] in x.dtype, xa [M, Σr] in x.dtype)."""
    return _q4_forward_impl(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                            out_features, bias, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale)


@lora_linear_4bit_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias, lora_A,
      lora_B, lora_bias, scales, masks, dropout_p, dora_scale):
    m = x.numel() // x.shape[-1]
    return x.new_empty((*x.shape[:-1], out_features)), x.new_empty((m, sum(a.shape[0] for a in lora_A)))


# ------------------------------------------------------------------ backward ops
# The backward is a custom op too: torch.compile then traces one opaque call (with a fake impl) instead
# of the Triton launches / C-library calls inside, and opcheck can test it. Gradients that are not
# needed come back as empty tensors (custom ops cannot return None).
_GradsT = tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]


def _grads_impl(base, dy, x, xa, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale, need_x, need_w,
                need_bias, in_features, w_dtype):
    lora_bias_o, dora_o = _opt(lora_bias), _opt(dora_scale)
    with torch.autocast(dy.device.type, enabled=False):
        dx, dw, db, da, dbb, dlb, dg = _lora_backward(
            base, dy, x, xa, lora_A, lora_B, lora_bias_o, scales, _opt(masks), dropout_p, dora_o,
            need_x=need_x, need_w=need_w, need_bias=need_bias, k=in_features)
    return (dy.new_empty((0,)) if dx is None else dx,
            dy.new_empty((0,), dtype=w_dtype) if dw is None else dw.to(w_dtype),
            dy.new_empty((0,), dtype=_acc(dy.dtype)) if db is None else db,
            [t if t is not None else a.new_empty((0,)) for t, a in zip(da, lora_A)],
            dbb,
            [t if t is not None else b.new_empty((0,)) for t, b in zip(dlb, lora_bias)],
            [t if t is not None else g.new_empty((0,)) for t, g in zip(dg, dora_scale)])


def _grads_fake(dy, x, lora_A, lora_B, lora_bias, dora_scale, need_x, need_w, need_bias, in_features, n_out,
                w_dtype):
    has_x = x is not None
    return (dy.new_empty((*dy.shape[:-1], in_features) if need_x else (0,)),
            dy.new_empty((n_out, in_features) if need_w and has_x else (0,), dtype=w_dtype),
            dy.new_empty((n_out,) if need_bias else (0,), dtype=_acc(dy.dtype)),
            [a.new_empty(a.shape) if has_x else a.new_empty((0,)) for a in lora_A],
            [b.new_empty(b.shape) for b in lora_B],
            [lb.new_empty(lb.shape) for lb in lora_bias],
            [g.new_empty(g.shape) if has_x and g.numel() else g.new_empty((0,)) for g in dora_scale])


def _dense_backward_impl(dy, x, xa, weight, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale,
                         need_x, need_w, need_bias):
    return _grads_impl(_DenseBase(weight, dy.dtype), dy, x, xa, lora_A, lora_B, lora_bias, scales, masks,
                       dropout_p, dora_scale, need_x, need_w, need_bias, weight.shape[1], weight.dtype)


def _q4_backward_impl(dy, x, xa, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                      in_features, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale, need_x,
                      need_bias):
    base = _QuantBase(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, dy.shape[-1],
                      in_features, dy.device)
    return _grads_impl(base, dy, x, xa, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale, need_x,
                       False, need_bias, in_features, dy.dtype)


@torch.library.custom_op("peft_kernels::lora_linear_dense_backward", mutates_args=())
def lora_linear_dense_backward_op(dy: Tensor, x: Optional[Tensor], xa: Tensor, weight: Tensor, lora_A: list[Tensor],
                                  lora_B: list[Tensor], lora_bias: list[Tensor], scales: list[float],
                                  masks: list[Tensor], dropout_p: list[float], dora_scale: list[Tensor],
                                  need_x: bool, need_w: bool, need_bias: bool) -> _GradsT:
    """(dx, dW, dbias, dA[], dB[], dlora_bias[], dg[]) of :func:`lora_linear_dense_op` (empty when not needed)."""
    return _dense_backward_impl(dy, x, xa, weight, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale,
                                need_x, need_w, need_bias)


@lora_linear_dense_backward_op.register_fake
def _(dy, x, xa, weight, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale, need_x, need_w, need_bias):
    return _grads_fake(dy, x, lora_A, lora_B, lora_bias, dora_scale, need_x, need_w, need_bias, weight.shape[1],
                       weight.shape[0], weight.dtype)


@torch.library.custom_op("peft_kernels::lora_linear_4bit_backward", mutates_args=())
def lora_linear_4bit_backward_op(dy: Tensor, x: Optional[Tensor], xa: Tensor, packed: Tensor, absmax: Tensor,
                                 code: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                                 nested_offset: float, blocksize: int, in_features: int, lora_A: list[Tensor],
                                 lora_B: list[Tensor], lora_bias: list[Tensor], scales: list[float],
                                 masks: list[Tensor], dropout_p: list[float], dora_scale: list[Tensor],
                                 need_x: bool, need_bias: bool) -> _GradsT:
    """(dx, empty, dbias, dA[], dB[], dlora_bias[], dg[]) of :func:`lora_linear_4bit_op`."""
    return _q4_backward_impl(dy, x, xa, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                             in_features, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale, need_x,
                             need_bias)


@lora_linear_4bit_backward_op.register_fake
def _(dy, x, xa, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, in_features, lora_A,
      lora_B, lora_bias, scales, masks, dropout_p, dora_scale, need_x, need_bias):
    return _grads_fake(dy, x, lora_A, lora_B, lora_bias, dora_scale, need_x, False, need_bias, in_features,
                       dy.shape[-1], dy.dtype)


# ------------------------------------------------------------------ autograd
def _save_common(ctx, x, xa, bias, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale, base_tensors,
                 w_needs_grad: bool):
    n = len(lora_A)
    # x is needed only for dA, dg (and dW when a dense W trains); dX needs just W, the masks and dY.
    need_x = w_needs_grad or any(a.requires_grad for a in lora_A) or any(g.requires_grad for g in dora_scale)
    ctx.n, ctx.nb = n, len(base_tensors)
    ctx.scales, ctx.dropout_p = list(scales), list(dropout_p)
    ctx.k = x.shape[-1]
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(x if need_x else None, xa, *base_tensors, *lora_A, *lora_B, *lora_bias, *masks,
                          *dora_scale)


def _unpack_common(ctx):
    t = ctx.saved_tensors
    n, nb = ctx.n, ctx.nb
    rest = t[2 + nb:]
    return (t[0], t[1], t[2:2 + nb], list(rest[:n]), list(rest[n:2 * n]), list(rest[2 * n:3 * n]),
            list(rest[3 * n:4 * n]), list(rest[4 * n:5 * n]))


def _none_if_empty(t: Tensor) -> Optional[Tensor]:
    return t if t.numel() else None


def _finish(ctx, dx, dw, db, da, dbb, dlb, dg):
    return (_none_if_empty(dx), _none_if_empty(dw),
            None if ctx.bias_dtype is None or not db.numel() else db.to(ctx.bias_dtype),
            [_none_if_empty(t) for t in da], list(dbb), [_none_if_empty(t) for t in dlb],
            [_none_if_empty(t) for t in dg])


def _dense_setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale = inputs
    _save_common(ctx, x, output[1], bias, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale, [weight],
                 weight.requires_grad)


def _dense_grads(ctx, grad_y, backward_fn):
    """(dx, dW, dbias, dA[], dB[], dlora_bias[], dg[]) with None where not needed; ``backward_fn`` is the
    backward op (op path) or its body (eager path). ``needs_input_grad`` indices 0-2: x, weight, bias."""
    x, xa, (weight,), lora_A, lora_B, lora_bias, masks, dora_scale = _unpack_common(ctx)
    need_bias = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
    grads = backward_fn(grad_y.to(ctx.x_dtype), x, xa, weight, lora_A, lora_B, lora_bias, ctx.scales, masks,
                        ctx.dropout_p, dora_scale, ctx.needs_input_grad[0],
                        ctx.needs_input_grad[1] and x is not None, need_bias)
    return _finish(ctx, *grads)


def _dense_backward(ctx, grad_y, grad_xa):
    dx, dw, db, da, dbb, dlb, dg = _dense_grads(ctx, grad_y, lora_linear_dense_backward_op)
    return dx, dw, db, da, dbb, dlb, None, [None] * ctx.n, None, dg


lora_linear_dense_op.register_autograd(_dense_backward, setup_context=_dense_setup)


def _q4_setup(ctx, inputs, output):
    (x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias, lora_A,
     lora_B, lora_bias, scales, masks, dropout_p, dora_scale) = inputs
    _save_common(ctx, x, output[1], bias, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale,
                 [packed, absmax, code, nested_absmax, nested_code], False)
    ctx.nested_offset, ctx.blocksize = nested_offset, blocksize


def _q4_grads(ctx, grad_y, backward_fn):
    """As :func:`_dense_grads` for the 4-bit base (``needs_input_grad`` index 0: x, 9: bias)."""
    x, xa, (packed, absmax, code, nabs, ncode), lora_A, lora_B, lora_bias, masks, dora_scale = _unpack_common(ctx)
    need_bias = ctx.bias_dtype is not None and ctx.needs_input_grad[9]
    grads = backward_fn(grad_y.to(ctx.x_dtype), x, xa, packed, absmax, code, nabs, ncode, ctx.nested_offset,
                        ctx.blocksize, ctx.k, lora_A, lora_B, lora_bias, ctx.scales, masks, ctx.dropout_p,
                        dora_scale, ctx.needs_input_grad[0], need_bias)
    return _finish(ctx, *grads)


def _q4_backward(ctx, grad_y, grad_xa):
    dx, _, db, da, dbb, dlb, dg = _q4_grads(ctx, grad_y, lora_linear_4bit_backward_op)
    return (dx, None, None, None, None, None, None, None, None, db, da, dbb, dlb, None, [None] * ctx.n, None, dg)


lora_linear_4bit_op.register_autograd(_q4_backward, setup_context=_q4_setup)


# ------------------------------------------------------------------ eager fast path
# Outside torch.compile, a torch.library op call pays for dispatch, schema checks and list flattening in the
# forward and again for the backward op: on CPU at small M that overhead rivals the math. These Functions run
# the same op bodies, save the same tensors (via the same setup_context) and call the backward op's body
# directly. The adapter lists travel as flat positional tensors (so autograd tracks each) after a ``meta``
# tuple (n, scales, dropout_p); the leading arguments keep the ops' positions, so ``needs_input_grad`` indices
# (x 0, weight 1, bias 2 dense; bias 9 4-bit) are shared with the op path's backward.
def _pack(lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale):
    return (len(lora_A), tuple(scales), tuple(dropout_p)), (*lora_A, *lora_B, *lora_bias, *masks, *dora_scale)


def _unpack(meta, flat):
    n, scales, dropout_p = meta
    return (list(flat[:n]), list(flat[n:2 * n]), list(flat[2 * n:3 * n]), list(scales), list(flat[3 * n:4 * n]),
            list(dropout_p), list(flat[4 * n:5 * n]))


def _flat_grads(ctx, da, dbb, dlb, dg):
    return (None, *da, *dbb, *dlb, *([None] * ctx.n), *dg)


class _LoraDenseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, meta, *flat):
        lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale = _unpack(meta, flat)
        inputs = (x, weight, bias, lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale)
        out = _dense_forward_impl(*inputs)
        _dense_setup(ctx, inputs, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_xa):
        dx, dw, db, da, dbb, dlb, dg = _dense_grads(ctx, grad_y, _dense_backward_impl)
        return (dx, dw, db, *_flat_grads(ctx, da, dbb, dlb, dg))


class _Lora4bitFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features,
                bias, meta, *flat):
        lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale = _unpack(meta, flat)
        inputs = (x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias,
                  lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale)
        out = _q4_forward_impl(*inputs)
        _q4_setup(ctx, inputs, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_xa):
        dx, _, db, da, dbb, dlb, dg = _q4_grads(ctx, grad_y, _q4_backward_impl)
        return (dx, None, None, None, None, None, None, None, None, db, *_flat_grads(ctx, da, dbb, dlb, dg))


def lora_linear_dense(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: list[Tensor],
                      lora_B: list[Tensor], lora_bias: list[Tensor], scales: list[float], masks: list[Tensor],
                      dropout_p: list[float], dora_scale: list[Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`lora_linear_dense_op` (same arguments, results and saved tensors); eagerly without the
    torch.library dispatch, the op itself under torch.compile."""
    if torch.compiler.is_compiling():
        return lora_linear_dense_op(x, weight, bias, lora_A, lora_B, lora_bias, scales, masks, dropout_p,
                                    dora_scale)
    meta, flat = _pack(lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale)
    return _LoraDenseFn.apply(x, weight, bias, meta, *flat)


def lora_linear_4bit(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                     nested_code: Optional[Tensor], nested_offset: float, blocksize: int, out_features: int,
                     bias: Optional[Tensor], lora_A: list[Tensor], lora_B: list[Tensor], lora_bias: list[Tensor],
                     scales: list[float], masks: list[Tensor], dropout_p: list[float],
                     dora_scale: list[Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`lora_linear_4bit_op` (same arguments, results and saved tensors); eagerly without the
    torch.library dispatch, the op itself under torch.compile."""
    if torch.compiler.is_compiling():
        return lora_linear_4bit_op(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                                   out_features, bias, lora_A, lora_B, lora_bias, scales, masks, dropout_p,
                                   dora_scale)
    meta, flat = _pack(lora_A, lora_B, lora_bias, scales, masks, dropout_p, dora_scale)
    return _Lora4bitFn.apply(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                             out_features, bias, meta, *flat)


# ------------------------------------------------------------------ DoRA weight norms (no autograd: detached)
def _norm_dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


@torch.library.custom_op("peft_kernels::dora_weight_norm_dense", mutates_args=())
def dora_weight_norm_dense_op(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """``||W[n, :] + scale (B A)[n, :]||_2``: weight [N, K], A [r, K], B [N, r] -> float32 [N] (float64 in)."""
    if backend.select(weight.device) == "triton" and _norm_dtype(weight, lora_A, lora_B) == torch.float32:
        from ..kernels.lora import dora_weight_norm_dense
        return dora_weight_norm_dense(weight.contiguous(), lora_A.contiguous(), lora_B.contiguous(), scale)
    return reference.dora_weight_norm_dense(weight, lora_A, lora_B, scale)


@dora_weight_norm_dense_op.register_fake
def _(weight, lora_A, lora_B, scale):
    return weight.new_empty((weight.shape[0],), dtype=_norm_dtype(weight, lora_A, lora_B))


@torch.library.custom_op("peft_kernels::dora_weight_norm_4bit", mutates_args=())
def dora_weight_norm_4bit_op(packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                             nested_code: Optional[Tensor], nested_offset: float, blocksize: int, out_features: int,
                             in_features: int, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """``||W[n, :] + scale (B A)[n, :]||_2`` of the 4-bit W [out_features, in_features] -> float32 [N]."""
    absmax_f = reference.decode_absmax(absmax, nested_absmax, nested_code, nested_offset)
    if backend.select(packed.device) == "triton" and _norm_dtype(lora_A, lora_B) == torch.float32:
        from ..kernels.lora import dora_weight_norm_4bit
        return dora_weight_norm_4bit(packed, absmax_f, code, blocksize, out_features, in_features,
                                     lora_A.contiguous(), lora_B.contiguous(), scale)
    return reference.dora_weight_norm_4bit(packed, absmax_f, code, blocksize, out_features, in_features, lora_A,
                                           lora_B, scale)


@dora_weight_norm_4bit_op.register_fake
def _(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, in_features, lora_A,
      lora_B, scale):
    return packed.new_empty((out_features,), dtype=_norm_dtype(lora_A, lora_B))
