"""The decode path: ``y = x W^T + bias (+ xa_s B^T)`` over a 4-bit W for M <= 16 rows of x.

:func:`gemv_4bit` runs the kernel ``decode_dispatch.resolve`` picks — the CUDA C GEMV or one of
the Triton kernels — and counts the run in ``decode_dispatch.counts``. ``ops/linear4bit.py`` and
``ops/lora.py`` call it for every forward with M <= 16 on the Triton backend (CUDA tensors, or
TRITON_INTERPRET=1): the forward kernel choice does not change what backward needs (it saves only
x, xa and the weight's own buffers), so no grad-mode condition is needed.

The torch.library ops ``peft_kernels::gemv_4bit`` and ``peft_kernels::lora_gemv_4bit`` expose it
(with fake implementations for torch.compile / FakeTensor); on backends without Triton (plain CPU)
they compute the reference.

Shapes: x [..., K] with prod(...) = M <= 16, fp32/fp16/bf16; W [N, K] as packed uint8, absmax
float32 [nblocks] or uint8 with nested_absmax/nested_code (double quantization), code float32 [16];
bias [N]; xa [M, r] and lora_B [N, r] (LoRA variant: y += scale * xa B^T). y [..., N] in x.dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backend, decode_dispatch, reference

Tensor = torch.Tensor


def gemv_4bit(x2: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
              nested_code: Optional[Tensor], nested_offset: float, blocksize: int, n: int,
              bias: Optional[Tensor], xa_s: Optional[Tensor] = None, lora_B: Optional[Tensor] = None,
              absmax_f=None) -> Tensor:
    """y [M, N] = x2 W^T + bias + xa_s lora_B^T (xa_s already scaled) for x2 [M <= 16, K] contiguous.

    absmax is the stored statistic (float32, or uint8 codes with the nested ones); absmax_f the
    decoded float32 scales, or a zero-argument callable returning them, when the caller caches
    them (Triton needs them; the CUDA C GEMV decodes nested scales itself and never asks).
    """
    m = x2.shape[0]
    if not 1 <= m <= decode_dispatch.MAX_M:
        raise ValueError(f"the decode path takes 1 <= M <= {decode_dispatch.MAX_M} rows, got x {tuple(x2.shape)}")
    lora = xa_s is not None
    which = decode_dispatch.resolve(x2, packed, n, lora)
    decode_dispatch.counts[which] += 1
    if which == "cuda":
        from .cuda_lib import gemv_4bit_cuda
        return gemv_4bit_cuda(x2, packed, absmax, code, blocksize, n, bias, nested_absmax=nested_absmax,
                              nested_code=nested_code, nested_offset=nested_offset, xa=xa_s, lora_B=lora_B,
                              scale=1.0)
    if absmax_f is None:
        absmax_f = reference.decode_absmax(absmax, nested_absmax, nested_code, nested_offset)
    elif callable(absmax_f):
        absmax_f = absmax_f()
    if lora:
        from ..kernels.lora import lora_matmul_4bit_nt
        cfg = "lora_nt_gemv" if which == "triton_gemv" else "lora_nt_m16"
        return lora_matmul_4bit_nt(x2, packed, absmax_f, code, blocksize, n, xa_s.contiguous(),
                                   lora_B.contiguous(), bias, config=cfg)
    from ..kernels.matmul4bit import matmul_4bit_nt
    cfg = "nt_gemv" if which == "triton_gemv" else "nt_m16"
    return matmul_4bit_nt(x2, packed, absmax_f, code, blocksize, n, bias, config=cfg)


def _run(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias,
         xa=None, lora_B=None, scale=1.0):
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if not 1 <= x2.shape[0] <= decode_dispatch.MAX_M:
        raise ValueError(f"peft_kernels::gemv_4bit takes 1 <= M <= {decode_dispatch.MAX_M} rows (decode), "
                         f"got x {tuple(x.shape)} = {x2.shape[0]} rows; use peft_kernels::linear4bit")
    xa_s = None if xa is None else xa * scale
    which = backend.select(x.device, has_cuda_impl=True)
    if which in ("triton", "cuda"):
        y = gemv_4bit(x2.contiguous(), packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                      out_features, bias, xa_s, lora_B)
    else:
        absmax_f = reference.decode_absmax(absmax, nested_absmax, nested_code, nested_offset)
        if xa_s is None:
            y = reference.linear4bit_forward(x2, packed, absmax_f, code, blocksize, out_features, bias)
        else:
            y = reference.lora_forward_4bit(x2, packed, absmax_f, code, blocksize, out_features, xa_s, lora_B, bias)
    return y.reshape(*x.shape[:-1], out_features)


@torch.library.custom_op("peft_kernels::gemv_4bit", mutates_args=())
def gemv_4bit_op(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                 nested_code: Optional[Tensor], nested_offset: float, blocksize: int, out_features: int,
                 bias: Optional[Tensor]) -> Tensor:
    """Decode ``y = x W^T + b``: x [..., K] (<= 16 rows) -> y [..., N] in x.dtype."""
    return _run(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias)


@gemv_4bit_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("peft_kernels::lora_gemv_4bit", mutates_args=())
def lora_gemv_4bit_op(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                      nested_code: Optional[Tensor], nested_offset: float, blocksize: int, out_features: int,
                      bias: Optional[Tensor], xa: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """Decode ``y = x W^T + b + scale * xa B^T``: x [..., K] (<= 16 rows), xa [M, r], B [N, r] -> [..., N]."""
    return _run(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias,
                xa, lora_B, scale)


@lora_gemv_4bit_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias, xa, lora_B,
      scale):
    return x.new_empty((*x.shape[:-1], out_features))
