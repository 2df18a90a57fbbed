"""The fused 4-bit decode GEMV of the CUDA C library (csrc/gemv_4bit.cu) and its torch ops.

Without a GPU:
* nvcc compiles it for sm_80/86/89/90: test_csrc.py builds the library (both .cu files) once, checks
  the fat binary, the exported symbols (pk_gemv_4bit among them) and pk_gemv_4bit's C-side checks;
* the kernel's per-lane code and its butterfly reduction, compiled for the host
  (-DPK_HOST_EMULATION) and run warp by warp, against a float64 reference on ragged shapes:
  M in 1, 3, 16; odd N; K a multiple and a non-multiple of the blocksize; fp32/fp16/bf16;
  with and without bias and LoRA term; double-quantized absmax; outputs poisoned with NaN;
* the wrapper's errors for bad input, and the torch.library ops' fake implementations.
The ``gpu``-marked tests run the real kernel (and compare it with Triton's GEMV).
"""
from __future__ import annotations

import ctypes

import pytest
import torch

from _tolerance import assert_close_to_reference
from peft_kernels import csrc_build
from peft_kernels.ops import cuda_lib, reference
from peft_kernels.quant import code4, quantize_4bit

NVCC = csrc_build.nvcc_path()
NO_NVCC = "nvcc not found: the CUDA C library cannot be compiled on this machine"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> ctypes.CDLL:
    if NVCC is None:
        pytest.skip(NO_NVCC)
    lib = ctypes.CDLL(str(csrc_build.build_emulator(tmp_path_factory.mktemp("gemv_emu"))))
    lib.pk_emulate_gemv_4bit.argtypes = cuda_lib.GEMV_ARGTYPES
    lib.pk_emulate_gemv_4bit.restype = ctypes.c_int
    lib.pk_last_error.restype = ctypes.c_char_p
    return lib


