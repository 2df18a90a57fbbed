"""LoraLinear: math against a float64 autograd reference (PEFT's formulas written plainly), PEFT parity,
merge/unmerge, swap in place, saved bytes vs PEFT, torch.library/compile, gradcheck, Triton path, bad input."""
import copy
import importlib.util
import math
import os

import pytest
import torch
from torch import nn

from _tolerance import assert_close_to_reference
from _weights import weight64
import peft_kernels.nn.lora as lora_mod
from peft_kernels.nn import Linear4bit, LoraLinear
from peft_kernels.ops.lora import (absent, dora_weight_norm_4bit_op, dora_weight_norm_dense_op,
                                   lora_linear_4bit_backward_op, lora_linear_4bit_op, lora_linear_dense_backward_op,
                                   lora_linear_dense_op)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HAS_TRITON_LORA = importlib.util.find_spec("peft_kernels.kernels.lora") is not None


def _conv1d(k, n):
    from transformers.pytorch_utils import Conv1D
    c = Conv1D(n, k)
    nn.init.normal_(c.weight, std=0.2)
    nn.init.normal_(c.bias, std=0.1)
    return c


def make_base(kind, k, n, bias=True, dtype=torch.float32, blocksize=64):
    lin = nn.Linear(k, n, bias=bias)
    if kind == "linear":
        return lin.to(dtype)
    if kind == "conv1d":
        return _conv1d(k, n).to(dtype)
    return Linear4bit.from_linear(lin, blocksize=blocksize).to(dtype)


def dense64(layer: LoraLinear) -> torch.Tensor:
    """The base W [N, K] in float64 as the layer computes with it (dequantized for 4-bit)."""
    return weight64(layer.base_layer)


class Ref:
    """PEFT 0.21's LoRA/DoRA forward written plainly in float64 with leaf copies of every parameter."""

    def __init__(self, layer: LoraLinear):
        self.layer = layer
        self.w = dense64(layer)
        b = layer.base_layer.bias
        self.bias = None if b is None else b.detach().double().requires_grad_()
        self.p = {}
        for n in layer.lora_A:
            self.p[n] = {"A": layer.lora_A[n].weight.detach().double().requires_grad_(),
                         "B": layer.lora_B[n].weight.detach().double().requires_grad_()}
            if layer.lora_B[n].bias is not None:
                self.p[n]["bB"] = layer.lora_B[n].bias.detach().double().requires_grad_()
            if layer.use_dora[n]:
                self.p[n]["m"] = layer.lora_magnitude_vector[n].weight.detach().double().requires_grad_()

    def __call__(self, x64, masks=None):
        masks = masks or {}
        y = x64 @ self.w.t()
        if self.bias is not None:
            y = y + self.bias
        for n in self.layer.active_adapters:
            p, s = self.p[n], self.layer.scaling[n]
            xd = x64
            if n in masks:
                q = self.layer.lora_dropout[n].p
                xd = x64 * masks[n].double() / (1 - q)
            lora = xd @ p["A"].t() @ p["B"].t()
            if "bB" in p:
                lora = lora + p["bB"]
            if "m" in p:
                norm = torch.linalg.vector_norm(self.w + s * (p["B"] @ p["A"]), dim=1).detach()
                g = p["m"] / norm
                # PEFT: base_result = result - bias without dropout (x Wᵀ), or drop(x) Wᵀ with dropout
                y = y + (g - 1) * (xd @ self.w.t()) + g * lora * s
            else:
                y = y + lora * s
        return y


@pytest.fixture
def record_masks(monkeypatch):
    """Record every dropout mask the layers draw, in order."""
    drawn = []
    orig = lora_mod.dropout_mask

    def rec(x, p):
        m = orig(x, p)
        drawn.append(m)
        return m

    monkeypatch.setattr(lora_mod, "dropout_mask", rec)
    return drawn


