"""IA3: the layer against a float64 plain-torch reference, parity and file interop with Hugging Face PEFT,
merging, training, parameter counts, saved-for-backward bytes and every bad input of issue #4."""
import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from _tiny_models import build, sample_ids
from _tolerance import assert_close_to_reference
from peft_kernels.io.method_files import CONFIG_NAME, FINGERPRINT_KEY, WEIGHTS_NAME, AdapterLoadError
from peft_kernels.methods import ia3 as M
from peft_kernels.nn.ia3 import IA3Linear
from peft_kernels.nn.linear4bit import Linear4bit

K, N = 37, 23  # ragged: not multiples of anything


# ============================================================== plain-torch float64 reference
def reference(x, w, b, ls, feedforward):
    """(IA)³ by definition in float64: l = Π l_i; y = (x ⊙ l) Wᵀ + b, or y = (x Wᵀ + b) ⊙ l.
    x [..., K], w [N, K], b [N] or None, ls: vectors of K (feed-forward) or N elements."""
    l_ = ls[0].reshape(-1)
    for other in ls[1:]:
        l_ = l_ * other.reshape(-1)
    if feedforward:
        return torch.nn.functional.linear(x * l_, w, b)
    return torch.nn.functional.linear(x, w, b) * l_


def make_base(kind, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    if kind == "linear":
        return lin.to(dtype)
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D
        c = Conv1D(N, K)
        with torch.no_grad():
            c.weight.copy_(lin.weight.t())
            c.bias.copy_(lin.bias if bias else torch.zeros(N))
        return c.to(dtype)
    return Linear4bit.from_linear(lin)


def base_w_b(layer):
    """The base's exact weight [N, K] and bias in float64."""
    base = layer.base_layer
    if isinstance(base, Linear4bit):
        w = base.dequantize(torch.float32)
    elif type(base).__name__ == "Conv1D":
        w = base.weight.t()
    else:
        w = base.weight
    b = None if base.bias is None else base.bias.detach().double()
    return w.detach().double(), b


def random_layer(kind, ff, dtype, n_adapters, bias=True):
    layer = IA3Linear(make_base(kind, dtype, bias), feedforward=ff, init_ia3_weights=False)
    for i in range(1, n_adapters):
        layer.add_adapter(f"a{i}", init_ia3_weights=False)
    layer.set_adapter(list(layer.ia3_l))
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ff", [False, True], ids=["out", "ff"])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "4bit"])
@pytest.mark.parametrize("lead,n_adapters", [((1,), 1), ((3, 5), 2)])
def test_layer_matches_float64_reference_with_gradients(kind, ff, dtype, lead, n_adapters):
    layer = random_layer(kind, ff, dtype, n_adapters, bias=kind != "4bit")
    torch.manual_seed(1)
    x = torch.randn(*lead, K).to(dtype).requires_grad_(True)
    g = torch.randn(*lead, N).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*lead, N)
    y.backward(g)

    w, b = base_w_b(layer)
    x64 = x.detach().double().requires_grad_(True)
    ls64 = [p.detach().double().requires_grad_(True) for p in layer.ia3_l.values()]
    y64 = reference(x64, w, b, ls64, ff)
    y64.backward(g.double())
    assert_close_to_reference(y, y64, dtype, f"{kind} y")
    assert_close_to_reference(x.grad, x64.grad, dtype, f"{kind} dx")
    for (name, p), r in zip(layer.ia3_l.items(), ls64):
        assert p.grad.dtype == torch.float32 and p.grad.shape == p.shape
        assert_close_to_reference(p.grad, r.grad, dtype, f"{kind} d ia3_l[{name}]")


