"""Sparse-delta kernels and ops on a real GPU: bf16 (which the interpreter cannot check), larger ragged
shapes, the M-split atomics of the block SDDMM and the transposed-chunk loop of the unstructured kernels.

Run on a lent GPU with ``pytest -m gpu tests/test_gpu_sparse_kernels.py`` (skipped without CUDA).
Every result is compared with the plain-torch reference in float64 under the one tolerance policy.
"""
import pytest
import torch
from _tolerance import assert_close_to_reference

from peft_kernels.ops import reference_sparse as R

pytestmark = pytest.mark.gpu

LAYOUTS = (0, 16, 32)


def _s():
    # Imported lazily: collecting this file must not need a working triton on CPU-only machines.
    from peft_kernels.kernels import sparse as K
    from peft_kernels.ops import sparse as S
    return K, S


def _delta(n, k, b, density, seed=0):
    _, S = _s()
    g = torch.Generator().manual_seed(seed)
    grid = S.grid_size(b, n, k)
    nnz = max(1, int(grid * density))
    idx = torch.randperm(grid, generator=g)[:nnz].sort().values
    vals = torch.randn(S._values_shape(nnz, b), generator=g)
    return vals.cuda(), idx.cuda()


def _randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device="cuda")


@pytest.mark.parametrize("b", LAYOUTS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("shape", ((1, 300, 257), (333, 520, 1000), (2048, 1024, 768)),
                         ids=lambda s: "x".join(map(str, s)))
def test_kernels_vs_float64(shape, dtype, b):
    K, S = _s()
    m, n, k = shape
    vals, idx = _delta(n, k, b, 0.02, seed=m)
    x, dy = _randn(m, k, dtype=dtype, seed=1), _randn(m, n, dtype=dtype, seed=2)
    x64, dy64, v64, i64 = x.double(), dy.double(), vals.double(), idx
    y = K.delta_matmul_nt(x, vals, idx, b, n, k, out=torch.full((m, n), float("nan"), dtype=dtype, device="cuda"))
    assert_close_to_reference(y, R.delta_matmul_nt(x64, v64, i64, b, n, k), dtype, "x Δᵀ")
    dx = K.delta_matmul_nn(dy, vals, idx, b, n, k, out=torch.full((m, k), float("nan"), dtype=dtype, device="cuda"))
    assert_close_to_reference(dx, R.delta_matmul_nn(dy64, v64, i64, b, n, k), dtype, "dY Δ")
    g = K.sampled_grad(dy, x, idx, b, n, k, out=torch.full(vals.shape, float("nan"), device="cuda"))
    # exact products of 16-bit inputs accumulated in fp32: the fp32 bound applies
    assert_close_to_reference(g, R.sampled_grad(dy64, x64, i64, b, n, k, torch.float64), torch.float32, "SDDMM")


@pytest.mark.parametrize("b", (16, 32))
def test_block_sddmm_atomics_bf16(b):
    K, _ = _s()
    m, n, k = 8192, 256, 320
    vals, idx = _delta(n, k, b, 0.05, seed=3)  # few tiles, many rows: the launcher splits M
    x, dy = _randn(m, k, dtype=torch.bfloat16, seed=1), _randn(m, n, dtype=torch.bfloat16, seed=2)
    ref = R.sampled_grad(dy.double(), x.double(), idx, b, n, k, torch.float64)
    assert_close_to_reference(K.sampled_grad(dy, x, idx, b, n, k), ref, torch.float32, "auto split")
    assert_close_to_reference(K.sampled_grad(dy, x, idx, b, n, k, split_m=1), ref, torch.float32, "no split")


def test_unstructured_chunks_bf16(monkeypatch):
    K, _ = _s()
    m, n, k = 1000, 384, 200
    monkeypatch.setattr(K, "TRANSPOSE_CHUNK_BYTES", 256 * n * 2)  # 256 rows per chunk -> 4 launches
    vals, idx = _delta(n, k, 0, 0.03, seed=4)
    x, dy = _randn(m, k, dtype=torch.bfloat16, seed=1), _randn(m, n, dtype=torch.bfloat16, seed=2)
    x64, dy64 = x.double(), dy.double()
    assert_close_to_reference(K.delta_matmul_nt(x, vals, idx, 0, n, k),
                              R.delta_matmul_nt(x64, vals.double(), idx, 0, n, k), torch.bfloat16, "nt")
    assert_close_to_reference(K.delta_matmul_nn(dy, vals, idx, 0, n, k),
                              R.delta_matmul_nn(dy64, vals.double(), idx, 0, n, k), torch.bfloat16, "nn")
    assert_close_to_reference(K.sampled_grad(dy, x, idx, 0, n, k),
                              R.sampled_grad(dy64, x64, idx, 0, n, k, torch.float64), torch.float32, "sddmm")


@pytest.mark.parametrize("b", LAYOUTS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("base_kind", ["dense", "4bit"])
def test_layer_ops_bf16_autograd(base_kind, b):
    """sparse_linear_* in bf16 on CUDA (fused 4-bit kernels below FUSED_MAX_M, workspace path above)."""
    _, S = _s()
    from torch import nn

    from peft_kernels.nn import Linear4bit
    from peft_kernels.ops import reference
    n, k = 700, 520
    for m in (16, 300):
        torch.manual_seed(0)
        lin = nn.Linear(k, n).cuda()
        vals, idx = _delta(n, k, b, 0.01, seed=5)
        vals.requires_grad_()
        x = _randn(m, k, dtype=torch.bfloat16, seed=6).requires_grad_()
        if base_kind == "4bit":
            layer = Linear4bit.from_linear(lin).to(torch.bfloat16)
            qs = layer.quant_state
            nest = qs.nested
            args = (layer.weight, qs.absmax, qs.code, nest.absmax if nest else None, nest.code if nest else None,
                    nest.offset if nest else 0.0, qs.blocksize, n)
            y = S.sparse_linear_4bit(x, *args, None, vals, idx, b)
            w64 = reference.dequantize_4bit(layer.weight, qs.absmax_float(), qs.code, qs.blocksize, n * k,
                                            torch.float64).view(n, k)
        else:
            w = lin.weight.detach().to(torch.bfloat16)
            y = S.sparse_linear_dense(x, w, None, vals, idx, b)
            w64 = w.double()
        dy = _randn(m, n, dtype=torch.bfloat16, seed=7)
        y.backward(dy)
        x64 = x.detach().double().requires_grad_()
        v64 = vals.detach().double().requires_grad_()
        y64 = R.sparse_linear_dense_reference(x64, w64, None, v64, idx, b)
        y64.backward(dy.double())
        assert_close_to_reference(y, y64, torch.bfloat16, f"y M={m}")
        assert_close_to_reference(x.grad, x64.grad, torch.bfloat16, f"dx M={m}")
        assert vals.grad.dtype == torch.float32
        assert_close_to_reference(vals.grad, v64.grad, torch.float32, f"dvalues M={m}")
