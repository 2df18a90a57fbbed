"""prepare(): quantization + method(s) + gradient checkpointing + freezing, its report and bad input;
methods.registry: configs by name, apply by config, save/load of one or several methods."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from peft_kernels.io.method_files import AdapterLoadError
from peft_kernels.methods import registry
from peft_kernels.methods.bitfit import BitFitConfig
from peft_kernels.methods.lora import LoraConfig
from peft_kernels.methods.prompt_tuning import PromptTuningModel
from peft_kernels.nn.linear4bit import Linear4bit
from peft_kernels.nn.lora import LoraLinear
from peft_kernels.prepare import PrepareReport, prepare
from peft_kernels.quant.model import quantize_model

from _tiny_models import build, sample_ids
from _tolerance import assert_close_to_reference

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


pytestmark = pytest.mark.usefixtures("one_thread")


def _train_step(model, ids):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ====================================================================== prepare
def test_prepare_qlora_report_and_training():
    model, report = prepare(build("llama"), LoraConfig(r=4, target_modules="all-linear"), quantize=True,
                            gradient_checkpointing=True, seq_len=32, batch_size=2)
    assert isinstance(report, PrepareReport)
    linears = [m for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert len(linears) == 14 and all(isinstance(m.base_layer, Linear4bit) for m in linears)
    assert len(report.quantized_layers) == 14
    assert not isinstance(model.lm_head, Linear4bit)                       # the head stays dense
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # r * (in + out) per linear, 2 blocks: q, o 64->64; k, v 64->32; gate, up 64->128; down 128->64
    assert report.trainable == trainable == 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    dense_model, dense_report = prepare(build("llama"), LoraConfig(r=4, target_modules="all-linear"))
    assert report.bits_per_parameter < dense_report.bits_per_parameter
    assert report.total == dense_report.total                             # 4-bit weights count their elements
    assert report.methods == ["lora"] and report.gradient_checkpointing
    assert model.model.gradient_checkpointing and model.config.use_cache is False
    assert report.estimate is not None and report.estimate.total_bytes > 0
    text = str(report)
    assert "trainable params" in text and "bits per parameter" in text and "estimated peak memory" in text
    _train_step(model, sample_ids(2, 12))
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = sample_ids(2, 10)
    grads = []
    for gc in (False, True):
        torch.manual_seed(0)
        model, _ = prepare(build("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"),
                           gradient_checkpointing=gc)
        _train_step(model, ids)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert_close_to_reference(grads[1][n], grads[0][n], torch.float32, n)


def test_composed_methods_train_the_union():
    model, report = prepare(build("llama"), [LoraConfig(r=4), BitFitConfig()], quantize=True)
    names = _trainable_names(model)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert any(n.endswith(".bias") for n in names)            # BitFit's biases survive LoRA's freezing...
    assert report.methods == ["lora", "bitfit"]
    assert registry.applied_methods(model) == ["lora", "bitfit"]
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    _train_step(model, sample_ids(2, 8))


def test_prompt_tuning_composes_last_and_returns_its_wrapper():
    base = build("llama")
    model, report = prepare(base, [{"method": "lora", "r": 2}, {"method": "prompt_tuning", "num_virtual_tokens": 3}])
    assert isinstance(model, PromptTuningModel) and model.base_model is base
    assert registry.applied_methods(model) == ["lora", "prompt_tuning"]
    assert report.trainable == 3 * 64 + 2 * 2 * ((64 + 64) + (64 + 32))  # the prompt + LoRA r=2 on q, v of 2 blocks
    _train_step(model, sample_ids(2, 8))
    assert model.prompt_encoder.embedding.weight.grad is not None


def test_freeze_quantizes_only_frozen_blocks():
    model, report = prepare(build("llama"), {"method": "freeze", "last_k": 1}, quantize=True)
    assert all(isinstance(m, Linear4bit) for n, m in model.model.layers[0].named_modules() if n.endswith("_proj"))
    assert not any(isinstance(m, Linear4bit) for m in model.model.layers[1].modules())
    assert all(p.requires_grad for p in model.model.layers[1].parameters())
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())
    assert len(report.quantized_layers) == 7
    _train_step(model, sample_ids(2, 8))


def test_full_finetuning_when_no_method():
    model, report = prepare(build("llama"))
    assert report.trainable == report.total and report.methods == []
    assert "full fine-tuning" in str(report)


@pytest.mark.parametrize("kwargs,error,needle", [
    ({"quantize": {"blocksize": 64, "bits": 4}}, ValueError, "bits"),
    ({"quantize": "yes"}, ValueError, "quantize must be"),
    ({"precision": "fp8"}, ValueError, "precision"),
    ({"optimizer": "adam"}, ValueError, "optimizer"),
    ({"seq_len": 0}, ValueError, "seq_len"),
    ({"batch_size": -1}, ValueError, "batch_size"),
    ({"gradient_checkpointing": "on"}, ValueError, "gradient_checkpointing"),
    ({"method": {"r": 4}}, ValueError, "'method' key"),
    ({"method": "lorax"}, ValueError, "unknown method 'lorax'"),
    ({"method": {"method": "lora", "rank": 4}}, ValueError, r"unknown lora config key\(s\) \['rank'\]"),
    ({"method": {"method": "lora", "r": -1}}, ValueError, "r must be a positive integer"),
    ({"method": [LoraConfig(), LoraConfig(r=2)]}, ValueError, "more than once"),
    ({"method": [{"method": "prompt_tuning", "num_virtual_tokens": 2}, LoraConfig()]}, ValueError, "must be the last"),
    ({"method": {"method": "prefix_tuning", "num_virtual_tokens": 2}, "gradient_checkpointing": True}, ValueError,
     "prefix tuning does not work with gradient checkpointing"),
    ({"quantize": True, "method": None}, ValueError, "needs a method"),
    ({"method": 3}, TypeError, "not a method config"),
    ({"method": LoraConfig(target_modules=["qq_proj"]), "quantize": True}, ValueError, "qq_proj"),
    ({"method": {"method": "sparse", "target_modules": ["nope"]}, "quantize": True}, ValueError, "nope"),
])
def test_bad_arguments_leave_the_model_unchanged(kwargs, error, needle):
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = kwargs.pop("method", LoraConfig(r=2))
    with pytest.raises(error, match=needle):
        prepare(model, method, **kwargs)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, (LoraLinear, Linear4bit)) for m in model.modules())


def test_prepare_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        prepare("model.safetensors")


# ====================================================================== registry: configs
MINIMAL = {"prompt_tuning": {"num_virtual_tokens": 2}, "prefix_tuning": {"num_virtual_tokens": 2},
           "freeze": {"last_k": 1}}


@pytest.mark.parametrize("name", list(registry.METHODS))
def test_config_from_dict_builds_every_method(name):
    cfg = registry.config_from_dict(name, MINIMAL.get(name, {}))
    assert isinstance(cfg, registry.METHODS[name]) and registry.method_name(cfg) == name
    with pytest.raises(ValueError, match=r"unknown .* key\(s\) \['no_such_key'\]"):
        registry.config_from_dict(name, {**MINIMAL.get(name, {}), "no_such_key": 1})


@pytest.mark.parametrize("name,d,needle", [
    ("lora", {"lora_dropout": 1.5}, "lora_dropout"), ("sparse", {"density": 0}, "density"),
    ("adapter", {"placement": "middle"}, "placement"), ("freeze", {}, "exactly one of"),
    ("prompt_tuning", {}, "num_virtual_tokens"), ("bitfit", {"train_norms": "yes"}, "train_norms"),
    ("lora", {"method": "ia3"}, "names another method"), ("lora", ["r", 4], "mapping"),
])
def test_config_from_dict_bad_values_are_value_errors(name, d, needle):
    with pytest.raises(ValueError, match=needle):
        registry.config_from_dict(name, d)


def test_aliases():
    assert registry.config_from_dict("dora", {"r": 4}).use_dora is True
    assert isinstance(registry.config_from_dict("Prefix-Tuning", {"num_virtual_tokens": 2}),
                      registry.METHODS["prefix_tuning"])


# ====================================================================== registry: files
def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _perturb(model):
    """Give the trainable tensors non-initial values, so a load that silently kept init values fails."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def test_save_load_single_lora_is_peft_format(tmp_path):
    model, _ = prepare(build("llama"), LoraConfig(r=4, target_modules="all-linear"), quantize=True)
    _perturb(model)
    out = registry.save_adapters(model, tmp_path / "a")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (out / "adapter_model.safetensors").is_file()
    fresh = build("llama")
    quantize_model(fresh)  # the same 4-bit base (quantization is deterministic)
    loaded = registry.load_adapters(fresh, out)
    ids = sample_ids(2, 8)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    assert not _trainable_names(loaded)                      # is_trainable=False by default, as PEFT
    trainable = registry.load_adapters(build("llama"), out, is_trainable=True)
    assert any("lora_A" in n for n in _trainable_names(trainable))