def test_layout_shapes_init_and_adapter_state():
    out = IA3Linear(make_base("linear", torch.float32))
    ff = IA3Linear(make_base("conv1d", torch.float32), feedforward=True)
    assert out.ia3_l["default"].shape == (N, 1) and ff.ia3_l["default"].shape == (1, K)
    assert torch.equal(out.ia3_l["default"], torch.ones(N, 1)) and ff.fan_in_fan_out
    assert sorted(out.state_dict()) == ["base_layer.bias", "base_layer.weight", "ia3_l.default"]
    x = torch.randn(4, K)
    assert torch.equal(out(x), out.base_layer(x))  # ones: the layer starts as its base
    out.add_adapter("b", init_ia3_weights=False)
    assert not out.ia3_l["b"].requires_grad and out.ia3_l["default"].requires_grad  # inactive until set
    out.set_adapter("b")
    assert out.ia3_l["b"].requires_grad and not out.ia3_l["default"].requires_grad
    assert torch.allclose(out(x), out.base_layer(x) * out.ia3_l["b"].reshape(-1))
    out.disabled = True
    assert torch.equal(out(x), out.base_layer(x))
    out.disabled = False
    out.delete_adapter("b")
    assert out.active_adapters == [] and torch.equal(out(x), out.base_layer(x))
    with pytest.raises(KeyError, match="unknown adapter 'zz'"):
        out.set_adapter("zz")


def test_layer_bad_inputs():
    layer = IA3Linear(make_base("4bit", torch.float32))
    with pytest.raises(ValueError, match=f"last dimension of x must be {K}"):
        layer(torch.randn(2, K + 1))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        layer(torch.ones(2, K, dtype=torch.int64))
    with pytest.raises(TypeError, match="IA3Linear wraps"):
        IA3Linear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="adapter name"):
        layer.add_adapter("a.b")
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default")
    with pytest.raises(ValueError, match="ParameterDict attribute"):
        layer.add_adapter("keys")


