"""peft_kernels.methods.lora on tiny transformers models: parity with Hugging Face PEFT (logits and every
gradient, against PEFT run in float64 on the same weights), targeting rules, parameter counts, training,
adapter management, merging, config round trips and bad input."""
import copy

import pytest
import torch
from torch import nn

from _tiny_models import build, sample_ids
from _tolerance import assert_close_to_reference
from peft_kernels.methods import lora as L
from peft_kernels.nn import Linear4bit, LoraLinear, ModulesToSaveWrapper
from peft_kernels.quant.model import quantize_model

peft = pytest.importorskip("peft")
PREFIX = "base_model.model."


def _peft(model, **kw):
    return peft.get_peft_model(model, peft.LoraConfig(**kw))


def _dequantized_twin(q_model, dense_model):
    """``dense_model`` with each weight that ``q_model`` holds in 4-bit replaced by its dequantized value: PEFT
    over it computes what PEFT + bitsandbytes computes over the 4-bit model (dequant(W4) x + LoRA)."""
    for name, m in q_model.named_modules():
        if isinstance(m, Linear4bit):
            tgt = dense_model.get_submodule(name)
            w = m.dequantize(torch.float32)
            tgt.weight.data = (w.t() if type(tgt).__name__ == "Conv1D" else w).to(tgt.weight.dtype).contiguous()
    return dense_model


def _compare_with_peft(ours, theirs, ids, what):
    """Logits and every trainable parameter's gradient of ``ours`` (fp32) vs PEFT's float64 model."""
    ours_names = {k for k, p in ours.named_parameters() if p.requires_grad}
    peft_names = {k.removeprefix(PREFIX) for k, p in theirs.named_parameters() if p.requires_grad}
    assert ours_names == peft_names, ours_names ^ peft_names
    lo = ours(input_ids=ids).logits
    lp = theirs(input_ids=ids).logits
    assert_close_to_reference(lo, lp, torch.float32, f"{what}: logits")
    lo.square().mean().backward()
    lp.square().mean().backward()
    og = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    pg = {k.removeprefix(PREFIX): p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    total = torch.sqrt(sum(g.double().square().sum() for g in pg.values()))
    for k in og:
        if pg[k].norm() < 1e-9 * total:
            # Mathematically zero (e.g. BERT's key bias: softmax is shift-invariant): only rounding noise.
            assert og[k].double().norm() < 1e-6 * total, k
        else:
            assert_close_to_reference(og[k], pg[k], torch.float32, f"{what}: grad {k}")


PARITY = {
    "llama": dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True, use_dora=True),
    "qwen2": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], bias="all",
                  lora_bias=True),
    "gpt2": dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], bias="lora_only"),
    "bert": dict(r=4, lora_alpha=8, target_modules="all-linear", bias="all"),
}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("arch", list(PARITY))
def test_parity_with_peft_logits_and_all_gradients(arch, dropout):
    kw = dict(PARITY[arch], lora_dropout=dropout, init_lora_weights=False)
    base = build(arch)
    ours = L.apply(copy.deepcopy(base), L.LoraConfig(**kw))
    theirs = _peft(copy.deepcopy(base).double(), **kw)
    missing, unexpected = theirs.load_state_dict(
        {PREFIX + k: v.double() for k, v in L.lora_state_dict(ours).items()}, strict=False)
    assert not unexpected
    ours.eval()
    theirs.eval()  # dropout > 0 is the identity in eval mode
    _compare_with_peft(ours, theirs, sample_ids(), f"{arch} p={dropout}")


def test_parity_with_peft_in_training_mode_with_dropout():
    """GPT-2 in train mode (its own dropouts and LoRA dropout): same seed -> same masks as PEFT."""
    kw = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.2, init_lora_weights=False)
    base = build("gpt2")
    ours = L.apply(copy.deepcopy(base), L.LoraConfig(**kw)).train()
    theirs = _peft(copy.deepcopy(base).double(), **kw).train()
    theirs.load_state_dict({PREFIX + k: v.double() for k, v in L.lora_state_dict(ours).items()}, strict=False)
    ids = sample_ids()
    torch.manual_seed(5)
    lo = ours(input_ids=ids).logits
    torch.manual_seed(5)
    lp = theirs(input_ids=ids).logits
    assert_close_to_reference(lo, lp, torch.float32, "train-mode logits")


