"""BitFit: the Triton backward kernel, the ops, ``BitFitLinear`` and ``methods.bitfit`` on CPU.

Ground truth is the plain-torch float64 "dense bias-only model": an ``nn.Linear`` in float64 whose weight
is the base's (dequantized) weight, frozen, and whose bias trains. Every layer output and gradient is
compared with it under the one tolerance policy (tests/_tolerance.py). Triton runs in the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 without a GPU): fp32/fp16 only here, bf16 in test_gpu_bitfit.py.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from _tiny_models import build, sample_ids
from _tolerance import assert_close_to_reference
from peft_kernels.io.method_files import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError
from peft_kernels.kernels import bitfit as K
from peft_kernels.kernels._launch import is_interpreted
from peft_kernels.methods import bitfit as M
from peft_kernels.methods._common import trainable_parameters
from peft_kernels.nn.bitfit import BitFitLinear
from peft_kernels.nn.linear4bit import Linear4bit
from peft_kernels.ops import bitfit as O
from peft_kernels.ops import reference as R
from peft_kernels.quant import quantize_4bit
from peft_kernels.quant.model import quantize_model
from _weights import weight64

HAS_TRITON = torch.cuda.is_available() or is_interpreted(K._bitfit_nn_kernel)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton needs a GPU or TRITON_INTERPRET=1")
DTYPES = (torch.float32, torch.float16)  # no bf16 math in the interpreter
KINDS = ("linear", "conv1d", "4bit")


# ============================================================================ helpers
def make_base(kind: str, k: int, n: int, dtype=torch.float32, *, blocksize=64, bias=False, seed=0):
    """A frozen base layer [n, k] of ``kind``; 16-bit dense bases hold their weight in ``dtype``."""
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(k, n, bias=bias).to(dtype)
    if kind == "conv1d":
        base = Conv1D(n, k)
        nn.init.normal_(base.weight, std=k ** -0.5)
        if not bias:
            base.bias = None
        return base.to(dtype)
    return Linear4bit.from_linear(nn.Linear(k, n, bias=bias), blocksize=blocksize)


def reference_model(layer: BitFitLinear) -> nn.Linear:
    """The plain-torch float64 dense bias-only model: frozen weight, trainable bias (same values)."""
    ref = nn.Linear(layer.in_features, layer.out_features, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(weight64(layer.base_layer))
        ref.bias.copy_(layer.bias.double())
    ref.weight.requires_grad_(False)
    return ref


def randn(*shape, dtype=torch.float32, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def storages(ts) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in ts if t is not None}


# ============================================================================ layer vs reference
# (x leading shape, N, K, blocksize): M = 1 with odd K (4-bit blocks cross rows); K not a multiple of the
# blocksize and N not a multiple of any tile; K % 32 == 0 (whole-byte path) with a 3-D input.
CASES = [((1,), 33, 65, 32), ((5,), 40, 100, 64), ((2, 3), 24, 96, 64)]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"x{c[0]}-N{c[1]}-K{c[2]}-bs{c[3]}")
def test_layer_matches_float64_bias_only_model(monkeypatch, case, kind, dtype, backend):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", backend)
    lead, n, k, bs = case
    layer = BitFitLinear(make_base(kind, k, n, dtype, blocksize=bs))
    with torch.no_grad():
        layer.bias.copy_(randn(n, seed=3))  # non-zero so a dropped bias shows
    ref = reference_model(layer)
    x = randn(*lead, k, dtype=dtype, seed=4).requires_grad_(True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*lead, n)
    x64 = x.detach().double().requires_grad_(True)
    y64 = ref(x64)
    dy = randn(*lead, n, dtype=dtype, seed=5)
    y.backward(dy)
    y64.backward(dy.double())
    assert_close_to_reference(y, y64, dtype, f"{kind} y")
    assert x.grad.dtype == dtype
    assert_close_to_reference(x.grad, x64.grad, dtype, f"{kind} dx")
    assert layer.bias.grad.dtype == torch.float32
    # db is a float32 sum of the dtype-valued dy: exact up to fp32 accumulation for either dtype.
    assert_close_to_reference(layer.bias.grad, ref.bias.grad, torch.float32, f"{kind} db")
    base_params = list(layer.base_layer.parameters())
    assert all(not p.requires_grad and p.grad is None for p in base_params)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "4bit"])
def test_existing_bias_is_copied_and_missing_bias_starts_at_zero(kind):
    with_bias = make_base(kind, 24, 16, bias=True)
    layer = BitFitLinear(with_bias)
    assert layer.bias.dtype == torch.float32 and layer.bias.requires_grad
    assert torch.equal(layer.bias.detach(), with_bias.bias.detach().float())
    assert layer.bias.data_ptr() != with_bias.bias.data_ptr()  # a copy: the base stays as it was
    assert not with_bias.bias.requires_grad
    layer0 = BitFitLinear(make_base(kind, 24, 16, bias=False))
    assert torch.equal(layer0.bias.detach(), torch.zeros(16))
    # A zero BitFit bias over a bias-free base computes x Wᵀ alone.
    x = randn(3, 24)
    assert_close_to_reference(layer0(x), x.double() @ weight64(layer0.base_layer).t(), torch.float32,
                              "zero-bias output")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_backend_above_the_fused_range(monkeypatch, dtype):
    """M > FUSED_MAX_M: matmul4bit's workspace + cuBLAS for the forward and dX, one reduction for db."""
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "triton")
    from peft_kernels.kernels import matmul4bit
    m = matmul4bit.FUSED_MAX_M + 6
    layer = BitFitLinear(make_base("4bit", 40, 24, blocksize=32))
    with torch.no_grad():
        layer.bias.copy_(randn(24, seed=3))
    ref = reference_model(layer)
    x = randn(m, 40, dtype=dtype).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y, y64 = layer(x), ref(x64)
    dy = randn(m, 24, dtype=dtype, seed=7)
    y.backward(dy)
    y64.backward(dy.double())
    assert_close_to_reference(y, y64, dtype, "y")
    assert_close_to_reference(x.grad, x64.grad, dtype, "dx")
    assert_close_to_reference(layer.bias.grad, ref.bias.grad, torch.float32, "db")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compute_dtype_and_autocast(monkeypatch, backend):
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", backend)
    # Linear4bit's compute_dtype: fp32 in, fp16 math, fp32 out; the float32 bias gets a float32 gradient.
    base = Linear4bit.from_linear(nn.Linear(48, 20), blocksize=32, compute_dtype=torch.float16)
    layer = BitFitLinear(base)
    ref = reference_model(layer)
    x = randn(3, 48).requires_grad_(True)
    y = layer(x)
    assert y.dtype == torch.float32
    x64 = x.detach().double().requires_grad_(True)
    y64 = ref(x64)
    y.sum().backward()
    y64.sum().backward()
    assert_close_to_reference(y, y64, torch.float16, "compute_dtype y")
    assert_close_to_reference(x.grad, x64.grad, torch.float16, "compute_dtype dx")
    assert layer.bias.grad.dtype == torch.float32
    # Autocast over a float32 dense base: fp16 math, fp16 output (as nn.Linear), float32 bias grad.
    dense = BitFitLinear(make_base("linear", 48, 20))
    with torch.autocast("cpu", dtype=torch.float16):
        yd = dense(x)
    assert yd.dtype == torch.float16
    yd.float().sum().backward()
    assert dense.bias.grad.dtype == torch.float32
    assert_close_to_reference(dense.bias.grad, torch.full((20,), 3.0, dtype=torch.float64), torch.float32, "db")