CASES = {
    # name: (x shape, K, N, [adapter kwargs...], active, base bias trains)
    "M1-plain": ((1, 33), 33, 17, [dict(r=4, lora_alpha=8)], ["a"], False),
    "ragged-dropout-lorabias": ((2, 5, 65), 65, 31, [dict(r=12, lora_alpha=7, lora_dropout=0.3, lora_bias=True)],
                                ["a"], True),
    "rslora-dora": ((7, 64), 64, 48, [dict(r=8, lora_alpha=16, use_rslora=True, use_dora=True)], ["a"], False),
    "dora-dropout": ((9, 40), 40, 24, [dict(r=4, lora_alpha=4, use_dora=True, lora_dropout=0.2)], ["a"], True),
    "two-adapters": ((3, 4, 48), 48, 40, [dict(r=8, lora_alpha=16, lora_dropout=0.25),
                                          dict(r=3, lora_alpha=5, lora_bias=True)], ["a", "b"], False),
    "two-plain": ((5, 36), 36, 28, [dict(r=4, lora_alpha=8), dict(r=6, lora_alpha=3, lora_bias=True)], ["a", "b"],
                  False),
    "lora+dora": ((6, 32), 32, 20, [dict(r=4, lora_alpha=8), dict(r=5, lora_alpha=5, use_dora=True)], ["a", "b"],
                  True),
}