@pytest.mark.parametrize("methods", [
    [LoraConfig(r=4), BitFitConfig()],
    [{"method": "ia3"}, {"method": "prompt_tuning", "num_virtual_tokens": 3}],
    [{"method": "adapter", "bottleneck": 8}, {"method": "sparse", "density": 0.05}],
])
def test_save_load_several_methods(tmp_path, methods):
    model, report = prepare(build("llama"), methods)
    _perturb(model)
    out = registry.save_adapters(model, tmp_path / "multi")
    manifest = json.loads((out / registry.MANIFEST_NAME).read_text())
    assert manifest["methods"] == report.methods
    for name in report.methods:
        assert (out / name / "adapter_config.json").is_file()
    loaded = registry.load_adapters(build("llama"), out)
    assert registry.applied_methods(loaded) == registry.applied_methods(model)
    assert not _trainable_names(loaded)
    ids = sample_ids(2, 8)
    assert_close_to_reference(_logits(loaded, ids), _logits(model, ids), torch.float32)
    # is_trainable: every loaded method trains again (a later loader must not freeze an earlier one)
    again = registry.load_adapters(build("llama"), out, is_trainable=True)
    assert _trainable_names(again) == _trainable_names(model)


def test_freeze_save_load_rebuilds_the_frozen_model(tmp_path):
    model, _ = prepare(build("llama"), {"method": "freeze", "last_k": 1}, quantize=True)
    _perturb(model)
    out = registry.save_adapters(model, tmp_path / "f")
    loaded = registry.load_adapters(build("llama"), out)
    ids = sample_ids(2, 8)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)


