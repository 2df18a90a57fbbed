"""Plain-torch ground truth for every kernel, and the CPU execution path.

Every function here is written for clarity, not speed: the Triton and CUDA C
kernels are tested against these on ragged shapes, and these are tested
against bitsandbytes (bytes) and Hugging Face PEFT (outputs, gradients).
All accept float64 inputs so tests can build an exact reference.

Conventions: the 4-bit weight W is [N out, K in], flattened row-major into
``numel = N*K`` elements; ``packed`` holds element 2i in the high nibble of
byte i; ``absmax`` is float32 [ceil(numel / blocksize)]; ``code`` float32 [16].
"""
from __future__ import annotations

import torch


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """int64 codes [numel] from packed uint8 (any shape with >= ceil(numel/2) bytes)."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return codes[:numel].long()


def decode_absmax(absmax: torch.Tensor, nested_absmax: torch.Tensor | None = None,
                  nested_code: torch.Tensor | None = None, nested_offset: float = 0.0,
                  nested_blocksize: int = 256) -> torch.Tensor:
    """float32 [nblocks] block scales: ``absmax`` itself, or decoded from double quantization.

    With nesting, ``absmax`` is uint8 codes: ``nested_code[q] * nested_absmax[i // 256] + offset``.
    """
    if nested_absmax is None:
        return absmax.float()
    nb = absmax.numel()
    scale = nested_absmax.float().repeat_interleave(nested_blocksize)[:nb]
    out = nested_code.float()[absmax.long()] * scale
    return out + torch.tensor(nested_offset, dtype=torch.float32, device=out.device)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Flat [numel] tensor of ``dtype``: ``code[q] * absmax[i // blocksize]``.

    The product is formed in float32 (as bitsandbytes does) and cast once, or in
    float64 when ``dtype`` is float64 (used for exact references).
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    # One gather per byte through a 256-entry table of (high, low) code pairs:
    # the same values as unpack_4bit + code[q], without materialising int64 codes.
    c = code.to(work)
    pairs = torch.stack([c.repeat_interleave(16), c.repeat(16)], dim=1)  # [256, 2]
    values = pairs[packed.reshape(-1).long()].reshape(-1)[:numel]
    nfull = numel // blocksize
    scale = absmax.to(work)
    out = torch.empty(numel, dtype=work, device=values.device)
    out[: nfull * blocksize] = (values[: nfull * blocksize].view(nfull, blocksize) * scale[:nfull, None]).view(-1)
    if numel > nfull * blocksize:  # partial last block
        out[nfull * blocksize:] = values[nfull * blocksize:] * scale[nfull]
    return out.to(dtype)


def linear4bit_forward(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                       blocksize: int, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x W^T + b``: x [M, K] -> y [M, N] in x.dtype (W dequantized to x.dtype)."""
    k = x.shape[-1]
    w = dequantize_4bit(packed, absmax, code, blocksize, out_features * k, x.dtype).view(out_features, k)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def linear4bit_grad_input(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                          blocksize: int, in_features: int) -> torch.Tensor:
    """``dX = dY W``: dy [M, N] -> dx [M, K] in dy.dtype."""
    n = dy.shape[-1]
    w = dequantize_4bit(packed, absmax, code, blocksize, n * in_features, dy.dtype).view(n, in_features)
    return dy @ w


# ----------------------------------------------------------------------------- LoRA / DoRA
def lora_forward_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                      blocksize: int, out_features: int, xa_scaled: torch.Tensor, lora_B: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x W^T + xa_scaled B^T + b``: x [M, K], xa_scaled [M, r], lora_B [N, r] -> y [M, N] in x.dtype.

    ``xa_scaled`` is ``s * drop(x) A^T`` (the LoRA scale already applied). W is dequantized to
    x.dtype; B and the bias are cast to x.dtype.
    """
    y = linear4bit_forward(x, packed, absmax, code, blocksize, out_features, bias)
    return y.addmm_(xa_scaled.to(x.dtype), lora_B.to(x.dtype).t())


def lora_grad_input_4bit(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int, in_features: int, dyb_scaled: torch.Tensor,
                         lora_A: torch.Tensor) -> torch.Tensor:
    """``dX = dY W + dyb_scaled A``: dy [M, N], dyb_scaled [M, r] (= s * dY B), lora_A [r, K] -> [M, K] in dy.dtype."""
    dx = linear4bit_grad_input(dy, packed, absmax, code, blocksize, in_features)
    return dx.addmm_(dyb_scaled.to(dy.dtype), lora_A.to(dy.dtype))


def dora_weight_norm_dense(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """``||W[n, :] + scale * (B A)[n, :]||_2`` per output row: weight [N, K], A [r, K], B [N, r] -> [N].

    Computed in float32 (float64 when any input is float64) and returned in that dtype; B A is
    formed in the same precision. Rows are processed in chunks so peak extra memory stays small.
    """
    work = torch.float64 if torch.float64 in (weight.dtype, lora_A.dtype, lora_B.dtype) else torch.float32
    a = lora_A.to(work)
    b = lora_B.to(work)
    n = weight.shape[0]
    out = torch.empty(n, dtype=work, device=weight.device)
    step = max(1, (1 << 22) // max(1, weight.shape[1]))  # ~4M elements per chunk
    for i in range(0, n, step):
        w = weight[i:i + step].to(work) + scale * (b[i:i + step] @ a)
        out[i:i + step] = torch.linalg.vector_norm(w, dim=1)
    return out


def dora_weight_norm_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                          out_features: int, in_features: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """:func:`dora_weight_norm_dense` of the 4-bit weight W [out_features, in_features] dequantized in
    float32 (float64 when A or B is float64) -> [N] in that dtype."""
    work = torch.float64 if torch.float64 in (lora_A.dtype, lora_B.dtype) else torch.float32
    w = dequantize_4bit(packed, absmax, code, blocksize, out_features * in_features, work)
    return dora_weight_norm_dense(w.view(out_features, in_features), lora_A, lora_B, scale)


# Each method's references live in their own file (one owner each); they are part of this module.
from .reference_adapter import *  # noqa: E402,F401,F403
from .reference_bitfit import *  # noqa: E402,F401,F403
from .reference_ce import *  # noqa: E402,F401,F403
from .reference_sparse import *  # noqa: E402,F401,F403
from .reference_embedding import *  # noqa: E402,F401,F403
