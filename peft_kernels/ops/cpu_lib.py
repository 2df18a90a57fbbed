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
ABI_VERSION = 2

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
    quant = [c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_float, c.c_int32, c.c_void_p, c.c_int32]
    lib.pk_cpu_gemv_4bit_nt.argtypes = quant + [c.c_void_p, c.c_int64, c.c_int64, c.c_int64, c.c_void_p, c.c_void_p,
                                                c.c_int32]
    lib.pk_cpu_gemv_4bit_nt.restype = c.c_int
    lib.pk_cpu_gemv_4bit_nn.argtypes = quant + [c.c_void_p, c.c_int64, c.c_int64, c.c_int64, c.c_void_p, c.c_int32]
    lib.pk_cpu_gemv_4bit_nn.restype = c.c_int


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


# ------------------------------------------------------------------ fused 4-bit products for few rows
def _quant_args(packed, absmax, code, blocksize, n, k, nested_absmax, nested_code, nested_offset,
                nested_blocksize) -> list:
    """The checked weight arguments of pk_cpu_gemv_4bit_* (W [n, k] in blockwise 4-bit)."""
    nested = nested_absmax is not None
    if nested != (nested_code is not None):
        raise ValueError("give nested_absmax and nested_code together (double quantization) or neither")
    _check_cpu("packed", packed, torch.uint8)
    _check_cpu("absmax", absmax, torch.uint8 if nested else torch.float32)
    _check_cpu("code", code, torch.float32)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"unsupported blocksize {blocksize!r}: expected one of {VALID_BLOCKSIZES}")
    if code.numel() != 16:
        raise ValueError(f"code must have 16 entries (the 4-bit code book), got {code.numel()}")
    numel = n * k
    if packed.numel() < (numel + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes but a [{n}, {k}] weight needs {(numel + 1) // 2}")
    nblocks = -(-numel // blocksize)
    if absmax.numel() < nblocks:
        raise ValueError(f"absmax has {absmax.numel()} entries but a [{n}, {k}] weight in blocks of {blocksize} "
                         f"needs {nblocks}")
    if not nested:
        return [packed.data_ptr(), absmax.data_ptr(), None, None, None, 0.0, 0, code.data_ptr(), blocksize]
    _check_cpu("nested_absmax", nested_absmax, torch.float32)
    _check_cpu("nested_code", nested_code, torch.float32)
    if (isinstance(nested_blocksize, bool) or not isinstance(nested_blocksize, int) or nested_blocksize < 1
            or nested_blocksize & (nested_blocksize - 1)):
        raise ValueError(f"nested_blocksize must be a power of two, got {nested_blocksize!r}")
    if nested_code.numel() != 256 or nested_absmax.numel() < -(-nblocks // nested_blocksize):
        raise ValueError(f"nested_code must have 256 entries and nested_absmax >= {-(-nblocks // nested_blocksize)} "
                         f"(got {nested_code.numel()}, {nested_absmax.numel()})")
    # c_float rounds the offset to float32 as the reference's decode_absmax does
    return [packed.data_ptr(), None, absmax.data_ptr(), nested_absmax.data_ptr(), nested_code.data_ptr(),
            float(nested_offset), nested_blocksize, code.data_ptr(), blocksize]


def _rows_operand(name: str, t: torch.Tensor, cols: int) -> int:
    """Rows of a float32 [rows, cols] CPU operand, checked."""
    _check_cpu(name, t, torch.float32)
    if t.dim() != 2 or t.shape[1] != cols or t.shape[0] < 1:
        raise ValueError(f"{name} must be float32 [rows >= 1, {cols}], got {tuple(t.shape)}")
    return t.shape[0]


def _lib_or_raise() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError(f"the CPU C library is unavailable: {unavailable_reason()}")
    return lib


def gemv_4bit_nt_cpu(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                     blocksize: int, n: int, bias: torch.Tensor | None = None, *,
                     nested_absmax: torch.Tensor | None = None, nested_code: torch.Tensor | None = None,
                     nested_offset: float = 0.0, nested_blocksize: int = 256) -> torch.Tensor:
    """y [M, n] = x [M, K] · Wᵀ (+ bias [n]) with W [n, K] in 4-bit, never dequantized whole (float32 only).

    Weight arguments as :func:`dequantize_4bit_cpu`. For few rows M (decode): it reads the 4-bit bytes once
    instead of writing and re-reading a float32 copy of W. The decoded W is bit-identical to the
    dequantization; the sums are float32 in a fixed order, independent of the thread count.
    """
    k = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() == 2 else -1
    m = _rows_operand("x", x, k)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (output features) must be a positive int, got {n!r}")
    args = _quant_args(packed, absmax, code, blocksize, n, k, nested_absmax, nested_code, nested_offset,
                       nested_blocksize)
    if bias is not None:
        _check_cpu("bias", bias, torch.float32)
        if bias.shape != (n,):
            raise ValueError(f"bias must be float32 [{n}], got {tuple(bias.shape)}")
    y = torch.empty(m, n, dtype=torch.float32)
    lib = _lib_or_raise()
    rc = lib.pk_cpu_gemv_4bit_nt(*args, x.data_ptr(), m, n, k, None if bias is None else bias.data_ptr(),
                                 y.data_ptr(), torch.get_num_threads())
    if rc != 0:
        _raise_for(lib, "pk_cpu_gemv_4bit_nt", rc)
    return y


def gemv_4bit_nn_cpu(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                     blocksize: int, k: int, *, nested_absmax: torch.Tensor | None = None,
                     nested_code: torch.Tensor | None = None, nested_offset: float = 0.0,
                     nested_blocksize: int = 256) -> torch.Tensor:
    """dx [M, k] = dy [M, N] · W with W [N, k] in 4-bit, never dequantized whole (float32 only); see
    :func:`gemv_4bit_nt_cpu`."""
    n = dy.shape[-1] if isinstance(dy, torch.Tensor) and dy.dim() == 2 else -1
    m = _rows_operand("dy", dy, n)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (input features) must be a positive int, got {k!r}")
    args = _quant_args(packed, absmax, code, blocksize, n, k, nested_absmax, nested_code, nested_offset,
                       nested_blocksize)
    dx = torch.empty(m, k, dtype=torch.float32)
    lib = _lib_or_raise()
    rc = lib.pk_cpu_gemv_4bit_nn(*args, dy.data_ptr(), m, n, k, dx.data_ptr(), torch.get_num_threads())
    if rc != 0:
        _raise_for(lib, "pk_cpu_gemv_4bit_nn", rc)
    return dx

