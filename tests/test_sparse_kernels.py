"""Sparse-delta kernels (kernels/sparse.py) and ops (ops/sparse.py) against float64 references.

* Triton kernels (interpreter without a GPU; fp32/fp16 only, bf16 is in test_gpu_sparse_kernels.py) vs the
  plain-torch reference in float64, on ragged shapes (M = 1, odd K, N and K not multiples of the tile,
  more than one M tile), both layouts, outputs poisoned with NaN so unwritten elements fail.
* The plain-torch reference itself vs the dense masked delta (``masked_delta_dense_reference``).
* The differentiable ops vs a dense masked-delta autograd graph (float64), dense and 4-bit bases, with
  the reference backend and with the Triton backend; the growth-score hook.
* Saved-for-backward bytes: exactly x's bytes beyond the tensors the caller already holds.
* The CPU path allocates no tensor of N*K elements in forward or backward (tests/_alloc_tracker.py).
* Bad input: every case raises a clear error before any kernel runs.
"""
import pytest
import torch
from _alloc_tracker import AllocTracker
from _tolerance import assert_close_to_reference
from torch import nn

from peft_kernels.kernels import sparse as K
from peft_kernels.kernels._launch import is_interpreted
from peft_kernels.nn import Linear4bit
from peft_kernels.ops import reference_sparse as R
from peft_kernels.ops import sparse as S
from _weights import weight64

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS_RUN = DEVICE == "cuda" or is_interpreted(K._nt_block_kernel)
needs_triton = pytest.mark.skipif(not KERNELS_RUN, reason="no GPU and triton imported without TRITON_INTERPRET=1")

LAYOUTS = (0, 16, 32)
DTYPES = (torch.float32, torch.float16)
# (M, N, K): M = 1; odd K; N, K not multiples of 16/32; M > BLOCK_M (two M tiles); rows with > BLOCK_E
# entries (K = 200 at 30 %: ~60 entries per row, > 32 per gather step).
SHAPES = ((1, 37, 45), (70, 50, 33), (3, 24, 200))


