"""Input validation shared by every layer: one place that turns bad input into a clear error.

Each helper raises ``TypeError`` (wrong type/dtype) or ``ValueError`` (wrong
shape, device, layout or value) whose message names the argument and what was
expected, so a mistake never surfaces as a crash deep inside a kernel.
"""
from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, dtypes: Iterable[torch.dtype] | None = None,
                 ndim: int | None = None, device: torch.device | None = None,
                 contiguous: bool = False, nonempty: bool = False) -> None:
    """Check that ``t`` is a tensor with the given properties, naming ``name`` in any error."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of: {allowed}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device} but must be on {device} (same device as the weight)")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first); got strides {t.stride()}")


def check_same_device(**tensors: torch.Tensor) -> None:
    """All given tensors live on one device; the error lists where each one is."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on the same device: {where}")
