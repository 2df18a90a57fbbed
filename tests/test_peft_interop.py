"""Hugging Face PEFT interoperability: adapter files both ways, PeftModel conversion, bad input.

Equality is "same function": float32 logits, dropout in eval mode, compared with the project's
tolerance policy (fp32: relative Frobenius error <= 1e-5). Over a 4-bit base the fair PEFT
counterpart is PEFT over the *dequantized* weights: our 4-bit model computes with exactly
dequant(W4), so a dense twin holding those values in float32 is the same function and only the
float32 summation order differs (PEFT over bitsandbytes would add bnb's own dequantization, which
is wrong on CPU for some shapes, DESIGN.md). The PeftModel-over-bnb conversion test compares the
same model before and after the swap (bnb kept in train mode, where its CPU forward is correct).
"""
import copy
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from _tiny_models import build, sample_ids
from _tolerance import assert_close_to_reference
from peft_kernels.io import AdapterLoadError, from_peft_model, load_adapter, save_adapter
from peft_kernels.io import method_files, peft_format
from peft_kernels.methods import lora as lora_methods
from peft_kernels.methods.lora import LoraConfig, apply
from peft_kernels.nn import Linear4bit, LoraLinear
from peft_kernels.quant.model import quantize_model

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


# ------------------------------------------------------------------ helpers
def _randomize_(model, seed=0):
    """Give every adapter tensor a non-trivial value (default init makes LoRA a no-op: B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * noise)
            elif "lora_" in name:
                p.copy_(0.2 * noise)
            elif "modules_to_save" in name:
                p.add_(0.1 * noise)
    return model


def _logits(model, ids=None):
    with torch.no_grad():
        return model(sample_ids() if ids is None else ids).logits


def _same(got, ref, what):
    assert_close_to_reference(got, ref, torch.float32, what)


def _peft_model(base, **cfg):
    return peft.get_peft_model(base, peft.LoraConfig(**cfg))


def _file_layout(directory):
    """{key: shape} of an adapter file."""
    sd = safetensors_torch.load_file(str(Path(directory) / peft_format.WEIGHTS_NAME))
    return {k: tuple(v.shape) for k, v in sd.items()}


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()],
            {n: p.requires_grad for n, p in model.named_parameters()},
            {a: copy.copy(model.__dict__.get(a)) for a in (lora_methods.CONFIG_ATTR, "peft_kernels_active_adapters")})


def _assert_unchanged(model, snap):
    sd, mods, grads, attrs = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == mods
    now = model.state_dict()
    assert list(now) == list(sd)
    for k, v in sd.items():
        assert torch.equal(now[k], v), f"{k} changed"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert {a: model.__dict__.get(a) for a in attrs} == attrs


# (arch, our config, the same config for PEFT)
OURS_TO_PEFT = {
    "llama": dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
    "qwen2": dict(r=6, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], use_rslora=True,
                  lora_dropout=0.1, bias="lora_only", rank_pattern={"down_proj": 3}, alpha_pattern={"v_proj": 5}),
    "gpt2": dict(r=4, lora_alpha=16, target_modules="all-linear", lora_bias=True),
    "bert": dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["transform"]),
}


# ------------------------------------------------------------------ ours -> PEFT
@pytest.mark.parametrize("arch", sorted(OURS_TO_PEFT))
def test_ours_loads_in_peft_with_the_same_logits_and_key_names(arch, tmp_path):
    cfg = OURS_TO_PEFT[arch]
    base = build(arch)
    ours = _randomize_(apply(copy.deepcopy(base), LoraConfig(**cfg))).eval()
    save_adapter(ours, tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", "adapter_model.safetensors"]

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert not _logits(ours).allclose(_logits(base))  # the adapter does something
    _same(_logits(ours), _logits(theirs), f"{arch}: peft_kernels vs PEFT.from_pretrained")

    # Byte-level format: the same key names and shapes PEFT writes for this config.
    _peft_model(copy.deepcopy(base), **cfg).save_pretrained(tmp_path / "peft")
    assert _file_layout(tmp_path / "ours") == _file_layout(tmp_path / "peft")
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert ours_cfg["peft_type"] == "LORA"
    for k in ("r", "lora_alpha", "use_rslora", "use_dora", "lora_bias", "bias", "modules_to_save", "lora_dropout",
              "fan_in_fan_out"):
        assert ours_cfg[k] == peft_cfg[k], k
    assert isinstance(peft.PeftConfig.from_pretrained(tmp_path / "ours"), peft.LoraConfig)


# ------------------------------------------------------------------ PEFT -> ours
PEFT_TO_OURS = [
    ("llama", "lora", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.05)),
    ("llama", "rslora", dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True)),
    ("llama", "dora", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj"], use_dora=True)),
    ("qwen2", "lora+bias", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all")),
    ("gpt2", "dora", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True)),
    ("bert", "rslora", dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], use_rslora=True,
                            layers_to_transform=[1])),
]


@pytest.mark.parametrize("arch,variant,cfg", PEFT_TO_OURS, ids=[f"{a}-{v}" for a, v, _ in PEFT_TO_OURS])
def test_peft_saved_adapter_loads_with_the_same_logits(arch, variant, cfg, tmp_path):
    base = build(arch)
    theirs = _randomize_(_peft_model(copy.deepcopy(base), **cfg)).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert not _logits(ours).allclose(_logits(base))
    _same(_logits(ours), _logits(theirs), f"{arch}/{variant}: PEFT vs peft_kernels.load_adapter")
    n_ours = sum(isinstance(m, LoraLinear) for m in ours.modules())
    n_peft = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in theirs.modules())
    assert n_ours == n_peft
    assert not any(p.requires_grad for p in ours.parameters())  # is_trainable=False: inference

    # And back: our save of the loaded adapter is the same file content.
    save_adapter(ours, tmp_path / "again")
    a = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    b = safetensors_torch.load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_is_trainable_and_a_second_adapter(tmp_path):
    base = build("llama")
    _randomize_(_peft_model(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "a")
    _randomize_(_peft_model(copy.deepcopy(base), r=2, lora_alpha=4, target_modules=["v_proj"]), seed=1) \
        .save_pretrained(tmp_path / "b")
    model = load_adapter(copy.deepcopy(base), tmp_path / "a", is_trainable=True).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    only_a = _logits(model)
    load_adapter(model, tmp_path / "b", adapter_name="other")
    assert lora_methods.active_adapters(model) == ["default"]  # like PeftModel.load_adapter: not activated
    _same(_logits(model), only_a, "second adapter inactive")
    lora_methods.set_adapter(model, "other")
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b").eval()
    _same(_logits(model), _logits(ref), "second adapter active")


def test_loading_into_an_existing_adapter_replaces_its_values_in_place(tmp_path):
    base = build("llama")
    for seed in (0, 1):
        _randomize_(_peft_model(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                use_dora=True), seed=seed).save_pretrained(tmp_path / str(seed))
    model = load_adapter(copy.deepcopy(base), tmp_path / "0").eval()
    params = {n: (p, p.data_ptr()) for n, p in model.named_parameters() if "lora_" in n}
    load_adapter(model, tmp_path / "1")
    assert all(p is dict(model.named_parameters())[n] and p.data_ptr() == ptr for n, (p, ptr) in params.items())
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "1").eval()
    _same(_logits(model), _logits(ref), "replaced adapter")


# ------------------------------------------------------------------ 4-bit bases
def _quantized_and_twin(arch):
    """Our 4-bit model, and a dense twin holding exactly its dequantized weights (float32)."""
    q = build(arch)
    quantize_model(q)
    twin = build(arch)
    with torch.no_grad():
        for name, layer in q.named_modules():
            if isinstance(layer, Linear4bit):
                dense = twin.get_submodule(name)
                w = layer.dequantize(torch.float32)
                dense.weight.copy_(w.t() if type(dense).__name__ == "Conv1D" else w)
    return q, twin


@pytest.mark.parametrize("arch,use_dora", [("llama", True), ("gpt2", False)])
def test_4bit_base_both_ways(arch, use_dora, tmp_path):
    q, twin = _quantized_and_twin(arch)
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora)
    # PEFT (over the dequantized twin) -> our 4-bit model
    theirs = _randomize_(_peft_model(copy.deepcopy(twin), **cfg)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(q), tmp_path / "peft").eval()
    assert all(isinstance(m.base_layer, Linear4bit) for m in ours.modules() if isinstance(m, LoraLinear))
    _same(_logits(ours), _logits(theirs), f"{arch}: PEFT adapter over 4-bit base")
    # our 4-bit model -> PEFT over the dequantized twin
    ours2 = _randomize_(apply(copy.deepcopy(q), LoraConfig(**cfg)), seed=3).eval()
    save_adapter(ours2, tmp_path / "ours")
    theirs2 = peft.PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path / "ours").eval()
    _same(_logits(ours2), _logits(theirs2), f"{arch}: our 4-bit adapter in PEFT")


# ------------------------------------------------------------------ PeftModel conversion
def _read_adapter(directory):
    return (json.loads((Path(directory) / "adapter_config.json").read_text()),
            safetensors_torch.load_file(str(Path(directory) / "adapter_model.safetensors")))


def _assert_same_adapter_files(a, b):
    (ca, ta), (cb, tb) = _read_adapter(a), _read_adapter(b)
    assert ca == cb
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("arch,cfg", [
    ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, bias="lora_only")),
    ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], use_rslora=True, lora_bias=True)),
])
def test_from_peft_model_dense(arch, cfg, tmp_path):
    base = build(arch)
    pm = _randomize_(_peft_model(copy.deepcopy(base), **cfg)).eval()
    before = _logits(pm)
    pm.save_pretrained(tmp_path / "before")
    lora_params = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    grads = {n: p.requires_grad for n, p in pm.named_parameters()}

    assert from_peft_model(pm) is pm
    peft_layer_modules = ("peft.tuners.lora.layer", "peft.tuners.lora.bnb", "peft.tuners.lora.dora")
    assert not any(type(m).__module__ in peft_layer_modules for m in pm.modules())
    fused = [m for m in pm.modules() if isinstance(m, LoraLinear)]
    assert fused and all(isinstance(m, peft.tuners.lora.LoraLayer) for m in fused)
    after = dict(pm.named_parameters())
    assert all(after[n] is p for n, p in lora_params.items())  # the same Parameters, shared
    assert {n: p.requires_grad for n, p in pm.named_parameters()} == grads
    _same(_logits(pm), before, f"{arch}: logits after from_peft_model")

    pm.save_pretrained(tmp_path / "after")  # PEFT's own save still finds every tensor
    _assert_same_adapter_files(tmp_path / "before", tmp_path / "after")
    restored = pickle.loads(pickle.dumps(pm))  # the fused layer class is importable
    _same(_logits(restored), before, f"{arch}: pickled converted model")

    # PEFT's own adapter management keeps working on the fused layers.
    other = _randomize_(_peft_model(copy.deepcopy(base), **{**cfg, "r": 2, "bias": "none"}), seed=5).eval()
    other.save_pretrained(tmp_path / "other")
    pm.load_adapter(tmp_path / "other", adapter_name="other")
    pm.set_adapter("other")
    _same(_logits(pm), _logits(other), f"{arch}: PEFT load_adapter on fused layers")
    with pm.disable_adapter():
        _same(_logits(pm), _logits(base), f"{arch}: PEFT disable_adapter on fused layers")
    pm.set_adapter("default")
    _same(_logits(pm), before, f"{arch}: back to the first adapter")


def _bnb_model(arch, bnb):
    """``arch`` with its linears (not lm_head) as bitsandbytes NF4 layers, quantized on the CPU."""
    model = build(arch)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name != "lm_head":
            layer = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(mod.weight.detach().clone(), requires_grad=False, quant_type="nf4")
            if mod.bias is not None:
                layer.bias = nn.Parameter(mod.bias.detach().clone())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to("cpu"))  # quantizes on the move
    model.is_loaded_in_4bit = True  # how PEFT recognises a bnb 4-bit model
    return model


def test_from_peft_model_over_bitsandbytes_4bit(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    # Every K is a multiple of 64: bnb's CPU dequantization is wrong otherwise (DESIGN.md).
    pm = _randomize_(_peft_model(_bnb_model("qwen2", bnb), r=4, lora_alpha=8, target_modules="all-linear",
                                 use_dora=True))
    pm.train()  # bnb repacks its CPU weights after an eval-mode forward; dropout is 0 here
    before = _logits(pm)
    pm.save_pretrained(tmp_path / "before")
    packed = {n: m.base_layer.weight.data_ptr() for n, m in pm.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}

    from_peft_model(pm)
    layers = {n: m for n, m in pm.named_modules() if isinstance(m, LoraLinear)}
    assert layers.keys() == packed.keys()
    for n, m in layers.items():
        assert isinstance(m.base_layer, Linear4bit) and m.base_layer.weight.data_ptr() == packed[n]  # same bytes
    _same(_logits(pm), before, "qwen2 over bnb 4-bit: logits after from_peft_model")
    pm.save_pretrained(tmp_path / "after")
    _assert_same_adapter_files(tmp_path / "before", tmp_path / "after")


def test_from_peft_model_refuses_what_it_cannot_convert():
    pm = _peft_model(build("llama"), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm.base_model.model.model.layers[1].self_attn.v_proj.merge()
    before = [(n, type(m)) for n, m in pm.named_modules()]
    with pytest.raises(ValueError, match="merged"):
        from_peft_model(pm)
    assert [(n, type(m)) for n, m in pm.named_modules()] == before  # nothing swapped
    with pytest.raises(TypeError, match="PeftModel"):
        from_peft_model(build("llama"))


# ------------------------------------------------------------------ atomic save
def test_save_replaces_atomically_and_keeps_other_files(tmp_path, monkeypatch):
    base = build("llama")
    out = tmp_path / "adapter"
    first = _randomize_(apply(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"])))
    save_adapter(first, out)
    (out / "README.md").write_text("notes")
    (out / "adapter_model.bin").write_bytes(b"stale pickle")
    (out / "other").mkdir()
    (out / "other" / "adapter_config.json").write_text("{}")
    second = _randomize_(apply(copy.deepcopy(base), LoraConfig(r=2, target_modules=["v_proj"])), seed=1)
    save_adapter(second, out, base_model_name_or_path="my/base")
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "other"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "my/base"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging debris
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def failing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(method_files, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(first, out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_save_refuses_bad_state(tmp_path):
    model = apply(build("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        save_adapter(model, tmp_path / "x", adapter_name="nope")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        save_adapter(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    """A PEFT-saved llama adapter (q_proj, v_proj; r=4) and its base."""
    d = tmp_path_factory.mktemp("good")
    base = build("llama")
    _randomize_(_peft_model(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])) \
        .save_pretrained(d)
    return d, base


def _edited(src, dst, *, config=None, tensors=None):
    """A copy of adapter ``src`` in ``dst`` with config fields / tensors changed (None value: removed)."""
    cfg, ts = _read_adapter(src)
    for k, v in (config or {}).items():
        cfg[k] = v
    for k, v in (tensors or {}).items():
        if v is None:
            del ts[k]
        else:
            ts[k] = v
    dst.mkdir()
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    safetensors_torch.save_file(ts, str(dst / "adapter_model.safetensors"))
    return dst


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _bad_cases(good, tmp):
    cfg, ts = _read_adapter(good)
    nan = ts[f"{Q0}.lora_B.weight"].clone()
    nan[1, 2] = float("nan")
    inf = ts[f"{Q0}.lora_A.weight"].clone()
    inf[0, 0] = float("inf")
    gpt2_dir = tmp / "gpt2"
    _randomize_(_peft_model(build("gpt2"), r=4, lora_alpha=8, target_modules=["c_attn"])).save_pretrained(gpt2_dir)
    wide_dir = tmp / "wide"
    _randomize_(_peft_model(build("llama", hidden_size=96), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
                ).save_pretrained(wide_dir)
    pickle_dir = tmp / "pickle"
    pickle_dir.mkdir()
    (pickle_dir / "adapter_config.json").write_text(json.dumps(cfg))
    (pickle_dir / "adapter_model.bin").write_bytes(b"\x80\x04 not really")
    trunc = _edited(good, tmp / "trunc")
    data = (trunc / "adapter_model.safetensors").read_bytes()
    (trunc / "adapter_model.safetensors").write_bytes(data[:-40])
    return {
        "another model": (gpt2_dir, "another model"),
        "another shape": (wide_dir, r"shape \(4, 96\).*another model or shape"),
        "missing key": (_edited(good, tmp / "missing", tensors={f"{Q0}.lora_B.weight": None}),
                        r"missing tensor.*lora_B\.weight.*q_proj"),
        "extra key (DoRA magnitude without use_dora)": (
            _edited(good, tmp / "extra", tensors={f"{Q0}.lora_magnitude_vector": torch.ones(64)}),
            r"unexpected tensor.*lora_magnitude_vector"),
        "extra key (unknown module)": (
            _edited(good, tmp / "extra2", tensors={"base_model.model.model.layers.0.mlp.nope.lora_A.weight":
                                                   torch.zeros(4, 64),
                                                   "base_model.model.model.layers.0.mlp.nope.lora_B.weight":
                                                   torch.zeros(64, 4)}),
            r"does not have.*mlp\.nope"),
        "extra key (base tensor)": (
            _edited(good, tmp / "extra3", tensors={"base_model.model.model.norm.weight": torch.ones(64)}),
            r"unexpected tensor base_model\.model\.model\.norm\.weight"),
        "wrong rank": (_edited(good, tmp / "rank", config={"r": 8}), r"rank 4 but the config says r=8"),
        "NaN": (_edited(good, tmp / "nan", tensors={f"{Q0}.lora_B.weight": nan}), r"lora_B\.weight contains NaN"),
        "Inf": (_edited(good, tmp / "inf", tensors={f"{Q0}.lora_A.weight": inf}), r"lora_A\.weight contains NaN"),
        "integer tensor": (
            _edited(good, tmp / "int", tensors={f"{Q0}.lora_A.weight": torch.zeros(4, 64, dtype=torch.int32)}),
            r"lora_A\.weight has dtype torch\.int32"),
        "config targets more than the file": (
            _edited(good, tmp / "target", config={"target_modules": ["q_proj", "k_proj", "v_proj"]}),
            r"missing the LoRA tensors.*k_proj"),
        "target matching nothing": (_edited(good, tmp / "target2", config={"target_modules": "nothing_here"}),
                                    r"matched no module"),
        "not LoRA": (_edited(good, tmp / "ia3", config={"peft_type": "IA3"}), r"not a LoRA adapter"),
        "unsupported feature": (_edited(good, tmp / "feat", config={"use_qalora": True}), r"use_qalora"),
        "PiSSA": (_edited(good, tmp / "pissa", config={"init_lora_weights": "pissa"}), r"pissa.*convert"),
        "pickle": (pickle_dir, r"pickle.*refusing"),
        "truncated": (trunc, r"not a readable safetensors file"),
        "bad JSON": (_edited(good, tmp / "json"), r"not valid JSON"),
        "no such directory": (tmp / "nowhere", r"no adapter at"),
    }


def test_every_bad_input_is_a_clear_error_and_leaves_the_model_unchanged(good_adapter, tmp_path):
    good, base = good_adapter
    cases = _bad_cases(good, tmp_path)
    (cases["bad JSON"][0] / "adapter_config.json").write_text("{not json")
    # A plain model, a model that already holds another adapter, and a 4-bit one.
    plain = copy.deepcopy(base)
    holding = load_adapter(copy.deepcopy(base), good, adapter_name="first", is_trainable=True)
    q4 = copy.deepcopy(base)
    quantize_model(q4)
    for label, (directory, pattern) in cases.items():
        for model in (plain, holding, q4):
            snap = _snapshot(model)
            with pytest.raises((AdapterLoadError, FileNotFoundError), match=pattern):
                load_adapter(model, directory)
            _assert_unchanged(model, snap)
    # The good adapter still loads into all three afterwards.
    for model in (plain, holding, q4):
        load_adapter(model, good, adapter_name="good")


def test_a_failure_after_the_checks_rolls_everything_back(good_adapter, monkeypatch):
    good, base = good_adapter
    holding = load_adapter(copy.deepcopy(base), good, adapter_name="first", is_trainable=True)
    for model in (copy.deepcopy(base), holding):
        snap = _snapshot(model)
        for fn in ("apply", "add_adapter"):
            def then_fail(*args, _real=getattr(lora_methods, fn), **kwargs):
                _real(*args, **kwargs)  # layers created and swapped in, base frozen ...
                raise RuntimeError("out of memory")  # ... then the load fails

            monkeypatch.setattr(lora_methods, fn, then_fail)
        with pytest.raises(RuntimeError, match="out of memory"):
            load_adapter(model, good, adapter_name="second")
        monkeypatch.undo()
        _assert_unchanged(model, snap)