def _delta(n, k, b, density, seed=0, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    grid = S.grid_size(b, n, k)
    nnz = max(1, int(grid * density))
    idx = torch.randperm(grid, generator=g)[:nnz].sort().values
    vals = torch.randn(S._values_shape(nnz, b), generator=g).to(dtype)
    return vals.to(device), idx.to(device)


def _randn(*shape, dtype=torch.float32, seed=1, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _poison_ragged_edges(vals, idx, b, n, k):
    """Set every tile element outside [N, K] to inf: the contract says those are never read."""
    if b == 0:
        return vals
    bn, bk = R.delta_coords(idx, b, n, k)
    r = torch.arange(b, device=vals.device)
    out = ((bn[:, None, None] * b + r[None, :, None]) >= n) | ((bk[:, None, None] * b + r[None, None, :]) >= k)
    return torch.where(out, torch.full_like(vals, float("inf")), vals)


# ------------------------------------------------------------------ reference vs dense masked delta
@pytest.mark.parametrize("b", LAYOUTS)
def test_reference_matches_dense_masked_delta(b):
    m, n, k = 6, 37, 45
    vals, idx = _delta(n, k, b, 0.3, device="cpu", dtype=torch.float64)
    x, dy = _randn(m, k, dtype=torch.float64, device="cpu"), _randn(m, n, dtype=torch.float64, seed=2, device="cpu")
    d = R.masked_delta_dense_reference(vals, idx, b, n, k)
    torch.testing.assert_close(R.delta_matmul_nt(x, vals, idx, b, n, k), x @ d.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(R.delta_matmul_nn(dy, vals, idx, b, n, k), dy @ d, rtol=1e-12, atol=1e-12)
    full = dy.t() @ x
    g = R.sampled_grad(dy, x, idx, b, n, k, torch.float64)
    if b == 0:
        want = full.reshape(-1)[idx]
    else:  # gather the full gradient into tiles, zero outside [N, K]
        want = torch.zeros_like(g)
        bn, bk = R.delta_coords(idx, b, n, k)
        for t in range(idx.numel()):
            blk = full[bn[t] * b:(bn[t] + 1) * b, bk[t] * b:(bk[t] + 1) * b]
            want[t, :blk.shape[0], :blk.shape[1]] = blk
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)
    # merge: W + Δ in place equals the dense sum; unmerge restores W
    w = _randn(n, k, dtype=torch.float64, seed=3, device="cpu")
    w0 = w.clone()
    S.merge_delta_(w, vals, idx, b)
    torch.testing.assert_close(w, w0 + d, rtol=0, atol=1e-15)
    S.merge_delta_(w, vals, idx, b, alpha=-1.0)
    torch.testing.assert_close(w, w0, rtol=0, atol=1e-14)


def test_merge_into_transposed_view():
    """A transformers Conv1D holds W transposed: merging into the [N, K] view must hit the right elements."""
    n, k = 20, 12
    vals, idx = _delta(n, k, 0, 0.3, device="cpu", dtype=torch.float64)
    storage = _randn(k, n, dtype=torch.float64, device="cpu")
    w = storage.t()
    want = w + R.masked_delta_dense_reference(vals, idx, 0, n, k)
    S.merge_delta_(w, vals, idx, 0)
    torch.testing.assert_close(storage.t(), want, rtol=0, atol=1e-15)


# ------------------------------------------------------------------ kernels (interpreter / GPU)
@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b", LAYOUTS, ids=lambda b: f"b{b}")
def test_kernels_match_reference(b, dtype, shape):
    m, n, k = shape
    vals, idx = _delta(n, k, b, 0.3, seed=m + n)
    vals = _poison_ragged_edges(vals, idx, b, n, k)
    x, dy = _randn(m, k, dtype=dtype), _randn(m, n, dtype=dtype, seed=2)
    x64, dy64, v64 = x.double().cpu(), dy.double().cpu(), vals.double().cpu()
    i64 = idx.cpu()
    y_ref = R.delta_matmul_nt(x64, v64, i64, b, n, k)
    dx_ref = R.delta_matmul_nn(dy64, v64, i64, b, n, k)
    g_ref = R.sampled_grad(dy64, x64, i64, b, n, k, torch.float64)

    y = K.delta_matmul_nt(x, vals, idx, b, n, k, out=_nan(m, n, dtype=dtype))
    assert_close_to_reference(y, y_ref, dtype, "x Δᵀ")
    dx = K.delta_matmul_nn(dy, vals, idx, b, n, k, out=_nan(m, k, dtype=dtype))
    assert_close_to_reference(dx, dx_ref, dtype, "dY Δ")
    g = K.sampled_grad(dy, x, idx, b, n, k, out=_nan(*S._values_shape(idx.numel(), b), dtype=torch.float32))
    # the SDDMM accumulates exact products of fp16 inputs in fp32: fp32's bound applies
    assert_close_to_reference(g, g_ref, torch.float32, "SDDMM")

    # accumulate=True adds to what is there (the layer adds the delta into the base output)
    base = _randn(m, n, dtype=dtype, seed=5)
    y2 = K.delta_matmul_nt(x, vals, idx, b, n, k, out=base.clone(), accumulate=True)
    assert_close_to_reference(y2, base.double().cpu() + y_ref, dtype, "y += x Δᵀ")
    base = _randn(m, k, dtype=dtype, seed=6)
    dx2 = K.delta_matmul_nn(dy, vals, idx, b, n, k, out=base.clone(), accumulate=True)
    assert_close_to_reference(dx2, base.double().cpu() + dx_ref, dtype, "dx += dY Δ")
    g0 = _randn(*g.shape, seed=7)
    g2 = K.sampled_grad(dy, x, idx, b, n, k, out=g0.clone(), accumulate=True)
    assert_close_to_reference(g2, g0.double().cpu() + g_ref, torch.float32, "g += SDDMM")


@needs_triton
@pytest.mark.parametrize("b", (16, 32))
def test_block_sddmm_split_m_atomics(b):
    """Few tiles and many rows: M is split over programs that atomically add fp32 partial tiles."""
    m, n, k = 150, 40, 70
    vals, idx = _delta(n, k, b, 0.5, seed=3)
    x, dy = _randn(m, k, dtype=torch.float16), _randn(m, n, dtype=torch.float16, seed=2)
    ref = R.sampled_grad(dy.double().cpu(), x.double().cpu(), idx.cpu(), b, n, k, torch.float64)
    for split in (2, 3):
        g = K.sampled_grad(dy, x, idx, b, n, k, out=_nan(*vals.shape, dtype=torch.float32), split_m=split)
        assert_close_to_reference(g, ref, torch.float32, f"SDDMM split_m={split}")
        g0 = _randn(*vals.shape, seed=4)
        g2 = K.sampled_grad(dy, x, idx, b, n, k, out=g0.clone(), accumulate=True, split_m=split)
        assert_close_to_reference(g2, g0.double().cpu() + ref, torch.float32, "accumulate + atomics")


@needs_triton
def test_unstructured_transpose_chunks(monkeypatch):
    """M larger than one transposed chunk: several launches, each on its own rows (SDDMM accumulates)."""
    m, n, k = 150, 30, 41
    monkeypatch.setattr(K, "TRANSPOSE_CHUNK_BYTES", 64 * max(n, k) * 4)  # 64 rows per chunk -> 3 chunks
    assert K._m_chunk(m, max(n, k), 4) == 64
    vals, idx = _delta(n, k, 0, 0.2, seed=9)
    x, dy = _randn(m, k), _randn(m, n, seed=2)
    x64, dy64, v64, i64 = x.double().cpu(), dy.double().cpu(), vals.double().cpu(), idx.cpu()
    assert_close_to_reference(K.delta_matmul_nt(x, vals, idx, 0, n, k, out=_nan(m, n, dtype=torch.float32)),
                              R.delta_matmul_nt(x64, v64, i64, 0, n, k), torch.float32, "nt")
    assert_close_to_reference(K.delta_matmul_nn(dy, vals, idx, 0, n, k, out=_nan(m, k, dtype=torch.float32)),
                              R.delta_matmul_nn(dy64, v64, i64, 0, n, k), torch.float32, "nn")
    assert_close_to_reference(K.sampled_grad(dy, x, idx, 0, n, k, out=_nan(idx.numel(), dtype=torch.float32)),
                              R.sampled_grad(dy64, x64, i64, 0, n, k, torch.float64), torch.float32, "sddmm")


@needs_triton
@pytest.mark.parametrize("b", LAYOUTS)
def test_kernels_empty_rows_and_no_entries(b):
    """All entries in one row (other row groups have none: they must still write zeros); nnz = 0."""
    m, n, k = 4, 40, 36
    cols = K._grid_cols(b, k)
    idx = torch.arange(min(3, cols), device=DEVICE, dtype=torch.int64) + cols  # row / block row 1 only
    vals = _randn(*S._values_shape(idx.numel(), b))
    x = _randn(m, k)
    y = K.delta_matmul_nt(x, vals, idx, b, n, k, out=_nan(m, n, dtype=torch.float32))
    assert_close_to_reference(y, R.delta_matmul_nt(x.double().cpu(), vals.double().cpu(), idx.cpu(), b, n, k),
                              torch.float32, "one row")
    # accumulate: row groups without entries leave their part of the output bit-for-bit untouched
    base = _randn(m, n, seed=3)
    y2 = K.delta_matmul_nt(x, vals, idx, b, n, k, out=base.clone(), accumulate=True)
    assert_close_to_reference(y2, base.double().cpu() + y.double().cpu(), torch.float32, "accumulate")
    rows = b or 1  # Δ rows covered by (block) row 1: [rows, 2 * rows)
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[rows:2 * rows] = False
    assert torch.equal(y2[:, untouched.to(DEVICE)], base[:, untouched.to(DEVICE)])
    dy = _randn(m, n, seed=4)
    base = _randn(m, k, seed=5)
    dx2 = K.delta_matmul_nn(dy, vals, idx, b, n, k, out=base.clone(), accumulate=True)
    assert_close_to_reference(dx2, base.double().cpu() + R.delta_matmul_nn(dy.double().cpu(), vals.double().cpu(),
                                                                           idx.cpu(), b, n, k), torch.float32, "nn acc")
    none = torch.empty(0, dtype=torch.int64, device=DEVICE)
    y0 = K.delta_matmul_nt(x, _randn(*S._values_shape(0, b)), none, b, n, k, out=_nan(m, n, dtype=torch.float32))
    assert torch.equal(y0, torch.zeros_like(y0))


# ------------------------------------------------------------------ ops: autograd vs dense masked delta
def _q4_args(layer):
    qs = layer.quant_state
    nest = qs.nested
    return (layer.weight, qs.absmax, qs.code, nest.absmax if nest else None, nest.code if nest else None,
            nest.offset if nest else 0.0, qs.blocksize, qs.shape[0])


def _run_layer(base, x, bias, vals, idx, b, grow=None):
    if isinstance(base, Linear4bit):
        return S.sparse_linear_4bit(x, *_q4_args(base), bias, vals, idx, b, *(grow or (None, None)))
    return S.sparse_linear_dense(x, base, bias, vals, idx, b, *(grow or (None, None)))


def _check_layer(base_kind, b, dtype, x_shape=(2, 3, 45), n=37, with_bias=True):
    k = x_shape[-1]
    torch.manual_seed(0)
    if base_kind == "4bit":
        base = Linear4bit.from_linear(nn.Linear(k, n, bias=False), blocksize=32)
        w64 = weight64(base)
    else:
        base = _randn(n, k, dtype=dtype, seed=11, device="cpu")
        w64 = base.double()
    vals, idx = _delta(n, k, b, 0.3, seed=4, device="cpu")
    vals = (vals * 2).requires_grad_()  # Δ as large as W: a mis-placed entry moves y far past the bound
    bias = _randn(n, dtype=dtype, seed=12, device="cpu").requires_grad_() if with_bias else None
    x = _randn(*x_shape, dtype=dtype, seed=13, device="cpu").requires_grad_()
    y = _run_layer(base, x, bias, vals, idx, b)
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], n)
    dy = _randn(*y.shape, dtype=dtype, seed=14, device="cpu")
    y.backward(dy)

    x64 = x.detach().double().requires_grad_()
    v64 = vals.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if with_bias else None
    y64 = R.sparse_linear_dense_reference(x64, w64, b64, v64, idx, b)
    y64.backward(dy.double())
    tol = torch.float32 if dtype == torch.float64 else dtype
    assert_close_to_reference(y, y64, tol, "y")
    assert_close_to_reference(x.grad, x64.grad, tol, "dx")
    assert vals.grad.dtype == vals.dtype
    assert_close_to_reference(vals.grad, v64.grad, tol, "dvalues")
    if with_bias:
        assert_close_to_reference(bias.grad, b64.grad, tol, "dbias")
    if base_kind == "dense":
        assert base.grad is None


