"""Triton LoRA / DoRA kernels on a real GPU: bf16 (which the interpreter cannot check), model-sized
shapes, every config, and a timing report against dense bf16 + cuBLAS LoRA.

Run on a lent GPU with ``pytest -m gpu tests/test_gpu_lora_kernels.py -s`` (skipped without CUDA).
"""
import functools
import math

import pytest
import torch
from _tolerance import assert_close_to_reference

from peft_kernels.ops import reference as R
from peft_kernels.quant import code4, quantize_4bit

pytestmark = pytest.mark.gpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    # Imported lazily: collecting this file must not need a working triton on CPU-only machines.
    from peft_kernels.kernels import lora, matmul4bit
    return lora, matmul4bit


@functools.lru_cache(maxsize=4)
def _weight(n, k, blocksize, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    packed, st = quantize_4bit(torch.randn(n, k, generator=g, device="cuda"), blocksize=blocksize,
                               double_quant=False)
    return packed, st.absmax_float().contiguous(), st.code


def _random_4bit(numel, blocksize, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, device="cuda", generator=g)
    absmax = torch.rand(-(-numel // blocksize), device="cuda", generator=g) + 0.5
    return packed, absmax, code4("nf4", "cuda")


def _randn(*shape, dtype, scale=1.0, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


SHAPES = ((4096, 4096, 16), (1027, 771, 12), (512, 2048, 64))  # (N, K, r); 771: odd K, blocks cross rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,r", SHAPES)
@pytest.mark.parametrize("m", [1, 7, 17, 65, 300])  # 1: GEMV; 7, 17: dot kernels; 65, 300: workspace
def test_lora_matmuls_vs_reference(m, n, k, r, dtype):
    lora, _ = _kernels()
    packed, absmax, code = _weight(n, k, 64, seed=n + k)
    x = _randn(m, k, dtype=dtype)
    xa = _randn(m, r, dtype=dtype, scale=math.sqrt(k / r), seed=2)  # LoRA term as large as x W^T
    b = _randn(n, r, dtype=dtype, seed=3)
    bias = _randn(n, dtype=dtype, seed=4)
    y = lora.lora_matmul_4bit_nt(x, packed, absmax, code, 64, n, xa, b, bias, out=_nan(m, n, dtype=dtype))
    ref = R.lora_forward_4bit(x.double(), packed, absmax, code, 64, n, xa.double(), b.double(), bias.double())
    assert_close_to_reference(y, ref, dtype, f"lora nt M={m} N={n} K={k} r={r}")
    dy = _randn(m, n, dtype=dtype, seed=5)
    dyb = _randn(m, r, dtype=dtype, scale=math.sqrt(n / r), seed=6)
    a = _randn(r, k, dtype=dtype, seed=7)
    dx = lora.lora_matmul_4bit_nn(dy, packed, absmax, code, 64, k, dyb, a, out=_nan(m, k, dtype=dtype))
    ref = R.lora_grad_input_4bit(dy.double(), packed, absmax, code, 64, k, dyb.double(), a.double())
    assert_close_to_reference(dx, ref, dtype, f"lora nn M={m} N={n} K={k} r={r}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_config(dtype):
    lora, _ = _kernels()
    for n, k, r in ((1027, 771, 8), (520, 1040, 64)):
        packed, absmax, code = _weight(n, k, 64, seed=k)
        for m in (1, 13, 40):
            x, dy = _randn(m, k, dtype=dtype), _randn(m, n, dtype=dtype, seed=2)
            xa, b = _randn(m, r, dtype=dtype, scale=math.sqrt(k / r), seed=3), _randn(n, r, dtype=dtype, seed=4)
            dyb, a = _randn(m, r, dtype=dtype, scale=math.sqrt(n / r), seed=5), _randn(r, k, dtype=dtype, seed=6)
            ref_y = R.lora_forward_4bit(x.double(), packed, absmax, code, 64, n, xa.double(), b.double())
            ref_dx = R.lora_grad_input_4bit(dy.double(), packed, absmax, code, 64, k, dyb.double(), a.double())
            for name in lora._NT:
                if name.endswith("gemv") and m != 1:
                    continue
                y = lora.lora_matmul_4bit_nt(x, packed, absmax, code, 64, n, xa, b, config=name)
                assert_close_to_reference(y, ref_y, dtype, f"{name} M={m} N={n} K={k} r={r}")
            for name in lora._NN:
                dx = lora.lora_matmul_4bit_nn(dy, packed, absmax, code, 64, k, dyb, a, config=name)
                assert_close_to_reference(dx, ref_dx, dtype, f"{name} M={m} N={n} K={k} r={r}")


@pytest.mark.parametrize("ab_dtype", DTYPES)
@pytest.mark.parametrize("n,k,r", ((4096, 4096, 16), (1027, 771, 12), (14336, 4096, 64)))
def test_dora_norms_vs_reference(n, k, r, ab_dtype):
    lora, _ = _kernels()
    packed, absmax, code = _weight(n, k, 64, seed=n + k)
    a = _randn(r, k, dtype=ab_dtype, scale=r ** -0.25, seed=2)
    b = _randn(n, r, dtype=ab_dtype, scale=r ** -0.25, seed=3)
    got = lora.dora_weight_norm_4bit(packed, absmax, code, 64, n, k, a, b, 2.0, out=_nan(n, dtype=torch.float32))
    ref = R.dora_weight_norm_4bit(packed, absmax, code, 64, n, k, a.double(), b.double(), 2.0)
    # fp32 math (16-bit A/B products are exact in the fp32-accumulated mma): the fp32 bound.
    assert_close_to_reference(got, ref, torch.float32, f"dora 4bit N={n} K={k} r={r} {ab_dtype}")
    for w_dtype in (torch.bfloat16, torch.float32):
        w = R.dequantize_4bit(packed, absmax, code, 64, n * k, w_dtype).view(n, k)
        ref = R.dora_weight_norm_dense(w.double(), a.double(), b.double(), 2.0)
        for wv in (w, w.t().contiguous().t()):  # row-major and transposed storage
            got = lora.dora_weight_norm_dense(wv, a, b, 2.0, out=_nan(n, dtype=torch.float32))
            assert_close_to_reference(got, ref, torch.float32, f"dora dense N={n} K={k} r={r} w={w_dtype}")


def _time(fn, reps=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e-3


def test_timing_report():
    """Not an assertion of speed (bench/ owns that): prints what the performance targets measure.

    * M=1 decode: lora_matmul_4bit_nt (r=16) vs the plain 4-bit GEMV.
    * M=8192, 4096 -> 14336, r=16, bf16: LoRA forward + backward with the 4-bit kernels vs a dense
      bf16 frozen Linear + cuBLAS LoRA (the same GEMMs PEFT runs). Target: ratio <= 1.15.
    """
    lora, mm = _kernels()
    dt, s, r = torch.bfloat16, 2.0, 16
    for n, k in ((4096, 4096), (14336, 4096), (4096, 14336)):
        packed, absmax, code = _random_4bit(n * k, 64)
        x, xa, b = _randn(1, k, dtype=dt), _randn(1, r, dtype=dt), _randn(n, r, dtype=dt)
        t0 = _time(lambda: mm.matmul_4bit_nt(x, packed, absmax, code, 64, n), reps=100)
        t1 = _time(lambda: lora.lora_matmul_4bit_nt(x, packed, absmax, code, 64, n, xa, b), reps=100)
        print(f"\nM=1 N={n} K={k} r={r}: gemv {t0 * 1e6:.1f} us, lora gemv {t1 * 1e6:.1f} us ({t1 / t0:.2f}x)")

    m, k, n = 8192, 4096, 14336
    packed, absmax, code = _random_4bit(n * k, 64)
    w = R.dequantize_4bit(packed, absmax, code, 64, n * k, dt).view(n, k)
    x, dy = _randn(m, k, dtype=dt), _randn(m, n, dtype=dt, seed=2)
    a, b = _randn(r, k, dtype=dt, scale=0.01, seed=3), _randn(n, r, dtype=dt, scale=0.01, seed=4)

    def ours():
        xa = x @ a.t()
        y = lora.lora_matmul_4bit_nt(x, packed, absmax, code, 64, n, xa * s, b)
        dyb = dy @ b
        dx = lora.lora_matmul_4bit_nn(dy, packed, absmax, code, 64, k, dyb * s, a)
        return y, dx, (dyb.t() @ x) * s, (dy.t() @ xa) * s

    def dense():
        xa = x @ a.t()
        y = x @ w.t() + (xa @ b.t()) * s
        dyb = dy @ b
        dx = dy @ w + (dyb * s) @ a
        return y, dx, (dyb.t() @ x) * s, (dy.t() @ xa) * s

    t_ours, t_dense = _time(ours, reps=10), _time(dense, reps=10)
    print(f"\nM={m} {k}->{n} r={r} bf16 fwd+bwd: 4-bit LoRA {t_ours * 1e3:.2f} ms, dense bf16 + cuBLAS LoRA "
          f"{t_dense * 1e3:.2f} ms, ratio {t_ours / t_dense:.3f} (target <= 1.15)")
    y0, dx0, *_ = ours()
    y1, dx1, *_ = dense()
    assert_close_to_reference(y0, y1.double(), torch.bfloat16, "fwd vs dense")
    assert_close_to_reference(dx0, dx1.double(), torch.bfloat16, "bwd vs dense")
