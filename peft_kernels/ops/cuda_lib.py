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
ABI_VERSION = 2

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
    6: "size argument out of range",
    7: "pointer not 16-byte aligned",
}

#: pk_gemv_4bit limits: at most GEMV_MAX_M rows of x, K a multiple of GEMV_K_MULTIPLE.
GEMV_MAX_M = 16
GEMV_K_MULTIPLE = 32


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
    lib.pk_gemv_4bit.argtypes = GEMV_ARGTYPES + [c.c_void_p]  # + stream
    lib.pk_gemv_4bit.restype = c.c_int


#: Arguments of pk_gemv_4bit without the trailing stream (also those of the test-only
#: pk_emulate_gemv_4bit): x, x_dtype, M, N, K, packed, absmax, nested_absmax, nested_code,
#: nested_offset, code16, blocksize, bias, xa, lora_B, R, scale, y.
GEMV_ARGTYPES = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_int32,
                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p]


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


# ----------------------------------------------------------------- fused decode GEMV
def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def gemv_unsupported_reason(x: torch.Tensor, packed: torch.Tensor) -> str | None:
    """Why :func:`gemv_4bit_cuda` cannot take this x [M, K] / packed (None when it can).

    Shape, dtype and alignment limits only (not whether the library loads): M in [1, 16], K a
    positive multiple of 32, fp32/fp16/bf16 x, x and packed 16-byte aligned and contiguous.
    """
    if x.dim() != 2:
        return f"x must be 2-D [M, K], got shape {tuple(x.shape)}"
    m, k = x.shape
    if not 1 <= m <= GEMV_MAX_M:
        return f"x has M={m} rows; the CUDA C GEMV takes 1 <= M <= {GEMV_MAX_M} (decode)"
    if k < GEMV_K_MULTIPLE or k % GEMV_K_MULTIPLE:
        return (f"K={k} (x {tuple(x.shape)}) is not a positive multiple of {GEMV_K_MULTIPLE}: the CUDA C GEMV "
                f"reads 32 weights per 16-byte load; the Triton kernels take any K")
    if x.dtype not in DTYPE_CODES:
        return f"x has dtype {x.dtype}; the CUDA C GEMV takes float32, float16 or bfloat16"
    if not x.is_contiguous() or not packed.is_contiguous():
        return "x and packed must be contiguous"
    if x.data_ptr() % 16 or packed.data_ptr() % 16:
        return "x and packed must be 16-byte aligned (a sliced view may not be)"
    return None