def build_layer(kind, case, dtype, seed=0):
    x_shape, k, n, adapters, active, bias_trains = CASES[case]
    torch.manual_seed(seed)
    layer = LoraLinear(make_base(kind, k, n, dtype=dtype, blocksize=32), adapter_name=None)
    for name, kw in zip("ab", adapters):
        layer.add_adapter(name, init_lora_weights=False, **kw)
    layer.set_adapter(active)
    if bias_trains:
        layer.base_layer.bias.requires_grad_(True)
    return layer, x_shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["linear", "conv1d", "4bit"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_match_float64_reference(kind, case, dtype, record_masks):
    layer, x_shape = build_layer(kind, case, dtype)
    layer.train()
    ref = Ref(layer)
    x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], layer.out_features)
    masks = {}
    dropping = [n for n in layer.active_adapters if isinstance(layer.lora_dropout[n], nn.Dropout)]
    assert len(record_masks) == len(dropping)
    masks = dict(zip(dropping, record_masks))
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64, masks)
    assert_close_to_reference(y, y64, dtype, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    y64.backward(dy.double())
    assert_close_to_reference(x.grad, x64.grad, dtype, "dx")
    for n in layer.active_adapters:
        p = ref.p[n]
        assert_close_to_reference(layer.lora_A[n].weight.grad, p["A"].grad, dtype, f"dA[{n}]")
        assert_close_to_reference(layer.lora_B[n].weight.grad, p["B"].grad, dtype, f"dB[{n}]")
        if "bB" in p:
            assert_close_to_reference(layer.lora_B[n].bias.grad, p["bB"].grad, dtype, f"d lora bias[{n}]")
        if "m" in p:
            assert_close_to_reference(layer.lora_magnitude_vector[n].weight.grad, p["m"].grad, dtype, f"dm[{n}]")
    if layer.base_layer.bias.requires_grad:
        assert_close_to_reference(layer.base_layer.bias.grad, ref.bias.grad, dtype, "d base bias")
    w = layer.base_layer.weight
    assert w.grad is None and not w.requires_grad


def test_matches_peft_lora_layer_in_training_mode_with_dropout_and_dora():
    """Same RNG state -> the same dropout masks as PEFT; outputs and every gradient agree (fp32)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora import LoraModel

    class Wrap(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    for dora in (False, True):
        torch.manual_seed(0)
        dense = nn.Linear(40, 24)
        cfg = PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["lin"], use_dora=dora,
                             init_lora_weights=False)
        pm = LoraModel(Wrap(copy.deepcopy(dense)), cfg, "default").train()
        ours = LoraLinear(copy.deepcopy(dense), r=4, lora_alpha=8, lora_dropout=0.3, use_dora=dora,
                          init_lora_weights=False).train()
        ours.load_state_dict({k.removeprefix("model.lin."): v for k, v in pm.state_dict().items()})
        x = torch.randn(5, 40, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        torch.manual_seed(7)
        yp = pm(x)
        torch.manual_seed(7)
        yo = ours(x2)
        assert_close_to_reference(yo, yp.double(), torch.float32, f"y (dora={dora})")
        dy = torch.randn_like(yp)
        yp.backward(dy)
        yo.backward(dy)
        assert_close_to_reference(x2.grad, x.grad.double(), torch.float32, "dx")
        pg = {k.removeprefix("model.lin."): p.grad for k, p in pm.named_parameters() if p.requires_grad}
        og = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
        assert set(pg) == set(og)
        for k in og:
            assert_close_to_reference(og[k], pg[k].double(), torch.float32, k)


# ------------------------------------------------------------------ initialisations
def test_initialisations():
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    x = torch.randn(4, 64)
    y0 = base(x)
    layer = LoraLinear(copy.deepcopy(base), r=8, lora_alpha=16)  # PEFT default: B = 0 -> no-op
    assert torch.equal(layer(x), y0)
    a = layer.lora_A["default"].weight
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    assert not layer.lora_B["default"].weight.any()
    layer.add_adapter("g", r=16, lora_alpha=16, init_lora_weights="gaussian")
    assert abs(layer.lora_A["g"].weight.std().item() - 1 / 16) < 0.01 and not layer.lora_B["g"].weight.any()
    layer.add_adapter("f", r=4, lora_alpha=4, init_lora_weights=False)
    assert layer.lora_B["f"].weight.abs().sum() > 0
    assert layer.lora_A["default"].weight.dtype == torch.float32
    # PiSSA: base <- residual, A/B from the top singular triplets; the function is unchanged.
    for kind in ("linear", "conv1d"):
        torch.manual_seed(1)
        b = make_base(kind, 64, 48)
        x = torch.randn(4, 64)
        y0 = b(x)
        w0 = dense64(LoraLinear(copy.deepcopy(b), adapter_name=None))
        pl = LoraLinear(b, r=8, lora_alpha=16, init_lora_weights="pissa")
        assert_close_to_reference(pl(x), y0.double(), torch.float32, f"pissa {kind}")
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)
        sba = pl.get_delta_weight("default").double()
        top = u[:, :8] @ torch.diag(s[:8]) @ vh[:8]
        assert_close_to_reference(sba, top, torch.float32, "pissa s*B@A = top-r of W")
    # PiSSA over 4-bit: the residual is requantized (function kept within NF4 error of the residual).
    torch.manual_seed(2)
    q = Linear4bit.from_linear(nn.Linear(64, 48))
    w4 = dense64(LoraLinear(copy.deepcopy(q), adapter_name=None))
    pl = LoraLinear(q, r=8, lora_alpha=8, init_lora_weights="pissa_niter_4")
    res = dense64(pl)
    rel = ((res + pl.get_delta_weight("default").double() - w4).norm() / w4.norm()).item()
    assert rel < 0.1  # NF4 rounding of the (smaller) residual only


def test_dora_magnitude_initialised_to_weight_norm():
    for kind in ("linear", "conv1d", "4bit"):
        torch.manual_seed(0)
        layer = LoraLinear(make_base(kind, 40, 24), r=4, lora_alpha=8, use_dora=True)
        m = layer.lora_magnitude_vector["default"].weight
        assert m.requires_grad and m.shape == (24,)
        assert_close_to_reference(m, torch.linalg.vector_norm(dense64(layer), dim=1), torch.float32, kind)
        x = torch.randn(3, 40)
        with torch.no_grad():
            assert_close_to_reference(layer(x), layer.base_layer(x).double(), torch.float32, f"{kind} no-op")


# ------------------------------------------------------------------ adapters: set / disable / delete / swap
def test_set_disable_delete_adapters():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8), adapter_name="a", r=2, lora_alpha=2, init_lora_weights=False)
    layer.add_adapter("b", r=3, lora_alpha=3, init_lora_weights=False)
    assert layer.active_adapters == ["a"] and not layer.lora_A["b"].weight.requires_grad
    x = torch.randn(2, 16)
    base = layer.base_layer(x)
    da = x @ layer.get_delta_weight("a").t()
    db = x @ layer.get_delta_weight("b").t()
    assert_close_to_reference(layer(x), (base + da).double(), torch.float32, "a")
    layer.set_adapter(["a", "b"])
    assert layer.lora_A["b"].weight.requires_grad
    assert_close_to_reference(layer(x), (base + da + db).double(), torch.float32, "a+b")
    layer.disabled = True
    assert torch.equal(layer(x), base)
    layer.disabled = False
    layer.delete_adapter("a")
    assert layer.active_adapters == ["b"] and "a" not in layer.lora_A and "a" not in layer.r
    assert_close_to_reference(layer(x), (base + db).double(), torch.float32, "b after delete")
    assert "lora_A.a.weight" not in layer.state_dict()
    with pytest.raises(KeyError, match="unknown adapter 'zz'"):
        layer.set_adapter("zz")
    with pytest.raises(KeyError, match="unknown adapter 'a'"):
        layer.delete_adapter("a")
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("b", r=2, lora_alpha=2)


def test_swap_adapter_in_place_keeps_storage_and_validates():
    torch.manual_seed(0)
    layer = LoraLinear(Linear4bit.from_linear(nn.Linear(32, 16)), r=4, lora_alpha=8, use_dora=True)
    ptrs = [p.data_ptr() for p in layer.parameters()]
    base_ptr = layer.base_layer.weight.data_ptr()
    a, b, m = torch.randn(4, 32), torch.randn(16, 4), torch.rand(16) + 0.5
    layer.swap_adapter_("default", a, b, magnitude=m)
    assert [p.data_ptr() for p in layer.parameters()] == ptrs and layer.base_layer.weight.data_ptr() == base_ptr
    assert torch.equal(layer.lora_A["default"].weight, a)
    assert torch.equal(layer.lora_magnitude_vector["default"].weight, m)
    fresh = LoraLinear(copy.deepcopy(layer.base_layer), r=4, lora_alpha=8, use_dora=True)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 32)
    assert torch.equal(layer(x), fresh(x))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"rank 8 != this adapter's r=4"):
        layer.swap_adapter_("default", torch.randn(8, 32), torch.randn(16, 8), magnitude=m)
    bad = b.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.swap_adapter_("default", a, bad, magnitude=m)
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.swap_adapter_("default", a, b, magnitude=torch.full((16,), float("inf")))
    with pytest.raises(ValueError, match="magnitude"):
        layer.swap_adapter_("default", a, b)
    with pytest.raises(KeyError, match="unknown adapter"):
        layer.swap_adapter_("other", a, b, magnitude=m)
    for k, v in layer.state_dict().items():  # nothing half-written
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------ merge
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_dense_exact(kind, dtype):
    torch.manual_seed(0)
    base = make_base(kind, 48, 40, dtype=dtype)
    layer = LoraLinear(base, adapter_name=None)
    layer.add_adapter("a", r=4, lora_alpha=8, init_lora_weights=False, dtype=dtype, lora_bias=True)
    layer.add_adapter("d", r=6, lora_alpha=3, init_lora_weights=False, dtype=dtype, use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector["d"].weight.mul_(torch.rand(40, dtype=dtype) + 0.5)  # m != ||W||
    layer.set_adapter(["a", "d"])
    layer.eval()
    w0 = layer.base_layer.weight.detach().clone()
    b0 = layer.base_layer.bias.detach().clone()
    x = torch.randn(5, 48, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged_adapters == ["a", "d"]
        y_m = layer(x)  # merged adapters are in the weight: base only
        assert torch.equal(y_m, layer.base_layer(x))
    assert_close_to_reference(y_m, y.double(), torch.float32, "merged forward")
    if dtype == torch.float64:  # the merged weight is exactly W' = g⊙(W + s_d B_d A_d) + s_a B_a A_a
        w = dense64(LoraLinear(copy.deepcopy(base), adapter_name=None))
        w_orig = w0.double().t() if kind == "conv1d" else w0.double()
        dd = layer.get_delta_weight("d")
        g = layer.lora_magnitude_vector["d"].weight.detach() / torch.linalg.vector_norm(w_orig + dd, dim=1)
        want = g[:, None] * (w_orig + dd) + layer.get_delta_weight("a")
        assert torch.allclose(w, want, rtol=0, atol=1e-12)
    layer.unmerge()
    with torch.no_grad():  # merging one adapter, then the other, is the same as merging both at once
        layer.merge(["d"])
        layer.merge(["a"])
        assert layer.merged_adapters == ["d", "a"]
        assert_close_to_reference(layer(x), y.double(), torch.float32, "merged in two steps")
    layer.unmerge()
    assert not layer.merged_adapters
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    assert torch.allclose(layer.base_layer.weight, w0, rtol=0, atol=tol)
    assert torch.allclose(layer.base_layer.bias, b0, rtol=0, atol=tol)
    with torch.no_grad():
        assert_close_to_reference(layer(x), y.double(), torch.float32, "after unmerge")


def test_merge_creates_and_removes_bias_and_disable_unmerges():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8, bias=False), r=2, lora_alpha=2, lora_bias=True, init_lora_weights=False)
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.base_layer.bias is not None
        assert_close_to_reference(layer(x), y.double(), torch.float32, "merged with lora bias")
        layer.disabled = True  # disabling a merged layer unmerges it (PEFT)
        assert torch.allclose(layer(x), x @ layer.base_layer.weight.t(), atol=1e-6)
    assert layer.base_layer.bias is None and not layer.merged_adapters


@pytest.mark.parametrize("dora", [False, True])
def test_merge_4bit_dequantize_and_requantize(dora):
    from peft_kernels.quant.quantize import quantize_4bit
    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(64, 40), blocksize=64)
    layer = LoraLinear(q, r=8, lora_alpha=16, init_lora_weights=False, use_dora=dora).eval()
    x = torch.randn(6, 64)
    w4 = dense64(layer)
    with torch.no_grad():
        y = layer(x)
        with pytest.raises(ValueError, match="cannot be merged exactly"):
            layer.merge()
        deq = copy.deepcopy(layer)
        deq.merge(mode="dequantize", dtype=torch.float32)
        assert isinstance(deq.base_layer, nn.Linear) and deq.base_layer.weight.dtype == torch.float32
        # dequantize mode computes exactly what was trained
        assert_close_to_reference(deq(x), y.double(), torch.float32, "dequantize-merged forward")
        deq.unmerge()
        assert_close_to_reference(deq.base_layer.weight, w4, torch.float32, "unmerged back to dequant(W4)")
        req = copy.deepcopy(layer)
        req.merge(mode="requantize")
        assert isinstance(req.base_layer, Linear4bit)
        # requantize: the bytes are those of quantize(dequant(W4) + ΔW): one NF4 rounding of the merged W
        g = 1.0
        delta = layer.get_delta_weight("default").double()
        if dora:
            g = (layer.lora_magnitude_vector["default"].weight.double()
                 / torch.linalg.vector_norm(w4 + delta, dim=1))[:, None]
        want = g * (w4 + delta)
        packed, _ = quantize_4bit(want.float(), 64, "nf4", True)
        # (fp32 vs float64 arithmetic can move an element across a rounding midpoint: nearly all bytes agree)
        assert (req.base_layer.weight.reshape(-1) == packed.reshape(-1)).float().mean() > 0.99
        rel = ((dense64(req) - want).norm() / want.norm()).item()
        assert rel < 0.12, rel  # NF4's rounding error (~0.1 relative for Gaussian-like weights)
        with pytest.raises(ValueError, match="cannot be undone"):
            req.unmerge()


# ------------------------------------------------------------------ saved bytes vs PEFT
def _activation_bytes(fn, module):
    """Bytes of distinct storages saved for backward that are not the module's parameters or buffers."""
    own = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    extra = getattr(module, "_extra_own", [])
    own |= {t.untyped_storage().data_ptr() for t in extra}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    y.sum().backward()
    return sum(v for k, v in seen.items() if k not in own)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_bytes_not_more_than_peft(p):
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora import LoraModel

    class Wrap(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    m, k, n, r = 64, 256, 128, 8
    torch.manual_seed(0)
    dense = nn.Linear(k, n)
    cfg = PeftLoraConfig(r=r, lora_alpha=16, lora_dropout=p, target_modules=["lin"])
    x = torch.randn(m, k, requires_grad=True)
    peft_dense = LoraModel(Wrap(copy.deepcopy(dense)), cfg, "default").train()
    bl = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    bl.weight = bnb.nn.Params4bit(dense.weight.detach().clone(), requires_grad=False, quant_type="nf4")
    bl.bias = nn.Parameter(dense.bias.detach().clone())
    bl = bl.to("cpu")
    peft_4bit = LoraModel(Wrap(bl), cfg, "default").train()
    peft_4bit._extra_own = [bl.weight.quant_state.absmax, bl.weight.quant_state.code]
    ours_dense = LoraLinear(copy.deepcopy(dense), r=r, lora_alpha=16, lora_dropout=p).train()
    ours_4bit = LoraLinear(Linear4bit.from_linear(dense), r=r, lora_alpha=16, lora_dropout=p).train()
    got = {name: _activation_bytes(lambda mod=mod: mod(x), mod) for name, mod in
           [("peft dense", peft_dense), ("peft 4bit", peft_4bit), ("ours dense", ours_dense), ("ours 4bit", ours_4bit)]}
    want = m * k * 4 + m * r * 4 + (m * k if p else 0)  # x, xa (fp32) and the bool dropout mask
    assert got["ours dense"] == want and got["ours 4bit"] == want, got
    assert got["ours dense"] <= got["peft dense"] and got["ours 4bit"] <= got["peft 4bit"], got


# ------------------------------------------------------------------ torch.library, compile, gradcheck
def _op_inputs(kind, dtype=torch.float32, dora=False, dropout=False, two=False, requires_grad=True, train_w=False):
    torch.manual_seed(0)
    m, k, n = 5, 24, 16
    x = torch.randn(m, k, dtype=dtype, requires_grad=requires_grad)
    mk = lambda *s: (torch.randn(*s, dtype=dtype) * 0.3).requires_grad_(requires_grad)  # noqa: E731
    rs = [3, 2] if two else [3]
    As, Bs = [mk(r, k) for r in rs], [mk(n, r) for r in rs]
    lbs = [mk(n), absent(x)] if two else [absent(x)]
    masks = [torch.rand(m, k) > 0.3 if dropout and i == 0 else absent(x, torch.bool) for i in range(len(rs))]
    ps = [0.3 if dropout and i == 0 else 0.0 for i in range(len(rs))]
    gs = [(torch.rand(n, dtype=dtype) + 0.5).requires_grad_(requires_grad) if dora and i == len(rs) - 1
          else absent(x, torch.float32) for i in range(len(rs))]
    scales = [1.5, 0.5][:len(rs)]
    bias = mk(n)
    lists = (As, Bs, lbs, scales, masks, ps, gs)
    if kind == "dense":
        w = mk(n, k).detach().requires_grad_(train_w)  # a dense W that trains gets dW too
        return (x, w, bias, *lists)
    q = Linear4bit.from_linear(nn.Linear(k, n), blocksize=32)
    qs = q.quant_state
    return (x, q.weight, qs.absmax, qs.code, qs.nested.absmax, qs.nested.code, float(qs.nested.offset),
            qs.blocksize, n, bias, *lists)


@pytest.mark.parametrize("kind", ["dense", "4bit"])
def test_torch_library_opcheck(kind):
    op = lora_linear_dense_op if kind == "dense" else lora_linear_4bit_op
    for flags in (dict(), dict(two=True), dict(dora=True, dropout=True, two=True)):
        args = _op_inputs(kind, **flags)
        torch.library.opcheck(op, args)
        # and the backward op, on the forward's saved tensors
        with torch.no_grad():
            y, xa = op(*args)
        dy = torch.randn_like(y)
        lists = [[t.detach() if isinstance(t, torch.Tensor) else t for t in v] for v in args[-7:]]
        a_, b_, lb, sc, mk, ps, gs = lists
        if kind == "dense":
            torch.library.opcheck(lora_linear_dense_backward_op,
                                  (dy, args[0].detach(), xa, args[1], a_, b_, lb, sc, mk, ps, gs, True, True, True))
        else:
            torch.library.opcheck(lora_linear_4bit_backward_op,
                                  (dy, args[0].detach(), xa, *args[1:8], args[0].shape[-1], a_, b_, lb, sc, mk, ps,
                                   gs, True, True))
            torch.library.opcheck(lora_linear_4bit_backward_op,
                                  (dy, None, xa, *args[1:8], args[0].shape[-1], a_, b_, lb, sc, mk, ps, gs, True,
                                   False))
    w = torch.randn(16, 24)
    a, b = torch.randn(3, 24), torch.randn(16, 3)
    torch.library.opcheck(dora_weight_norm_dense_op, (w, a, b, 0.7))
    q = Linear4bit.from_linear(nn.Linear(24, 16))
    qs = q.quant_state
    torch.library.opcheck(dora_weight_norm_4bit_op, (q.weight, qs.absmax, qs.code, qs.nested.absmax, qs.nested.code,
                                                     float(qs.nested.offset), qs.blocksize, 16, 24, a, b, 0.7))


@pytest.mark.parametrize("kind", ["dense", "4bit"])
def test_gradcheck_reference_path_float64(kind):
    op = lora_linear_dense_op if kind == "dense" else lora_linear_4bit_op
    for flags in (dict(two=True, train_w=True), dict(dora=True), dict(dora=True, dropout=True, two=True, train_w=True)):
        args = _op_inputs(kind, dtype=torch.float64, **flags)
        head, lists = list(args[:-7]), list(args[-7:])
        # gradcheck wants a flat tuple of tensors: lift every differentiable one out of the lists.
        slots = [(None, i) for i, t in enumerate(head) if isinstance(t, torch.Tensor) and t.requires_grad]
        slots += [(j, i) for j in (0, 1, 2, 6) for i, t in enumerate(lists[j]) if t.requires_grad]
        flat = [head[i] if j is None else lists[j][i] for j, i in slots]

        def f(*ts):
            h, ls = list(head), [list(v) for v in lists]
            for (j, i), t in zip(slots, ts):
                if j is None:
                    h[i] = t
                else:
                    ls[j][i] = t
            return op(*h, *ls)[0]

        assert torch.autograd.gradcheck(f, tuple(flat), atol=1e-7, rtol=1e-6, fast_mode=True)


@pytest.mark.parametrize("kind,backend", [("linear", "aot_eager"), ("4bit", "aot_eager"), ("4bit", "inductor")])
def test_torch_compile_fullgraph_matches_eager(kind, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LoraLinear(make_base(kind, 32, 24), adapter_name=None)
    layer.add_adapter("a", r=4, lora_alpha=8, init_lora_weights=False, lora_dropout=0.1)
    layer.add_adapter("d", r=2, lora_alpha=2, init_lora_weights=False, use_dora=True)
    layer.set_adapter(["a", "d"])
    model = nn.Sequential(layer, nn.GELU())
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # a graph break raises
    x = torch.randn(4, 32, requires_grad=True)
    compiled.train()
    compiled(x).sum().backward()  # dropout masks drawn inside the graph
    assert layer.lora_A["a"].weight.grad is not None
    model.eval()
    for p in [x, *layer.parameters()]:
        p.grad = None
    y_c = compiled(x)
    y_c.sum().backward()
    g_c = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    for p in [x, *layer.parameters()]:
        p.grad = None
    y_e = model(x)
    y_e.sum().backward()
    g_e = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
    assert_close_to_reference(y_c, y_e.double(), torch.float32, "compiled y")
    for a, b in zip(g_c, g_e):
        assert_close_to_reference(a, b.double(), torch.float32, "compiled grad")


# ------------------------------------------------------------------ Triton path through the module
@pytest.mark.skipif(not HAS_TRITON_LORA, reason="peft_kernels.kernels.lora (Triton LoRA kernels) not present")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)  # no bf16 math in the interpreter
@pytest.mark.parametrize("case", ["ragged-dropout-lorabias", "rslora-dora", "two-adapters", "two-plain"])
def test_triton_backend_through_the_module_matches_reference(monkeypatch, record_masks, dtype, case):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "triton")
    layer, x_shape = build_layer("4bit", case, dtype)
    layer.train()
    ref = Ref(layer)
    x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
    y = layer(x)
    dropping = [n for n in layer.active_adapters if isinstance(layer.lora_dropout[n], nn.Dropout)]
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64, dict(zip(dropping, record_masks)))
    assert_close_to_reference(y, y64, dtype, "triton y")
    dy = torch.randn_like(y)
    y.backward(dy)
    y64.backward(dy.double())
    assert_close_to_reference(x.grad, x64.grad, dtype, "triton dx")
    for n in layer.active_adapters:
        assert_close_to_reference(layer.lora_A[n].weight.grad, ref.p[n]["A"].grad, dtype, "triton dA")
        assert_close_to_reference(layer.lora_B[n].weight.grad, ref.p[n]["B"].grad, dtype, "triton dB")
        if layer.use_dora[n]:
            assert_close_to_reference(layer.lora_magnitude_vector[n].weight.grad, ref.p[n]["m"].grad, dtype,
                                      "triton dm")