@pytest.mark.parametrize("b", LAYOUTS)
@pytest.mark.parametrize("base_kind", ["dense", "4bit"])
def test_ops_autograd_float64_reference_backend(base_kind, b, monkeypatch):
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "reference")
    _check_layer(base_kind, b, torch.float64)


@pytest.mark.parametrize("b", (0, 16))
@pytest.mark.parametrize("base_kind", ["dense", "4bit"])
def test_ops_autograd_default_cpu_backend_fp32(base_kind, b, monkeypatch):
    """Default backend on CPU tensors (the CPU C library dequantizes 4-bit chunks when it loads)."""
    monkeypatch.delenv("PEFT_KERNELS_BACKEND", raising=False)
    _check_layer(base_kind, b, torch.float32, x_shape=(5, 45), with_bias=False)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b", LAYOUTS)
@pytest.mark.parametrize("base_kind", ["dense", "4bit"])
def test_ops_autograd_triton_backend(base_kind, b, dtype, monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("CPU-tensor variant of the Triton path (interpreter); the GPU file covers CUDA")
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "triton")
    _check_layer(base_kind, b, dtype, x_shape=(2, 9, 64), n=40)


def test_mixed_dtypes_fp16_x_fp32_values(monkeypatch):
    """x and W fp16, values fp32 (the default parameter dtype): y/dx in fp16, dvalues in fp32."""
    monkeypatch.delenv("PEFT_KERNELS_BACKEND", raising=False)
    _check_layer("dense", 16, torch.float16, x_shape=(4, 45))