def gemv_args(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
              out_features: int, bias: torch.Tensor | None = None, *, nested_absmax: torch.Tensor | None = None,
              nested_code: torch.Tensor | None = None, nested_offset: float = 0.0,
              xa: torch.Tensor | None = None, lora_B: torch.Tensor | None = None, scale: float = 1.0,
              out: torch.Tensor | None = None, require_cuda: bool = True) -> tuple[torch.Tensor, list, list]:
    """Validate the GEMV's operands and build pk_gemv_4bit's arguments (without the stream).

    Returns (y, args, keep): y the [M, N] output (x.dtype; ``out`` when given, else new), args the ctypes
    arguments, keep the converted tensors that must stay alive during the call. Shared by
    :func:`gemv_4bit_cuda` and the host-emulation tests (``require_cuda=False``).
    """
    check_tensor("x", x, dtypes=tuple(DTYPE_CODES))
    check_tensor("packed", packed, dtypes=(torch.uint8,))
    check_tensor("code", code, dtypes=(torch.float32,))
    nested = nested_absmax is not None
    check_tensor("absmax", absmax, dtypes=(torch.uint8,) if nested else (torch.float32,))
    if nested:
        check_tensor("nested_absmax", nested_absmax, dtypes=(torch.float32,))
        check_tensor("nested_code", nested_code, dtypes=(torch.float32,))
    elif nested_code is not None:
        raise ValueError("nested_code is given without nested_absmax")
    reason = gemv_unsupported_reason(x, packed)
    if reason is not None:
        raise ValueError(reason)
    named = dict(x=x, packed=packed, absmax=absmax, code=code, nested_absmax=nested_absmax,
                 nested_code=nested_code, bias=bias, xa=xa, lora_B=lora_B)
    if require_cuda:
        for name, t in named.items():
            if t is not None:
                _require_cuda(name, t)
    check_same_device(**named)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"unsupported blocksize {blocksize!r}: expected one of {VALID_BLOCKSIZES}")
    m, k = x.shape
    n = out_features
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"out_features must be a positive int, got {n!r}")
    numel = n * k
    nblocks = -(-numel // blocksize)
    if packed.numel() < numel // 2:
        raise ValueError(f"packed has {packed.numel()} bytes but W [{n}, {k}] needs {numel // 2}")
    if absmax.numel() < nblocks:
        raise ValueError(f"absmax has {absmax.numel()} entries but W [{n}, {k}] in blocks of {blocksize} needs "
                         f"{nblocks}")
    if code.numel() != 16:
        raise ValueError(f"code must have 16 entries (the 4-bit code book), got {code.numel()}")
    if nested and (nested_code.numel() != 256 or nested_absmax.numel() < -(-nblocks // 256)):
        raise ValueError(f"double quantization needs nested_code [256] and >= {-(-nblocks // 256)} nested_absmax "
                         f"entries; got {nested_code.numel()} and {nested_absmax.numel()}")
    keep = [absmax.contiguous(), code.contiguous()]
    if nested:
        keep += [nested_absmax.contiguous(), nested_code.contiguous()]
    bias_f = None
    if bias is not None:
        check_tensor("bias", bias, dtypes=tuple(DTYPE_CODES))
        if bias.numel() != n:
            raise ValueError(f"bias must have {n} elements, got {bias.numel()}")
        bias_f = bias.reshape(n).float().contiguous()
        keep.append(bias_f)
    if (xa is None) != (lora_B is None):
        raise ValueError("xa and lora_B must be given together (the LoRA term) or not at all")
    xa_f = b_c = None
    r = 0
    if xa is not None:
        check_tensor("xa", xa, dtypes=tuple(DTYPE_CODES), ndim=2)
        check_tensor("lora_B", lora_B, dtypes=tuple(DTYPE_CODES), ndim=2)
        r = xa.shape[1]
        if xa.shape[0] != m or r < 1:
            raise ValueError(f"xa must have shape [{m}, r >= 1] (M rows of x), got {tuple(xa.shape)}")
        if tuple(lora_B.shape) != (n, r):
            raise ValueError(f"lora_B must have shape [{n}, {r}], got {tuple(lora_B.shape)}")
        xa_f = xa.to(x.dtype).contiguous()  # the reference's rounding of xa; no conversion when it is x.dtype
        b_c = lora_B.to(x.dtype).contiguous()
        keep += [xa_f, b_c]
    if out is None:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        check_tensor("out", out, dtypes=(x.dtype,), contiguous=True)
        if tuple(out.shape) != (m, n) or out.device != x.device:
            raise ValueError(f"out must be [{m}, {n}] on {x.device}, got {tuple(out.shape)} on {out.device}")
        y = out
    args = [x.data_ptr(), DTYPE_CODES[x.dtype], m, n, k, packed.data_ptr(), keep[0].data_ptr(),
            _ptr(keep[2]) if nested else None, _ptr(keep[3]) if nested else None, float(nested_offset),
            keep[1].data_ptr(), blocksize, _ptr(bias_f), _ptr(xa_f), _ptr(b_c), r, float(scale), y.data_ptr()]
    return y, args, keep


def gemv_4bit_cuda(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                   blocksize: int, out_features: int, bias: torch.Tensor | None = None, *,
                   nested_absmax: torch.Tensor | None = None, nested_code: torch.Tensor | None = None,
                   nested_offset: float = 0.0, xa: torch.Tensor | None = None,
                   lora_B: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """``y = x W^T + bias + scale * xa lora_B^T`` via ``pk_gemv_4bit`` (decode: 1 <= M <= 16).

    x: [M, K] fp32/fp16/bf16, contiguous, 16-byte aligned, K a multiple of 32. packed: uint8
    (>= N*K/2 bytes, 16-byte aligned). absmax: float32 [nblocks], or uint8 codes with
    nested_absmax float32 [ceil(nblocks/256)] and nested_code float32 [256] (double quantization).
    code: float32 [16]. bias: [N] (any float dtype, added in fp32). xa: [M, r] and lora_B: [N, r]
    (both used in x.dtype, products in fp32), scale: the LoRA scale. All on one CUDA device.
    Returns y [M, N] in x.dtype (fp32 W, products and sums); runs on the current stream.
    """
    y, args, keep = gemv_args(x, packed, absmax, code, blocksize, out_features, bias, nested_absmax=nested_absmax,
                              nested_code=nested_code, nested_offset=nested_offset, xa=xa, lora_B=lora_B,
                              scale=scale)
    lib = load()
    if lib is None:
        raise RuntimeError(f"the CUDA C library is unavailable: {unavailable_reason()}")
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        rc = lib.pk_gemv_4bit(*args, stream)
    del keep  # the converted operands are only read by kernels queued on this stream (caching allocator)
    if rc != 0:
        _raise_for(lib, "pk_gemv_4bit", rc)
    return y
