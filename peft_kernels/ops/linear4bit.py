"""torch.library ops over a 4-bit weight: dequantize, linear forward, and its input gradient.

The ops take the quantized weight as plain tensors and ints (so torch.compile
and ``torch.library.opcheck`` see a pure functional op):

    packed         uint8 [(N*K + 1) // 2, 1]   two 4-bit codes per byte
    absmax         float32 [nblocks], or uint8 [nblocks] with double quantization
    code           float32 [16]                the code book (NF4 or FP4)
    nested_absmax  float32 [ceil(nblocks/256)] or None
    nested_code    float32 [256] or None
    nested_offset  float                       mean absmax (0.0 without nesting)

Autograd (``linear4bit``): backward computes ``dX = dY W`` by a kernel that
dequantizes W on the fly, and ``db = sum(dY)`` when the bias trains. Saved for
backward are only the tensors above (the module's own buffers: no new memory)
and never x or a dequantized W — the weight is frozen.

CPU tensors (backend ``cpu``, the default when the CPU C library loads): up to
``CPU_GEMV_MAX_M`` float32 rows go through the C library's fused GEMV (W decoded
span by span, never whole: decode is memory-bound, and this reads the 4-bit bytes
once); more rows dequantize W by the C kernel — bit-identical to the reference's —
and multiply by torch, so those results equal backend ``reference``'s exactly.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backend, reference
from . import decode, decode_dispatch

Tensor = torch.Tensor


def _absmax_f32(absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                nested_offset: float) -> Tensor:
    return reference.decode_absmax(absmax, nested_absmax, nested_code, nested_offset)


#: Rows up to which the CPU C library's fused products (``pk_cpu_gemv_4bit_nt`` / ``_nn``: W decoded span by
#: span into L1, never whole) beat dequantize-then-matmul, float32 only. Measured on the 2-core sandbox
#: (AVX-512; 1024x1024, 4096x1024, 1024x4096, NF4 + double quant): x·Wᵀ 1.8-3x faster at M = 1, 1.3-2x at
#: M = 4, even to 1.6x at M = 8, slower from M = 16; dY·W 2.5-3x faster at M = 1, even at M = 4.
CPU_GEMV_MAX_M = {"nt": 8, "nn": 2}


def cpu_gemv(kind: str, a: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
             nested_code: Optional[Tensor], nested_offset: float, blocksize: int, n: int, k: int,
             bias: Optional[Tensor] = None) -> Optional[Tensor]:
    """The CPU GEMV for W [n, k] when it is the faster path, else None (the caller dequantizes).

    kind "nt": a = x [M, k] -> x·Wᵀ (+ bias) [M, n]; "nn": a = dY [M, n] -> dY·W [M, k]. Taken for float32
    CPU operands with M <= :data:`CPU_GEMV_MAX_M` [kind] when the CPU C library is loaded. The decoded W is
    the dequantization's (same bits); the sums differ from torch's matmul by float32 rounding only.
    """
    if a.dtype != torch.float32 or a.dim() != 2 or a.shape[0] > CPU_GEMV_MAX_M[kind] or a.shape[0] == 0:
        return None
    if bias is not None and bias.dtype != torch.float32:
        return None
    from . import cpu_lib
    if cpu_lib.load() is None:
        return None
    nested = nested_absmax is not None and absmax.dtype == torch.uint8
    if nested:
        kw = dict(nested_absmax=nested_absmax.float().contiguous(), nested_code=nested_code.float().contiguous(),
                  nested_offset=nested_offset)
        am = absmax.contiguous()
    else:
        kw, am = {}, _absmax_f32(absmax, nested_absmax, nested_code, nested_offset).contiguous()
    if kind == "nt":
        return cpu_lib.gemv_4bit_nt_cpu(a.contiguous(), packed.contiguous(), am, code.float().contiguous(), blocksize,
                                        n, None if bias is None else bias.contiguous(), **kw)
    return cpu_lib.gemv_4bit_nn_cpu(a.contiguous(), packed.contiguous(), am, code.float().contiguous(), blocksize, k,
                                    **kw)


def _dense_weight(which: str, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                  nested_code: Optional[Tensor], nested_offset: float, blocksize: int, numel: int,
                  dtype: torch.dtype) -> Tensor:
    """Flat [numel] W in ``dtype`` from CPU tensors: the C kernel for backend 'cpu', else the reference.

    Both give the same bits. The C kernel also decodes double-quantized absmax
    (saving a pass over nblocks floats); float64 (exact references) has no C kernel.
    """
    if which == "cpu" and dtype in (torch.float32, torch.float16, torch.bfloat16):
        from .cpu_lib import dequantize_4bit_cpu
        if nested_absmax is not None and absmax.dtype == torch.uint8:
            return dequantize_4bit_cpu(packed.contiguous(), absmax.contiguous(), code.float().contiguous(),
                                       blocksize, numel, dtype, nested_absmax=nested_absmax.float().contiguous(),
                                       nested_code=nested_code.float().contiguous(), nested_offset=nested_offset)
        absmax_f = _absmax_f32(absmax, nested_absmax, nested_code, nested_offset)
        return dequantize_4bit_cpu(packed.contiguous(), absmax_f.contiguous(), code.float().contiguous(),
                                   blocksize, numel, dtype)
    absmax_f = _absmax_f32(absmax, nested_absmax, nested_code, nested_offset)
    return reference.dequantize_4bit(packed, absmax_f, code, blocksize, numel, dtype)


# ----------------------------------------------------------------- dequantize
@torch.library.custom_op("peft_kernels::dequantize_4bit", mutates_args=())
def dequantize_4bit_op(packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                       nested_code: Optional[Tensor], nested_offset: float, blocksize: int, numel: int,
                       dtype: torch.dtype) -> Tensor:
    """Flat [numel] tensor of ``dtype`` from the 4-bit weight."""
    which = backend.select(packed.device, has_cuda_impl=True, has_cpu_impl=True)
    if which == "triton":
        from ..kernels.dequant4bit import dequantize_4bit
        absmax_f = _absmax_f32(absmax, nested_absmax, nested_code, nested_offset)
        return dequantize_4bit(packed, absmax_f, code, blocksize, numel, dtype)
    if which == "cuda":
        from .cuda_lib import dequantize_4bit_cuda
        absmax_f = _absmax_f32(absmax, nested_absmax, nested_code, nested_offset)
        return dequantize_4bit_cuda(packed, absmax_f, code, blocksize, numel, dtype)
    return _dense_weight(which, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, numel,
                         dtype)


@dequantize_4bit_op.register_fake
def _(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, numel, dtype):
    return packed.new_empty((numel,), dtype=dtype)


# ---------------------------------------------------------------- linear fwd
@torch.library.custom_op("peft_kernels::linear4bit", mutates_args=())
def linear4bit_op(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                  nested_code: Optional[Tensor], nested_offset: float, blocksize: int, out_features: int,
                  bias: Optional[Tensor]) -> Tensor:
    """``y = x W^T + b``: x [..., K] -> y [..., N] in x.dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    which = backend.select(x.device, has_cpu_impl=True)
    if which == "cpu":  # few rows: the fused GEMV; else the reference's computation with the C dequantization
        k = x2.shape[-1]
        y = cpu_gemv("nt", x2, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                     out_features, k, bias)
        if y is not None:
            return y.reshape(*x.shape[:-1], out_features)
        w = _dense_weight(which, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                          out_features * k, x.dtype)
        y = torch.nn.functional.linear(x2, w.view(out_features, k), None if bias is None else bias.to(x.dtype))
        return y.reshape(*x.shape[:-1], out_features)
    if which == "triton" and 1 <= x2.shape[0] <= decode_dispatch.MAX_M:  # decode: the per-shape kernel table
        y = decode.gemv_4bit(x2.contiguous(), packed, absmax, code, nested_absmax, nested_code, nested_offset,
                             blocksize, out_features, bias)
        return y.reshape(*x.shape[:-1], out_features)
    absmax_f = _absmax_f32(absmax, nested_absmax, nested_code, nested_offset)
    if which == "triton":
        from ..kernels.matmul4bit import matmul_4bit_nt
        y = matmul_4bit_nt(x2.contiguous(), packed, absmax_f, code, blocksize, out_features, bias)
    else:
        y = reference.linear4bit_forward(x2, packed, absmax_f, code, blocksize, out_features, bias)
    return y.reshape(*x.shape[:-1], out_features)


