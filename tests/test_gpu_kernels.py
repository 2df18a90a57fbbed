"""Triton 4-bit kernels on a real GPU: bf16 (which the interpreter cannot check), larger shapes,
every config, flat indices past 2**31, and a bandwidth report for decode.

Run on a lent GPU with ``pytest -m gpu tests/test_gpu_kernels.py -s`` (skipped without CUDA).
"""
import functools

import pytest
import torch
from _tolerance import assert_close_to_reference

from peft_kernels.ops import reference as R
from peft_kernels.quant import code4, quantize_4bit

pytestmark = pytest.mark.gpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    # Imported lazily: collecting this file must not need a working triton on CPU-only machines.
    from peft_kernels.kernels import dequant4bit, matmul4bit
    return dequant4bit, matmul4bit


@functools.lru_cache(maxsize=8)  # parametrized cases share their (large) weights
def _weight(n, k, blocksize, quant_type="nf4", double_quant=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, generator=g, device="cuda")
    packed, st = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    return packed, st.absmax_float().contiguous(), st.code


def _random_4bit(numel, blocksize, seed=0):
    """Random bytes and scales (no quantization pass): cheap stand-in for huge weights."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, device="cuda", generator=g)
    absmax = torch.rand(-(-numel // blocksize), device="cuda", generator=g) + 0.5
    return packed, absmax, code4("nf4", "cuda")


def _randn(*shape, dtype, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda").to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_dequant_bit_exact(dtype, blocksize):
    dq, _ = _kernels()
    for numel in (1, 4097, 4096 * 4096 + 3):
        packed, absmax, code = _weight(1, numel, blocksize, double_quant=True, seed=numel)
        out = torch.full((numel + 8,), float("nan"), dtype=dtype, device="cuda")
        got = dq.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype, out=out)
        assert torch.equal(got, R.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype))
        assert torch.isnan(out[numel:]).all()


def test_dequant_past_2_31_elements():
    dq, _ = _kernels()
    numel, bs = 2**31 + 1001, 64
    packed, absmax, code = _random_4bit(numel, bs)
    got = dq.dequantize_4bit(packed, absmax, code, bs, numel, torch.bfloat16)
    start = (2**31 - 4096) // bs * bs  # check the tail, across the 2**31 boundary
    want = R.dequantize_4bit(packed[start // 2:], absmax[start // bs:], code, bs, numel - start, torch.bfloat16)
    assert torch.equal(got[start:], want)


SHAPES = ((4096, 4096), (1027, 771), (512, 2048))  # (N, K); 771 odd: blocks cross rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 7, 17, 65, 300])  # 1: GEMV; 7, 17: dot kernels; 65, 300: workspace
def test_matmul_vs_reference(m, n, k, dtype):
    _, mm = _kernels()
    for blocksize in (64, 4096):
        packed, absmax, code = _weight(n, k, blocksize, seed=n + k)
        x = _randn(m, k, dtype=dtype)
        bias = _randn(n, dtype=torch.float32, seed=3)
        y = mm.matmul_4bit_nt(x, packed, absmax, code, blocksize, n, bias,
                              out=torch.full((m, n), float("nan"), dtype=dtype, device="cuda"))
        ref = R.linear4bit_forward(x.double(), packed, absmax, code, blocksize, n, bias.double())
        assert_close_to_reference(y, ref, dtype, f"nt M={m} N={n} K={k} bs={blocksize}")
        dy = _randn(m, n, dtype=dtype, seed=5)
        dx = mm.matmul_4bit_nn(dy, packed, absmax, code, blocksize, k,
                               out=torch.full((m, k), float("nan"), dtype=dtype, device="cuda"))
        ref = R.linear4bit_grad_input(dy.double(), packed, absmax, code, blocksize, k)
        assert_close_to_reference(dx, ref, dtype, f"nn M={m} N={n} K={k} bs={blocksize}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_config(dtype):
    _, mm = _kernels()
    for n, k in ((1027, 771), (520, 1040)):
        packed, absmax, code = _weight(n, k, 64, seed=k)
        for m in (1, 13, 40):
            x = _randn(m, k, dtype=dtype)
            dy = _randn(m, n, dtype=dtype, seed=2)
            ref_y = R.linear4bit_forward(x.double(), packed, absmax, code, 64, n)
            ref_dx = R.linear4bit_grad_input(dy.double(), packed, absmax, code, 64, k)
            for cfg in mm.NT_CONFIGS + ((mm.GEMV_CONFIG,) if m == 1 else ()):
                y = mm.matmul_4bit_nt(x, packed, absmax, code, 64, n, config=cfg.name)
                assert_close_to_reference(y, ref_y, dtype, f"{cfg.name} M={m} N={n} K={k}")
            for cfg in mm.NN_CONFIGS:
                dx = mm.matmul_4bit_nn(dy, packed, absmax, code, 64, k, config=cfg.name)
                assert_close_to_reference(dx, ref_dx, dtype, f"{cfg.name} M={m} N={n} K={k}")


def test_matmul_past_2_31_weight_elements():
    # N*K > 2**31 (a large vocabulary head): the flat index must not wrap in int32.
    _, mm = _kernels()
    n, k, bs = 131200, 16384, 64
    packed, absmax, code = _random_4bit(n * k, bs)
    x = _randn(1, k, dtype=torch.bfloat16)
    y = mm.matmul_4bit_nt(x, packed, absmax, code, bs, n)
    rows = 512  # the last rows lie past element 2**31
    start = (n - rows) * k
    ref = R.linear4bit_forward(x.double(), packed[start // 2:], absmax[start // bs:], code, bs, rows)
    assert_close_to_reference(y[:, -rows:], ref, torch.bfloat16, "nt tail rows past 2**31")


def test_decode_bandwidth_report():
    """Not an assertion of speed (bench/ owns that): prints the M=1 weight-read bandwidth."""
    _, mm = _kernels()
    for n, k in ((4096, 4096), (14336, 4096), (4096, 14336)):
        packed, absmax, code = _random_4bit(n * k, 64)
        x = _randn(1, k, dtype=torch.bfloat16)
        for _ in range(3):
            mm.matmul_4bit_nt(x, packed, absmax, code, 64, n)
        src = torch.empty(packed.numel(), dtype=torch.uint8, device="cuda")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 50
        start.record()
        for _ in range(reps):
            mm.matmul_4bit_nt(x, packed, absmax, code, 64, n)
        end.record()
        torch.cuda.synchronize()
        t = start.elapsed_time(end) / reps * 1e-3
        start.record()
        for _ in range(reps):
            src.copy_(packed)
        end.record()
        torch.cuda.synchronize()
        t_copy = start.elapsed_time(end) / reps * 1e-3
        read = packed.numel() + absmax.numel() * 4
        print(f"\nM=1 N={n} K={k}: {t * 1e6:.1f} us, {read / t / 1e9:.0f} GB/s weight read; "
              f"copy of the bytes {t_copy * 1e6:.1f} us ({2 * packed.numel() / t_copy / 1e9:.0f} GB/s r+w)")
