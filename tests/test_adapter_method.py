"""Bottleneck adapters on whole models (methods/adapter.py, nn/adapter.py): placement, equality with a
hand-written hooked reference, training, parameter counts, adapter management, save/load, bad input.

Tiny llama / gpt2 / bert from tests/_tiny_models.py (hidden 64, 2 layers). The plain-torch path runs
by default (CPU tensors); one test runs a training step through the Triton kernels (interpreter).
"""
import copy
import json
import math

import pytest
import torch
from _tiny_models import build, sample_ids
from _tolerance import assert_close_to_reference

from peft_kernels.io.method_files import CONFIG_NAME, FINGERPRINT_KEY, WEIGHTS_NAME, AdapterLoadError
from peft_kernels.kernels import adapter as K
from peft_kernels.kernels._launch import is_interpreted
from peft_kernels.methods import adapter as A
from peft_kernels.nn.adapter import Adapter, AdapterSlot
from peft_kernels.ops import reference_adapter as R

#: The modules each placement must hook, per architecture (inside block i of the layer stack).
EXPECTED = {
    "llama": ("model.layers", "self_attn", "mlp"),
    "gpt2": ("transformer.h", "attn", "mlp"),
    "bert": ("bert.encoder.layer", "attention.output.dense", "output.dense"),
}
HIDDEN, LAYERS = 64, 2


def _logits(model, ids=None):
    with torch.no_grad():
        return model(sample_ids() if ids is None else ids).logits


def _randomise(model, seed=0):
    """Give every adapter non-zero weights sized so each adapter changes its block output by O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, slot in A._slots(model):
            for ad in slot.values():
                for p in ad.parameters():
                    fan = p.shape[-1] if p.dim() == 2 else 4
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan))


def _hooked_reference(base, points, adapters):
    """A copy of the base model with hand-written hooks: out -> out + s·up(act(down(out))) in plain torch."""
    ref = copy.deepcopy(base)
    for name, ad in zip(points, adapters):
        s = ad.scaling.detach()
        p = [t.detach() for t in (ad.down.weight, ad.down.bias, ad.up.weight, ad.up.bias)]

        def hook(mod, args, out, p=p, s=s, act=ad.activation):
            h = out[0] if isinstance(out, tuple) else out
            h = h + s * torch.nn.functional.linear(R.adapter_activation(torch.nn.functional.linear(h, p[0], p[1]),
                                                                        act), p[2], p[3])
            return (h, *out[1:]) if isinstance(out, tuple) else h
        ref.get_submodule(name).register_forward_hook(hook)
    return ref


# ------------------------------------------------------------------ placement and outputs
@pytest.mark.parametrize("arch", sorted(EXPECTED))
@pytest.mark.parametrize("placement", A.PLACEMENTS)
def test_placement_identity_at_init_then_equals_hooked_reference(arch, placement):
    base = build(arch)
    model = copy.deepcopy(base)
    before = _logits(base)
    A.apply(model, A.BottleneckConfig(placement=placement, bottleneck=8, activation="gelu", scaling=0.5))
    stack, attn, ffn = EXPECTED[arch]
    kinds = (attn, ffn) if placement == "houlsby" else (ffn,)
    names = [f"{stack}.{i}.{k}" for i in range(LAYERS) for k in kinds]
    assert [p.name for p in A.hook_points(model, "default")] == names
    assert torch.equal(_logits(model), before)  # up weight and biases zero: exactly the base model

    _randomise(model)
    adapters = [getattr(model.get_submodule(n), A.SLOT_ATTR)["default"] for n in names]
    ref = _hooked_reference(base, names, adapters)
    got, want = _logits(model), _logits(ref)
    assert (got - before).abs().max() > 1e-2  # the adapters now matter
    assert_close_to_reference(got, want.double(), torch.float32, f"{arch} {placement} logits")


def test_base_state_dict_keys_unchanged():
    base = build("llama")
    keys = set(base.state_dict())
    A.apply(base, A.BottleneckConfig(bottleneck=4))
    new = set(base.state_dict())
    assert keys <= new
    assert all(f".{A.SLOT_ATTR}.default." in k for k in new - keys)


# ------------------------------------------------------------------ training and parameter counts
@pytest.mark.parametrize("arch,placement", (("llama", "houlsby"), ("gpt2", "pfeiffer"), ("bert", "houlsby")))
def test_loss_decreases_with_adamw(arch, placement):
    model = build(arch).train()
    A.apply(model, A.BottleneckConfig(placement=placement, bottleneck=8, activation="relu", scaling="learned"))
    ids = sample_ids(4, 12, seed=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def _formula(d, r, layers, per_layer, learned):
    return layers * per_layer * (2 * d * r + r + d + int(learned))


@pytest.mark.parametrize("arch", sorted(EXPECTED))
@pytest.mark.parametrize("cfg,per_layer,r,layers", [
    (A.BottleneckConfig(placement="houlsby", bottleneck=8), 2, 8, LAYERS),
    (A.BottleneckConfig(placement="pfeiffer", bottleneck=8), 1, 8, LAYERS),
    (A.BottleneckConfig(placement="houlsby", reduction_factor=16, scaling="learned"), 2, HIDDEN // 16, LAYERS),
    (A.BottleneckConfig(placement="pfeiffer", bottleneck=5, layers_to_transform=[1]), 1, 5, 1),
], ids=("houlsby", "pfeiffer", "houlsby-rf16-learned", "pfeiffer-layer1"))
def test_trainable_parameters_equal_formula(arch, cfg, per_layer, r, layers):
    model = build(arch)
    total_before = A.trainable_parameters(model)[1]
    A.apply(model, cfg)
    trainable, total = A.trainable_parameters(model)
    want = _formula(HIDDEN, r, layers, per_layer, cfg.scaling == "learned")
    assert trainable == want == A.adapter_parameter_count(model, "default")
    assert want == A.expected_parameter_count(cfg, A.hook_points(model, "default"))
    assert total == total_before + want


@pytest.mark.skipif(not is_interpreted(K._adapter_down_kernel) and not torch.cuda.is_available(),
                    reason="needs TRITON_INTERPRET=1 or a GPU")
def test_model_gradients_through_triton_kernels(monkeypatch):
    """One forward + backward of tiny llama with Houlsby adapters through the Triton kernels (fp32) equals
    the float64 model's gradients (plain-torch path) within the fp32 tolerance."""
    model = build("llama")
    A.apply(model, A.BottleneckConfig(bottleneck=8, activation="silu", scaling="learned"))
    _randomise(model, seed=2)
    model64 = copy.deepcopy(model).double()
    ids = sample_ids(2, 6, seed=4)

    def grads(m):
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    calls = []
    for fn in ("adapter_forward", "adapter_backward"):
        real = getattr(K, fn)
        monkeypatch.setattr(K, fn, lambda *a, real=real, fn=fn, **k: calls.append(fn) or real(*a, **k))
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "triton")
    got = grads(model)
    assert calls.count("adapter_forward") == 4 and calls.count("adapter_backward") == 4  # really the kernels
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "reference")
    want = grads(model64)
    assert set(got) == set(want) and len(got) == 4 * 5  # 4 adapters x (down w/b, up w/b, scaling)
    for n in got:
        assert_close_to_reference(got[n], want[n], torch.float32, n)