def test_dense_weight_of_another_dtype_is_cast_in_chunks(monkeypatch):
    """W bf16 under fp32 x: cast in row chunks (no full cast copy), same result as a full cast."""
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "reference")
    n, k, m = 40, 48, 3
    w = _randn(n, k, dtype=torch.bfloat16, device="cpu")
    vals, idx = _delta(n, k, 0, 0.2, device="cpu")
    x = _randn(m, k, device="cpu").requires_grad_()
    with AllocTracker() as tr:
        y = S.sparse_linear_dense(x, w, None, vals, idx, 0)
        y.sum().backward()
    tr.assert_below(n * k, "dense bf16 W under fp32 x")
    x64 = x.detach().double().requires_grad_()
    y64 = R.sparse_linear_dense_reference(x64, w.double(), None, vals.double(), idx, 0)
    y64.sum().backward()
    assert_close_to_reference(y, y64, torch.float32, "y")
    assert_close_to_reference(x.grad, x64.grad, torch.float32, "dx")


def test_values_without_grad_and_x_without_grad():
    n, k = 24, 40
    w = _randn(n, k, device="cpu")
    vals, idx = _delta(n, k, 0, 0.2, device="cpu")
    x = _randn(3, k, device="cpu").requires_grad_()
    S.sparse_linear_dense(x, w, None, vals, idx, 0).sum().backward()
    assert x.grad is not None and vals.grad is None
    vals.requires_grad_()
    x2 = _randn(3, k, device="cpu")
    S.sparse_linear_dense(x2, w, None, vals, idx, 0).sum().backward()
    assert vals.grad is not None and x2.grad is None