# ============================================================================ the fused kernel itself
# (M, N, K, blocksize, forced config): odd K; N over one BLOCK_N=128 step; M in the 64-row config;
# a forced 16-row config at M = 37 (three M tiles: partial sums added by the launcher).
KCASES = [(1, 33, 65, 32, None), (5, 200, 96, 64, None), (40, 40, 100, 64, None), (37, 30, 64, 32, "bitfit_nn_m16"),
          (20, 50, 32, 32, "bitfit_nn_m64")]


def _weight(n, k, bs, seed=0):
    packed, st = quantize_4bit(randn(n, k, seed=seed), blocksize=bs, quant_type="nf4", double_quant=False)
    absmax = st.absmax_float().contiguous()
    w64 = R.dequantize_4bit(packed, absmax, st.code, bs, n * k, torch.float64).view(n, k)
    return packed, absmax, st.code, w64


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", KCASES, ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-bs{c[3]}-{c[4]}")
def test_fused_kernel_matches_reference_with_poisoned_outputs(case, dtype):
    m, n, k, bs, config = case
    packed, absmax, code, w64 = _weight(n, k, bs, seed=n + k)
    dy = randn(m, n, dtype=dtype, seed=m)
    dx_out = torch.full((m, k), float("nan"), dtype=dtype)
    db_out = torch.full((n,), float("nan"))
    dx, db = K.bitfit_grad_4bit(dy, packed, absmax, code, bs, k, dx_out=dx_out, db_out=db_out, config=config)
    assert dx is dx_out and db is db_out
    ref_dx, ref_db = R.bitfit_backward_4bit(dy.double(), packed, absmax, code, bs, k)
    assert_close_to_reference(dx, ref_dx, dtype, "kernel dx")
    assert_close_to_reference(db, ref_db, torch.float32, "kernel db")
    assert torch.allclose(ref_dx, dy.double() @ w64)  # the reference is the definition