@pytest.mark.parametrize("arch", ("llama", "bert"))
def test_on_4bit_base(arch):
    """Adapters over a model whose linear layers are NF4 (the engine's setting): identity at init, the
    4-bit weights stay frozen and unchanged, the adapters train (bert hooks a Linear4bit directly)."""
    from peft_kernels.nn.linear4bit import Linear4bit
    from peft_kernels.quant import quantize_model
    model = build(arch)
    quantize_model(model)
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    before = _logits(model)
    A.apply(model, A.BottleneckConfig(bottleneck=8))
    assert torch.equal(_logits(model), before)
    packed = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    model.train()
    ids = sample_ids(4, 12, seed=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(m.weight, packed[n]) for n, m in model.named_modules() if isinstance(m, Linear4bit))


def test_half_precision_model_float32_adapters():
    model = build("llama", dtype=torch.float16)
    A.apply(model, A.BottleneckConfig(bottleneck=8))
    ad = model.get_submodule(f"model.layers.0.mlp.{A.SLOT_ATTR}")["default"]
    assert ad.down.weight.dtype == torch.float32
    _randomise(model)
    model.train()
    out = model(sample_ids(), labels=sample_ids())
    assert out.logits.dtype == torch.float16
    out.loss.backward()
    assert ad.up.weight.grad is not None and ad.up.weight.grad.dtype == torch.float32


