"""Triton LoRA / DoRA kernels (peft_kernels/kernels/lora.py) against ops/reference.py in float64.

Without a GPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); only
fp32/fp16 here (the interpreter's bf16 math is wrong): bf16 and large shapes are in
tests/test_gpu_lora_kernels.py. Output buffers are pre-filled with NaN so an unwritten element fails.

The low-rank operands are scaled so that the rank-r term is as large as x W^T: a dropped or
mis-indexed rank column then moves the result far past the tolerance.
"""
import math

import pytest
import torch
from _tolerance import assert_close_to_reference

from peft_kernels.kernels import (dora_weight_norm_4bit, dora_weight_norm_dense, lora, lora_matmul_4bit_nn,
                                  lora_matmul_4bit_nt, matmul4bit)
from peft_kernels.kernels._launch import is_interpreted
from peft_kernels.ops import reference as R
from peft_kernels.quant import quantize_4bit

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not is_interpreted(lora._lora_nt_kernel),
                                reason="no GPU and triton was imported without TRITON_INTERPRET=1")

DTYPES = (torch.float32, torch.float16)
# (N, K, r, blocksize): odd K with blocks crossing rows, K % 32 == 0 (whole-byte path), K not a
# multiple of the blocksize, r = 1 / 8 / 12 (padded to 16 by masks) / 16 / 64 (4 tail trips).
CASES = ((33, 65, 8, 32), (40, 96, 16, 64), (48, 100, 12, 64), (17, 31, 1, 32), (24, 64, 64, 32))


def _weight(n, k, blocksize, quant_type="nf4", double_quant=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    packed, st = quantize_4bit(torch.randn(n, k, generator=g).to(DEVICE), blocksize=blocksize,
                               quant_type=quant_type, double_quant=double_quant)
    return packed, st.absmax_float().contiguous(), st.code


def _randn(*shape, dtype=torch.float32, scale=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)


def _poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _d(t):
    return None if t is None else t.double()


def _check_nt(m, n, k, r, blocksize, dtype, bias=False, config=None, lr_dtype=None, quant_type="nf4",
              double_quant=False):
    """lr_dtype: dtype of xa_scaled / lora_B / bias when it differs from x's (the launcher casts)."""
    packed, absmax, code = _weight(n, k, blocksize, quant_type, double_quant, seed=n * 1000 + k)
    lr = lr_dtype or dtype
    x = _randn(m, k, dtype=dtype, seed=m)
    xa = _randn(m, r, dtype=lr, scale=math.sqrt(k / r), seed=m + 1)
    b = _randn(n, r, dtype=lr, seed=n + r)
    bias_t = _randn(n, dtype=lr, seed=7) if bias else None
    out = _poisoned(m, n, dtype=dtype)
    y = lora_matmul_4bit_nt(x, packed, absmax, code, blocksize, n, xa, b, bias_t, out=out, config=config)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    # The kernel uses the low-rank operands in x.dtype: so does the reference (rounded first, then exact).
    ref = R.lora_forward_4bit(x.double(), packed, absmax, code, blocksize, n, _d(xa.to(dtype)), _d(b.to(dtype)),
                              _d(None if bias_t is None else bias_t.to(dtype)))
    assert_close_to_reference(y, ref, dtype, f"lora nt M={m} N={n} K={k} r={r} bs={blocksize} bias={bias} "
                                             f"config={config}")


def _check_nn(m, n, k, r, blocksize, dtype, config=None, lr_dtype=None, quant_type="nf4", double_quant=False):
    packed, absmax, code = _weight(n, k, blocksize, quant_type, double_quant, seed=n * 1000 + k)
    lr = lr_dtype or dtype
    dy = _randn(m, n, dtype=dtype, seed=m + 100)
    dyb = _randn(m, r, dtype=lr, scale=math.sqrt(n / r), seed=m + 101)
    a = _randn(r, k, dtype=lr, seed=k + r)
    out = _poisoned(m, k, dtype=dtype)
    dx = lora_matmul_4bit_nn(dy, packed, absmax, code, blocksize, k, dyb, a, out=out, config=config)
    assert dx.data_ptr() == out.data_ptr() and dx.dtype == dtype
    ref = R.lora_grad_input_4bit(dy.double(), packed, absmax, code, blocksize, k, _d(dyb.to(dtype)), _d(a.to(dtype)))
    assert_close_to_reference(dx, ref, dtype, f"lora nn M={m} N={n} K={k} r={r} bs={blocksize} config={config}")


# --------------------------------------------------------------------------- matmuls, by M
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17, 70])  # GEMV, 16-row tiles, 64-row tiles, workspace (70 > FUSED_MAX_M)
def test_lora_nt(m, dtype):
    for i, (n, k, r, bs) in enumerate(CASES):
        _check_nt(m, n, k, r, bs, dtype, bias=i % 2 == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17, 70])
