"""BitFit (bias-only fine-tuning) over a frozen dense or 4-bit base: torch.library custom ops with autograd.

    peft_kernels::bitfit_linear_dense(x, weight, bias) -> y
    peft_kernels::bitfit_linear_4bit(x, packed, absmax, code, nested_absmax, nested_code, nested_offset,
                                     blocksize, out_features, bias) -> y
    peft_kernels::bitfit_dense_backward(dy, weight, need_x, need_bias) -> (dx, db)
    peft_kernels::bitfit_4bit_backward(dy, packed, ..., blocksize, in_features, need_x, need_bias) -> (dx, db)

Math (W [N, K] frozen, b [N] trainable; x [..., K])::

    y = x Wᵀ + b        dX = dY W  (only when x needs a gradient)        db = Σ_m dY  (fp32 accumulation)

Saved for backward: only the frozen weight — the dense ``weight`` tensor as passed (the module's own
parameter, or a transposed view of it for a transformers Conv1D: no new memory) or the 4-bit weight's
packed bytes, absmax and code books (module buffers). **Nothing of x** is saved: neither gradient
needs it, so a BitFit layer adds no activation memory of its own. A dense weight in another dtype than
x is cast inside each call (forward and backward), never kept.

Backends (``ops/backend.py``): the dense base always runs torch (cuBLAS on a GPU): ``addmm`` with the
bias in the GEMM epilogue, ``dy @ W`` and one column reduction for db. The 4-bit base runs, on CUDA
tensors (or ``PEFT_KERNELS_BACKEND=triton`` with ``TRITON_INTERPRET=1``), matmul4bit's forward kernel
(bias in its epilogue) and ``kernels/bitfit.py``'s backward, which computes dX and db in one pass over
dY; on CPU tensors, W dequantized by the CPU C library (bit-identical to the reference's) and torch
matmuls; with ``reference``, ``ops/reference_bitfit.py``. float64 inputs (exact references) always take
the reference path: the kernels have no float64 variant.

Callers use :func:`bitfit_linear_dense` / :func:`bitfit_linear_4bit`: eagerly a ``torch.autograd.Function``
running the same bodies and saving the same tensors without the torch.library dispatch (it costs as
much as the math at small M on CPU, as measured for LoRA); under torch.compile the custom ops.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backend, reference
from . import reference_bitfit as ref

Tensor = torch.Tensor


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _which(device: torch.device, dtype: torch.dtype) -> str:
    which = backend.select(device, has_cpu_impl=True)
    if dtype == torch.float64 and which != "cpu":
        return "reference"  # no float64 kernels; the cpu path already handles float64 (reference dequant)
    return which


def _empty(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The "not computed" placeholder of the backward ops (custom ops cannot return None)."""
    return like.new_empty((0,), dtype=dtype or like.dtype)