# ------------------------------------------------------------------ several adapters
def test_add_set_disable_delete():
    base = build("gpt2")
    model = copy.deepcopy(base)
    before = _logits(base)
    A.apply(model, A.BottleneckConfig(bottleneck=4, activation="gelu_tanh"), "a")
    A.add_adapter(model, A.BottleneckConfig(placement="pfeiffer", bottleneck=6, activation="silu"), "b")
    _randomise(model, seed=1)
    ads = {n: [s[n] for _, s in A._slots(model) if n in s] for n in ("a", "b")}
    assert all(p.requires_grad for ad in ads["a"] for p in ad.parameters())
    assert not any(p.requires_grad for ad in ads["b"] for p in ad.parameters())  # added, not active

    only_a = _logits(model)
    a_points = [p.name for p in A.hook_points(model, "a")]
    assert_close_to_reference(only_a, _logits(_hooked_reference(base, a_points, ads["a"])).double(), torch.float32,
                              "only a")
    A.set_adapter(model, "b")
    only_b = _logits(model)
    assert A.active_adapters(model) == ["b"]
    assert all(p.requires_grad for ad in ads["b"] for p in ad.parameters())
    assert not any(p.requires_grad for ad in ads["a"] for p in ad.parameters())
    b_points = [p.name for p in A.hook_points(model, "b")]
    assert_close_to_reference(only_b, _logits(_hooked_reference(base, b_points, ads["b"])).double(), torch.float32,
                              "only b")

    # Stacked: on the feed-forward outputs a runs first, then b on a's output.
    A.set_adapter(model, ["a", "b"])
    ref = _hooked_reference(_hooked_reference(base, a_points, ads["a"]), b_points, ads["b"])
    assert_close_to_reference(_logits(model), _logits(ref).double(), torch.float32, "a then b")

    with A.disable_adapters(model):
        assert torch.equal(_logits(model), before)
    assert not torch.equal(_logits(model), before)

    A.delete_adapter(model, "a")
    assert list(A.get_configs(model)) == ["b"] and A.active_adapters(model) == ["b"]
    assert torch.equal(_logits(model), only_b)
    attn = model.get_submodule("transformer.h.0.attn")
    assert not hasattr(attn, A.SLOT_ATTR) and not attn._forward_hooks  # a was the only adapter there
    A.delete_adapter(model, "b")
    assert not list(A._slots(model)) and torch.equal(_logits(model), before)
    assert set(model.state_dict()) == set(base.state_dict())
    with pytest.raises(KeyError, match="unknown bottleneck adapter 'b'"):
        A.set_adapter(model, "b")


def test_adapter_module():
    ad = Adapter(16, 4, activation="gelu_new", scaling="learned")
    h = torch.randn(3, 5, 16, dtype=torch.float16)
    assert torch.equal(ad(h), h)  # identity at init (up and biases zero)
    assert ad.activation == "gelu_tanh" and ad.num_parameters_formula() == sum(p.numel() for p in ad.parameters())
    assert "scaling" in ad.state_dict()
    assert "scaling" not in Adapter(16, 4, scaling=2.0).state_dict()  # a fixed s is not a parameter
    with pytest.raises(ValueError, match=r"expects inputs \[\.\.\., 16\]"):
        ad(torch.randn(3, 15))
    with pytest.raises(ValueError, match="scaling must be"):
        Adapter(16, 4, scaling="auto")
    with pytest.raises(ValueError, match="bottleneck must be a positive integer"):
        Adapter(16, 0)
    with pytest.raises(ValueError, match="init must be one of"):
        Adapter(16, 4, init="lora")
    assert isinstance(AdapterSlot(), torch.nn.ModuleDict)