def test_lora_nn(m, dtype):
    for n, k, r, bs in CASES:
        _check_nn(m, n, k, r, bs, dtype)


def test_fused_64_row_tiles_at_m70():
    # M = 70 normally takes the workspace path; forced fused: two M tiles, the second 6 rows deep.
    for n, k, r, bs in CASES[:3]:
        _check_nt(70, n, k, r, bs, torch.float16, bias=True, config="lora_nt_m64")
        _check_nn(70, n, k, r, bs, torch.float32, config="lora_nn_m64")


@pytest.mark.parametrize("config", sorted(lora._NT))
def test_every_nt_config(config):
    # K > every BLOCK_K and N > every BLOCK_N: several loop trips and tiles, ragged at both ends.
    m = 1 if config == "lora_nt_gemv" else 5
    for n, k, r in ((70, 544, 12), (67, 301, 64)):
        _check_nt(m, n, k, r, 32, torch.float16, bias=True, config=config)
        _check_nt(m, n, k, r, 64, torch.float32, config=config)
    if config == "lora_nt_gemv":
        _check_nt(1, 9, 1088, 16, 4096, torch.float32, config=config)  # > 2 aligned K tiles, one block
        with pytest.raises(ValueError, match="M == 1"):
            _check_nt(2, 8, 64, 8, 32, torch.float32, config=config)


@pytest.mark.parametrize("config", sorted(lora._NN))
def test_every_nn_config(config):
    for n, k, r in ((300, 160, 12), (259, 133, 64)):  # N > BLOCK_N (the loop), K > BLOCK_K (the grid)
        _check_nn(5, n, k, r, 32, torch.float16, config=config)
        _check_nn(19, n, k, r, 64, torch.float32, config=config)


def test_operand_dtypes_and_formats():
    # Low-rank operands and bias in another dtype are cast to x.dtype by the launcher.
    _check_nt(3, 33, 65, 8, 64, torch.float16, bias=True, lr_dtype=torch.float32)
    _check_nt(1, 33, 65, 8, 64, torch.float16, bias=True, lr_dtype=torch.bfloat16)
    _check_nt(3, 40, 96, 16, 64, torch.float32, bias=True, lr_dtype=torch.float16)
    _check_nn(3, 33, 65, 8, 64, torch.float16, lr_dtype=torch.float32)
    # FP4 codes and double-quantized absmax go through the same W decode.
    _check_nt(3, 48, 100, 12, 64, torch.float32, bias=True, quant_type="fp4", double_quant=True)
    _check_nn(3, 33, 65, 8, 32, torch.float32, quant_type="nf4", double_quant=True)


def test_workspace_path(monkeypatch):
    monkeypatch.setattr(matmul4bit, "FUSED_MAX_M", 2)
    matmul4bit.clear_workspace()
    for dtype in DTYPES:
        for i, (n, k, r, bs) in enumerate(CASES):
            _check_nt(3, n, k, r, bs, dtype, bias=i % 2 == 1)
            _check_nn(3, n, k, r, bs, dtype)
        _check_nt(2, 33, 65, 8, 32, dtype, bias=True)  # M <= threshold: still fused
    # matmul4bit's workspace is reused: one buffer per (device, dtype, stream), sized for the largest W.
    assert len(matmul4bit._WORKSPACES) == len(DTYPES)
    assert {b.numel() for b in matmul4bit._WORKSPACES.values()} == {48 * 100}
    matmul4bit.clear_workspace()


def test_empty_and_degenerate_shapes():
    packed, absmax, code = _weight(8, 32, 32)
    x, xa, b = _randn(0, 32), _randn(0, 4), _randn(8, 4)
    assert lora_matmul_4bit_nt(x, packed, absmax, code, 32, 8, xa, b).shape == (0, 8)
    assert lora_matmul_4bit_nn(_randn(0, 8), packed, absmax, code, 32, 32, xa, _randn(4, 32)).shape == (0, 32)
    # N == 0 in the backward: dx is the low-rank term alone.
    dyb, a = _randn(3, 4), _randn(4, 32)
    e = torch.empty(0, dtype=torch.uint8, device=DEVICE)
    dx = lora_matmul_4bit_nn(_randn(3, 0), e, absmax[:0], code, 32, 32, dyb, a, out=_poisoned(3, 32, dtype=torch.float32))
    assert_close_to_reference(dx, dyb.double() @ a.double(), torch.float32, "nn N=0")


