"""Triton 4-bit kernels against ops/reference.py.

Without a GPU they run in Triton's interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported); with one, on CUDA tensors.
Only fp32/fp16 here: the interpreter's bf16 arithmetic/dot is wrong, and so is
its fp32 -> bf16 cast (it truncates instead of rounding to nearest), so bf16 is
covered by tests/test_gpu_kernels.py on a GPU.

Every output buffer is pre-filled with NaN (``out=``): an element a kernel does
not write fails the finiteness check of ``assert_close_to_reference``.
"""
import pytest
import torch
from _tolerance import assert_close_to_reference

from peft_kernels.kernels import dequantize_4bit, matmul_4bit_nn, matmul_4bit_nt
from peft_kernels.kernels import matmul4bit
from peft_kernels.kernels._launch import is_interpreted
from peft_kernels.kernels.dequant4bit import _dequant4bit_kernel
from peft_kernels.ops import reference as R
from peft_kernels.quant import quantize_4bit

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not is_interpreted(_dequant4bit_kernel),
                                reason="no GPU and triton was imported without TRITON_INTERPRET=1")

DTYPES = (torch.float32, torch.float16)
# (N, K): ragged, odd K, blocks crossing rows; K=96 takes the K % 32 == 0 (byte-group) path.
SHAPES = ((33, 65), (48, 100), (17, 31), (40, 96))