# ============================================================== saved for backward
def _saved_activation_bytes(layer, x, grad_l: bool):
    """Bytes of distinct storages autograd keeps that are not the layer's parameters/buffers."""
    for p in layer.ia3_l.values():
        p.requires_grad_(grad_l)
    own = {t.untyped_storage().data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    return sum(v for k, v in seen.items() if k not in own)


@pytest.mark.parametrize("kind", ["linear", "4bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_saved_bytes_are_the_scaled_activation_only_when_l_trains(kind, dtype):
    m = 6
    for ff in (False, True):
        layer = random_layer(kind, ff, dtype, 2)
        x = torch.randn(m, K).to(dtype).requires_grad_(True)
        el = torch.empty((), dtype=dtype).element_size()
        # l trains: base(x) [M, N] (output scaling) or x [M, K] (input scaling), in the activation dtype
        want = m * (K if ff else N) * el
        assert _saved_activation_bytes(layer, x, grad_l=True) == want, (kind, ff)
        # frozen vectors: nothing of the activations is kept (dx needs only l and W)
        assert _saved_activation_bytes(layer, x, grad_l=False) == 0, (kind, ff)


# ============================================================== merge
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("ff", [False, True], ids=["out", "ff"])
def test_dense_merge_is_exact_and_unmerges(kind, ff):
    layer = random_layer(kind, ff, torch.float64, 2)
    x = torch.randn(7, K, dtype=torch.float64)
    y = layer(x)
    w0 = layer.base_layer.weight.detach().clone()
    b0 = layer.base_layer.bias.detach().clone()
    layer.merge()
    assert layer.merged_adapters == ["default", "a1"]
    assert torch.allclose(layer(x), y, rtol=1e-13, atol=1e-13)  # float64 base: exact to rounding
    layer.unmerge()
    assert not layer.merged
    assert torch.allclose(layer.base_layer.weight, w0, rtol=1e-15, atol=0)
    assert torch.allclose(layer.base_layer.bias, b0, rtol=1e-15, atol=0)
    # float32 base: the merged weight is one float32 rounding of W ⊙ l
    layer32 = random_layer(kind, ff, torch.float32, 2)
    x32 = torch.randn(7, K)
    ref = reference(x32.double(), *base_w_b(layer32), [p.detach().double() for p in layer32.ia3_l.values()], ff)
    w32 = layer32.base_layer.weight.detach().clone()
    layer32.merge(["default"])
    layer32.merge(["a1"])  # one at a time: the factors multiply
    assert_close_to_reference(layer32(x32), ref, torch.float32, "merged fp32")
    layer32.unmerge()
    assert_close_to_reference(layer32.base_layer.weight, w32, torch.float32, "unmerged fp32")
    assert (layer32.base_layer.weight - w32).abs().max() <= 4 * torch.finfo(torch.float32).eps * w32.abs().max()


def test_merged_adapters_and_disable_follow_peft():
    layer = random_layer("linear", False, torch.float32, 2)
    x = torch.randn(3, K)
    full = layer(x).detach()
    layer.merge(["default"])
    # an active adapter that is not merged still scales (PEFT would return the bare merged base)
    assert_close_to_reference(layer(x), full.double(), torch.float32, "half-merged")
    layer.disabled = True
    base = layer(x)  # disabling a merged layer unmerges it (PEFT's behaviour)
    assert not layer.merged
    assert torch.allclose(base, layer.base_layer(x))
    layer.disabled = False
    layer.merge(["a1"])
    with pytest.raises(ValueError, match="merged into the base"):
        layer.delete_adapter("a1")


def test_unmerge_refuses_a_zero_factor():
    layer = random_layer("linear", False, torch.float32, 1)
    with torch.no_grad():
        layer.ia3_l["default"][3] = 0.0
    layer.merge()
    with pytest.raises(ValueError, match="1 zero entries"):
        layer.unmerge()


@pytest.mark.parametrize("ff", [False, True], ids=["out", "ff"])
def test_4bit_merge_dequantize_and_requantize(ff):
    from peft_kernels.quant.quantize import quantize_4bit
    layer = random_layer("4bit", ff, torch.float32, 1)
    x = torch.randn(5, K)
    y = layer(x).detach()
    w4 = layer.base_layer.dequantize(torch.float32).double()
    lvec = layer.ia3_l["default"].detach().double()
    want = w4 * lvec  # [1, K] scales W's columns, [N, 1] its rows
    with pytest.raises(ValueError, match="cannot be merged exactly"):
        copy.deepcopy(layer).merge()
    deq = copy.deepcopy(layer)
    deq.merge(mode="dequantize", dtype=torch.float32)
    assert isinstance(deq.base_layer, nn.Linear)
    assert_close_to_reference(deq.base_layer.weight, want, torch.float32, "dequantize-merged W")
    assert_close_to_reference(deq(x), y.double(), torch.float32, "dequantize-merged y")
    deq.unmerge()
    assert_close_to_reference(deq.base_layer.weight, w4, torch.float32, "unmerged back to dequant(W4)")
    req = copy.deepcopy(layer)
    req.merge(mode="requantize")
    assert isinstance(req.base_layer, Linear4bit)
    packed, _ = quantize_4bit(want.float(), 64, "nf4", True)
    # (float32 vs float64 arithmetic can move an element across a rounding midpoint: nearly all bytes agree)
    assert (req.base_layer.weight.reshape(-1) == packed.reshape(-1)).float().mean() > 0.99
    with pytest.raises(ValueError, match="cannot be undone"):
        req.unmerge()


def test_model_merge_and_unload_keeps_the_logits():
    model = M.apply(build("llama"), M.IA3Config(init_ia3_weights=False))
    ids = sample_ids()
    base = build("llama")(ids).logits
    want = model(ids).logits.detach()
    assert not torch.allclose(want, base)
    with M.disable_adapters(model):
        assert torch.equal(model(ids).logits, base)
    M.merge_and_unload(model)
    assert not any(isinstance(m, IA3Linear) for m in model.modules())
    assert_close_to_reference(model(ids).logits, want.double(), torch.float32, "merged logits")


# ============================================================== parity with Hugging Face PEFT
def _peft_pair(arch, **cfg):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model
    torch.manual_seed(0)
    ours = M.apply(build(arch), M.IA3Config(init_ia3_weights=False, **cfg))
    ref = get_peft_model(build(arch), PeftIA3Config(**cfg))
    ours_sd = ours.state_dict()
    ref_sd = ref.base_model.model.state_dict()
    assert sorted(ours_sd) == sorted(ref_sd)  # PEFT's module layout and keys, base weights included
    with torch.no_grad():
        for k, v in ref.base_model.model.named_parameters():
            if "ia3_l" in k:
                assert ours_sd[k].shape == v.shape, k
                v.copy_(ours_sd[k])
    return ours, ref


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_outputs_and_every_gradient_match_peft(arch):
    ours, ref = _peft_pair(arch)
    ids = sample_ids()
    ya, yb = ours(ids).logits, ref(ids).logits
    assert torch.equal(ya, yb)
    ya.square().mean().backward()
    yb.square().mean().backward()
    ref_params = dict(ref.base_model.model.named_parameters())
    n = 0
    for k, p in ours.named_parameters():
        if p.requires_grad:
            assert "ia3_l" in k
            assert_close_to_reference(p.grad, ref_params[k].grad.double(), torch.float32, k)
            n += 1
    assert n == len([k for k in ref_params if "ia3_l" in k]) > 0


def test_two_active_adapters_multiply_as_in_peft():
    from peft import IA3Config as PeftIA3Config
    ours, ref = _peft_pair("llama")
    M.add_adapter(ours, M.IA3Config(init_ia3_weights=False), "b")
    ref.add_adapter("b", PeftIA3Config(init_ia3_weights=False))
    with torch.no_grad():
        src = dict(ours.named_parameters())
        for k, v in ref.base_model.model.named_parameters():
            if k.endswith("ia3_l.b"):
                v.copy_(src[k])
    M.set_adapter(ours, ["default", "b"])
    ref.base_model.set_adapter(["default", "b"])
    ids = sample_ids()
    ya, yb = ours(ids).logits, ref(ids).logits
    assert torch.equal(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    ref_params = dict(ref.base_model.model.named_parameters())
    trained = [k for k, p in ours.named_parameters() if p.requires_grad]
    assert sum(k.endswith(".b") for k in trained) == sum(k.endswith(".default") for k in trained) == 6
    for k in trained:
        assert_close_to_reference(dict(ours.named_parameters())[k].grad, ref_params[k].grad.double(),
                                  torch.float32, k)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_trainable_count_equals_the_formula_and_peft(arch):
    ours, ref = _peft_pair(arch)
    c = ours.config
    if arch == "llama":  # k_proj, v_proj: out = kv_heads * head_dim; down_proj (ff): in = intermediate
        kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
        formula = c.num_hidden_layers * (2 * kv + c.intermediate_size)
    elif arch == "gpt2":  # c_attn: out = 3 n_embd; mlp.c_proj (ff): in = 4 n_embd
        formula = c.n_layer * (3 * c.n_embd + 4 * c.n_embd)
    else:  # key, value: out = hidden; attention.output.dense (ff, in = hidden), output.dense (ff, in = intermediate)
        formula = c.num_hidden_layers * (2 * c.hidden_size + c.hidden_size + c.intermediate_size)
    trainable, total = M.trainable_parameters(ours)
    assert trainable == M.ia3_parameter_count(ours) == formula
    assert (trainable, total) == tuple(ref.get_nb_trainable_parameters())


# ============================================================== files, both ways
def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")  # PEFT warns about our extra config key (fingerprint) and in-place loads
    return ctx


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("gpt2", {}), ("bert", {}),
                                        ("llama", {"modules_to_save": ["lm_head"]})],
                         ids=["llama", "gpt2", "bert", "llama-modules_to_save"])
def test_files_load_both_ways_with_identical_logits(arch, extra, tmp_path):
    from peft import PeftModel
    ours, ref = _peft_pair(arch, **extra)
    if extra:
        with torch.no_grad():  # make the trainable copy differ from the frozen original
            ours.lm_head.modules_to_save["default"].weight.mul_(1.5)
            ref.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    ids = sample_ids()
    want = ours(ids).logits.detach()
    M.save_ia3(ours, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "IA3" and cfg[FINGERPRINT_KEY]["model_type"] == arch
    assert cfg["fan_in_fan_out"] == (arch == "gpt2")
    keys = sorted(load_file(str(tmp_path / "ours" / WEIGHTS_NAME)))
    ref.save_pretrained(str(tmp_path / "peft"))
    assert keys == sorted(load_file(str(tmp_path / "peft" / WEIGHTS_NAME)))  # PEFT's very key names
    ctx = _quiet()
    try:
        loaded_in_peft = PeftModel.from_pretrained(build(arch), str(tmp_path / "ours"))
    finally:
        ctx.__exit__(None, None, None)
    assert torch.equal(loaded_in_peft(ids).logits, want)
    loaded_in_ours = M.load_ia3(build(arch), tmp_path / "peft")
    assert torch.equal(loaded_in_ours(ids).logits, ref(ids).logits)
    assert torch.equal(loaded_in_ours(ids).logits, want)
    assert not any(p.requires_grad for p in loaded_in_ours.parameters())  # is_trainable=False
    again = M.load_ia3(build(arch), tmp_path / "ours", is_trainable=True)
    assert M.trainable_parameters(again)[0] == M.trainable_parameters(ours)[0]


def test_a_4bit_model_saves_and_loads(tmp_path):
    from peft_kernels.quant import quantize_model
    model = build("llama")
    quantize_model(model)
    M.apply(model, M.IA3Config(init_ia3_weights=False))
    assert isinstance(model.model.layers[0].mlp.down_proj.base_layer, Linear4bit)
    ids = sample_ids()
    want = model(ids).logits.detach()
    M.save_ia3(model, tmp_path)
    other = build("llama")
    quantize_model(other)
    M.load_ia3(other, tmp_path)
    assert torch.equal(other(ids).logits, want)


def test_second_adapter_and_in_place_reload(tmp_path):
    model = M.apply(build("llama"), M.IA3Config(init_ia3_weights=False))
    M.save_ia3(model, tmp_path)
    M.load_ia3(model, tmp_path, adapter_name="second")
    assert M.active_adapters(model) == ["default"]
    sd = M.ia3_state_dict(model, "second")
    assert len(sd) == 6 and all(k.endswith(".ia3_l.second") for k in sd)
    layer = model.model.layers[0].self_attn.k_proj
    assert torch.equal(layer.ia3_l["second"], layer.ia3_l["default"]) and not layer.ia3_l["second"].requires_grad
    p = layer.ia3_l["second"]
    with torch.no_grad():
        p.fill_(2.0)
    M.load_ia3(model, tmp_path, adapter_name="second")  # same modules: values replaced in place
    assert layer.ia3_l["second"] is p and torch.equal(p, layer.ia3_l["default"])
    M.delete_adapter(model, "second")
    M.delete_adapter(model, "default")
    assert not any(isinstance(m, IA3Linear) for m in model.modules())


# ============================================================== training
@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "4bit"])
def test_loss_decreases_in_a_few_adamw_steps(four_bit):
    from peft_kernels.quant import quantize_model
    model = build("llama")
    if four_bit:
        quantize_model(model)
    M.apply(model, M.IA3Config())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 6 and all("ia3_l" in n for n, p in model.named_parameters() if p.requires_grad)
    # (a randomly initialised model: IA3 can only rescale it, so a large step shows the drop within 4 steps)
    opt = torch.optim.AdamW(params, lr=0.3)
    ids = sample_ids(4, 16)
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.05, losses


# ============================================================== bad inputs
@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("ia3_good")
    M.save_ia3(M.apply(build("llama"), M.IA3Config(init_ia3_weights=False)), d)
    return d


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [type(m).__name__ for m in model.modules()], [p.requires_grad for p in model.parameters()],
            {a: model.__dict__.get(a) for a in (M.CONFIG_ATTR, M.ACTIVE_ATTR)})


