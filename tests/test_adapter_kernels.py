"""Bottleneck adapter: Triton kernels (kernels/adapter.py) and the op (ops/adapter.py) against float64.

Kernels run in Triton's interpreter without a GPU (tests/conftest.py), fp32/fp16 only (the
interpreter's bf16 math is wrong; bf16 is in tests/test_gpu_adapter.py). Every buffer a launcher
allocates, and every output passed in, is filled with NaN first, so an unwritten element fails.
The up weights are sized so that the adapter branch is about as large as h: a dropped or
mis-indexed bottleneck column moves ``out`` far past the tolerance, not just the gradients.
"""
import math

import pytest
import torch
from _tolerance import assert_close_to_reference

from peft_kernels.kernels import adapter as K
from peft_kernels.kernels._launch import is_interpreted
from peft_kernels.ops import adapter as ops
from peft_kernels.ops import reference_adapter as R

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not is_interpreted(K._adapter_down_kernel),
                                reason="no GPU and triton was imported without TRITON_INTERPRET=1")
ACTS = R.ADAPTER_ACTIVATIONS
D = 100  # not a multiple of any BLOCK_D (32/64/128): every d loop and d tile has a ragged tail


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the launchers allocate starts as NaN."""
    monkeypatch.setattr(K, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                             device=device))


def _randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)


def _params(d, r, dtype, seed=0):
    """(w_down, b_down, w_up, b_up) with z ~ N(0, 1) and the up branch ~ as large as h."""
    return (_randn(r, d, dtype=dtype, scale=1 / math.sqrt(d), seed=seed + 1),
            _randn(r, dtype=dtype, scale=0.5, seed=seed + 2),
            _randn(d, r, dtype=dtype, scale=1.5 / math.sqrt(r), seed=seed + 3),
            _randn(d, dtype=dtype, scale=0.5, seed=seed + 4))


def _scale(v=0.7):
    return torch.tensor([v], dtype=torch.float32, device=DEVICE)


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _check_kernels(m, r, dtype, act, row_config=None, tile_config=None, d=D, w_dtype=None):
    """w_dtype: the parameters' dtype when not h's (float32: rounded to h's dtype inside the kernels)."""
    h = _randn(m, d, dtype=dtype, seed=m)
    wd, bd, wu, bu = _params(d, r, w_dtype or dtype, seed=r)
    s = _scale()
    out, z = K.adapter_forward(h, wd, bd, wu, bu, s, act, out=_nan(m, d, dtype=dtype), z=_nan(m, r, dtype=dtype),
                               row_config=row_config, tile_config=tile_config)
    # The reference sees the parameters as the kernels use them: rounded to h's dtype.
    d64 = [t.to(dtype).double() if i in (1, 2, 3, 4) else t.double() for i, t in enumerate((h, wd, bd, wu, bu, s))]
    ref_out, ref_z = R.adapter_forward(*d64, act)
    assert out.dtype == dtype and z.dtype == dtype
    assert_close_to_reference(z, ref_z, dtype, f"z ({act})")
    assert_close_to_reference(out, ref_out, dtype, f"out ({act})")
    # Backward from the kernel's own z (what autograd would hand it); the reference gets the same z.
    dy = _randn(m, d, dtype=dtype, seed=m + 99)
    got = K.adapter_backward(dy, h, z, wd, wu, bu, s, act, need_scale=True, dh=_nan(m, d, dtype=dtype),
                             grad_dtype=w_dtype, row_config=row_config, tile_config=tile_config)
    want = R.adapter_backward(dy.double(), d64[0], z.double(), d64[1], d64[3], d64[4], d64[5], act, need_scale=True)
    for name, g, w in zip(("dh", "dW_d", "db_d", "dW_u", "db_u", "ds"), got, want):
        assert_close_to_reference(g, w, dtype, f"{name} ({act})")
    assert got[5].dtype == torch.float32 and got[0].dtype == dtype
    assert all(g.dtype == (w_dtype or dtype) for g in got[1:5])


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("fp32", "fp16"))
@pytest.mark.parametrize("m,r", ((1, 8), (37, 24), (37, 8), (1, 24)))
def test_kernels_match_reference(poison, m, r, dtype, act):
    _check_kernels(m, r, dtype, act)


