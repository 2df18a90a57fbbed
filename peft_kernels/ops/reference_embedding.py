"""Plain-torch 4-bit embedding lookup (the CPU path), re-exported by ``ops/reference.py``.

``embedding_4bit_rows`` returns rows ``ids`` of a 4-bit table W [V, H] (ARCHITECTURE.md "The 4-bit
format") by decoding only the bytes and absmax blocks those rows touch — never the whole table:

* ``H % blocksize == 0`` (then H is even): a row is ``H / 2`` whole bytes and ``H / blocksize`` whole
  blocks, gathered as rows of ``packed.view(V, H/2)`` and ``absmax.view(V, H/blocksize)``;
* otherwise (H odd, or blocks crossing rows): per element, ``e = id * H + col`` gives byte ``e >> 1``,
  nibble ``e & 1`` (0: high) and block ``e // blocksize``.

Values are ``code[q] * scale`` formed in float32 (float64 when ``dtype`` is float64) and cast once: the
same bits as :func:`reference.dequantize_4bit` of the whole table, then indexed. Work is done in chunks of
rows so the temporaries stay bounded (int64 element indices are 8 bytes per element).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["embedding_4bit_rows", "block_scales"]

#: Elements decoded per pass (bounds the float32 / int64 temporaries).
CHUNK_ELEMENTS = 1 << 20


def block_scales(absmax: torch.Tensor, blocks: torch.Tensor, nested_absmax: Optional[torch.Tensor] = None,
                 nested_code: Optional[torch.Tensor] = None, nested_offset: float = 0.0,
                 nested_blocksize: int = 256) -> torch.Tensor:
    """float32 scales of the absmax blocks ``blocks`` (int64, any shape): ``absmax[blocks]``, or with double
    quantization ``nested_code[absmax[b]] * nested_absmax[b // 256] + offset`` — the very float32 operations of
    ``reference.decode_absmax``, applied to the gathered blocks only."""
    if nested_absmax is None:
        return absmax.float()[blocks]
    out = nested_code.float()[absmax[blocks].long()] * nested_absmax.float()[blocks // nested_blocksize]
    return out + torch.tensor(nested_offset, dtype=torch.float32, device=out.device)


def embedding_4bit_rows(ids: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                        blocksize: int, embedding_dim: int, dtype: torch.dtype = torch.float32,
                        nested_absmax: Optional[torch.Tensor] = None, nested_code: Optional[torch.Tensor] = None,
                        nested_offset: float = 0.0) -> torch.Tensor:
    """Rows ``ids`` (int64 [M], values in [0, V)) of the 4-bit table as ``[M, embedding_dim]`` in ``dtype``.

    absmax: float32 [nblocks], or uint8 codes with ``nested_absmax`` / ``nested_code`` (double quantization).
    """
    h = embedding_dim
    work = torch.float64 if dtype == torch.float64 else torch.float32
    flat = packed.reshape(-1)
    ids = ids.reshape(-1).long()
    m = ids.numel()
    out = torch.empty(m, h, dtype=dtype, device=ids.device)
    c = code.to(work)
    nest = dict(nested_absmax=nested_absmax, nested_code=nested_code, nested_offset=nested_offset)
    step = max(1, CHUNK_ELEMENTS // h)
    if h % blocksize == 0:
        # Whole bytes and whole blocks per row: gather rows, decode through a (high, low) pair table.
        pairs = torch.stack([c.repeat_interleave(16), c.repeat(16)], dim=1)  # [256, 2]
        by_row = flat.view(-1, h // 2)  # H even: the table is exactly V * H / 2 bytes
        nb = h // blocksize
        cols = torch.arange(nb, device=ids.device)
        for i in range(0, m, step):
            r = ids[i:i + step]
            values = pairs[by_row[r].long()].view(r.numel(), nb, blocksize)
            scale = block_scales(absmax, r[:, None] * nb + cols, **nest).to(work)
            out[i:i + step] = (values * scale[..., None]).view(r.numel(), h).to(dtype)
        return out
    cols = torch.arange(h, device=ids.device)
    for i in range(0, m, step):
        e = ids[i:i + step, None] * h + cols                       # [rows, H] flat element indices
        byte = flat[e >> 1].long()
        q = torch.where((e & 1) == 0, byte >> 4, byte & 15)
        scale = block_scales(absmax, e // blocksize, **nest).to(work)
        out[i:i + step] = (c[q] * scale).to(dtype)
    return out
