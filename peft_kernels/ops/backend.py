"""Which implementation runs an op: the plain-torch reference, Triton, the CUDA C library or the CPU C library.

``auto`` (the default): CUDA tensors go to Triton; CPU tensors go to the CPU C
library (``csrc/cpu/``, backend ``cpu``) for ops that have a CPU implementation
when the library loads, else to ``ops/reference.py``. The CUDA C library
(``csrc/``) runs when forced with ``cuda``. ``PEFT_KERNELS_BACKEND`` forces one:
``reference`` is plain torch everywhere (the ground truth tests compare with);
tests use ``PEFT_KERNELS_BACKEND=triton`` together with ``TRITON_INTERPRET=1``
to run the Triton kernels on CPU tensors.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")
ENV_VAR = "PEFT_KERNELS_BACKEND"


def requested() -> str:
    """The backend named by the environment ('auto' when unset); raises on an unknown name."""
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a backend; expected one of {BACKENDS}")
    return name


def triton_usable(device: torch.device) -> bool:
    """Triton can run on this device: a CUDA device, or any device under TRITON_INTERPRET=1."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return device.type == "cuda"


def cpu_lib_usable() -> bool:
    """The CPU C library loads (built and ABI-compatible)."""
    from . import cpu_lib
    return cpu_lib.load() is not None


def select(device: torch.device, *, has_cuda_impl: bool = False, has_cpu_impl: bool = False) -> str:
    """The backend that will run an op whose tensors live on ``device``.

    ``has_cuda_impl``: the op has a CUDA C implementation (otherwise a forced
    'cuda' falls back to Triton, the other GPU path). ``has_cpu_impl``: the op
    has a CPU C implementation (otherwise 'cpu' and ``auto`` on CPU tensors run
    the reference).
    """
    name = requested()
    if name == "reference":
        return "reference"
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{ENV_VAR}=cpu needs CPU tensors, got tensors on {device}")
        if not has_cpu_impl:
            return "reference"
        if not cpu_lib_usable():
            from . import cpu_lib
            raise RuntimeError(f"{ENV_VAR}=cpu but the CPU C library is unavailable: "
                               f"{cpu_lib.unavailable_reason()}")
        return "cpu"
    if name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{ENV_VAR}=cuda needs CUDA tensors, got tensors on {device}")
        if has_cuda_impl:
            from . import cuda_lib
            if cuda_lib.load() is None:
                raise RuntimeError(f"{ENV_VAR}=cuda but the CUDA C library is unavailable: "
                                   f"{cuda_lib.unavailable_reason()}")
            return "cuda"
        return "triton"
    if name == "triton":
        if not triton_usable(device):
            raise ValueError(f"{ENV_VAR}=triton needs CUDA tensors or TRITON_INTERPRET=1 (got {device})")
        return "triton"
    # auto. The CUDA C dequantization is only chosen when forced until a GPU
    # benchmark (bench/gpu_suite.py) shows it beating the Triton kernel on a shape.
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and has_cpu_impl and cpu_lib_usable():
        return "cpu"
    return "reference"
