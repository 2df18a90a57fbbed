"""Triton gather-dequant of 4-bit embedding rows: ``out[m, :] = dequant(W)[ids[m], :]`` for the looked-up rows only.

The table W [V, H] is in the project's 4-bit layout (ARCHITECTURE.md "The 4-bit format"): flattened
row-major, element ``e = row * H + col`` is nibble ``e & 1`` (0: high, 1: low) of byte ``e >> 1`` and is
scaled by ``absmax[e >> log2(blocksize)]``. Nothing here assumes a row starts on a byte or a block:
with H odd a row starts in the low nibble of a byte, and with ``H % blocksize != 0`` absmax blocks cross
rows; every element computes its own byte, nibble and block from ``e`` (int64: V·H may exceed 2**31).

Double quantization is decoded in the kernel, per element, only for the blocks the looked-up rows touch
(``nested_code[absmax[b]] * nested_absmax[b >> 8] + offset``): decoding the whole table's absmax first
would read and write ~V·H/blocksize floats per call (8.2 M at V = 128256, H = 4096, blocksize 64).

Tiles: ``BLOCK_M`` looked-up rows x ``BLOCK_H`` columns per program, grid (cdiv(M, BLOCK_M),
cdiv(H, BLOCK_H)). The op is bandwidth-bound (0.5 byte read, 2-4 bytes written per element); adjacent
lanes read the same byte and the same absmax entry, which the L1 cache serves. The value is formed in
fp32 (``code[q] * scale``) and cast once to the output dtype, as ``reference.dequantize_4bit`` does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPES, TL_PTR, AotVariant, check_arg, check_device, log2_blocksize

BLOCK_M = 4
BLOCK_H = 512
NUM_WARPS = 4
NUM_STAGES = 1  # no loop: nothing to pipeline
#: Second-level (nested) absmax blocksize of the format; the kernel shifts by 8.
NESTED_BLOCKSIZE = 256


@triton.jit
def _embedding4bit_kernel(ids_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                          nested_offset, out_ptr, n_ids, dim, log2_bs,
                          NESTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_ok = m < n_ids
    mask = m_ok[:, None] & (c[None, :] < dim)
    row = tl.load(ids_ptr + m, mask=m_ok, other=0).to(tl.int64)
    e = row[:, None] * dim + c[None, :]                                   # flat element index, int64
    byte = tl.load(packed_ptr + (e >> 1), mask=mask, other=0).to(tl.int32)
    q = tl.where((e & 1) == 0, byte >> 4, byte & 15)                     # even element: high nibble
    blk = e >> log2_bs
    if NESTED:
        qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = (tl.load(nested_code_ptr + qa, mask=mask, other=0.0)
                 * tl.load(nested_absmax_ptr + (blk >> 8), mask=mask, other=0.0) + nested_offset)
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    v = tl.load(code_ptr + q, mask=mask, other=0.0) * scale
    dst = m[:, None].to(tl.int64) * dim + c[None, :]
    tl.store(out_ptr + dst, v.to(out_ptr.dtype.element_ty), mask=mask)


def embedding_4bit(ids: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                   blocksize: int, embedding_dim: int, dtype: torch.dtype = torch.float32, *,
                   nested_absmax: torch.Tensor | None = None, nested_code: torch.Tensor | None = None,
                   nested_offset: float = 0.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``ids`` of the 4-bit table as ``[M, embedding_dim]`` in ``dtype``.

    ids: int64 [M], contiguous, every value in [0, V) (the op layer checks the range; here it is trusted).
    packed: uint8, contiguous (the table's ``[(V*H + 1) // 2, 1]`` bytes). absmax: float32 [nblocks], or
    uint8 [nblocks] codes with ``nested_absmax`` (float32 [ceil(nblocks / 256)]) and ``nested_code``
    (float32 [256]) given. code: float32 [16]. out: optional contiguous ``dtype`` tensor of M*H elements.
    """
    check_arg("ids", ids, (torch.int64,))
    check_arg("packed", packed, (torch.uint8,))
    check_arg("code", code, (torch.float32,))
    nested = nested_absmax is not None
    if nested != (nested_code is not None):
        raise ValueError("nested_absmax and nested_code must be given together (double quantization) or neither")
    check_arg("absmax", absmax, (torch.uint8,) if nested else (torch.float32,))
    if nested:
        check_arg("nested_absmax", nested_absmax, (torch.float32,))
        check_arg("nested_code", nested_code, (torch.float32,))
        if nested_code.numel() != 256:
            raise ValueError(f"nested_code must have 256 entries, got {nested_code.numel()}")
    check_device(_embedding4bit_kernel, ids=ids, packed=packed, absmax=absmax, code=code,
                 nested_absmax=nested_absmax, nested_code=nested_code, out=out)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of float32, float16, bfloat16; got {dtype}")
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D (flatten first), got shape {tuple(ids.shape)}")
    if not isinstance(embedding_dim, int) or embedding_dim <= 0:
        raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
    if code.numel() != 16:
        raise ValueError(f"code must have 16 entries, got {code.numel()}")
    log2_bs = log2_blocksize(blocksize)
    m = ids.numel()
    if out is None:
        out = torch.empty(m, embedding_dim, dtype=dtype, device=ids.device)
    else:
        check_arg("out", out, (dtype,))
        if out.numel() != m * embedding_dim:
            raise ValueError(f"out has {out.numel()} elements, needs {m * embedding_dim}")
        out = out.view(m, embedding_dim)
    if m == 0:
        return out
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(embedding_dim, BLOCK_H))
    # Without double quantization the nested pointers are never read; any valid pointer fills them.
    _embedding4bit_kernel[grid](ids, packed, absmax, code, nested_absmax if nested else code,
                                nested_code if nested else code, float(nested_offset), out, m, embedding_dim,
                                log2_bs, NESTED=nested, BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H,
                                num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out


def _aot_variants() -> list[AotVariant]:
    variants = []
    for nested in (False, True):
        for dtype in FLOAT_DTYPES:
            sig = {"ids_ptr": "*i64", "packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32",
                   "code_ptr": "*fp32", "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32",
                   "nested_offset": "fp32", "out_ptr": TL_PTR[dtype], "n_ids": "i32", "dim": "i32",
                   "log2_bs": "i32", "NESTED": "constexpr", "BLOCK_M": "constexpr", "BLOCK_H": "constexpr"}
            name = f"embedding4bit-{'nested-' if nested else ''}{TL_PTR[dtype][1:]}"
            variants.append(AotVariant(name=name, kernel=_embedding4bit_kernel, signature=sig,
                                       constexprs={"NESTED": nested, "BLOCK_M": BLOCK_M, "BLOCK_H": BLOCK_H},
                                       num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                                       divisible_by_16=("ids_ptr", "packed_ptr", "absmax_ptr", "code_ptr",
                                                        "out_ptr", "dim"),
                                       meta={"dtype": TL_PTR[dtype][1:], "nested": nested}))
    return variants


#: Every compiled form the launcher can request (output dtype x double quantization); tests/test_triton_aot.py
#: builds them all.
AOT_VARIANTS = _aot_variants()