def test_rejects_bad_arguments():
    packed, absmax, code = _weight(8, 32, 32)
    x, xa, b, a = _randn(3, 32), _randn(3, 4), _randn(8, 4), _randn(4, 32)
    with pytest.raises(ValueError, match="lora_B must have shape"):
        lora_matmul_4bit_nt(x, packed, absmax, code, 32, 8, xa, _randn(8, 5))
    with pytest.raises(ValueError, match="xa_scaled must have shape"):
        lora_matmul_4bit_nt(x, packed, absmax, code, 32, 8, _randn(2, 4), b)
    with pytest.raises(ValueError, match="contiguous"):
        lora_matmul_4bit_nt(x, packed, absmax, code, 32, 8, xa, _randn(4, 8).t())
    with pytest.raises(ValueError, match="bias"):
        lora_matmul_4bit_nt(x, packed, absmax, code, 32, 8, xa, b, _randn(7))
    with pytest.raises(ValueError, match="lora_A must have shape"):
        lora_matmul_4bit_nn(_randn(3, 8), packed, absmax, code, 32, 32, xa, _randn(4, 31))
    with pytest.raises(ValueError, match="dyb_scaled must have shape"):
        lora_matmul_4bit_nn(_randn(3, 8), packed, absmax, code, 32, 32, _randn(3, 5), a)
    with pytest.raises(ValueError, match="needs >="):
        lora_matmul_4bit_nt(x, packed, absmax, code, 32, 9, xa, _randn(9, 4))
    with pytest.raises(ValueError, match="lora_A must be"):
        dora_weight_norm_4bit(packed, absmax, code, 32, 8, 32, a, _randn(8, 5), 1.0)
    with pytest.raises(TypeError, match="out has dtype"):
        dora_weight_norm_dense(_randn(8, 32), a, b, 1.0, out=_poisoned(8, dtype=torch.float16))


# ----------------------------------------------------------------------------------- DoRA norm
# K = 300 > BLOCK_K (several K tiles, ragged); K = 96: aligned path; r = 64: several rank chunks.
NORM_CASES = ((33, 65, 8, 32), (40, 96, 16, 64), (17, 300, 12, 64), (24, 160, 64, 32), (5, 31, 1, 32))


@pytest.mark.parametrize("ab_dtypes", [(torch.float32,) * 2, (torch.float16,) * 2, (torch.float16, torch.float32)])
def test_dora_norm_4bit(ab_dtypes):
    for n, k, r, bs in NORM_CASES:
        packed, absmax, code = _weight(n, k, bs, seed=n + k)
        # B A as large as W, so the norm depends on it as much as on W.
        a = _randn(r, k, dtype=ab_dtypes[0], scale=r ** -0.25, seed=r)
        b = _randn(n, r, dtype=ab_dtypes[1], scale=r ** -0.25, seed=n)
        out = _poisoned(n, dtype=torch.float32)
        got = dora_weight_norm_4bit(packed, absmax, code, bs, n, k, a, b, -0.75, out=out)
        assert got.data_ptr() == out.data_ptr() and got.dtype == torch.float32
        ref = R.dora_weight_norm_4bit(packed, absmax, code, bs, n, k, a.double(), b.double(), -0.75)
        # fp32 math throughout (16-bit A/B are exact in the fp32-accumulated dot): the fp32 bound.
        assert_close_to_reference(got, ref, torch.float32, f"dora 4bit N={n} K={k} r={r} {ab_dtypes}")


@pytest.mark.parametrize("w_dtype", DTYPES)
def test_dora_norm_dense(w_dtype):
    for i, (n, k, r, _) in enumerate(NORM_CASES):
        w = _randn(n, k, dtype=w_dtype, seed=n + k)
        if i % 2:  # a transposed [K, N] weight (GPT-2 Conv1D) read through its strides
            w = _randn(k, n, dtype=w_dtype, seed=n + k).t()
        for ab in dict.fromkeys((w_dtype, torch.float32, torch.float16)):
            a = _randn(r, k, dtype=ab, scale=r ** -0.25, seed=r)
            b = _randn(n, r, dtype=ab, scale=r ** -0.25, seed=n)
            got = dora_weight_norm_dense(w, a, b, 0.5, out=_poisoned(n, dtype=torch.float32))
            ref = R.dora_weight_norm_dense(w.double(), a.double(), b.double(), 0.5)
            assert_close_to_reference(got, ref, torch.float32, f"dora dense N={n} K={k} r={r} w={w_dtype} ab={ab}")


def test_dora_norm_matches_peft_formula():
    # The reference itself against the literal definition ||W + s B A|| per row, and the 4-bit
    # reference against the dense one on the dequantized weight.
    n, k, r, bs = 17, 300, 12, 64
    packed, absmax, code = _weight(n, k, bs)
    w = R.dequantize_4bit(packed, absmax, code, bs, n * k, torch.float64).view(n, k)
    a, b = _randn(r, k, dtype=torch.float64), _randn(n, r, dtype=torch.float64, seed=2)
    want = torch.linalg.norm(w + 0.3 * (b @ a), dim=1)
    assert torch.allclose(R.dora_weight_norm_dense(w, a, b, 0.3), want, rtol=1e-12, atol=0)
    assert torch.allclose(R.dora_weight_norm_4bit(packed, absmax, code, bs, n, k, a, b, 0.3), want, rtol=1e-12, atol=0)