def test_seq_cls_head_is_saved_like_peft():
    """task_type SEQ_CLS: the classification head joins modules_to_save (PEFT's sequence-classification
    model does this); same state-dict keys, counts, logits and gradients as PEFT."""
    import transformers
    from _tiny_models import tiny_config
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(tiny_config("bert", num_labels=3)).eval()
    kw = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS", init_lora_weights=False)
    ours = L.apply(copy.deepcopy(base), L.LoraConfig(**kw))
    theirs = _peft(copy.deepcopy(base).double(), **kw)
    assert isinstance(ours.classifier, ModulesToSaveWrapper)
    assert not isinstance(ours.classifier.original_module, LoraLinear)
    assert set(ours.state_dict()) == {k.removeprefix(PREFIX) for k in theirs.state_dict()}
    assert L.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    theirs.load_state_dict({PREFIX + k: v.double() for k, v in L.lora_state_dict(ours).items()}, strict=False)
    _compare_with_peft(ours.eval(), theirs.eval(), sample_ids(), "bert seq-cls")


def test_parity_with_peft_over_4bit_base():
    """Ours over quantize_model'd Linear4bit layers vs PEFT over the same dequantized weights."""
    kw = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.1, init_lora_weights=False)
    base = build("llama")
    q = copy.deepcopy(base)
    quantize_model(q)
    twin = _dequantized_twin(q, copy.deepcopy(base))
    ours = L.apply(q, L.LoraConfig(**kw)).eval()
    assert sum(isinstance(m, LoraLinear) and isinstance(m.base_layer, Linear4bit) for m in ours.modules()) == 14
    theirs = _peft(twin.double(), **kw).eval()
    theirs.load_state_dict({PREFIX + k: v.double() for k, v in L.lora_state_dict(ours).items()}, strict=False)
    _compare_with_peft(ours, theirs, sample_ids(), "llama 4-bit")


# ------------------------------------------------------------------ targeting and counts
def _expected_lora_params(model, names, r, dora=False):
    total = 0
    for n in names:
        m = model.get_submodule(n)
        if type(m).__name__ == "Conv1D":
            k, o = m.weight.shape
        else:
            k, o = m.in_features, m.out_features
        total += r * (k + o) + (o if dora else 0)
    return total


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "4bit"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert"])
def test_apply_all_linear_counts_and_freezing(arch, quantized):
    model = build(arch)
    if quantized:
        quantize_model(model)
    head = {"llama": "lm_head", "qwen2": "lm_head", "gpt2": "lm_head", "bert": "cls.predictions.decoder"}[arch]
    linear = [n for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, Linear4bit)) or type(m).__name__ == "Conv1D"]
    want = [n for n in linear if n != head]
    _, total_before = L.trainable_parameters(model)
    L.apply(model, L.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    got = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert got == want and head not in got
    n_lora = _expected_lora_params(build(arch), want, 4, dora=True)
    trainable, total = L.trainable_parameters(model)
    assert (trainable, total) == (n_lora, total_before + n_lora)
    assert all(("lora_" in k) == p.requires_grad for k, p in model.named_parameters())
    if quantized:
        assert all(isinstance(m.base_layer, Linear4bit) for m in model.modules() if isinstance(m, LoraLinear))


def test_counts_and_report_match_peft(capsys):
    kw = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    base = build("llama")
    ours = L.apply(copy.deepcopy(base), L.LoraConfig(**kw))
    theirs = _peft(copy.deepcopy(base), **kw)
    assert L.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    L.print_trainable_parameters(ours)
    theirs.print_trainable_parameters()
    ours_line, peft_line = capsys.readouterr().out.strip().splitlines()
    assert ours_line == peft_line and ours_line.startswith("trainable params: ")
    # The same module tree and parameter names as PEFT (so PEFT tooling reads our state dicts).
    assert set(ours.state_dict()) == {k.removeprefix(PREFIX) for k in theirs.state_dict()}


def test_layers_to_transform_and_patterns():
    model = build("llama")
    L.apply(model, L.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], layers_to_transform=[1],
                                layers_pattern="layers", rank_pattern={"down_proj": 6}, alpha_pattern={"q_proj": 4}))
    got = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert sorted(got) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    assert got["model.layers.1.mlp.down_proj"].r["default"] == 6
    assert got["model.layers.1.self_attn.q_proj"].scaling["default"] == 4 / 2
    model = build("llama")
    L.apply(model, L.LoraConfig(r=2, target_modules=r".*\.0\.self_attn\.(q|k)_proj", exclude_modules=["k_proj"]))
    assert [n for n, m in model.named_modules() if isinstance(m, LoraLinear)] == ["model.layers.0.self_attn.q_proj"]
    model = build("gpt2")  # no target_modules: PEFT's default for the model type
    L.apply(model, L.LoraConfig(r=2))
    assert all(n.endswith("c_attn") for n, m in model.named_modules() if isinstance(m, LoraLinear))