# ------------------------------------------------------------------ growth-score hook
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("b", (0, 16))
@pytest.mark.parametrize("base_kind", ["dense", "4bit"])
def test_grow_scores_accumulate_sampled_grad(base_kind, b, backend_name, monkeypatch):
    if backend_name == "triton" and not (KERNELS_RUN and DEVICE == "cpu"):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", backend_name)
    n, k = 37, 64
    if base_kind == "4bit":
        base = Linear4bit.from_linear(nn.Linear(k, n, bias=False), blocksize=64)
    else:
        base = _randn(n, k, device="cpu", seed=21)
    grid = S.grid_size(b, n, k)
    perm = torch.randperm(grid, generator=torch.Generator().manual_seed(1))
    idx = perm[:grid // 5].sort().values
    grow_idx = perm[grid // 5:grid // 5 + max(2, grid // 6)].sort().values  # disjoint from idx
    vals = _randn(*S._values_shape(idx.numel(), b), device="cpu").requires_grad_()
    scores = torch.zeros(S._values_shape(grow_idx.numel(), b))
    dense_grad = torch.zeros(n, k, dtype=torch.float64)
    for step in range(2):  # two backward passes: scores accumulate (signed)
        x = _randn(3, k, device="cpu", seed=30 + step)
        y = _run_layer(base, x, None, vals, idx, b, grow=(grow_idx, scores))
        dy = _randn(*y.shape, device="cpu", seed=40 + step)
        y.backward(dy)
        dense_grad += dy.double().t() @ x.double()
    # reference: the dense gradient of W at the candidate positions
    if b == 0:
        want = dense_grad.reshape(-1)[grow_idx]
    else:
        want = torch.stack([
            torch.nn.functional.pad(dense_grad, (0, -k % b, 0, -n % b))[bn * b:(bn + 1) * b, bk * b:(bk + 1) * b]
            for bn, bk in zip(*R.delta_coords(grow_idx, b, n, k))])
    assert scores.dtype == torch.float32
    assert_close_to_reference(scores, want, torch.float32, "grow_scores")
    assert (scores < 0).any() and (scores > 0).any()  # signed, not magnitudes


# ------------------------------------------------------------------ saved for backward
def _new_saved_bytes(fn, own):
    """Bytes of distinct storages saved for backward that the caller does not already hold."""
    owned = {t.untyped_storage().data_ptr() for t in own if t is not None}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    y.sum().backward()
    return sum(v for p, v in seen.items() if p not in owned)


@pytest.mark.parametrize("b", (0, 32))
@pytest.mark.parametrize("base_kind", ["dense", "4bit"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
def test_saved_for_backward_is_exactly_x(base_kind, b, x_dtype):
    n, k = 48, 64
    vals, idx = _delta(n, k, b, 0.1, device="cpu")
    vals.requires_grad_()
    bias = torch.zeros(n, requires_grad=True)
    if base_kind == "4bit":
        base = Linear4bit.from_linear(nn.Linear(k, n, bias=False))
        own = [base.weight, *[t for t in _q4_args(base) if isinstance(t, torch.Tensor)]]
    else:
        base = _randn(n, k, dtype=x_dtype, device="cpu")
        own = [base]
    own += [vals, idx, bias]
    x = _randn(2, 5, k, dtype=x_dtype, device="cpu").requires_grad_()
    assert _new_saved_bytes(lambda: _run_layer(base, x, bias, vals, idx, b), own) == x.numel() * x.element_size()
    # values frozen and no growth scores: nothing of x is kept
    vals.requires_grad_(False)
    assert _new_saved_bytes(lambda: _run_layer(base, x, bias, vals, idx, b), own) == 0


# ------------------------------------------------------------------ no N*K allocation on the CPU path
@pytest.mark.parametrize("backend_name", ["reference", "auto"])
@pytest.mark.parametrize("b", (0, 16, 32))
@pytest.mark.parametrize("base_kind", ["dense", "4bit"])
def test_cpu_path_allocates_no_nk_tensor(base_kind, b, backend_name, monkeypatch):
    if backend_name == "auto":
        monkeypatch.delenv("PEFT_KERNELS_BACKEND", raising=False)
    else:
        monkeypatch.setenv("PEFT_KERNELS_BACKEND", backend_name)
    n, k, m = 96, 72, 6  # K % blocksize != 0: quant blocks cross rows, chunks align to 8 rows
    if base_kind == "4bit":
        base = Linear4bit.from_linear(nn.Linear(k, n, bias=True), blocksize=64)
        bias = base.bias
    else:
        base, bias = _randn(n, k, device="cpu"), _randn(n, device="cpu").requires_grad_()
    vals, idx = _delta(n, k, b, 0.05, device="cpu")
    vals.requires_grad_()
    grid = S.grid_size(b, n, k)
    grow_idx = torch.tensor(sorted(set(range(grid)) - set(idx.tolist()))[:4])
    scores = torch.zeros(S._values_shape(4, b))
    x = _randn(m, k, device="cpu").requires_grad_()
    with AllocTracker() as tr:
        y = _run_layer(base, x, bias, vals, idx, b, grow=(grow_idx, scores))
        y.sum().backward()
    tr.assert_below(n * k, f"{base_kind} base, block_size={b}, fwd+bwd")
    assert x.grad is not None and vals.grad is not None and scores.abs().sum() > 0


def test_alloc_tracker_sees_inside_custom_ops():
    """Negative control: above CPU_GEMV_MAX_M rows the linear4bit op dequantizes all of W on CPU; the tracker
    must see it (and, at few rows, must see that the fused CPU GEMV does not)."""
    from peft_kernels.ops.linear4bit import CPU_GEMV_MAX_M, linear4bit_op
    n, k = 48, 64
    layer = Linear4bit.from_linear(nn.Linear(k, n))
    with AllocTracker() as tr:
        linear4bit_op(torch.randn(CPU_GEMV_MAX_M["nt"] + 1, k), *_q4_args(layer), layer.bias)
    assert tr.at_least(n * k), "the tracker missed the full dequantization inside a custom op"
    from peft_kernels.ops import backend, cpu_lib
    if backend.select(torch.device("cpu"), has_cpu_impl=True) == "cpu" and cpu_lib.load() is not None:
        with AllocTracker() as tr:
            linear4bit_op(torch.randn(2, k), *_q4_args(layer), layer.bias)
        assert not tr.at_least(n * k), "the CPU GEMV path materialised W"
    with AllocTracker() as tr:  # and it catches a dense reference in plain torch
        R.masked_delta_dense_reference(*_delta(n, k, 0, 0.1, device="cpu"), 0, n, k)
    assert tr.at_least(n * k)


# ------------------------------------------------------------------ masks <-> indices
def test_mask_round_trip():
    n, k, b = 37, 45, 16
    mask = torch.rand(n, k, generator=torch.Generator().manual_seed(0)) < 0.1
    idx = S.indices_from_mask(mask, 0, (n, k))
    assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all())
    assert torch.equal(S.mask_from_indices(idx, 0, n, k), mask)
    bmask = torch.rand(3, 3, generator=torch.Generator().manual_seed(1)) < 0.5
    bidx = S.indices_from_mask(bmask, b, (n, k))
    assert torch.equal(S.mask_from_indices(bidx, b, n, k), bmask)
    vals = torch.randn(bidx.numel(), b, b)
    dense = R.masked_delta_dense_reference(vals, bidx, b, n, k)
    tiles = bmask.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k]
    assert bool((dense[~tiles] == 0).all()) and bool((dense[tiles] != 0).all())


# ------------------------------------------------------------------ bad input
def _good(n=24, k=40, b=0):
    vals, idx = _delta(n, k, b, 0.2, device="cpu")
    return torch.randn(3, k), torch.randn(n, k), vals, idx


@pytest.mark.parametrize("case,exc,match", [
    ("values_shape", ValueError, r"values must have shape \(\d+,\)"),
    ("block_values_shape", ValueError, r"values must have shape \(\d+, 16, 16\)"),
    ("out_of_range", ValueError, "out of range"),
    ("negative", ValueError, "out of range"),
    ("duplicate", ValueError, "duplicate"),
    ("unsorted", ValueError, "sorted"),
    ("int32_indices", TypeError, "int64"),
    ("2d_indices", ValueError, "1-D"),
    ("block_size", ValueError, "block_size must be one of"),
    ("bool_block_size", ValueError, "block_size must be one of"),
    ("x_last_dim", ValueError, "last dimension must be 40"),
    ("bias_shape", ValueError, r"bias must have shape \(24,\)"),
    ("device", ValueError, "same device"),
    ("int_values", TypeError, "floating-point"),
    ("grow_alone", ValueError, "given together"),
    ("grow_overlap", ValueError, "overlaps"),
    ("grow_scores_dtype", TypeError, "float32"),
    ("grow_scores_shape", ValueError, "grow_scores must have shape"),
    ("grow_out_of_range", ValueError, "grow_indices out of range"),
])
def test_bad_input_dense_op(case, exc, match):
    x, w, vals, idx = _good()
    bias, b, gi, gs = None, 0, None, None
    free = torch.tensor(sorted(set(range(24 * 40)) - set(idx.tolist()))[:3])
    if case == "values_shape":
        vals = vals[:-1]
    elif case == "block_values_shape":
        b = 16
        idx = torch.tensor([0, 2])
        vals = torch.randn(2, 32, 32)
    elif case == "out_of_range":
        idx = idx.clone()
        idx[-1] = 24 * 40
    elif case == "negative":
        idx = torch.cat([torch.tensor([-1]), idx[1:]])
    elif case == "duplicate":
        idx = idx.clone()
        idx[1] = idx[0]
    elif case == "unsorted":
        idx = idx.flip(0)
    elif case == "int32_indices":
        idx = idx.int()
    elif case == "2d_indices":
        idx, vals = idx.view(1, -1), vals
    elif case == "block_size":
        b = 8
    elif case == "bool_block_size":
        b = True
    elif case == "x_last_dim":
        x = torch.randn(3, 41)
    elif case == "bias_shape":
        bias = torch.zeros(23)
    elif case == "device":
        x = torch.randn(3, 40, device="meta")
    elif case == "int_values":
        vals = torch.ones(idx.numel(), dtype=torch.int32)
    elif case == "grow_alone":
        gi = free
    elif case == "grow_overlap":
        gi, gs = torch.cat([idx[:1], free]).sort().values, torch.zeros(4)
    elif case == "grow_scores_dtype":
        gi, gs = free, torch.zeros(3, dtype=torch.float16)
    elif case == "grow_scores_shape":
        gi, gs = free, torch.zeros(4)
    elif case == "grow_out_of_range":
        gi, gs = torch.tensor([24 * 40 + 5]), torch.zeros(1)
    with pytest.raises(exc, match=match):
        S.sparse_linear_dense(x, w, bias, vals, idx, b, gi, gs)


def test_bad_input_other_entry_points():
    x, w, vals, idx = _good()
    layer = Linear4bit.from_linear(nn.Linear(40, 24))
    args = list(_q4_args(layer))
    with pytest.raises(ValueError, match="packed must be uint8 with >= 480 bytes"):
        S.sparse_linear_4bit(x, args[0][:100], *args[1:], None, vals, idx, 0)
    with pytest.raises(ValueError, match="out of range"):  # out_features larger than the weight's rows: caught too
        S.sparse_linear_4bit(x, *args[:-1], 20, None, vals, idx, 0)
    with pytest.raises(ValueError, match="last dimension must be 24"):
        S.delta_matmul_nn(torch.randn(3, 25), vals, idx, 0, 24, 40)
    with pytest.raises(ValueError, match="same leading dims"):
        S.sampled_grad(torch.randn(3, 24), torch.randn(4, 40), idx, 0, 24, 40)
    with pytest.raises(ValueError, match="N must be a positive int"):
        S.delta_matmul_nt(x, vals, idx, 0, 0, 40)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 3\)"):
        S.indices_from_mask(torch.zeros(3, 3, dtype=torch.bool), 16, (24, 40))
    with pytest.raises(ValueError, match=r"mask must have shape \(24, 40\)"):
        S.indices_from_mask(torch.zeros(24, 41, dtype=torch.bool), 0, (24, 40))
    with pytest.raises(ValueError, match="2-D bool"):
        S.indices_from_mask(torch.zeros(24, 40), 0)
    with pytest.raises(ValueError, match="duplicate"):
        S.mask_from_indices(torch.tensor([3, 3]), 0, 24, 40)
    if KERNELS_RUN:  # the launchers' own checks (a direct kernel call with mismatched shapes)
        with pytest.raises(ValueError, match="values must have shape"):
            K.delta_matmul_nt(x.to(DEVICE), vals[:-1].to(DEVICE), idx.to(DEVICE), 0, 24, 40)
        with pytest.raises(ValueError, match="out must have shape"):
            K.delta_matmul_nt(x.to(DEVICE), vals.to(DEVICE), idx.to(DEVICE), 0, 24, 40,
                              out=torch.empty(3, 23, device=DEVICE))


# ------------------------------------------------------------------ torch.library
def test_opcheck_custom_ops(monkeypatch):
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "reference")
    x, w, vals, idx = _good()
    vals.requires_grad_()
    x.requires_grad_()
    torch.library.opcheck(S.sparse_linear_dense_op, (x, w, torch.randn(24), vals, idx, 0, None, None))
    layer = Linear4bit.from_linear(nn.Linear(40, 24))
    torch.library.opcheck(S.sparse_linear_4bit_op, (x, *_q4_args(layer), None, vals, idx, 0, None, None))
    bv, bi = _delta(24, 40, 16, 0.5, device="cpu")
    torch.library.opcheck(S.delta_matmul_nt_op, (x.detach(), bv, bi, 16, 24, 40))
    torch.library.opcheck(S.delta_matmul_nn_op, (torch.randn(3, 24), bv, bi, 16, 24, 40))
    torch.library.opcheck(S.sampled_grad_op, (torch.randn(3, 24), x.detach(), bi, 16, 24, 40, torch.float32))