def _assert_unchanged(model, snap):
    sd, types, flags, attrs = snap
    now = model.state_dict()
    assert sorted(now) == sorted(sd) and all(torch.equal(now[k], sd[k]) for k in sd)
    assert [type(m).__name__ for m in model.modules()] == types
    assert [p.requires_grad for p in model.parameters()] == flags
    assert {a: model.__dict__.get(a) for a in attrs} == attrs


def _variant(src, dst, tensors=None, config=None):
    dst.mkdir()
    t = load_file(str(src / WEIGHTS_NAME))
    c = json.loads((src / CONFIG_NAME).read_text())
    t = tensors(t) if tensors else t
    c = config(c) if config else c
    save_file(t, str(dst / WEIGHTS_NAME))
    (dst / CONFIG_NAME).write_text(json.dumps(c))
    return dst


K0 = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"


def _set(d, k, v):
    d = dict(d)
    d[k] = v
    return d


BAD = {
    "missing key": (lambda t: {k: v for k, v in t.items() if k != K0}, None, "missing keys"),
    "extra key": (lambda t: _set(t, K0.replace("k_proj", "q_proj"), torch.ones(64, 1)), None, "unexpected keys"),
    "stray key": (lambda t: _set(t, "base_model.model.model.norm.weight", torch.ones(64)), None, "unexpected key"),
    "wrong shape": (lambda t: _set(t, K0, torch.ones(31, 1)), None, r"has shape \(31, 1\)"),
    "transposed": (lambda t: _set(t, K0, torch.ones(1, 32)), None, "treats it as feed-forward"),
    "nan": (lambda t: _set(t, K0, torch.full((32, 1), float("nan"))), None, "NaN or Inf"),
    "int dtype": (lambda t: _set(t, K0, torch.ones(32, 1, dtype=torch.int32)), None, "expected a float dtype"),
    "lora file": (None, lambda c: _set(c, "peft_type", "LORA"), "peft_type is 'LORA'"),
    "other model": (None, lambda c: _set(c, FINGERPRINT_KEY, {**c[FINGERPRINT_KEY], "hidden_size": 4096}),
                    "made for another model"),
    "unknown target": (None, lambda c: {**c, "target_modules": ["nope"], "feedforward_modules": []},
                       "matched no module"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_are_clear_errors_and_leave_the_model_unchanged(case, good_file, tmp_path):
    tensors, config, match = BAD[case]
    bad = _variant(good_file, tmp_path / "bad", tensors, config)
    for model in (build("llama"), M.apply(build("llama"), M.IA3Config(), "other")):
        snap = _snapshot(model)
        with pytest.raises(AdapterLoadError, match=match):
            M.load_ia3(model, bad)
        _assert_unchanged(model, snap)


def test_a_file_for_another_model(good_file, tmp_path):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model
    # ours, with its fingerprint: another architecture, and the same one at another size
    for other in (build("gpt2"), build("llama", intermediate_size=96)):
        snap = _snapshot(other)
        with pytest.raises(AdapterLoadError, match="made for another model"):
            M.load_ia3(other, good_file)
        _assert_unchanged(other, snap)
    # PEFT's (no fingerprint): the modules and shapes decide
    get_peft_model(build("llama"), PeftIA3Config()).save_pretrained(str(tmp_path / "peft"))
    small = build("llama", intermediate_size=96)
    snap = _snapshot(small)
    with pytest.raises(AdapterLoadError, match=r"down_proj.ia3_l has shape \(1, 128\).*another model"):
        M.load_ia3(small, tmp_path / "peft")
    _assert_unchanged(small, snap)
    shallow = build("llama", num_hidden_layers=1)
    with pytest.raises(AdapterLoadError, match="does not have.*layers.1"):
        M.load_ia3(shallow, tmp_path / "peft")
    gpt2 = build("gpt2")
    with pytest.raises(AdapterLoadError, match="matched no module"):
        M.load_ia3(gpt2, tmp_path / "peft")


def test_corrupt_and_missing_files(good_file, tmp_path):
    model = build("llama")
    snap = _snapshot(model)
    bad = _variant(good_file, tmp_path / "trunc")
    raw = (bad / WEIGHTS_NAME).read_bytes()
    (bad / WEIGHTS_NAME).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AdapterLoadError, match="not a readable safetensors file"):
        M.load_ia3(model, bad)
    (bad / WEIGHTS_NAME).write_bytes(raw)
    (bad / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        M.load_ia3(model, bad)
    with pytest.raises(FileNotFoundError):
        M.load_ia3(model, tmp_path / "nowhere")
    _assert_unchanged(model, snap)


def test_a_failure_after_the_checks_rolls_back(good_file, monkeypatch):
    model = build("llama")
    snap = _snapshot(model)

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(M, "_freeze_base", boom)  # fails inside apply(), after the layers were swapped in
    with pytest.raises(RuntimeError, match="injected"):
        M.load_ia3(model, good_file)
    _assert_unchanged(model, snap)


def test_bad_configs_and_unknown_targets_leave_the_model_unchanged():
    model = build("llama")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        M.apply(model, M.IA3Config(target_modules=["nope"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="is a Embedding"):
        M.apply(model, M.IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="subset of target_modules"):
        M.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="no IA3 default for model type"):
        M.apply(nn.Sequential(nn.Linear(4, 4)), M.IA3Config())
    _assert_unchanged(model, snap)
    M.apply(model, M.IA3Config())
    with pytest.raises(ValueError, match="feedforward=True"):  # one layer scales its input or its output
        M.add_adapter(model, M.IA3Config(target_modules=["down_proj"], feedforward_modules=[]), "b")
    with pytest.raises(ValueError, match="already has an IA3 adapter"):
        M.add_adapter(model, M.IA3Config(), "default")
