"""torch.library op ``peft_kernels::embedding4bit``: rows of a frozen 4-bit table, dequantized on lookup.

    embedding4bit(ids, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                  embedding_dim, dtype) -> [*ids.shape, embedding_dim] in dtype

ids: int64, any shape, values in [0, V) (checked by ``ops/functional.embedding_4bit`` before the op runs).
The quantized table is passed as in ``ops/linear4bit.py``. Only the looked-up rows are decoded: the Triton
kernel (``kernels/embedding4bit.py``) on CUDA tensors (or under TRITON_INTERPRET=1 with backend
``triton``); on CPU tensors, when each row is whole bytes and whole blocks (``H % blocksize == 0``) and the
CPU C library is built, the rows' bytes and block scales are gathered and decoded by it (``_rows_cpu_lib``),
else ``reference.embedding_4bit_rows``; both give the bits of dequantizing the whole table, then indexing.
The op is not differentiable (the table is frozen and ids are integers); trainable rows are added by
``nn.Embedding4bit`` in torch, around it.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backend, reference

Tensor = torch.Tensor


@torch.library.custom_op("peft_kernels::embedding4bit", mutates_args=())
def embedding4bit_op(ids: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                     nested_code: Optional[Tensor], nested_offset: float, blocksize: int, embedding_dim: int,
                     dtype: torch.dtype) -> Tensor:
    """Rows ``ids`` of the 4-bit table: ``[*ids.shape, embedding_dim]`` in ``dtype``."""
    flat = ids.reshape(-1).contiguous()
    which = backend.select(ids.device, has_cpu_impl=True)
    if which == "cpu" and embedding_dim % blocksize == 0 and dtype in CPU_LIB_DTYPES:
        out = _rows_cpu_lib(flat, packed, absmax, code, blocksize, embedding_dim, dtype, nested_absmax,
                            nested_code, nested_offset)
    elif which == "triton":
        from ..kernels.embedding4bit import embedding_4bit
        out = embedding_4bit(flat, packed.contiguous(), absmax.contiguous(), code.contiguous(), blocksize,
                             embedding_dim, dtype, nested_absmax=nested_absmax, nested_code=nested_code,
                             nested_offset=nested_offset)
    else:
        out = reference.embedding_4bit_rows(flat, packed, absmax, code, blocksize, embedding_dim, dtype,
                                            nested_absmax, nested_code, nested_offset)
    return out.view(*ids.shape, embedding_dim)


#: dtypes the CPU C library writes (float64 rows take the reference).
CPU_LIB_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rows_cpu_lib(ids: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, h: int,
                  dtype: torch.dtype, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                  nested_offset: float) -> Tensor:
    """Rows ``ids`` (int64 [M]) as [M, h] through the CPU C dequantization; needs ``h % blocksize == 0``.

    Each row is then h/2 whole bytes and h/blocksize whole blocks, so the M rows' bytes gathered one after
    another are themselves a valid 4-bit tensor, with the gathered rows' block scales as its float32
    absmax (double quantization is decoded for those blocks only, by the reference's own float32
    operations, because gathered blocks no longer line up with the 256-block nested groups). Work and
    temporaries are M·h/2 bytes + M·h/blocksize floats: never the table.
    """
    from . import cpu_lib
    nb = h // blocksize
    rows = packed.reshape(-1).view(-1, h // 2).index_select(0, ids)                 # [M, h/2] uint8
    blocks = ids[:, None] * nb + torch.arange(nb, device=ids.device)                 # [M, nb]
    scales = reference.block_scales(absmax, blocks, nested_absmax, nested_code, nested_offset)
    out = cpu_lib.dequantize_4bit_cpu(rows, scales.float().contiguous(), code.float().contiguous(), blocksize,
                                      ids.numel() * h, dtype)
    return out.view(-1, h)


@embedding4bit_op.register_fake
def _(ids, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, embedding_dim, dtype):
    return ids.new_empty((*ids.shape, embedding_dim), dtype=dtype)