def test_modules_to_save_wrapper():
    model = build("llama")
    L.apply(model, L.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    w = model.lm_head
    assert isinstance(w, ModulesToSaveWrapper) and w.active_adapter == "default"
    assert not w.original_module.weight.requires_grad and w.modules_to_save["default"].weight.requires_grad
    assert w.weight is w.modules_to_save["default"].weight  # attribute reads go to the module in use
    ids = sample_ids()
    with torch.no_grad():
        w.modules_to_save["default"].weight.add_(0.5)
        y = model(input_ids=ids).logits
        with L.disable_adapters(model):
            y0 = model(input_ids=ids).logits
    assert not torch.allclose(y, y0)
    sd = L.lora_state_dict(model)
    assert "lm_head.modules_to_save.default.weight" in sd and "lm_head.original_module.weight" not in sd


def test_training_steps_lower_the_loss_on_4bit_base():
    torch.manual_seed(0)
    model = build("llama")
    quantize_model(model)
    L.apply(model, L.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05))
    model.train()
    ids = sample_ids(batch=4, seq=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


# ------------------------------------------------------------------ adapters and merging
def test_add_set_delete_disable_adapters():
    base = build("qwen2")
    model = L.apply(copy.deepcopy(base), L.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    L.add_adapter(model, L.LoraConfig(r=3, target_modules=["v_proj", "o_proj"], init_lora_weights=False), "second")
    ids = sample_ids()
    with torch.no_grad():
        y_base = base(input_ids=ids).logits
        y1 = model(input_ids=ids).logits
        assert L.active_adapters(model) == ["default"]
        assert not any(p.requires_grad for k, p in model.named_parameters() if ".second." in k)
        L.set_adapter(model, ["default", "second"])
        assert all(p.requires_grad for k, p in model.named_parameters() if ".second." in k)
        y12 = model(input_ids=ids).logits
        with L.disable_adapters(model):
            assert_close_to_reference(model(input_ids=ids).logits, y_base.double(), torch.float32, "disabled")
        assert not torch.allclose(y12, y1)
        L.delete_adapter(model, "second")
        assert_close_to_reference(model(input_ids=ids).logits, y1.double(), torch.float32, "after delete")
        assert not any(".second." in k for k in model.state_dict())
        assert not isinstance(model.model.layers[0].self_attn.o_proj, LoraLinear)  # only 'second' was there
    with pytest.raises(KeyError, match="unknown adapter 'nope'"):
        L.set_adapter(model, "nope")
    with pytest.raises(KeyError, match="unknown adapter 'second'"):
        L.delete_adapter(model, "second")
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        L.add_adapter(model, L.LoraConfig(r=2, target_modules=["q_proj"]), "default")


def test_merge_and_unload_dense_and_4bit():
    ids = sample_ids()
    base = build("llama")
    model = L.apply(copy.deepcopy(base), L.LoraConfig(r=4, target_modules="all-linear", use_dora=True,
                                                      init_lora_weights=False)).eval()
    with torch.no_grad():
        y = model(input_ids=ids).logits
        merged = L.merge_and_unload(model)
        assert not any(isinstance(m, LoraLinear) for m in merged.modules())
        assert_close_to_reference(merged(input_ids=ids).logits, y.double(), torch.float32, "dense merged")
    q = copy.deepcopy(base)
    quantize_model(q)
    with torch.no_grad():
        nf4_err = ((q(input_ids=ids).logits - base(input_ids=ids).logits).norm() / y.norm()).item()
    L.apply(q, L.LoraConfig(r=4, target_modules="all-linear"))
    q.eval()
    with torch.no_grad():
        for n, p in q.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.01)  # a trained-looking adapter (B = 0 would make merging trivial)
        yq = q(input_ids=ids).logits
        with pytest.raises(ValueError, match="4-bit base layers"):
            L.merge_and_unload(q)
        assert any(isinstance(m, LoraLinear) for m in q.modules())  # unchanged by the refusal
        deq = L.merge_and_unload(copy.deepcopy(q), mode="dequantize", dtype=torch.float32)
        assert not any(isinstance(m, (LoraLinear, Linear4bit)) for m in deq.modules())
        assert_close_to_reference(deq(input_ids=ids).logits, yq.double(), torch.float32, "dequantize-merged")
        req = L.merge_and_unload(q, mode="requantize")
        assert sum(isinstance(m, Linear4bit) for m in req.modules()) == 14
        rel = ((req(input_ids=ids).logits - yq).norm() / yq.norm()).item()
        assert rel < 1.5 * nf4_err, (rel, nf4_err)  # one more NF4 rounding of every merged weight


# ------------------------------------------------------------------ config
def test_config_round_trips_through_peft():
    cfg = L.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["v_proj", "q_proj"],
                       use_rslora=True, use_dora=True, bias="lora_only", modules_to_save=["lm_head"],
                       layers_to_transform=[0, 2], layers_pattern="layers", task_type="CAUSAL_LM",
                       base_model_name_or_path="tiny/llama", rank_pattern={"q_proj": 8})
    d = cfg.to_peft_dict()
    assert d["peft_type"] == "LORA" and d["target_modules"] == ["q_proj", "v_proj"]
    pc = peft.LoraConfig(**d)  # PEFT accepts every field we write
    back = L.LoraConfig.from_peft_dict(pc.to_dict())
    assert back == cfg
    assert L.LoraConfig.from_peft_dict(peft.LoraConfig(r=4, target_modules="all-linear").to_dict()).target_modules \
        == "all-linear"
    with pytest.raises(ValueError, match="not a LoRA adapter config"):
        L.LoraConfig.from_peft_dict({"peft_type": "IA3", "r": 4})
    with pytest.raises(ValueError, match="does not implement"):
        L.LoraConfig.from_peft_dict({**d, "layer_replication": [[0, 2]]})


def test_bad_config_and_targets_raise_and_leave_model_unchanged():
    model = build("llama")
    before = set(model.state_dict())
    with pytest.raises(ValueError, match=r"matched no module of LlamaForCausalLM"):
        L.apply(model, L.LoraConfig(target_modules=["qq_proj"]))
    with pytest.raises(ValueError, match="is a LlamaMLP"):
        L.apply(model, L.LoraConfig(target_modules=["mlp"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        L.apply(model, L.LoraConfig(target_modules=["q_proj"], modules_to_save=["nothing_here"]))
    assert set(model.state_dict()) == before and not any(isinstance(m, LoraLinear) for m in model.modules())
    assert get_requires_grad(model) == get_requires_grad(build("llama"))
    for bad in (dict(r=0), dict(lora_dropout=1.5), dict(bias="some"), dict(init_lora_weights="olora"),
                dict(target_modules="q_proj", layers_to_transform=[0]), dict(layers_pattern="layers")):
        with pytest.raises(ValueError):
            L.LoraConfig(**bad)
    with pytest.raises(TypeError, match="peft_kernels LoraConfig"):
        L.apply(model, peft.LoraConfig(r=2))


def get_requires_grad(model):
    return {k: p.requires_grad for k, p in model.named_parameters()}