@pytest.mark.parametrize("rc,tc", [
    # several M tiles and d tiles in the tile kernels, r walked in two chunks (24 = 16 + 8)
    (K.RowConfig(16, 32, 32), K.TileConfig(16, 32, 16)),
    # the large-M row tile (64 rows, here partial) and a wider R_PAD than needed
    (K.RowConfig(64, 64, 64, num_stages=2), K.TileConfig(64, 128, 32)),
], ids=("small-tiles", "tall-rows"))
def test_forced_tiles(poison, rc, tc):
    _check_kernels(37, 24, torch.float16, "gelu", rc, tc)


def test_largest_bottleneck(poison):
    # r = 200 pads to R_PAD = 256, the largest accumulator a row kernel holds.
    _check_kernels(20, 200, torch.float16, "silu", d=72)


@pytest.mark.parametrize("act", ("relu", "gelu_tanh"))
def test_float32_parameters_with_fp16_activations(poison, act):
    """nn.Adapter's default: float32 parameters, rounded to h's dtype inside the kernels (no cast kernels);
    the parameter gradients come back in float32."""
    _check_kernels(37, 24, torch.float16, act, w_dtype=torch.float32)


def test_config_choice():
    assert K.r_pad(1) == 16 and K.r_pad(24) == 32 and K.r_pad(64) == 64 and K.r_pad(200) == 256
    assert K.r_ext(64) == 72 and K.r_ext(7) == 8 and K.r_ext(8) == 16
    small, large = K.pick_row_config(512, 64, torch.bfloat16), K.pick_row_config(8192, 64, torch.bfloat16)
    assert small.BLOCK_M == 16 and large.BLOCK_M == 64 and large.R_PAD == 64
    big_r = K.pick_row_config(8192, 256, torch.float32)
    assert big_r.BLOCK_M == 16 and big_r.num_stages == 2  # three stages would need 102 KB of shared memory
    # bf16 activations with float32 weights at R_PAD = 256: BLOCK_D halves so two stages fit in 96 KB.
    mixed = K.pick_row_config(8192, 256, torch.bfloat16, torch.float32)
    assert mixed.BLOCK_D == 32 and mixed.num_stages == 2
    names = {v.name for v in K.AOT_VARIANTS}
    assert len(names) == len(K.AOT_VARIANTS)
    kernels = {v.kernel for v in K.AOT_VARIANTS}
    assert kernels == {K._adapter_down_kernel, K._adapter_up_kernel, K._adapter_dz_kernel, K._adapter_dh_kernel}
    acts = {v.constexprs["ACT"] for v in K.AOT_VARIANTS if "ACT" in v.constexprs}
    assert acts == set(K.ACT_CODES.values())


def test_launcher_rejects_bad_arguments():
    h = _randn(4, 32, dtype=torch.float16)
    wd, bd, wu, bu = _params(32, 8, torch.float16)
    s = _scale()
    with pytest.raises(TypeError, match="w_down has dtype bfloat16; expected one of: float16, float32"):
        K.adapter_forward(h, wd.bfloat16(), bd, wu, bu, s, "relu")
    with pytest.raises(ValueError, match="w_up must have shape"):
        K.adapter_forward(h, wd, bd, wu[:, :4].contiguous(), bu, s, "relu")
    with pytest.raises(ValueError, match="contiguous"):
        K.adapter_forward(_randn(32, 4, dtype=torch.float16).t(), wd, bd, wu, bu, s, "relu")
    with pytest.raises(ValueError, match="bottleneck r must be in"):
        big = _randn(300, 32, dtype=torch.float16)
        K.adapter_forward(h, big, _randn(300, dtype=torch.float16), _randn(32, 300, dtype=torch.float16), bu, s,
                          "relu")
    with pytest.raises(TypeError, match="scale has dtype float16"):
        K.adapter_forward(h, wd, bd, wu, bu, s.half(), "relu")
    with pytest.raises(ValueError, match="out must have shape"):
        K.adapter_forward(h, wd, bd, wu, bu, s, "relu", out=_nan(4, 31, dtype=torch.float16))