def _weight(n, k, blocksize, quant_type="nf4", double_quant=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(device)
    packed, st = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    return packed, st


def _stats_kwargs(st):
    if st.nested is None:
        return {}
    return dict(nested_absmax=st.nested.absmax, nested_code=st.nested.code, nested_offset=st.nested.offset)


def _reference64(x, packed, st, blocksize, n, bias=None, xa=None, lora_B=None, scale=1.0):
    """float64 y = x W^T + bias + scale * xa B^T, W from the same (fp32-decoded) scales as the kernel."""
    k = x.shape[1]
    absmax = st.absmax_float()
    w = reference.dequantize_4bit(packed, absmax, st.code, blocksize, n * k, torch.float64).view(n, k)
    y = x.double() @ w.t()
    if bias is not None:
        y = y + bias.double()
    if xa is not None:
        y = y + scale * (xa.double() @ lora_B.double().t())
    return y


def _emulate(emu, x, packed, st, blocksize, n, **kw):
    y = torch.full((x.shape[0], n), float("nan"), dtype=x.dtype)  # poison: unwritten -> NaN
    _, args, keep = cuda_lib.gemv_args(x, packed, st.absmax, st.code, blocksize, n, out=y, require_cuda=False,
                                       **_stats_kwargs(st), **kw)
    rc = emu.pk_emulate_gemv_4bit(*args)
    assert rc == 0, emu.pk_last_error()
    del keep
    return y


# (M, N, K, blocksize): odd N, K a multiple of the blocksize (64, 128) and not (96 / 64,
# 320 / 128: blocks span rows), and K > 32 * 32 so lanes take several chunks (1056 = 33 chunks).
SHAPES = [(1, 37, 64, 64), (3, 37, 128, 128), (16, 37, 96, 64), (1, 5, 320, 128), (3, 19, 1056, 64),
          (16, 3, 2048, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("m,n,k,blocksize", SHAPES)
def test_emulated_gemv_matches_float64(emu, m, n, k, blocksize, dtype):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    packed, st = _weight(n, k, blocksize, seed=k + n)
    x = torch.randn(m, k, generator=g).to(dtype)
    got = _emulate(emu, x, packed, st, blocksize, n)
    assert_close_to_reference(got, _reference64(x, packed, st, blocksize, n), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("m,n,k,blocksize,r", [(1, 37, 64, 64, 8), (3, 21, 96, 64, 1), (16, 13, 1056, 128, 40)])
@pytest.mark.parametrize("double_quant", (False, True), ids=("absmax", "nested"))
def test_emulated_gemv_bias_lora_nested(emu, m, n, k, blocksize, r, dtype, double_quant):
    # r = 40 > 32: lanes take two rank columns; rank 1 leaves 31 lanes without LoRA work.
    g = torch.Generator().manual_seed(r + m)
    packed, st = _weight(n, k, blocksize, quant_type="fp4" if double_quant else "nf4", double_quant=double_quant,
                         seed=r)
    assert (st.nested is not None) == double_quant
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    xa = torch.randn(m, r, generator=g).to(dtype)  # the kernel reads xa in x.dtype
    lora_B = (torch.randn(n, r, generator=g) * 0.1).to(dtype)
    scale = 0.75
    for kw in (dict(bias=bias), dict(xa=xa, lora_B=lora_B, scale=scale),
               dict(bias=bias, xa=xa, lora_B=lora_B, scale=scale)):
        got = _emulate(emu, x, packed, st, blocksize, n, **kw)
        want = _reference64(x, packed, st, blocksize, n, **kw)
        assert_close_to_reference(got, want, dtype, what=f"y with {sorted(kw)}")


def test_emulated_gemv_writes_only_y(emu):
    # y is the middle of a NaN buffer: the guards on both sides stay NaN, every y element is written.
    m, n, k, bs = 3, 9, 64, 64
    packed, st = _weight(n, k, bs, seed=3)
    x = torch.randn(m, k)
    buf = torch.full((m * n + 8,), float("nan"))
    y = buf[4:4 + m * n].view(m, n)
    _, args, keep = cuda_lib.gemv_args(x, packed, st.absmax, st.code, bs, n, out=y, require_cuda=False)
    assert emu.pk_emulate_gemv_4bit(*args) == 0
    assert torch.isnan(buf[:4]).all() and torch.isnan(buf[4 + m * n:]).all()
    assert_close_to_reference(y, _reference64(x, packed, st, bs, n), torch.float32)


def test_emulated_c_side_validation(emu):
    """The C side's own checks (the wrapper catches these earlier with the same words)."""
    fake = 0x1000  # 16-byte aligned, never dereferenced: every call fails validation first
    base = [fake, 0, 1, 8, 64, fake, fake, None, None, 0.0, fake, 64, None, None, None, 0, 1.0, fake]

    def call(**changes):
        args = list(base)
        names = ["x", "x_dtype", "M", "N", "K", "packed", "absmax", "nested_absmax", "nested_code", "offset",
                 "code16", "blocksize", "bias", "xa", "lora_B", "R", "scale", "y"]
        for name, v in changes.items():
            args[names.index(name)] = v
        return emu.pk_emulate_gemv_4bit(*args), emu.pk_last_error().decode()

    for changes, code, text in [
        (dict(M=17), 6, "M=17"), (dict(M=0), 6, "M=0"), (dict(K=48), 6, "K=48"), (dict(N=0), 6, "N=0"),
        (dict(x_dtype=3), 4, "x_dtype 3"), (dict(blocksize=48), 2, "blocksize 48"), (dict(y=None), 1, "null"),
        (dict(xa=fake), 1, "xa="), (dict(nested_absmax=fake), 1, "nested_absmax="),
        (dict(xa=fake, lora_B=fake, R=0), 6, "R=0"), (dict(packed=fake + 4), 7, "16-byte aligned"),
    ]:
        rc, msg = call(**changes)
        assert rc == code and text in msg, (changes, rc, msg)


# ----------------------------------------------------------------- wrapper errors (CPU)
def _args(m=1, n=8, k=64, bs=64, dtype=torch.float32):
    packed, st = _weight(n, k, bs)
    return torch.randn(m, k, dtype=dtype), packed, st.absmax, st.code, bs, n


@pytest.mark.parametrize("change,exc,msg", [
    (dict(m=17), ValueError, "M=17 rows.*1 <= M <= 16"),
    (dict(k=48, bs=32), ValueError, r"K=48 \(x \(1, 48\)\) is not a positive multiple of 32"),
    (dict(dtype=torch.float64), TypeError, "x has dtype float64"),
])
def test_wrapper_rejects_bad_shapes_and_dtypes(change, exc, msg):
    with pytest.raises(exc, match=msg):
        cuda_lib.gemv_4bit_cuda(*_args(**change))


def test_wrapper_rejects_bad_operands():
    x, packed, absmax, code, bs, n = _args()
    with pytest.raises(ValueError, match="x is on cpu.*CUDA"):
        cuda_lib.gemv_4bit_cuda(x, packed, absmax, code, bs, n)
    kw = dict(require_cuda=False)
    with pytest.raises(ValueError, match="needs 256"):
        cuda_lib.gemv_args(x, packed[:10], absmax, code, bs, n, **kw)
    with pytest.raises(ValueError, match="absmax has 7 entries"):
        cuda_lib.gemv_args(x, packed, absmax[:7], code, bs, n, **kw)
    with pytest.raises(ValueError, match="bias must have 8 elements"):
        cuda_lib.gemv_args(x, packed, absmax, code, bs, n, torch.zeros(9), **kw)
    with pytest.raises(ValueError, match="given together"):
        cuda_lib.gemv_args(x, packed, absmax, code, bs, n, xa=torch.zeros(1, 4), **kw)
    with pytest.raises(ValueError, match=r"lora_B must have shape \[8, 4\]"):
        cuda_lib.gemv_args(x, packed, absmax, code, bs, n, xa=torch.zeros(1, 4), lora_B=torch.zeros(8, 5), **kw)
    with pytest.raises(ValueError, match=r"xa must have shape \[1, r >= 1\]"):
        cuda_lib.gemv_args(x, packed, absmax, code, bs, n, xa=torch.zeros(2, 4), lora_B=torch.zeros(8, 4), **kw)
    with pytest.raises(ValueError, match="16-byte aligned"):
        cuda_lib.gemv_args(torch.randn(65)[1:].view(1, 64), packed, absmax, code, bs, n, **kw)
    with pytest.raises(TypeError, match="absmax has dtype float32; expected one of: uint8"):
        cuda_lib.gemv_args(x, packed, absmax, code, bs, n, nested_absmax=torch.ones(1),
                           nested_code=torch.ones(256), **kw)
    with pytest.raises(ValueError, match="out_features must be a positive int"):
        cuda_lib.gemv_args(x, packed, absmax, code, bs, 0, **kw)


# ----------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def gpu_lib(tmp_path_factory):
    """The library the GPU tests run: freshly built when nvcc exists, else the installed one."""
    mp = pytest.MonkeyPatch()
    if NVCC is not None:
        arch = "".join(map(str, torch.cuda.get_device_capability()))  # this GPU only: a fast build
        mp.setenv(cuda_lib.ENV_LIB, str(csrc_build.build(tmp_path_factory.mktemp("gemv_gpu"), archs=(arch,))))
    cuda_lib.clear_cache()
    lib = cuda_lib.load()
    if lib is None:
        mp.undo()
        pytest.skip(f"no CUDA C library: {cuda_lib.unavailable_reason()}")
    yield lib
    mp.undo()
    cuda_lib.clear_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("m", (1, 3, 8, 16))
def test_gpu_gemv_matches_float64(gpu_lib, m, dtype):
    for n, k, bs, dq in ((37, 96, 64, False), (1001, 4096, 64, True), (4096, 1056, 128, True)):
        packed, st = _weight(n, k, bs, double_quant=dq, seed=n, device="cuda")
        g = torch.Generator(device="cuda").manual_seed(m)
        x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
        bias = torch.randn(n, device="cuda", generator=g)
        xa = torch.randn(m, 24, device="cuda", generator=g).to(dtype)
        b = (0.1 * torch.randn(n, 24, device="cuda", generator=g)).to(dtype)
        for kw in ({}, dict(bias=bias), dict(bias=bias, xa=xa, lora_B=b, scale=0.5)):
            y = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
            _, args, keep = cuda_lib.gemv_args(x, packed, st.absmax, st.code, bs, n, out=y, **_stats_kwargs(st),
                                               **kw)
            assert gpu_lib.pk_gemv_4bit(*args, torch.cuda.current_stream().cuda_stream) == 0
            torch.cuda.synchronize()
            want = _reference64(x.cpu(), packed.cpu(), st.to("cpu"), bs, n,
                                **{key: (v.cpu() if torch.is_tensor(v) else v) for key, v in kw.items()})
            assert_close_to_reference(y.cpu(), want, dtype, what=f"M={m} N={n} K={k} {sorted(kw)}")
            got = cuda_lib.gemv_4bit_cuda(x, packed, st.absmax, st.code, bs, n, **_stats_kwargs(st), **kw)
            assert_close_to_reference(got.cpu(), want, dtype)


@pytest.mark.gpu
def test_gpu_gemv_equals_emulation_and_tracks_triton(gpu_lib, emu):
    # The emulation runs the same per-lane code and reduction order: equal up to FMA contraction.
    from peft_kernels.kernels.matmul4bit import matmul_4bit_nt
    n, k, bs = 513, 2048, 64
    packed, st = _weight(n, k, bs, double_quant=True, seed=9)
    x = torch.randn(1, k, dtype=torch.float16)
    emu_y = _emulate(emu, x, packed, st, bs, n)
    gpu_y = cuda_lib.gemv_4bit_cuda(x.cuda(), packed.cuda(), st.absmax.cuda(), st.code.cuda(), bs, n,
                                    **_stats_kwargs(st.to("cuda")))
    assert_close_to_reference(gpu_y.cpu().float(), emu_y.float(), torch.float16)
    tri = matmul_4bit_nt(x.cuda(), packed.cuda(), st.absmax_float().cuda(), st.code.cuda(), bs, n, config="nt_gemv")
    assert_close_to_reference(gpu_y.cpu().float(), tri.cpu().float(), torch.float16)


@pytest.mark.gpu
def test_gpu_gemv_errors_and_side_stream(gpu_lib):
    n, k, bs = 64, 128, 64
    packed, st = _weight(n, k, bs, device="cuda")
    x = torch.randn(2, k, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = cuda_lib.gemv_4bit_cuda(x, packed, st.absmax, st.code, bs, n)
    side.synchronize()
    want = _reference64(x.cpu(), packed.cpu(), st.to("cpu"), bs, n)
    assert_close_to_reference(y.cpu(), want, torch.bfloat16)
    with pytest.raises(ValueError, match="absmax is on cpu"):
        cuda_lib.gemv_4bit_cuda(x, packed, st.absmax.cpu(), st.code, bs, n)
    with pytest.raises(ValueError, match="16-byte aligned"):
        cuda_lib.gemv_4bit_cuda(x, packed.reshape(-1)[8:].reshape(-1, 1), st.absmax, st.code, bs, n - 1)