def test_failed_save_keeps_the_previous_directory(tmp_path):
    model, _ = prepare(build("llama"), [LoraConfig(r=4), BitFitConfig()])
    out = registry.save_adapters(model, tmp_path / "s")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith(".bias") and p.requires_grad).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        registry.save_adapters(model, out)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["s"]     # no staging directory left behind


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        registry.load_adapters(build("llama"), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterLoadError, match="neither"):
        registry.load_adapters(build("llama"), tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(AdapterLoadError, match="LOHA"):
        registry.load_adapters(build("llama"), bad)
    model, _ = prepare(build("llama"), [LoraConfig(r=2), BitFitConfig()])
    out = registry.save_adapters(model, tmp_path / "m")
    (out / registry.MANIFEST_NAME).write_text(json.dumps({"methods": ["lora", "dora"]}))
    with pytest.raises(AdapterLoadError, match="unknown method 'dora'"):
        registry.load_adapters(build("llama"), out)
    other = build("llama", hidden_size=32, intermediate_size=64)
    single, _ = prepare(build("llama"), LoraConfig(r=2))
    path = registry.save_adapters(single, tmp_path / "one")
    with pytest.raises(AdapterLoadError):
        registry.load_adapters(other, path)                   # made for another model
    assert not any(isinstance(m, LoraLinear) for m in other.modules())


def test_save_without_methods_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no PEFT method"):
        registry.save_adapters(build("llama"), tmp_path / "x")


def test_the_estimate_sees_every_switch_prepare_applied():
    """prepare()'s memory estimate is estimate_memory with the same switches: the 4-bit tables, the fused
    modules actually swapped, the loss the Trainer will use."""
    from peft_kernels.train.estimate import estimate_memory

    lora = LoraConfig(r=4, target_modules="all-linear")
    model = build("llama")
    cfg = model.config
    q = {"quantize_embeddings": True, "quantize_head": True}
    _, report = prepare(model, lora, quantize=q, fused_kernels={"rmsnorm": True, "swiglu": False},
                        gradient_checkpointing=True, seq_len=32, fused_cross_entropy=False)
    s = report.estimate.settings
    assert (s["quantize_embeddings"], s["quantize_head"], s["fused_rmsnorm"], s["fused_swiglu"],
            s["fused_cross_entropy"]) == (True, True, True, False, False)
    want = estimate_memory(cfg, method=[lora], seq_len=32, quantize=True, gradient_checkpointing=True, device="cpu",
                           weight_dtype="fp32", fused_cross_entropy=False, quantize_embeddings=True,
                           quantize_head=True, fused_kernels={"rmsnorm": True, "swiglu": False})
    assert report.estimate.total_bytes == want.total_bytes
    # the defaults: the Trainer's fused loss, no other switch
    _, plain = prepare(build("llama"), lora, quantize=True, seq_len=32)
    s = plain.estimate.settings
    assert s["fused_cross_entropy"] is True and not (s["quantize_embeddings"] or s["fused_rmsnorm"] or
                                                     s["fused_swiglu"] or s["offload_activations"])
    with pytest.raises(ValueError, match="fused_cross_entropy must be True or False"):
        prepare(build("llama"), lora, fused_cross_entropy="yes")


def test_bad_fused_kernels_switch_is_refused_before_the_model_changes():
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="fused_kernels switches must be True or False"):
        prepare(model, LoraConfig(r=4), quantize=True, fused_kernels={"rmsnorm": "yes"})
    assert not any(isinstance(m, (Linear4bit, LoraLinear)) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