def _weight(n, k, blocksize, quant_type="nf4", double_quant=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    packed, st = quantize_4bit(w.to(DEVICE), blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    return packed, st.absmax_float().contiguous(), st.code


def _randn(*shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


def _poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


# ------------------------------------------------------------------------------------- dequant
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
def test_dequant_matches_reference(blocksize, quant_type, double_quant):
    # 1: a lone high nibble; 7/1001: odd, partial last block; 4096+2049 > one program's 2048 outputs.
    for numel in (1, 7, 1001, 6145):
        packed, absmax, code = _weight(1, numel, blocksize, quant_type, double_quant, seed=numel)
        for dtype in DTYPES:
            guard = 5
            out = _poisoned(numel + guard, dtype=dtype)
            got = dequantize_4bit(packed, absmax, code, blocksize, numel, dtype, out=out)
            want = R.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype)
            assert got.shape == (numel,) and got.data_ptr() == out.data_ptr()
            # fp32 product then one cast, as the reference: bit-identical, NaN poison included.
            assert torch.equal(got, want), f"numel={numel} {dtype}: differs from reference"
            assert torch.isnan(out[numel:]).all(), "kernel wrote past numel"
            exact = R.dequantize_4bit(packed, absmax, code, blocksize, numel, torch.float64)
            assert_close_to_reference(got, exact, dtype, f"dequant numel={numel}")


def test_dequant_allocates_and_accepts_any_packed_shape():
    packed, absmax, code = _weight(6, 11, 32)
    want = R.dequantize_4bit(packed, absmax, code, 32, 66, torch.float32)
    got = dequantize_4bit(packed.view(-1), absmax, code, 32, 66, torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    # More bytes than needed (a longer buffer): only ceil(numel/2) are read.
    padded = torch.cat([packed.view(-1), torch.full((9,), 0xFF, dtype=torch.uint8, device=DEVICE)])
    assert torch.equal(dequantize_4bit(padded, absmax, code, 32, 66, torch.float32), want)


def test_dequant_rejects_bad_arguments():
    packed, absmax, code = _weight(4, 16, 32)
    with pytest.raises(TypeError, match="absmax"):
        dequantize_4bit(packed, absmax.double(), code, 32, 64, torch.float32)
    with pytest.raises(ValueError, match="blocksize"):
        dequantize_4bit(packed, absmax, code, 48, 64, torch.float32)
    with pytest.raises(ValueError, match="packed bytes"):
        dequantize_4bit(packed, absmax, code, 32, 65, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        dequantize_4bit(packed, absmax, code, 32, 64, torch.int32)
    with pytest.raises(ValueError, match="contiguous"):
        dequantize_4bit(packed, absmax, code, 32, 64, torch.float32, out=_poisoned(128, dtype=torch.float32)[::2])


# --------------------------------------------------------------------------------- matmul nt
def _check_nt(m, n, k, blocksize, dtype, bias_dtype=None, quant_type="nf4", double_quant=False, config=None):
    packed, absmax, code = _weight(n, k, blocksize, quant_type, double_quant, seed=n * 1000 + k)
    x = _randn(m, k, dtype=dtype, seed=m)
    bias = None if bias_dtype is None else _randn(n, dtype=bias_dtype, seed=7)
    out = _poisoned(m, n, dtype=dtype)
    y = matmul_4bit_nt(x, packed, absmax, code, blocksize, n, bias, out=out, config=config)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    ref = R.linear4bit_forward(x.double(), packed, absmax, code, blocksize, n,
                               None if bias is None else bias.double())
    assert_close_to_reference(y, ref, dtype, f"nt M={m} N={n} K={k} bs={blocksize} bias={bias_dtype}")


def _check_nn(m, n, k, blocksize, dtype, quant_type="nf4", double_quant=False, config=None):
    packed, absmax, code = _weight(n, k, blocksize, quant_type, double_quant, seed=n * 1000 + k)
    dy = _randn(m, n, dtype=dtype, seed=m + 100)
    out = _poisoned(m, k, dtype=dtype)
    dx = matmul_4bit_nn(dy, packed, absmax, code, blocksize, k, out=out, config=config)
    assert dx.data_ptr() == out.data_ptr() and dx.dtype == dtype
    ref = R.linear4bit_grad_input(dy.double(), packed, absmax, code, blocksize, k)
    assert_close_to_reference(dx, ref, dtype, f"nn M={m} N={n} K={k} bs={blocksize}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_matmul_nt(m, n, k, blocksize, dtype):
    _check_nt(m, n, k, blocksize, dtype)
    _check_nt(m, n, k, blocksize, dtype, bias_dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_matmul_nn(m, n, k, blocksize, dtype):
    _check_nn(m, n, k, blocksize, dtype)


@pytest.mark.parametrize("n,k", SHAPES)
def test_matmul_blocksize_4096(n, k):
    # One block spans the whole (small) weight: every row shares absmax[0].
    for dtype in DTYPES:
        _check_nt(3, n, k, 4096, dtype, bias_dtype=torch.float32)
        _check_nn(3, n, k, 4096, dtype)


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matmul_nt_bias_dtypes(bias_dtype):
    # Bias is added in fp32 whatever its dtype (bf16 is only loaded/converted, no bf16 math).
    _check_nt(2, 33, 65, 64, torch.float16, bias_dtype=bias_dtype)
    _check_nt(2, 48, 100, 64, torch.float32, bias_dtype=bias_dtype)


@pytest.mark.parametrize("quant_type,double_quant", [("fp4", False), ("nf4", True), ("fp4", True)])
def test_matmul_formats(quant_type, double_quant):
    _check_nt(3, 48, 100, 64, torch.float32, torch.float32, quant_type, double_quant)
    _check_nn(3, 33, 65, 32, torch.float32, quant_type, double_quant)


@pytest.mark.parametrize("config", [c.name for c in matmul4bit.NT_CONFIGS])
def test_every_nt_config(config):
    # K > every BLOCK_K and N > every BLOCK_N: several loop trips and tiles, ragged at both ends.
    for n, k in ((70, 544), (67, 301)):
        _check_nt(5, n, k, 32, torch.float16, bias_dtype=torch.float32, config=config)
        _check_nt(19, n, k, 64, torch.float32, config=config)


def test_gemv_config():
    name = matmul4bit.GEMV_CONFIG.name
    for n, k in ((70, 1088), (67, 1025), (5, 64)):  # > 2 K tiles (aligned / any K), N < BLOCK_N...
        for dtype in DTYPES:
            _check_nt(1, n, k, 64, dtype, bias_dtype=torch.float32, config=name)
            _check_nt(1, n, k, 4096, dtype, config=name)
    with pytest.raises(ValueError, match="M == 1"):
        _check_nt(2, 8, 64, 64, torch.float32, config=name)


@pytest.mark.parametrize("config", [c.name for c in matmul4bit.NN_CONFIGS])
def test_every_nn_config(config):
    # N > every BLOCK_N (the loop), K > every BLOCK_K (the grid); odd and even K.
    for n, k in ((300, 160), (259, 133)):
        _check_nn(5, n, k, 32, torch.float16, config=config)
        _check_nn(19, n, k, 64, torch.float32, config=config)


def test_config_choice_follows_m():
    assert matmul4bit.pick_nt_config(1) is matmul4bit.GEMV_CONFIG
    assert matmul4bit.pick_nt_config(2).BLOCK_M == 16
    assert matmul4bit.pick_nt_config(16).BLOCK_M == 16
    assert matmul4bit.pick_nt_config(17).BLOCK_M == 64
    assert matmul4bit.pick_nn_config(1).BLOCK_M == 16
    assert matmul4bit.pick_nn_config(64).BLOCK_M == 64
    for cfg in matmul4bit.NT_CONFIGS + matmul4bit.NN_CONFIGS:  # tensor-core minimum in every dot dim
        assert min(cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K) >= 16, cfg
    for cfg in matmul4bit.NT_CONFIGS + matmul4bit.NN_CONFIGS + (matmul4bit.GEMV_CONFIG,):
        assert cfg.BLOCK_K % 32 == 0, cfg  # whole 32-element groups on the K_ALIGNED path


# ---------------------------------------------------------------------------- workspace path
def test_workspace_path(monkeypatch):
    monkeypatch.setattr(matmul4bit, "FUSED_MAX_M", 2)
    matmul4bit.clear_workspace()
    for dtype in DTYPES:
        for n, k in SHAPES:
            _check_nt(3, n, k, 32, dtype, bias_dtype=torch.float32)
            _check_nt(17, n, k, 64, dtype)
            _check_nn(3, n, k, 32, dtype)
        _check_nt(2, 33, 65, 32, dtype)  # M <= threshold: still fused
    # One buffer per (device, dtype, stream), reused by smaller weights and grown for larger ones.
    def fp32_buffers():
        return [b for key, b in matmul4bit._WORKSPACES.items() if key[1] == torch.float32]

    assert len(matmul4bit._WORKSPACES) == len(DTYPES)
    (buf,) = fp32_buffers()
    assert buf.numel() == 48 * 100  # the largest weight seen
    _check_nt(3, 17, 31, 32, torch.float32)
    assert [b.data_ptr() for b in fp32_buffers()] == [buf.data_ptr()]
    _check_nn(3, 64, 100, 32, torch.float32)
    assert [b.numel() for b in fp32_buffers()] == [64 * 100]
    matmul4bit.clear_workspace()
    assert not matmul4bit._WORKSPACES


# ------------------------------------------------------------------------------------ launch
def test_matmul_rejects_bad_arguments():
    packed, absmax, code = _weight(8, 32, 32)
    x = _randn(3, 32)
    with pytest.raises(ValueError, match="contiguous"):
        matmul_4bit_nt(_randn(32, 3).t(), packed, absmax, code, 32, 8)
    with pytest.raises(TypeError, match="x has dtype"):
        matmul_4bit_nt(x.double(), packed, absmax, code, 32, 8)
    with pytest.raises(ValueError, match="needs >="):
        matmul_4bit_nt(x, packed, absmax, code, 32, 9)  # more rows than the bytes hold
    with pytest.raises(ValueError, match="bias"):
        matmul_4bit_nt(x, packed, absmax, code, 32, 8, _randn(7))
    with pytest.raises(ValueError, match="2-D"):
        matmul_4bit_nn(_randn(8), packed, absmax, code, 32, 32)
    with pytest.raises(ValueError, match="shape"):
        matmul_4bit_nt(x, packed, absmax, code, 32, 8, out=_poisoned(3, 9, dtype=torch.float32))


def test_empty_batches():
    packed, absmax, code = _weight(8, 32, 32)
    assert matmul_4bit_nt(_randn(0, 32), packed, absmax, code, 32, 8).shape == (0, 8)
    assert matmul_4bit_nn(_randn(0, 8), packed, absmax, code, 32, 32).shape == (0, 32)