@needs_triton
def test_kernel_db_only_large_m_and_determinism():
    n, k, bs = 30, 64, 32
    packed, absmax, code, w64 = _weight(n, k, bs)
    dy = randn(37, n, dtype=torch.float16)
    # x needs no gradient: db alone, no dx.
    dx, db = K.bitfit_grad_4bit(dy, packed, absmax, code, bs, k, need_dx=False, db_out=torch.full((n,), float("nan")))
    assert dx is None
    assert_close_to_reference(db, dy.double().sum(0), torch.float32, "db only")
    # Several M tiles: partial sums in a fixed order, so two runs give the same bits.
    a = K.bitfit_grad_4bit(dy, packed, absmax, code, bs, k, config="bitfit_nn_m16")
    b = K.bitfit_grad_4bit(dy, packed, absmax, code, bs, k, config="bitfit_nn_m16")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Above FUSED_MAX_M: workspace + cuBLAS for dx, one reduction for db (poisoned outputs).
    from peft_kernels.kernels import matmul4bit
    m = matmul4bit.FUSED_MAX_M + 1
    dy = randn(m, n, seed=9)
    dx, db = K.bitfit_grad_4bit(dy, packed, absmax, code, bs, k, dx_out=torch.full((m, k), float("nan")),
                                db_out=torch.full((n,), float("nan")))
    assert_close_to_reference(dx, dy.double() @ w64, torch.float32, "large-M dx")
    assert_close_to_reference(db, dy.double().sum(0), torch.float32, "large-M db")
    # Empty M: zero db, empty dx.
    dx, db = K.bitfit_grad_4bit(dy[:0], packed, absmax, code, bs, k)
    assert dx.shape == (0, k) and torch.equal(db, torch.zeros(n))


@needs_triton
def test_kernel_launcher_rejects_bad_arguments():
    packed, absmax, code, _ = _weight(16, 32, 32)
    dy = randn(4, 16)
    with pytest.raises(ValueError, match="unknown config"):
        K.bitfit_grad_4bit(dy, packed, absmax, code, 32, 32, config="fast")
    with pytest.raises(ValueError, match=r"db_out must have shape \(16,\)"):
        K.bitfit_grad_4bit(dy, packed, absmax, code, 32, 32, db_out=torch.empty(15))
    with pytest.raises(TypeError, match="db_out has dtype float16"):
        K.bitfit_grad_4bit(dy, packed, absmax, code, 32, 32, db_out=torch.empty(16, dtype=torch.float16))
    with pytest.raises(ValueError, match="2-D"):
        K.bitfit_grad_4bit(dy[None], packed, absmax, code, 32, 32)
    with pytest.raises(TypeError, match="dy has dtype int64"):
        K.bitfit_grad_4bit(dy.long(), packed, absmax, code, 32, 32)
    with pytest.raises(ValueError, match="packed bytes"):
        K.bitfit_grad_4bit(dy, packed, absmax, code, 32, 64)  # in_features too large for the bytes


