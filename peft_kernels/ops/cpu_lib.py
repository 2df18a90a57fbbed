"""ctypes loader and torch wrapper for the CPU C library (``csrc/cpu/``, C ABI in ``csrc/cpu/peft_kernels_cpu.h``).

The library is found at ``$PEFT_KERNELS_CPU_LIB`` when that is set, else at
``peft_kernels/_cpu/libpeft_kernels_cpu.so`` (written by ``setup.py`` or
``peft_kernels.csrc_build.build_cpu()``). It is optional: :func:`load` returns
None when it is missing or unusable and :func:`unavailable_reason` says why;
``ops/backend.py`` then runs ``ops/reference.py``.

The wrapper validates everything the C side cannot (sizes, devices, dtypes,
contiguity) and allocates the output with torch (the C library never
allocates). ctypes releases the GIL for the call; the library's OpenMP threads
are torch's own pool (both bind libgomp.so.1), capped at ``torch.get_num_threads()``.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ._clib import CLibrary
from .._checks import check_tensor
from ..quant.codes import VALID_BLOCKSIZES

ENV_LIB = "PEFT_KERNELS_CPU_LIB"
LIB_NAME = "libpeft_kernels_cpu.so"
#: PK_CPU_VERSION of csrc/cpu/peft_kernels_cpu.h this module was written against.
ABI_VERSION = 1

#: out_dtype codes of pk_cpu_dequantize_4bit.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: pk_cpu_isa() values.
ISA_NAMES = {0: "baseline", 1: "avx2", 2: "avx512"}

#: Return codes (PK_CPU_ERR_* in the header), used when pk_cpu_last_error() has nothing to say.
ERROR_MESSAGES = {
    1: "null pointer argument",
    2: "blocksize is not a power of two in [32, 4096]",
    3: "numel must be > 0",
    4: "unsupported output dtype",
}


def _declare(lib: ctypes.CDLL) -> None:
    c = ctypes
    lib.pk_cpu_version.argtypes = []
    lib.pk_cpu_version.restype = c.c_int
    lib.pk_cpu_last_error.argtypes = []
    lib.pk_cpu_last_error.restype = c.c_char_p
    lib.pk_cpu_isa.argtypes = []
    lib.pk_cpu_isa.restype = c.c_int
    lib.pk_cpu_set_max_isa.argtypes = [c.c_int32]
    lib.pk_cpu_set_max_isa.restype = c.c_int
    lib.pk_cpu_max_threads.argtypes = []
    lib.pk_cpu_max_threads.restype = c.c_int
    lib.pk_cpu_dequantize_4bit.argtypes = [c.c_void_p, c.c_void_p, c.c_void_p, c.c_int64, c.c_int32, c.c_int32,
                                           c.c_void_p, c.c_int32]
    lib.pk_cpu_dequantize_4bit.restype = c.c_int
    lib.pk_cpu_dequantize_4bit_nested.argtypes = [c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_float,
                                                  c.c_int32, c.c_void_p, c.c_int64, c.c_int32, c.c_int32,
                                                  c.c_void_p, c.c_int32]
    lib.pk_cpu_dequantize_4bit_nested.restype = c.c_int


_LIB = CLibrary(what="CPU C library", env_var=ENV_LIB, folder="_cpu", lib_name=LIB_NAME,
                abi_version=ABI_VERSION, declare=_declare, version_symbol="pk_cpu_version",
                build_hint="build it with `python -c 'import peft_kernels.csrc_build as b; b.build_cpu()'` "
                           "or reinstall with a C compiler on PATH")


def library_path() -> Path:
    """Where :func:`load` looks: ``$PEFT_KERNELS_CPU_LIB`` or the package's ``_cpu/`` folder."""
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


def isa() -> str | None:
    """Instruction-set tier the kernels run with ('baseline', 'avx2', 'avx512'); None without the library."""
    lib = load()
    return None if lib is None else ISA_NAMES.get(lib.pk_cpu_isa(), "unknown")