# ------------------------------------------------------------------ save / load
def test_save_load_round_trip(tmp_path):
    model = build("llama")
    cfg = A.BottleneckConfig(placement="houlsby", bottleneck=8, activation="silu", scaling="learned",
                             layers_to_transform=[1])
    A.apply(model, cfg)
    _randomise(model, seed=3)
    want = _logits(model)
    A.save_bottleneck(model, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["format_version"] == 1
    assert config["placement"] == "houlsby" and config["bottleneck"] == 8 and config["scaling"] == "learned"
    assert config[FINGERPRINT_KEY]["hidden_size"] == HIDDEN
    assert [p["name"] for p in config["hook_points"]] == ["model.layers.1.self_attn", "model.layers.1.mlp"]
    assert (tmp_path / "ad" / WEIGHTS_NAME).is_file()

    fresh = build("llama")
    A.load_bottleneck(fresh, tmp_path / "ad")
    assert torch.equal(_logits(fresh), want)
    assert A.trainable_parameters(fresh)[0] == 0  # inference load: nothing trains
    A.load_bottleneck(fresh, tmp_path / "ad", adapter_name="again", is_trainable=True)
    assert A.active_adapters(fresh) == ["again"]
    assert A.trainable_parameters(fresh)[0] == A.adapter_parameter_count(fresh, "again")
    assert torch.equal(_logits(fresh), want)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: len(m._forward_hooks) for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def _assert_unchanged(model, snap):
    sd, hooks, grads = _snapshot(model)
    assert set(sd) == set(snap[0]) and all(torch.equal(sd[k], snap[0][k]) for k in sd)
    assert hooks == snap[1] and grads == snap[2]


def test_load_refuses_file_for_another_model(tmp_path):
    src = build("llama")
    A.apply(src, A.BottleneckConfig(bottleneck=8))
    A.save_bottleneck(src, tmp_path / "ad")
    for other, match in ((build("llama", hidden_size=32, intermediate_size=64), "made for another model.*hidden_size"),
                         (build("gpt2"), "made for another model.*model_type")):
        snap = _snapshot(other)
        with pytest.raises(AdapterLoadError, match=match):
            A.load_bottleneck(other, tmp_path / "ad")
        _assert_unchanged(other, snap)


def test_failed_load_leaves_model_unchanged(tmp_path):
    from safetensors.torch import load_file, save_file
    src = build("bert")
    A.apply(src, A.BottleneckConfig(placement="pfeiffer", bottleneck=8))
    A.save_bottleneck(src, tmp_path / "ad")
    target = build("bert")
    A.apply(target, A.BottleneckConfig(bottleneck=4), "existing")
    snap = _snapshot(target)
    path = tmp_path / "ad" / WEIGHTS_NAME
    tensors = load_file(str(path))
    # One tensor of the last hook point has the wrong shape: found only after the others checked fine.
    key = sorted(tensors)[-1]
    bad = dict(tensors, **{key: torch.zeros(3, 3)})
    save_file(bad, str(path))
    with pytest.raises(AdapterLoadError, match="expected a floating tensor of shape"):
        A.load_bottleneck(target, tmp_path / "ad", adapter_name="new")
    _assert_unchanged(target, snap)
    save_file({k: v for k, v in tensors.items() if k != key}, str(path))
    with pytest.raises(AdapterLoadError, match="missing"):
        A.load_bottleneck(target, tmp_path / "ad", adapter_name="new")
    save_file(tensors, str(path))
    with pytest.raises(AdapterLoadError, match="already has a bottleneck adapter named 'existing'"):
        A.load_bottleneck(target, tmp_path / "ad", adapter_name="existing")
    cfg_path = tmp_path / "ad" / CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, peft_type="LORA")))
    with pytest.raises(AdapterLoadError, match="peft_type is 'LORA'"):
        A.load_bottleneck(target, tmp_path / "ad", adapter_name="new")
    cfg_path.write_text(json.dumps(dict(cfg, ffn_modules="output.nowhere")))
    with pytest.raises(AdapterLoadError, match="names no module"):
        A.load_bottleneck(target, tmp_path / "ad", adapter_name="new")
    _assert_unchanged(target, snap)
    cfg_path.write_text(json.dumps(cfg))
    A.load_bottleneck(target, tmp_path / "ad", adapter_name="new")  # the intact file loads
    assert A.active_adapters(target) == ["new"]


# ------------------------------------------------------------------ bad placements and configs
def test_placement_naming_no_module_is_an_error():
    model = build("llama")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"'attention\.dense' names no module in block 0 \(model\.layers\.0, "
                                         r"LlamaDecoderLayer\); its submodules: self_attn"):
        A.apply(model, A.BottleneckConfig(attn_modules="attention.dense"))
    with pytest.raises(ValueError, match="layers_to_transform \\[5\\] out of range"):
        A.apply(model, A.BottleneckConfig(layers_to_transform=[0, 5]))
    model.config.model_type = "my_model"  # a type without a placement table entry
    with pytest.raises(ValueError, match="model_type 'my_model' has no entry in BLOCK_OUTPUTS.*ffn_modules="):
        A.apply(model, A.BottleneckConfig(placement="pfeiffer"))
    _assert_unchanged(model, snap)
    # Explicit paths place adapters on any model.
    A.apply(model, A.BottleneckConfig(placement="houlsby", attn_modules="self_attn.o_proj", ffn_modules="mlp",
                                      bottleneck=4))
    assert [p.name for p in A.hook_points(model, "default")][:2] == ["model.layers.0.self_attn.o_proj",
                                                                       "model.layers.0.mlp"]
    with pytest.raises(ValueError, match="already has a bottleneck adapter named 'default'"):
        A.apply(model, A.BottleneckConfig())


@pytest.mark.parametrize("kwargs,match", [
    (dict(placement="parallel"), "placement must be one of"),
    (dict(bottleneck=8, reduction_factor=16), "not both"),
    (dict(bottleneck=0), "bottleneck must be a positive integer"),
    (dict(reduction_factor=-2), "reduction_factor must be a positive number"),
    (dict(activation="tanh"), "unknown adapter activation"),
    (dict(scaling="auto"), "scaling must be a number or 'learned'"),
    (dict(layers_to_transform=[-1]), "layers_to_transform must be"),
    (dict(ffn_modules=""), "ffn_modules must be a module path"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        A.BottleneckConfig(**kwargs)


def test_config_round_trip():
    cfg = A.BottleneckConfig(placement="pfeiffer", reduction_factor=8, activation="swish", scaling=2.0,
                             layers_to_transform=(0, 1))
    assert cfg.activation == "silu" and cfg.bottleneck_for(64) == 8 and cfg.layers_to_transform == [0, 1]
    assert A.BottleneckConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert A.BottleneckConfig().bottleneck_for(4096) == 64