def test_aot_variants_cover_every_config_and_dtype():
    """tests/test_triton_aot.py compiles these for sm_80/86/89/90; every launcher choice must be listed."""
    got = {(v.meta["config"], v.meta["dtype"], v.constexprs["K_ALIGNED"]) for v in K.AOT_VARIANTS}
    want = {(c, d, a) for c in K._NN for d in ("fp32", "fp16", "bf16") for a in (True, False)}
    assert got == want
    assert {K.pick_config(m) for m in (1, 16, 17, 64)} <= set(K._NN)
    assert all(v.expect_mma == (v.meta["dtype"] != "fp32") for v in K.AOT_VARIANTS)


# ============================================================================ saved for backward
def _record_saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("kind", KINDS)
def test_saves_nothing_of_x(monkeypatch, kind, backend):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", backend)
    n, k = 24, 40
    base = make_base(kind, k, n, blocksize=32)
    layer = BitFitLinear(base)
    x = randn(2, 3, k).requires_grad_(True)
    y, saved = _record_saved(lambda: layer(x))
    x_store = storages([x])
    x_bytes = sum(t.untyped_storage().nbytes() for t in saved if storages([t]) & x_store)
    assert x_bytes == 0, "BitFit saved x (or a view of it) for backward"
    if kind == "4bit":
        qs = base.quant_state
        owned = [base.weight, qs.absmax, qs.code, qs.nested.absmax, qs.nested.code]
        # Exactly the quantized weight's own buffers, by identity: no copy, no dense W, nothing of x.
        assert sorted(t.data_ptr() for t in saved) == sorted(t.data_ptr() for t in owned)
        assert sum(t.numel() * t.element_size() for t in saved) == \
            (n * k // 2) + (n * k // 32) + 4 * 1 + 16 * 4 + 256 * 4
    else:
        assert len(saved) == 1 and storages(saved) == storages([base.weight])
    new_bytes = sum(t.untyped_storage().nbytes() for t in saved if not storages([t]) <= storages(owned_by(layer)))
    assert new_bytes == 0  # everything saved is already resident in the module
    y.sum().backward()
    assert x.grad is not None and layer.bias.grad is not None


def owned_by(layer: BitFitLinear) -> list[torch.Tensor]:
    ts = list(layer.parameters()) + list(layer.buffers())
    if isinstance(layer.base_layer, Linear4bit):
        qs = layer.base_layer.quant_state
        ts += [qs.absmax, qs.code, qs.nested.absmax, qs.nested.code]
    return ts


def _layer_call(layer: BitFitLinear, use_op: bool):
    """x -> y through the layer's op: the eager autograd.Function, or the torch.library op (what
    torch.compile traces), called directly with the arguments the layer passes."""
    if isinstance(layer.base_layer, Linear4bit):
        base = layer.base_layer
        qs = base.quant_state
        fn = O.bitfit_linear_4bit_op if use_op else O.bitfit_linear_4bit
        return lambda x: fn(x, base.weight, qs.absmax, qs.code, qs.nested.absmax, qs.nested.code,
                            float(qs.nested.offset), qs.blocksize, layer.out_features, layer.bias)
    fn = O.bitfit_linear_dense_op if use_op else O.bitfit_linear_dense
    return lambda x: fn(x, layer._dense_weight(), layer.bias)


def test_saves_nothing_of_x_with_a_compute_dtype_cast_and_on_the_op_path():
    # fp32 x cast to fp16 inside the layer: the cast copy must not be kept either.
    base = Linear4bit.from_linear(nn.Linear(32, 16), blocksize=32, compute_dtype=torch.float16)
    layer = BitFitLinear(base)
    x = randn(4, 32).requires_grad_(True)
    _, saved = _record_saved(lambda: layer(x))
    assert storages(saved) <= storages(owned_by(layer))
    # The torch.library op path saves the same tensors as the eager path.
    for lay in (layer, BitFitLinear(make_base("conv1d", 32, 16))):
        _, saved_fast = _record_saved(lambda: _layer_call(lay, False)(x))
        _, saved_op = _record_saved(lambda: _layer_call(lay, True)(x))
        assert storages(saved_op) == storages(saved_fast) and storages(saved_op) <= storages(owned_by(lay))
    dense = BitFitLinear(make_base("conv1d", 32, 16))
    _, saved_dense = _record_saved(lambda: dense(x))
    assert storages(saved_dense) == storages([dense.base_layer.weight])


@pytest.mark.parametrize("kind", ["linear", "4bit"])
def test_no_input_gradient_when_x_needs_none(monkeypatch, kind):
    """x without requires_grad (the first layer after a frozen embedding): only db is computed."""
    import peft_kernels.ops.linear4bit as L4
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "cpu")
    calls = []
    real = L4._dense_weight
    monkeypatch.setattr(L4, "_dense_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    seen = []
    real_dense_bwd = O._dense_backward_impl
    monkeypatch.setattr(O, "_dense_backward_impl",
                        lambda dy, w, nx, nb: seen.append(nx) or real_dense_bwd(dy, w, nx, nb))
    layer = BitFitLinear(make_base(kind, 40, 24, blocksize=32))
    x = randn(5, 40)
    y = layer(x)
    y.backward(torch.ones_like(y))
    assert torch.equal(layer.bias.grad, torch.full((24,), 5.0))
    if kind == "4bit":
        assert len(calls) == 1  # the forward's dequantization only: no dY W in the backward
    else:
        assert seen == [False]


# ============================================================================ ops
@pytest.mark.parametrize("kind", ["dense", "4bit"])
def test_torch_library_opcheck(kind):
    x = randn(3, 40).requires_grad_(True)
    bias = randn(24, seed=2).requires_grad_(True)
    dy = randn(3, 24, seed=3)
    if kind == "dense":
        w = randn(40, 24, seed=4).t()  # strided, as a Conv1D passes it
        torch.library.opcheck(O.bitfit_linear_dense_op, (x, w, bias))
        for flags in ((True, True), (False, True), (True, False)):
            torch.library.opcheck(O.bitfit_dense_backward_op, (dy, w, *flags))
    else:
        q = Linear4bit.from_linear(nn.Linear(40, 24), blocksize=32)
        qs = q.quant_state
        wargs = (q.weight, qs.absmax, qs.code, qs.nested.absmax, qs.nested.code, float(qs.nested.offset), 32)
        torch.library.opcheck(O.bitfit_linear_4bit_op, (x, *wargs, 24, bias))
        for flags in ((True, True), (False, True), (True, False)):
            torch.library.opcheck(O.bitfit_4bit_backward_op, (dy, *wargs, 40, *flags))


@pytest.mark.parametrize("four_bit", [False, True])
def test_eager_fast_path_equals_the_custom_op_path(four_bit):
    layer = BitFitLinear(make_base("4bit" if four_bit else "conv1d", 40, 24, blocksize=32, bias=True))

    def run(use_op):
        layer.bias.grad = None
        x = randn(2, 5, 40).requires_grad_(True)
        y = _layer_call(layer, use_op)(x)
        y.square().sum().backward()
        return y.detach(), x.grad, layer.bias.grad

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_gradcheck_float64():
    layer = BitFitLinear(make_base("4bit", 20, 12, blocksize=32))
    x = randn(3, 20).double().requires_grad_(True)
    b = randn(12).double().requires_grad_(True)
    qs = layer.base_layer.quant_state
    args = (layer.base_layer.weight, qs.absmax, qs.code, qs.nested.absmax, qs.nested.code, float(qs.nested.offset),
            32, 12)
    assert torch.autograd.gradcheck(lambda x, b: O.bitfit_linear_4bit(x, *args, b), (x, b), fast_mode=True)
    w = randn(12, 20).double()
    assert torch.autograd.gradcheck(lambda x, b: O.bitfit_linear_dense(x, w, b), (x, b), fast_mode=True)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    layer = BitFitLinear(make_base("4bit", 32, 24, blocksize=32))
    model = nn.Sequential(layer, nn.GELU())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break raises
    x = randn(4, 32).requires_grad_(True)
    compiled(x).sum().backward()
    g_c = (x.grad.clone(), layer.bias.grad.clone())
    x.grad = layer.bias.grad = None
    model(x).sum().backward()
    assert_close_to_reference(g_c[0], x.grad.double(), torch.float32, "compiled dx")
    assert_close_to_reference(g_c[1], layer.bias.grad.double(), torch.float32, "compiled db")


# ============================================================================ layer: bad input, unwrapping
def test_layer_bad_input_raises_clear_errors():
    layer = BitFitLinear(make_base("linear", 16, 8))
    with pytest.raises(ValueError, match=r"last dimension of x must be 16"):
        layer(torch.randn(2, 15))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        layer(torch.ones(2, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        layer([1.0] * 16)
    with pytest.raises(ValueError, match="x is on meta but the layer is on cpu"):
        layer(torch.empty(2, 16, device="meta"))
    with pytest.raises(TypeError, match="BitFitLinear wraps nn.Linear"):
        BitFitLinear(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="BitFitLinear wraps nn.Linear"):
        BitFitLinear(nn.LayerNorm(8))
    with pytest.raises(TypeError, match="bias_dtype must be a float dtype"):
        BitFitLinear(nn.Linear(4, 4), bias_dtype=torch.int32)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_gives_a_plain_layer_with_the_trained_bias(kind):
    base = make_base(kind, 24, 16, bias=False)
    layer = BitFitLinear(base)
    with torch.no_grad():
        layer.bias.copy_(randn(16, seed=3))
    x = randn(3, 24)
    y = layer(x)
    assert layer.unload() is base and base.bias is None  # unload: the base as it was
    plain = layer.merge_and_unload()
    assert plain is base and type(plain) is type(base)
    assert plain.bias is not None and not plain.bias.requires_grad
    assert_close_to_reference(plain(x), y.double(), torch.float32, "merged output")


# ============================================================================ methods: counts, training
def _linear_out_features(model, exclude=()):
    total = 0
    for name, m in model.named_modules():
        if name in exclude:
            continue
        if isinstance(m, (nn.Linear, Linear4bit)):
            total += m.out_features
        elif isinstance(m, Conv1D):
            total += m.nf
    return total


def _norm_params(model):
    return sum(p.numel() for m in model.modules() if type(m).__name__.endswith("Norm")
               for p in m.parameters(recurse=False))


@pytest.mark.parametrize("arch,quant", [("llama", False), ("llama", True), ("bert", False), ("gpt2", False)])
@pytest.mark.parametrize("train_norms", [False, True])
def test_exact_trainable_parameter_counts(arch, quant, train_norms):
    model = build(arch)
    if quant:
        quantize_model(model)
    head = {n for n, m in model.named_modules() if m is model.get_output_embeddings()}
    want = _linear_out_features(model, exclude=head) + (_norm_params(model) if train_norms else 0)
    _, total_before = trainable_parameters(model)
    M.apply(model, M.BitFitConfig(train_norms=train_norms))
    trainable, total = trainable_parameters(model)
    assert trainable == want
    assert total == total_before + _linear_out_features(model, exclude=head)  # one new bias per wrapped layer
    # Hand-counted for tiny llama (hidden 64, 4 heads of 16, 2 kv heads, intermediate 128, 2 layers):
    # per layer q 64 + k 32 + v 32 + o 64 + gate 128 + up 128 + down 64 = 512; norms 2*64 per layer + 64.
    if arch == "llama":
        assert trainable == (1024 + (5 * 64 if train_norms else 0))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(M.bitfit_state_dict(model))


@pytest.mark.parametrize("arch,quant,train_norms", [("llama", True, True), ("bert", False, False),
                                                    ("gpt2", False, True)])
def test_training_a_few_steps_lowers_the_loss(arch, quant, train_norms):
    model = build(arch)
    if quant:
        quantize_model(model)
    M.apply(model, M.BitFitConfig(train_norms=train_norms))
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = sample_ids(2, 12)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"


def test_targeting_rules():
    model = build("llama")
    assert M.resolve_targets(model, M.BitFitConfig(target_modules=["q_proj", "down_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert M.resolve_targets(model, M.BitFitConfig(target_modules=r".*layers\.1\..*_proj",
                                                   exclude_modules=["mlp.gate_proj", "mlp.up_proj"])) == [
        f"model.layers.1.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.down_proj")]
    all_linear = M.resolve_targets(model, M.BitFitConfig())
    assert "lm_head" not in all_linear and len(all_linear) == 14
    # modules_to_save trains in full and is never wrapped; excluded norms are not tuned.
    cfg = M.BitFitConfig(target_modules="all-linear", train_norms=True, modules_to_save=["layers.1"],
                         exclude_modules=r"model\.norm")
    M.apply(model, cfg)
    assert [n for n, m in model.named_modules() if isinstance(m, BitFitLinear)] == all_linear[:7]
    assert all(p.requires_grad for p in model.model.layers[1].parameters())
    assert not model.model.norm.weight.requires_grad and model.model.layers[0].input_layernorm.weight.requires_grad
    assert not model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad


# ============================================================================ methods: bad input
def _snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def _assert_unchanged(model, snap):
    assert not any(isinstance(m, BitFitLinear) for m in model.modules())
    assert M.get_config(model) is None
    now = dict(model.named_parameters())
    assert set(now) == set(snap)
    for n, (v, rg) in snap.items():
        assert torch.equal(now[n], v) and now[n].requires_grad == rg, n


def test_apply_bad_config_raises_and_leaves_the_model_unchanged():
    model = build("llama")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp' is a LlamaMLP; BitFit wraps nn.Linear"):
        M.apply(model, M.BitFitConfig(target_modules=["q_proj", "mlp"]))
    with pytest.raises(ValueError, match=r"is a LlamaRMSNorm"):
        M.apply(model, M.BitFitConfig(target_modules=r".*layernorm"))
    with pytest.raises(ValueError, match=r"matched no linear module of LlamaForCausalLM.*named like"):
        M.apply(model, M.BitFitConfig(target_modules=["query", "value"]))
    with pytest.raises(ValueError, match=r"matched no linear module"):
        M.apply(model, M.BitFitConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"modules_to_save \['classifier'\] matched no module"):
        M.apply(model, M.BitFitConfig(modules_to_save=["classifier"]))
    with pytest.raises(TypeError, match="cfg must be a BitFitConfig"):
        M.apply(model, {"target_modules": "all-linear"})
    _assert_unchanged(model, snap)
    M.apply(model, M.BitFitConfig())
    with pytest.raises(ValueError, match="already has BitFit applied"):
        M.apply(model, M.BitFitConfig())


def test_config_validation():
    with pytest.raises(ValueError, match="empty list"):
        M.BitFitConfig(target_modules=[])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        M.BitFitConfig(target_modules="(")
    with pytest.raises(TypeError, match="list of non-empty strings"):
        M.BitFitConfig(target_modules=["q_proj", 3])
    with pytest.raises(TypeError, match="modules_to_save must be a list"):
        M.BitFitConfig(modules_to_save="lm_head")
    with pytest.raises(TypeError, match="train_norms must be a bool"):
        M.BitFitConfig(train_norms="yes")
    cfg = M.BitFitConfig(target_modules=("v_proj", "q_proj", "q_proj"), train_norms=True)
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert M.BitFitConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ============================================================================ files
def _trained(arch="llama", quant=False, train_norms=True, seed=0):
    model = build(arch, seed=seed)
    if quant:
        quantize_model(model)
    M.apply(model, M.BitFitConfig(train_norms=train_norms))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # stand-in for training: every trainable tensor moved
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("quant", [False, True])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, quant):
    model = _trained(quant=quant)
    ids = sample_ids()
    want = model(input_ids=ids).logits
    M.save_bitfit(model, tmp_path / "bf")
    cfg = json.loads((tmp_path / "bf" / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "BITFIT" and cfg["train_norms"] is True and len(cfg["bitfit_modules"]) == 14
    fresh = build("llama")
    if quant:
        quantize_model(fresh)
    M.load_bitfit(fresh, tmp_path / "bf")
    assert torch.equal(fresh(input_ids=ids).logits, want)
    assert trainable_parameters(fresh) == trainable_parameters(model)
    assert M.get_config(fresh) == M.get_config(model)
    # Loading into a model that already has BitFit on the same modules replaces the values.
    other = _trained(quant=quant, seed=0)
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.zero_()
    M.load_bitfit(other, tmp_path / "bf")
    assert torch.equal(other(input_ids=ids).logits, want)
    # merge_and_unload: plain layers holding the trained biases compute the same function.
    merged = M.merge_and_unload(fresh)
    assert not any(isinstance(m, BitFitLinear) for m in merged.modules()) and M.get_config(merged) is None
    assert merged.model.layers[0].mlp.gate_proj.bias is not None
    assert_close_to_reference(merged(input_ids=ids).logits, want.double(), torch.float32, "merged logits")


def test_unload_without_merge_restores_the_base_layers():
    model = build("gpt2")
    ids = sample_ids()
    want = model(input_ids=ids).logits
    attn = model.transformer.h[0].attn.c_attn
    M.apply(model, M.BitFitConfig())
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.bias.add_(1.0)
    M.unload(model, merge=False)
    assert model.transformer.h[0].attn.c_attn is attn
    assert torch.equal(model(input_ids=ids).logits, want)


def test_load_refuses_a_file_for_another_model_and_changes_nothing(tmp_path):
    M.save_bitfit(_trained(), tmp_path / "bf")
    for other in (build("llama", intermediate_size=96), build("bert")):
        snap = _snapshot(other)
        with pytest.raises(AdapterLoadError, match="made for another model"):
            M.load_bitfit(other, tmp_path / "bf")
        _assert_unchanged(other, snap)
    # No fingerprint to compare (plain modules): names and shapes are checked instead.
    small = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    M.apply(small, M.BitFitConfig())
    M.save_bitfit(small, tmp_path / "seq")
    wider = nn.Sequential(nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 4))
    snap = _snapshot(wider)
    with pytest.raises(AdapterLoadError, match=r"tensor 0.bias has shape \(6,\), the model needs \(7,\)"):
        M.load_bitfit(wider, tmp_path / "seq")
    _assert_unchanged(wider, snap)
    shorter = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(AdapterLoadError, match="which Sequential does not have"):
        M.load_bitfit(shorter, tmp_path / "seq")
    relu_at_0 = nn.Sequential(nn.ReLU(), nn.ReLU(), nn.Linear(6, 4))
    with pytest.raises(AdapterLoadError, match="module '0' is a ReLU, not a linear layer"):
        M.load_bitfit(relu_at_0, tmp_path / "seq")


def _rewrite(directory, config=None, tensors=None):
    if config is not None:
        (directory / CONFIG_NAME).write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(directory / WEIGHTS_NAME))


def test_load_refuses_corrupt_files_and_changes_nothing(tmp_path):
    src = _trained()
    good = tmp_path / "good"
    M.save_bitfit(src, good)
    config = json.loads((good / CONFIG_NAME).read_text())
    tensors = {k: v.clone().contiguous() for k, v in M.bitfit_state_dict(src).items()}
    key = "model.layers.0.mlp.gate_proj.bias"
    cases = {
        "garbage weights": (None, b"not a safetensors file", "not a readable safetensors file"),
        "garbage config": (b"{oops", None, "is not valid JSON"),
        "peft_type": ({**config, "peft_type": "LORA"}, None, "peft_type is 'LORA'"),
        "missing key": (None, {k: v for k, v in tensors.items() if k != key}, rf"missing \['{key}'\]"),
        "unexpected key": (None, {**tensors, "model.layers.0.mlp.up_proj.lora_A": torch.zeros(2)},
                           "unexpected .*lora_A"),
        "shape": (None, {**tensors, key: torch.zeros(5)}, rf"{key} has shape \(5,\)"),
        "dtype": (None, {**tensors, key: torch.zeros(128, dtype=torch.int32)}, "expected a float dtype"),
        "nan": (None, {**tensors, key: torch.full((128,), float("nan"))}, "NaN or Inf"),
        "bad module list": ({**config, "bitfit_modules": "q_proj"}, None, "bitfit_modules must be a list"),
        "bad config field": ({**config, "train_norms": "yes"}, None, "invalid BitFit config"),
    }
    for what, (cfg_, weights, match) in cases.items():
        d = tmp_path / what.replace(" ", "_")
        d.mkdir()
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            (d / name).write_bytes((good / name).read_bytes())
        if isinstance(cfg_, bytes):
            (d / CONFIG_NAME).write_bytes(cfg_)
        elif cfg_ is not None:
            _rewrite(d, config=cfg_)
        if isinstance(weights, bytes):
            (d / WEIGHTS_NAME).write_bytes(weights)
        elif weights is not None:
            _rewrite(d, tensors=weights)
        model = build("llama")
        snap = _snapshot(model)
        with pytest.raises(AdapterLoadError, match=match):
            M.load_bitfit(model, d)
        _assert_unchanged(model, snap)
    with pytest.raises(FileNotFoundError):
        M.load_bitfit(build("llama"), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="has no BitFit applied"):
        M.save_bitfit(build("llama"), tmp_path / "none")
    assert os.listdir(good) and not (tmp_path / "none").exists()