# ------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors():
    layer = LoraLinear(nn.Linear(16, 8), r=2, lora_alpha=4)
    with pytest.raises(ValueError, match=r"last dimension of x must be 16"):
        layer(torch.randn(2, 15))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        layer(torch.ones(2, 16, dtype=torch.int64))
    for r in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="r must be a positive integer"):
            layer.add_adapter("x", r=r, lora_alpha=1)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        layer.add_adapter("x", r=2, lora_alpha=1, lora_dropout=1.0)
    with pytest.raises(ValueError, match="init_lora_weights"):
        layer.add_adapter("x", r=2, lora_alpha=1, init_lora_weights="loftq")
    with pytest.raises(ValueError, match="adapter name"):
        layer.add_adapter("a.b", r=2, lora_alpha=1)
    assert "x" not in layer.lora_A
    with pytest.raises(TypeError, match="LoraLinear wraps"):
        LoraLinear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="merge mode"):
        layer.merge(mode="fast")


@pytest.mark.parametrize("four_bit", [False, True])
def test_eager_fast_path_equals_the_custom_op_path(monkeypatch, four_bit):
    """Eager calls skip torch.library dispatch (an autograd.Function over the same bodies);
    outputs, every gradient and the saved tensors must be identical to the op path's."""
    import peft_kernels.ops.lora as ops_lora

    def run(force_op):
        torch.manual_seed(3)
        base = nn.Linear(40, 24)
        if four_bit:
            base = Linear4bit.from_linear(base, blocksize=32)
        layer = LoraLinear(base, r=4, lora_alpha=8, lora_dropout=0.2, use_dora=True, init_lora_weights=False)
        layer.add_adapter("b", r=3, lora_alpha=3, init_lora_weights=False)
        layer.set_adapter(["default", "b"])
        layer.train()
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: force_op)
        x = torch.randn(5, 40, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.shape, t.dtype)) or t,
                                                      lambda t: t):
            y = layer(x)
        y.square().sum().backward()
        grads = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
        return y.detach(), grads, saved

    y_fast, g_fast, s_fast = run(False)
    y_op, g_op, s_op = run(True)
    assert torch.equal(y_fast, y_op)
    assert len(g_fast) == len(g_op) and all(torch.equal(a, b) for a, b in zip(g_fast, g_op))
    assert s_fast == s_op
    assert ops_lora.lora_linear_4bit is not ops_lora.lora_linear_4bit_op  # two paths really exist
