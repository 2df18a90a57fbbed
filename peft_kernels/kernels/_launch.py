"""Small helpers shared by the Triton launchers: cheap argument checks, device rules, AOT records.

The op layer (``peft_kernels.ops``) validates user input in depth; the launchers
here only check what would otherwise turn into a silent wrong answer or a crash
inside a kernel (dtype, contiguity, device), with messages that name the argument.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

#: Triton signature spelling of each torch dtype a kernel pointer may carry.
TL_PTR = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.uint8: "*u8",
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_BLOCKSIZE, MAX_BLOCKSIZE = 32, 4096


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was created under ``TRITON_INTERPRET=1`` (it then runs on CPU tensors)."""
    # triton.jit decides at decoration time; the class name is stable from 3.0 to 3.9.
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(kernel, **tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device, and one the kernel can run on: CUDA, or CPU under the interpreter."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        where = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on the same device: {where}")
    if first.type != "cuda" and not (first.type == "cpu" and is_interpreted(kernel)):
        raise ValueError(f"Triton kernels need CUDA tensors (CPU tensors only with TRITON_INTERPRET=1 set "
                         f"before triton is imported); got tensors on {first}")
    return first


def check_arg(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    """``t`` is a contiguous tensor of one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of: {allowed}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first); got strides {t.stride()}")


def log2_blocksize(blocksize: int) -> int:
    """log2 of a power-of-two blocksize in [32, 4096]; the kernels turn index // blocksize into a shift."""
    if not (isinstance(blocksize, int) and MIN_BLOCKSIZE <= blocksize <= MAX_BLOCKSIZE
            and blocksize & (blocksize - 1) == 0):
        raise ValueError(f"blocksize must be a power of two in [{MIN_BLOCKSIZE}, {MAX_BLOCKSIZE}], got {blocksize!r}")
    return blocksize.bit_length() - 1


@dataclass(frozen=True)
class AotVariant:
    """One compiled form of a kernel: what ``triton.compile(ASTSource(...))`` needs to build it ahead of time.

    ``expect_mma``: the kernel has a ``tl.dot`` on 16-bit operands, so its PTX must use tensor cores.
    ``divisible_by_16``: arguments the JIT would see as multiples of 16 in the common case (aligned
    pointers, K % 16 == 0), compiled with that hint so the AOT code is the code that usually runs.
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    expect_mma: bool = False
    divisible_by_16: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