# ------------------------------------------------------------------ op bodies (plain functions)
def _dense_forward_impl(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    with torch.autocast(x.device.type, enabled=False):
        x2 = x.reshape(-1, x.shape[-1])
        y = ref.bitfit_forward_dense(x2, weight, bias)  # addmm: the bias rides in the GEMM epilogue
        return y.reshape(*x.shape[:-1], weight.shape[0])


def _dense_backward_impl(dy: Tensor, weight: Tensor, need_x: bool, need_bias: bool) -> tuple[Tensor, Tensor]:
    with torch.autocast(dy.device.type, enabled=False):
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = (dy2 @ weight.to(dy.dtype)).reshape(*dy.shape[:-1], weight.shape[1]) if need_x else _empty(dy)
        db = ref.bitfit_bias_grad(dy2) if need_bias else _empty(dy, _acc(dy.dtype))
        return dx, db


def _q4_forward_impl(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                     nested_code: Optional[Tensor], nested_offset: float, blocksize: int, out_features: int,
                     bias: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    k = x2.shape[-1]
    which = _which(x.device, x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        if which == "cpu":  # the reference computation with the C library's dequantization
            from .linear4bit import _dense_weight
            w = _dense_weight(which, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                              out_features * k, x.dtype).view(out_features, k)
            y = ref.bitfit_forward_dense(x2, w, bias)
        else:
            absmax_f = reference.decode_absmax(absmax, nested_absmax, nested_code, nested_offset)
            if which == "triton":
                from ..kernels.matmul4bit import matmul_4bit_nt
                # fp32 bias added to the fp32 accumulator (fused path) or, rounded to x.dtype, by addmm.
                y = matmul_4bit_nt(x2.contiguous(), packed, absmax_f, code, blocksize, out_features, bias)
            else:
                y = ref.bitfit_forward_4bit(x2, packed, absmax_f, code, blocksize, out_features, bias)
    return y.reshape(*x.shape[:-1], out_features)


def _q4_backward_impl(dy: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                      nested_code: Optional[Tensor], nested_offset: float, blocksize: int, in_features: int,
                      need_x: bool, need_bias: bool) -> tuple[Tensor, Tensor]:
    dy2 = dy.reshape(-1, dy.shape[-1])
    n = dy2.shape[-1]
    which = _which(dy.device, dy.dtype)
    dx = db = None
    with torch.autocast(dy.device.type, enabled=False):
        if which == "cpu":
            if need_x:
                from .linear4bit import _dense_weight
                w = _dense_weight(which, packed, absmax, code, nested_absmax, nested_code, nested_offset,
                                  blocksize, n * in_features, dy.dtype).view(n, in_features)
                dx = dy2 @ w
            if need_bias:
                db = ref.bitfit_bias_grad(dy2)
        else:
            absmax_f = reference.decode_absmax(absmax, nested_absmax, nested_code, nested_offset)
            if which == "triton":
                dy2 = dy2.contiguous()
                if need_bias:  # dX and db in one pass over dY (db alone when x needs no gradient)
                    from ..kernels.bitfit import bitfit_grad_4bit
                    dx, db = bitfit_grad_4bit(dy2, packed, absmax_f, code, blocksize, in_features, need_dx=need_x)
                elif need_x:
                    from ..kernels.matmul4bit import matmul_4bit_nn
                    dx = matmul_4bit_nn(dy2, packed, absmax_f, code, blocksize, in_features)
            else:
                dx, db = ref.bitfit_backward_4bit(dy2, packed, absmax_f, code, blocksize, in_features, need_x)
                db = db if need_bias else None
    dx = _empty(dy) if dx is None else dx.reshape(*dy.shape[:-1], in_features)
    db = _empty(dy, _acc(dy.dtype)) if db is None else db
    return dx, db


# ------------------------------------------------------------------ custom ops
@torch.library.custom_op("peft_kernels::bitfit_linear_dense", mutates_args=())
def bitfit_linear_dense_op(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``y = x Wᵀ + b``: x [..., K], weight [N, K] (any strides), bias [N] -> y [..., N] in x.dtype."""
    return _dense_forward_impl(x, weight, bias)


@bitfit_linear_dense_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("peft_kernels::bitfit_linear_4bit", mutates_args=())
def bitfit_linear_4bit_op(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                          nested_code: Optional[Tensor], nested_offset: float, blocksize: int, out_features: int,
                          bias: Tensor) -> Tensor:
    """``y = x Wᵀ + b`` with W the 4-bit weight [out_features, K]: x [..., K] -> y [..., N] in x.dtype."""
    return _q4_forward_impl(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                            out_features, bias)


@bitfit_linear_4bit_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("peft_kernels::bitfit_dense_backward", mutates_args=())
def bitfit_dense_backward_op(dy: Tensor, weight: Tensor, need_x: bool, need_bias: bool) -> tuple[Tensor, Tensor]:
    """(dX = dY W [..., K] in dy.dtype, db = Σ dY [N] float32); each empty when not needed."""
    return _dense_backward_impl(dy, weight, need_x, need_bias)


@bitfit_dense_backward_op.register_fake
def _(dy, weight, need_x, need_bias):
    return (dy.new_empty((*dy.shape[:-1], weight.shape[1]) if need_x else (0,)),
            dy.new_empty((dy.shape[-1],) if need_bias else (0,), dtype=_acc(dy.dtype)))


@torch.library.custom_op("peft_kernels::bitfit_4bit_backward", mutates_args=())
def bitfit_4bit_backward_op(dy: Tensor, packed: Tensor, absmax: Tensor, code: Tensor,
                            nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], nested_offset: float,
                            blocksize: int, in_features: int, need_x: bool,
                            need_bias: bool) -> tuple[Tensor, Tensor]:
    """(dX = dY W [..., in_features] in dy.dtype, db = Σ dY [N] float32) for the 4-bit W; empty when not needed."""
    return _q4_backward_impl(dy, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                             in_features, need_x, need_bias)


@bitfit_4bit_backward_op.register_fake
def _(dy, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, in_features, need_x,
      need_bias):
    return (dy.new_empty((*dy.shape[:-1], in_features) if need_x else (0,)),
            dy.new_empty((dy.shape[-1],) if need_bias else (0,), dtype=_acc(dy.dtype)))


# ------------------------------------------------------------------ autograd (shared by ops and eager path)
def _dense_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(weight)  # the frozen weight only: nothing of x (see the module doc)
    ctx.x_dtype, ctx.bias_dtype = x.dtype, bias.dtype


def _dense_grads(ctx, grad_y, backward_fn):
    (weight,) = ctx.saved_tensors
    need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dx, db = backward_fn(grad_y.to(ctx.x_dtype), weight, need_x, need_b)
    return (dx if need_x else None), (db.to(ctx.bias_dtype) if need_b else None)


def _dense_backward(ctx, grad_y):
    dx, db = _dense_grads(ctx, grad_y, bitfit_dense_backward_op)
    return dx, None, db


bitfit_linear_dense_op.register_autograd(_dense_backward, setup_context=_dense_setup)


def _q4_setup(ctx, inputs, output):
    x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias = inputs
    # The quantized weight's own tensors (module buffers): nothing of x, never a dequantized W.
    ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code)
    ctx.nested_offset, ctx.blocksize, ctx.in_features = nested_offset, blocksize, x.shape[-1]
    ctx.x_dtype, ctx.bias_dtype = x.dtype, bias.dtype


def _q4_grads(ctx, grad_y, backward_fn):
    packed, absmax, code, nabs, ncode = ctx.saved_tensors
    need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[9]
    dx, db = backward_fn(grad_y.to(ctx.x_dtype), packed, absmax, code, nabs, ncode, ctx.nested_offset,
                         ctx.blocksize, ctx.in_features, need_x, need_b)
    return (dx if need_x else None), (db.to(ctx.bias_dtype) if need_b else None)


def _q4_backward(ctx, grad_y):
    dx, db = _q4_grads(ctx, grad_y, bitfit_4bit_backward_op)
    return dx, None, None, None, None, None, None, None, None, db


bitfit_linear_4bit_op.register_autograd(_q4_backward, setup_context=_q4_setup)


# ------------------------------------------------------------------ eager fast path
class _BitFitDenseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        y = _dense_forward_impl(x, weight, bias)
        _dense_setup(ctx, (x, weight, bias), y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        dx, db = _dense_grads(ctx, grad_y, _dense_backward_impl)
        return dx, None, db


class _BitFit4bitFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features,
                bias):
        inputs = (x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias)
        y = _q4_forward_impl(*inputs)
        _q4_setup(ctx, inputs, y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        dx, db = _q4_grads(ctx, grad_y, _q4_backward_impl)
        return dx, None, None, None, None, None, None, None, None, db


def bitfit_linear_dense(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """:func:`bitfit_linear_dense_op` (same result and saved tensors); eagerly without the torch.library
    dispatch, the op itself under torch.compile. Differentiable in x and bias, never in weight."""
    if torch.compiler.is_compiling():
        return bitfit_linear_dense_op(x, weight, bias)
    return _BitFitDenseFn.apply(x, weight, bias)


def bitfit_linear_4bit(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                       nested_code: Optional[Tensor], nested_offset: float, blocksize: int, out_features: int,
                       bias: Tensor) -> Tensor:
    """:func:`bitfit_linear_4bit_op` (same result and saved tensors); eagerly without the torch.library
    dispatch, the op itself under torch.compile. Differentiable in x and bias."""
    if torch.compiler.is_compiling():
        return bitfit_linear_4bit_op(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                                     out_features, bias)
    return _BitFit4bitFn.apply(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                               out_features, bias)