def test_empty_batch():
    h = _randn(0, 32, dtype=torch.float32)
    wd, bd, wu, bu = _params(32, 8, torch.float32)
    out, z = K.adapter_forward(h, wd, bd, wu, bu, _scale(), "relu")
    assert out.shape == (0, 32) and z.shape == (0, 8)
    dh, dwd, dbd, dwu, dbu, ds = K.adapter_backward(h, h, z, wd, wu, bu, _scale(), "relu", need_scale=True)
    assert dh.shape == (0, 32) and float(dwd.abs().sum()) == 0 and float(ds) == 0


# ------------------------------------------------------------------ the op (autograd, saved bytes, paths)
def _leaf(t, grad=True):
    return t.detach().clone().requires_grad_(grad)


def _op_inputs(shape, r, dtype, param_dtype=torch.float32, learned=True, seed=0):
    d = shape[-1]
    h = _leaf(_randn(*shape, dtype=dtype, seed=seed))
    ps = [_leaf(p) for p in _params(d, r, param_dtype, seed=seed)]
    s = _leaf(_scale(0.8), learned)
    return h, ps, s


def _autograd_reference(h, ps, s, act, dy):
    """float64 torch autograd of the unfused module: (out, grads of h, params, s)."""
    h64, ps64, s64 = _leaf(h.double()), [_leaf(p.double()) for p in ps], _leaf(s.double())
    out = R.adapter_autograd(h64, *ps64, s64, act)
    out.backward(dy.double())
    return out, [h64.grad] + [p.grad for p in ps64] + [s64.grad]


@pytest.mark.parametrize("backend", ("triton", "reference"))
@pytest.mark.parametrize("act", ("gelu", "silu"))
def test_op_autograd_matches_torch_autograd(monkeypatch, poison, backend, act):
    """fp16 activations [2, 9, 48] with float32 parameters and a learned scale: every gradient comes back
    in its parameter's dtype and matches float64 torch autograd of the unfused module."""
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", backend)
    dtype = torch.float16
    h, ps, s = _op_inputs((2, 9, 48), 24, dtype)
    out = ops.bottleneck_adapter(h, *ps, s, act)
    dy = _randn(*out.shape, dtype=dtype, seed=5)
    out.backward(dy)
    ref_out, ref_grads = _autograd_reference(h, ps, s, act, dy)
    assert out.dtype == dtype and h.grad.dtype == dtype
    assert_close_to_reference(out, ref_out, dtype, "out")
    for name, t, g in zip(("h", "w_down", "b_down", "w_up", "b_up", "scale"), [h, *ps, s], ref_grads):
        assert t.grad.dtype == t.dtype, name
        assert_close_to_reference(t.grad, g, dtype, f"d{name}")


def test_gradcheck_float64():
    """The closed-form backward (reference path) against finite differences, each activation, learned s."""
    for act in ACTS:
        h = _leaf(_randn(3, 5, dtype=torch.float64, seed=1))
        ps = [_leaf(p) for p in _params(5, 2, torch.float64, seed=3)]
        s = _leaf(_scale(0.6).double())
        assert torch.autograd.gradcheck(lambda *a: ops.bottleneck_adapter(*a, act), (h, *ps, s)), act


def test_op_path_equals_eager_path(monkeypatch):
    """The torch.library op (used under torch.compile) and the eager Function: same results, same saved."""
    def run(force_op):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: force_op)
        h, ps, s = _op_inputs((7, 40), 8, torch.float32)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t,
                                                      lambda t: t):
            out = ops.bottleneck_adapter(h, *ps, s, "gelu_tanh")
        out.square().sum().backward()
        return out.detach(), [t.grad for t in (h, *ps, s)], saved

    o1, g1, s1 = run(False)
    o2, g2, s2 = run(True)
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert s1 == s2