@linear4bit_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias):
    return x.new_empty((*x.shape[:-1], out_features))


# ------------------------------------------------------------- linear dX op
@torch.library.custom_op("peft_kernels::linear4bit_grad_input", mutates_args=())
def linear4bit_grad_input_op(dy: Tensor, packed: Tensor, absmax: Tensor, code: Tensor,
                             nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                             nested_offset: float, blocksize: int, in_features: int) -> Tensor:
    """``dX = dY W``: dy [..., N] -> dx [..., K] in dy.dtype."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    which = backend.select(dy.device, has_cpu_impl=True)
    if which == "cpu":  # few rows: the fused GEMV; else the reference's computation with the C dequantization
        n = dy2.shape[-1]
        dx = cpu_gemv("nn", dy2, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, n,
                      in_features)
        if dx is not None:
            return dx.reshape(*dy.shape[:-1], in_features)
        w = _dense_weight(which, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                          n * in_features, dy.dtype)
        return (dy2 @ w.view(n, in_features)).reshape(*dy.shape[:-1], in_features)
    absmax_f = _absmax_f32(absmax, nested_absmax, nested_code, nested_offset)
    if which == "triton":
        from ..kernels.matmul4bit import matmul_4bit_nn
        dx = matmul_4bit_nn(dy2.contiguous(), packed, absmax_f, code, blocksize, in_features)
    else:
        dx = reference.linear4bit_grad_input(dy2, packed, absmax_f, code, blocksize, in_features)
    return dx.reshape(*dy.shape[:-1], in_features)


@linear4bit_grad_input_op.register_fake
def _(dy, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, in_features):
    return dy.new_empty((*dy.shape[:-1], in_features))


# ------------------------------------------------------------------ autograd
def _setup_context(ctx, inputs, output):
    x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias = inputs
    # Only the quantized weight (already resident as module buffers) is saved:
    # never x (the weight does not train) and never a dequantized W.
    ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code)
    ctx.nested_offset = nested_offset
    ctx.blocksize = blocksize
    ctx.in_features = x.shape[-1]
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.x_dtype = x.dtype


def _backward(ctx, grad_out):
    packed, absmax, code, nested_absmax, nested_code = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = linear4bit_grad_input_op(grad_out, packed, absmax, code, nested_absmax, nested_code,
                                          ctx.nested_offset, ctx.blocksize, ctx.in_features)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[9]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, None, None, None, None, grad_bias


linear4bit_op.register_autograd(_backward, setup_context=_setup_context)