def _raise_for(lib: ctypes.CDLL, fn: str, rc: int) -> None:
    msg = (lib.pk_cpu_last_error() or b"").decode("utf-8", "replace")
    raise RuntimeError(f"{fn} failed with code {rc}: {msg or ERROR_MESSAGES.get(rc, 'unknown error')}")


def _check_cpu(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    # The common case in one cheap test (this runs twice per Linear4bit step); the
    # detailed checks below only word the error.
    if isinstance(t, torch.Tensor) and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous():
        return
    check_tensor(name, t, dtypes=(dtype,))
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}; the CPU C library needs CPU tensors")
    check_tensor(name, t, contiguous=True)


def dequantize_4bit_cpu(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                        numel: int, dtype: torch.dtype = torch.float32, *,
                        nested_absmax: torch.Tensor | None = None, nested_code: torch.Tensor | None = None,
                        nested_offset: float = 0.0, nested_blocksize: int = 256) -> torch.Tensor:
    """Flat [numel] tensor of ``dtype``: ``code[q_i] * absmax[i // blocksize]`` via the C library.

    packed: uint8, >= ceil(numel / 2) bytes (any shape, e.g. [(numel+1)//2, 1]); absmax: float32 with
    >= ceil(numel / blocksize) entries; code: float32 [16]. With double quantization absmax is the
    uint8 codes and ``nested_absmax`` (float32 [ceil(nblocks / nested_blocksize)]), ``nested_code``
    (float32 [256]) and ``nested_offset`` decode it as ``reference.decode_absmax`` does. All
    contiguous CPU tensors; dtype float32, float16 or bfloat16. Bit-identical to
    ``reference.dequantize_4bit(packed, reference.decode_absmax(...), ...)``. Uses up to
    ``torch.get_num_threads()`` threads; the output is a new tensor.
    """
    if dtype not in DTYPE_CODES:
        raise TypeError(f"dtype must be one of float32, float16, bfloat16; got {dtype}")
    nested = nested_absmax is not None
    if nested != (nested_code is not None):
        raise ValueError("give nested_absmax and nested_code together (double quantization) or neither")
    _check_cpu("packed", packed, torch.uint8)
    _check_cpu("absmax", absmax, torch.uint8 if nested else torch.float32)
    _check_cpu("code", code, torch.float32)
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
    if nested:
        _check_cpu("nested_absmax", nested_absmax, torch.float32)
        _check_cpu("nested_code", nested_code, torch.float32)
        if (isinstance(nested_blocksize, bool) or not isinstance(nested_blocksize, int) or nested_blocksize < 1
                or nested_blocksize & (nested_blocksize - 1)):
            raise ValueError(f"nested_blocksize must be a power of two, got {nested_blocksize!r}")
        if nested_code.numel() != 256:
            raise ValueError(f"nested_code must have 256 entries, got {nested_code.numel()}")
        if nested_absmax.numel() < -(-nblocks // nested_blocksize):
            raise ValueError(f"nested_absmax has {nested_absmax.numel()} entries but {nblocks} blocks in groups "
                             f"of {nested_blocksize} need {-(-nblocks // nested_blocksize)}")
    out = torch.empty(numel, dtype=dtype)
    if numel == 0:
        return out
    lib = load()
    if lib is None:
        raise RuntimeError(f"the CPU C library is unavailable: {unavailable_reason()}")
    threads = torch.get_num_threads()
    if nested:
        # c_float rounds the offset to float32 as torch.tensor(offset, dtype=float32) does in the reference.
        rc = lib.pk_cpu_dequantize_4bit_nested(packed.data_ptr(), absmax.data_ptr(), nested_absmax.data_ptr(),
                                               nested_code.data_ptr(), float(nested_offset), nested_blocksize,
                                               code.data_ptr(), numel, blocksize, DTYPE_CODES[dtype],
                                               out.data_ptr(), threads)
        fn = "pk_cpu_dequantize_4bit_nested"
    else:
        rc = lib.pk_cpu_dequantize_4bit(packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), numel, blocksize,
                                        DTYPE_CODES[dtype], out.data_ptr(), threads)
        fn = "pk_cpu_dequantize_4bit"
    if rc != 0:
        _raise_for(lib, fn, rc)
    return out
