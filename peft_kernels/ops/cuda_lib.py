"""ctypes loader and torch wrappers for the CUDA C library (``csrc/``, C ABI in ``csrc/peft_kernels.h``).

The library is found at ``$PEFT_KERNELS_CUDA_LIB`` when that is set, else at
``peft_kernels/_cuda/libpeft_kernels_cuda.so`` (written by ``setup.py`` or
``peft_kernels.csrc_build.build()``). It is optional: :func:`load` returns None
when it is missing or unusable and :func:`unavailable_reason` says why, so
callers can fall back to Triton or the reference.

The wrappers validate everything the C side cannot (sizes, devices, dtypes,
contiguity), allocate the output with torch (the C library never allocates) and
enqueue the kernel on torch's current stream of the tensors' device.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ._clib import CLibrary
from .._checks import check_same_device, check_tensor
from ..quant.codes import VALID_BLOCKSIZES

ENV_LIB = "PEFT_KERNELS_CUDA_LIB"
LIB_NAME = "libpeft_kernels_cuda.so"
#: PK_VERSION of csrc/peft_kernels.h this module was written against.
ABI_VERSION = 1

#: out_dtype codes of pk_dequantize_4bit.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

#: Return codes of the C functions (PK_ERR_* in the header), used when
#: pk_last_error() has nothing to say.
ERROR_MESSAGES = {
    1: "null pointer argument",
    2: "blocksize is not a power of two in [32, 4096]",
    3: "numel must be > 0",
    4: "unsupported output dtype",
    5: "CUDA kernel launch failed",
}


def _declare(lib: ctypes.CDLL) -> None:
    c = ctypes
    lib.pk_version.argtypes = []
    lib.pk_version.restype = c.c_int
    lib.pk_last_error.argtypes = []
    lib.pk_last_error.restype = c.c_char_p
    # Pointers travel as c_void_p (ints from data_ptr()); the header's const
    # qualifiers do not matter across the ABI.
    lib.pk_dequantize_4bit.argtypes = [c.c_void_p, c.c_void_p, c.c_void_p, c.c_int64, c.c_int32, c.c_int32,
                                       c.c_void_p, c.c_void_p]
    lib.pk_dequantize_4bit.restype = c.c_int


_LIB = CLibrary(what="CUDA C library", env_var=ENV_LIB, folder="_cuda", lib_name=LIB_NAME,
                abi_version=ABI_VERSION, declare=_declare, version_symbol="pk_version",
                build_hint="build it with `python -c 'import peft_kernels.csrc_build as b; b.build()'` "
                           "or reinstall with nvcc on PATH")


def library_path() -> Path:
    """Where :func:`load` looks: ``$PEFT_KERNELS_CUDA_LIB`` or the package's ``_cuda/`` folder."""
    return _LIB.path()


def load() -> ctypes.CDLL | None:
    """The loaded library (cached), or None when unavailable; see :func:`unavailable_reason`."""
    return _LIB.load()


def unavailable_reason() -> str | None:
    """Why :func:`load` returns None (None when the library is loaded)."""
    return _LIB.unavailable_reason()


def clear_cache() -> None:
    """Forget the cached load result so the next :func:`load` looks again (tests; a changed env var)."""
    _LIB.clear_cache()


def _raise_for(lib: ctypes.CDLL, fn: str, rc: int) -> None:
    msg = (lib.pk_last_error() or b"").decode("utf-8", "replace")
    raise RuntimeError(f"{fn} failed with code {rc}: {msg or ERROR_MESSAGES.get(rc, 'unknown error')}")


def _require_cuda(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"{name} is on {t.device}; the CUDA C library needs CUDA tensors "
                         f"(use peft_kernels.ops.reference for CPU tensors)")


def dequantize_4bit_cuda(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Flat [numel] tensor of ``dtype``: ``code[q_i] * absmax[i // blocksize]`` via ``pk_dequantize_4bit``.

    packed: uint8, >= ceil(numel / 2) bytes, contiguous (any shape, e.g. [(numel+1)//2, 1]);
    absmax: float32, >= ceil(numel / blocksize) entries, contiguous; code: float32 [16], contiguous;
    all on one CUDA device. dtype: float32, float16 or bfloat16. Bit-identical to
    ``reference.dequantize_4bit``. Runs on the current stream; the output is a new tensor.
    """
    if dtype not in DTYPE_CODES:
        raise TypeError(f"dtype must be one of float32, float16, bfloat16; got {dtype}")
    check_tensor("packed", packed, dtypes=(torch.uint8,))
    check_tensor("absmax", absmax, dtypes=(torch.float32,))
    check_tensor("code", code, dtypes=(torch.float32,))
    for name, t in (("packed", packed), ("absmax", absmax), ("code", code)):
        _require_cuda(name, t)
        check_tensor(name, t, contiguous=True)
    check_same_device(packed=packed, absmax=absmax, code=code)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"unsupported blocksize {blocksize!r}: expected one of {VALID_BLOCKSIZES}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    if code.numel() != 16:
        raise ValueError(f"code must have 16 entries (the 4-bit code book), got {code.numel()}")
    if packed.numel() < (numel + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes but {numel} elements need {(numel + 1) // 2}")
    nblocks = -(-numel // blocksize)
    if absmax.numel() < nblocks:
        raise ValueError(f"absmax has {absmax.numel()} entries but {numel} elements in blocks of {blocksize} "
                         f"need {nblocks}")
    if numel == 0:
        return torch.empty(0, dtype=dtype, device=packed.device)
    lib = load()
    if lib is None:
        raise RuntimeError(f"the CUDA C library is unavailable: {unavailable_reason()}")
    with torch.cuda.device(packed.device):  # makes the device's context current for the library's runtime
        out = torch.empty(numel, dtype=dtype, device=packed.device)
        stream = torch.cuda.current_stream(packed.device).cuda_stream
        rc = lib.pk_dequantize_4bit(packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), numel, blocksize,
                                    DTYPE_CODES[dtype], out.data_ptr(), stream)
    if rc != 0:
        _raise_for(lib, "pk_dequantize_4bit", rc)
    return out
