"""Triton dequantization of a blockwise 4-bit (NF4/FP4) tensor into fp32/fp16/bf16.

Layout (see ARCHITECTURE.md "NF4 bytes"): flat element ``2i`` is the high nibble
of byte ``i`` and ``2i + 1`` the low nibble; ``absmax[e // blocksize]`` scales
element ``e`` (blocks run over the flat index and may cross rows).

The kernel walks *bytes*, not elements: one byte load yields two outputs, 16
bytes (32 outputs) share one absmax load, and the two nibbles' values are
interleaved in registers (``tl.join``) so that each thread writes a contiguous,
vectorizable run.
The op is purely bandwidth-bound: 0.5 byte read + 2-4 bytes written per element.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPES, TL_PTR, AotVariant, check_arg, check_device, log2_blocksize

#: Bytes of packed input per program (2 * BLOCK outputs). 1024 bytes over 4 warps is 8 bytes
#: (16 outputs) per thread: one 8-byte load and 32-64 bytes of stores, enough to keep HBM busy.
DEQUANT_BLOCK = 1024
DEQUANT_WARPS = 4
DEQUANT_STAGES = 1  # no loop: nothing to pipeline


@triton.jit
def _dequant4bit_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, numel, nbytes, log2_bs, BLOCK: tl.constexpr):
    # Bytes as [BLOCK/16, 16]: each row is 16 bytes = 32 elements starting at a multiple of 32, so it
    # lies inside one absmax block (blocksizes are powers of two >= 32): one scale load per row.
    pid = tl.program_id(0).to(tl.int64)  # int64: numel may exceed 2**31 (large embeddings)
    g = pid * (BLOCK // 16) + tl.arange(0, BLOCK // 16)  # 16-byte group index
    j = g[:, None] * 16 + tl.arange(0, 16)[None, :]  # byte index
    # nbytes (= ceil(numel / 2)) comes from the host so that the JIT sees its divisibility by 16
    # and vectorizes the masked loads.
    b = tl.load(packed_ptr + j, mask=j < nbytes, other=0).to(tl.int32)
    s = tl.load(absmax_ptr + ((g * 32) >> log2_bs), mask=g * 16 < nbytes, other=0.0)[:, None]
    # fp32 product, one rounding when cast: bit-identical to reference.dequantize_4bit.
    hi = tl.load(code_ptr + (b >> 4)) * s
    lo = tl.load(code_ptr + (b & 15)) * s
    v = tl.reshape(tl.join(hi, lo), (2 * BLOCK,))  # hi0, lo0, hi1, lo1, ...
    e = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + e, v.to(out_ptr.dtype.element_ty), mask=e < numel)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    numel: int, dtype: torch.dtype = torch.float32, *,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize ``numel`` 4-bit codes into a flat ``[numel]`` tensor of ``dtype``.

    packed: uint8, any shape, contiguous, at least ``ceil(numel / 2)`` bytes.
    absmax: float32 ``[ceil(numel / blocksize)]`` (decode double quantization first).
    code: float32 ``[16]`` code book. dtype: float32, float16 or bfloat16.
    out: optional contiguous tensor of ``dtype`` with >= ``numel`` elements; its first
    ``numel`` (flat) are written and the flat view of them is returned.
    Value ``code[q] * absmax[i // blocksize]`` is formed in fp32 then cast once.
    """
    check_arg("packed", packed, (torch.uint8,))
    check_arg("absmax", absmax, (torch.float32,))
    check_arg("code", code, (torch.float32,))
    check_device(_dequant4bit_kernel, packed=packed, absmax=absmax, code=code, out=out)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of float32, float16, bfloat16; got {dtype}")
    log2_bs = log2_blocksize(blocksize)
    if packed.numel() < (numel + 1) // 2 or absmax.numel() < -(-numel // blocksize) or code.numel() != 16:
        raise ValueError(f"{numel} elements in blocks of {blocksize} need >= {(numel + 1) // 2} packed bytes, "
                         f">= {-(-numel // blocksize)} absmax and 16 codes; got {packed.numel()}, "
                         f"{absmax.numel()} and {code.numel()}")
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=packed.device)
    else:
        check_arg("out", out, (dtype,))
        if out.numel() < numel:
            raise ValueError(f"out has {out.numel()} elements, needs >= {numel}")
        out = out.view(-1)[:numel]
    if numel == 0:
        return out
    grid = (triton.cdiv((numel + 1) // 2, DEQUANT_BLOCK),)
    _dequant4bit_kernel[grid](packed, absmax, code, out, numel, (numel + 1) // 2, log2_bs,
                              BLOCK=DEQUANT_BLOCK, num_warps=DEQUANT_WARPS, num_stages=DEQUANT_STAGES)
    return out


def _aot_variants() -> list[AotVariant]:
    variants = []
    for dtype in FLOAT_DTYPES:
        sig = {"packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": TL_PTR[dtype],
               "numel": "i32", "nbytes": "i32", "log2_bs": "i32", "BLOCK": "constexpr"}
        variants.append(AotVariant(name=f"dequant4bit-{TL_PTR[dtype][1:]}", kernel=_dequant4bit_kernel,
                                   signature=sig, constexprs={"BLOCK": DEQUANT_BLOCK},
                                   num_warps=DEQUANT_WARPS, num_stages=DEQUANT_STAGES,
                                   divisible_by_16=("packed_ptr", "absmax_ptr", "code_ptr", "out_ptr",
                                                    "numel", "nbytes"),
                                   meta={"dtype": TL_PTR[dtype][1:]}))
    return variants


#: Every compiled form the launcher can request (one per output dtype); tests/test_triton_aot.py builds them all.
AOT_VARIANTS = _aot_variants()