def test_opcheck():
    h, ps, s = _op_inputs((5, 24), 8, torch.float32)
    torch.library.opcheck(ops.bottleneck_adapter_op, (h, *ps, s, "silu"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def _saved(fn, params):
    """(bytes of storages autograd keeps that are not parameters, list of their shapes)."""
    own = {p.untyped_storage().data_ptr() for p in params}
    seen, shapes = {}, []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return sum(seen.values()), shapes


@pytest.mark.parametrize("backend", ("triton", "reference"))
@pytest.mark.parametrize("learned", (False, True))
def test_saved_bytes_exact(monkeypatch, backend, learned):
    """Saved for backward: h and the [M, r] pre-activation z, nothing else (never a = act(z), never an
    [M, d] product); the unfused torch module keeps at least a as well (and s·u for a learned s)."""
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", backend)
    m, d, r = 30, 64, 16
    h, ps, s = _op_inputs((m, d), r, torch.float16, learned=learned)
    ours, shapes = _saved(lambda: ops.bottleneck_adapter(h, *ps, s, "gelu"), [*ps, s])
    assert ours == m * d * 2 + m * r * 2
    assert sorted(shapes) == sorted([(m, d), (m, r)])
    theirs, _ = _saved(lambda: R.adapter_autograd(h, *ps, s, "gelu"), [*ps, s])
    assert theirs >= ours + m * r * 2  # the unfused module also keeps a (and casts of the parameters)


def test_large_bottleneck_falls_back_to_reference(monkeypatch):
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "triton")
    called = []
    monkeypatch.setattr(K, "adapter_forward", lambda *a, **k: called.append(1))
    h, ps, s = _op_inputs((3, 20), K.MAX_R + 1, torch.float32)
    out = ops.bottleneck_adapter(h, *ps, s, "relu")
    assert not called
    assert_close_to_reference(out, R.adapter_autograd(h.double(), *[p.double() for p in ps], s.double(), "relu"),
                              torch.float32, "out")


def test_op_rejects_bad_input():
    h, ps, s = _op_inputs((4, 16), 8, torch.float32)
    wd, bd, wu, bu = ps
    with pytest.raises(ValueError, match=r"w_down must have shape \[r, 16\]"):
        ops.bottleneck_adapter(h, wd[:, :8], bd, wu, bu, s)
    with pytest.raises(ValueError, match=r"w_up must have shape \[16, 8\]"):
        ops.bottleneck_adapter(h, wd, bd, wu.t(), bu, s)
    with pytest.raises(ValueError, match=r"b_up must have shape \[16\]"):
        ops.bottleneck_adapter(h, wd, bd, wu, bu[:3], s)
    with pytest.raises(TypeError, match="h has dtype int64"):
        ops.bottleneck_adapter(torch.zeros(4, 16, dtype=torch.long), wd, bd, wu, bu, s)
    with pytest.raises(ValueError, match="scale must hold exactly one value"):
        ops.bottleneck_adapter(h, wd, bd, wu, bu, torch.ones(2))
    with pytest.raises(ValueError, match="unknown adapter activation 'tanh'"):
        ops.bottleneck_adapter(h, wd, bd, wu, bu, s, "tanh")
    with pytest.raises(ValueError, match="one device"):
        ops.bottleneck_adapter(h, wd, bd, wu, bu.to("meta"), s)
    assert R.canonical_activation("GELU_new") == "gelu_tanh" and R.canonical_activation("swish") == "silu"


def test_autocast_and_inference_paths():
    """Under autocast the op still computes in h's dtype (same result as without); without grad it
    builds no graph and keeps nothing."""
    h, ps, s = _op_inputs((6, 32), 8, torch.float32)
    want = ops.bottleneck_adapter(h, *ps, s, "relu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.bottleneck_adapter(h, *ps, s, "relu")
    assert got.dtype == torch.float32 and torch.equal(got, want)
    saved = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.bottleneck_adapter(h, *ps, s, "relu")
    assert not saved and out.grad_fn is None and torch.equal(out, want.detach())


@pytest.mark.parametrize("act", ACTS)
def test_activation_derivatives(act):
    """The written-out act'(z) (what the kernels implement) equals torch autograd of act and the fused aten
    backward the CPU path uses, in float64 (z avoids relu's kink at 0)."""
    z = _leaf(torch.linspace(-6, 6, 1001, dtype=torch.float64) + 1e-3)
    R.adapter_activation(z, act).sum().backward()
    g = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(R.adapter_activation_grad(z.detach(), act), z.grad, rtol=1e-12, atol=1e-12)
    assert torch.allclose(R._act_backward(g, z.detach(), act), g * z.grad, rtol=1e-12, atol=1e-12)
