"""Validated entry points over the 4-bit ops: what layers and users call.

These check every argument (dtype, shape, device, layout, a QuantState that
does not match its bytes) and raise a clear error before any kernel runs, then
call the ``peft_kernels::`` torch.library ops.
"""
from __future__ import annotations

import torch

from .._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ..quant.state import QuantState
from .linear4bit import dequantize_4bit_op, linear4bit_op


def _state_args(state: QuantState) -> tuple:
    n = state.nested
    if n is None:
        return state.absmax, state.code, None, None, 0.0
    return state.absmax, state.code, n.absmax, n.code, float(n.offset)


def _check_weight(packed: torch.Tensor, state: QuantState) -> None:
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    state.validate(packed)
    check_tensor("packed weight", packed, contiguous=True)
    check_tensor("absmax", state.absmax, contiguous=True)


def dequantize(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight ``[*state.shape]`` in ``dtype`` (default: the dtype it was quantized from)."""
    _check_weight(packed, state)
    dtype = state.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dequantize dtype must be one of float32/float16/bfloat16, got {dtype}")
    absmax, code, nabs, ncode, noff = _state_args(state)
    flat = dequantize_4bit_op(packed, absmax, code, nabs, ncode, noff, state.blocksize, state.numel, dtype)
    return flat.view(state.shape)


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x W^T + b`` with W the 4-bit weight [N, K]: x [..., K] (contiguous) -> y [..., N] in x.dtype.

    Differentiable in x and bias (never in W). Raises on an empty, non-contiguous,
    wrongly-typed or wrongly-placed input.
    """
    _check_weight(packed, state)
    if len(state.shape) != 2:
        raise ValueError(f"linear_4bit needs a 2-D weight, the quant state has shape {tuple(state.shape)}")
    n_out, k_in = state.shape
    check_tensor("x", x, dtypes=FLOAT_DTYPES, nonempty=True, contiguous=True)
    if x.dim() < 1 or x.shape[-1] != k_in:
        raise ValueError(f"x has shape {tuple(x.shape)} but the 4-bit weight is [{n_out}, {k_in}]: "
                         f"the last dimension of x must be {k_in}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != n_out:
            raise ValueError(f"bias has {bias.shape[0]} entries, the layer has {n_out} outputs")
    check_same_device(x=x, packed_weight=packed, bias=bias)
    absmax, code, nabs, ncode, noff = _state_args(state)
    return linear4bit_op(x, packed, absmax, code, nabs, ncode, noff, state.blocksize, n_out, bias)


#: Integer dtypes accepted as token ids (int32 is widened to int64 for the lookup).
ID_DTYPES = (torch.int64, torch.int32)


def embedding_4bit(ids: torch.Tensor, packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` of the 4-bit table W [V, H]: ids (int64/int32, any shape) -> ``[*ids.shape, H]`` in ``dtype``.

    Raises TypeError for non-integer ids or an unsupported dtype, ValueError for ids outside [0, V) (naming
    the first bad id), a table that is not 2-D, or tensors on different devices. The range check reads the ids
    once (a device sync on CUDA, as a clear error instead of a device-side assert); it is skipped while
    torch.compile traces.
    """
    _check_weight(packed, state)
    if len(state.shape) != 2:
        raise ValueError(f"embedding_4bit needs a 2-D table, the quant state has shape {tuple(state.shape)}")
    vocab, dim = state.shape
    if not isinstance(ids, torch.Tensor) or ids.dtype not in ID_DTYPES:
        raise TypeError(f"token ids must be an int64 (or int32) tensor, got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"embedding_4bit dtype must be one of float32/float16/bfloat16, got {dtype}")
    check_same_device(ids=ids, packed_weight=packed)
    if ids.dtype != torch.int64:
        ids = ids.long()
    if ids.numel() and not torch.compiler.is_compiling():
        bad = (ids < 0) | (ids >= vocab)
        if bool(bad.any()):
            first = int(ids[bad].reshape(-1)[0])
            raise ValueError(f"token id {first} is out of range for an embedding table of {vocab} rows "
                             f"(ids must be in [0, {vocab}); {int(bad.sum())} of {ids.numel()} ids are outside)")
    from .embedding4bit import embedding4bit_op
    absmax, code, nabs, ncode, noff = _state_args(state)
    return embedding4bit_op(ids, packed, absmax, code, nabs, ncode, noff, state.blocksize, dim, dtype)
