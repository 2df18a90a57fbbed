"""torch.library op ``peft_kernels::embedding4bit``: rows of a frozen 4-bit table, dequantized on lookup.

    embedding4bit(ids, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                  embedding_dim, dtype) -> [*ids.shape, embedding_dim] in dtype

ids: int64, any shape, values in [0, V) (checked by ``ops/functional.embedding_4bit`` before the op runs).
The quantized table is passed as in ``ops/linear4bit.py``. Only the looked-up rows are decoded: the Triton
kernel (``kernels/embedding4bit.py``) on CUDA tensors (or under TRITON_INTERPRET=1 with backend
``triton``), ``reference.embedding_4bit_rows`` on CPU tensors. The op is not differentiable (the table is
frozen and ids are integers); trainable rows are added by ``nn.Embedding4bit`` in torch, around it.
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
    which = backend.select(ids.device)
    if which == "triton":
        from ..kernels.embedding4bit import embedding_4bit
        out = embedding_4bit(flat, packed.contiguous(), absmax.contiguous(), code.contiguous(), blocksize,
                             embedding_dim, dtype, nested_absmax=nested_absmax, nested_code=nested_code,
                             nested_offset=nested_offset)
    else:
        out = reference.embedding_4bit_rows(flat, packed, absmax, code, blocksize, embedding_dim, dtype,
                                            nested_absmax, nested_code, nested_offset)
    return out.view(*ids.shape, embedding_dim)


@embedding4bit_op.register_fake
def _(ids, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, embedding_dim, dtype):
    return ids.new_empty((*ids.shape, embedding_dim), dtype=dtype)