@pytest.mark.parametrize("b", (0, 16))
def test_torch_compile_fullgraph_matches_eager(b, monkeypatch):
    """The op compiles without graph breaks (the host-side index checks run eagerly only) and matches eager."""
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "reference")
    torch._dynamo.reset()
    x, w, vals, idx = _good(b=b)
    vals.requires_grad_()

    def f(x, vals):
        return S.sparse_linear_dense(x, w, None, vals, idx, b)

    y_e = f(x, vals)
    (gv_e,) = torch.autograd.grad(y_e.square().sum(), vals)
    y_c = torch.compile(f, backend="aot_eager", fullgraph=True)(x, vals)
    (gv_c,) = torch.autograd.grad(y_c.square().sum(), vals)
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(gv_c, gv_e)


def test_index_validation_is_cached_per_version_and_redone_after_inplace_change():
    n, k = 24, 40
    vals, idx = _delta(n, k, 0, 0.2, device="cpu")
    x = torch.randn(2, k)
    S.delta_matmul_nt(x, vals, idx, 0, n, k)
    assert getattr(idx, S._CHECKED_ATTR) == (idx._version, 0, n, k)
    idx[0] = idx[1]  # in place: now a duplicate; the version counter moves, the check runs again
    with pytest.raises(ValueError, match="duplicate"):
        S.delta_matmul_nt(x, vals, idx, 0, n, k)
    idx2 = idx.clone()
    idx2[0] = -5  # a fresh tensor carries no mark
    with pytest.raises(ValueError, match="out of range"):
        S.delta_matmul_nt(x, vals, idx2, 0, n, k)
    with pytest.raises(ValueError, match="out of range"):  # same tensor, other shape: checked again
        S.delta_matmul_nt(torch.randn(2, 10), vals, torch.arange(vals.numel()) * 30, 0, n, 10)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_sampled_grad_mixed_input_dtypes(backend_name, monkeypatch):
    """dy fp16 with x fp32 (e.g. a caller's own loop): promoted to fp32, same result on both backends."""
    if backend_name == "triton" and not (KERNELS_RUN and DEVICE == "cpu"):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", backend_name)
    n, k = 30, 50
    _, idx = _delta(n, k, 16, 0.5, device="cpu")
    dy, x = _randn(5, n, dtype=torch.float16, device="cpu"), _randn(5, k, device="cpu")
    g = S.sampled_grad(dy, x, idx, 16, n, k)
    assert g.dtype == torch.float32
    assert_close_to_reference(g, R.sampled_grad(dy.double(), x.double(), idx, 16, n, k, torch.float64),
                              torch.float32, "SDDMM fp16 x fp32")
