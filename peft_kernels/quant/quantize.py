"""Blockwise 4-bit quantization (NF4/FP4), byte-identical to bitsandbytes.

``quantize_4bit(w)`` flattens ``w`` row-major, splits it into blocks of
``blocksize`` consecutive elements (blocks may cross rows; the last may be
partial), scales each block by its absolute maximum and rounds every element to
the nearest code of the code book (ties to the lower code), then packs two codes
per byte. With ``double_quant`` the float32 absmax is itself quantized to 8 bits
(signed dynamic map, blocks of 256) around its mean.

Runs with plain torch ops on whatever device ``w`` is on.
"""
from __future__ import annotations

import functools

import torch

from .._checks import FLOAT_DTYPES, check_tensor
from .codes import NESTED_BLOCKSIZE, code4, dynamic_map
from .state import NestedStats, QuantState, check_blocksize


@functools.lru_cache(maxsize=None)
def _bounds_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = code4(quant_type)
    order = torch.argsort(code)  # FP4 codes are not in value order; NF4's are
    sorted_code = code[order]
    return (sorted_code[:-1] + sorted_code[1:]) / 2, order


def _block_absmax_and_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """absmax float32 [nblocks] and ``flat`` scaled into [-1, 1] blockwise (float32 [n])."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    body = flat[:full].reshape(-1, blocksize)
    absmax = body.abs().amax(dim=-1)
    # Multiply by the reciprocal for full blocks and divide in the tail block:
    # this is what bitsandbytes does, and the last ulp decides some roundings.
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        tail_max = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return absmax, scaled


@functools.lru_cache(maxsize=None)
def _dynamic_lut_cpu() -> torch.Tensor:
    # bitsandbytes' native CPU quantizer does not search the 256 codes per value:
    # it snaps the normalised value to a 65536-point grid on [-1, 1] and reads the
    # nearest code of that grid point from a table. Doing the same reproduces its
    # codes exactly (plain nearest-code rounding differs for values close to a
    # midpoint between two codes).
    code = _dynamic_map_sorted_cpu()
    grid = torch.arange(65536, dtype=torch.float32) / 65535.0 * 2 - 1
    return torch.bucketize(grid, (code[:-1] + code[1:]) / 2).to(torch.uint8)


def _dynamic_map_sorted_cpu() -> torch.Tensor:
    return dynamic_map("cpu")


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with the signed dynamic map.

    Returns (uint8 codes [numel], float32 absmax [ceil(numel / blocksize)]),
    byte-identical to bitsandbytes (the rounding of its native CPU quantizer,
    which wrote every double-quantized checkpoint made on CPU).
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).reshape(nblocks, blocksize)
    absmax = padded.abs().amax(dim=-1)
    normed = (padded * (1.0 / absmax.view(-1, 1))).clamp(-1, 1).reshape(-1)[:n]
    normed = torch.nan_to_num(normed, nan=-1.0)  # all-zero block: 0 * inf; bitsandbytes writes code 0
    grid_idx = (((normed + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)
    q = _dynamic_lut_cpu().to(x.device)[grid_idx]
    return q, absmax


#: Elements quantized per pass: bounds the float32 temporaries (about nine copies of
#: a chunk) so a large layer never needs several times its own size in scratch memory.
CHUNK_ELEMENTS = 1 << 20


def _quantize_chunk(flat: torch.Tensor, blocksize: int, bounds: torch.Tensor, order: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed uint8 [ceil(n/2)] and float32 absmax of ``flat`` (whole blocks, except a final partial one)."""
    absmax, scaled = _block_absmax_and_scale(flat.float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # odd count: pad with the code of 0.0
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if order is not None:
        q = order[q]
    q = q.to(torch.uint8)
    return (q[0::2] << 4) | q[1::2], absmax


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True, chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``w`` (any shape; fp32/fp16/bf16) to packed 4-bit.

    Returns ``(packed, state)``: packed is uint8 ``[(numel + 1) // 2, 1]`` on
    ``w.device``; ``state`` holds absmax (float32, or uint8 + nested stats when
    ``double_quant``), the code book, the shape and the original dtype.
    Works through ``w`` in chunks of whole blocks (``chunk_elements``): every
    block and byte comes out exactly as in one pass, with bounded temporaries.
    """
    check_tensor("weight", w, dtypes=FLOAT_DTYPES, nonempty=True)
    check_blocksize(blocksize)
    code = code4(quant_type, w.device)  # also validates quant_type
    bounds, order = (t.to(w.device) for t in _bounds_cpu(quant_type))
    order = None if quant_type == "nf4" else order

    flat = w.reshape(-1)
    step = max(blocksize, chunk_elements // blocksize * blocksize)  # whole blocks, so an even count
    parts = [_quantize_chunk(flat[i:i + step], blocksize, bounds, order) for i in range(0, flat.numel(), step)]
    packed = (parts[0][0] if len(parts) == 1 else torch.cat([p for p, _ in parts])).unsqueeze(1)
    absmax = parts[0][1] if len(parts) == 1 else torch.cat([a for _, a in parts])
    del parts

    nested = None
    if double_quant:
        offset = absmax.mean()
        qabs, absmax2 = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
        nested = NestedStats(absmax=absmax2, code=dynamic_map(w.device), offset=float(offset.item()))
        absmax = qabs
    state = QuantState(quant_type=quant_type, blocksize=blocksize, shape=torch.Size(w.shape), dtype=w.dtype,
                       absmax=absmax, code=code, nested=nested)
    return packed, state
