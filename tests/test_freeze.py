"""Layer freezing (methods/freeze.py): selectors, 4-bit frozen blocks, training, LISA, files, bad input."""
import json

import pytest
import torch
from torch import nn

from peft_kernels.io.method_files import AdapterLoadError, read_method_files, write_method_files
from peft_kernels.methods.freeze import (FreezeConfig, LisaSchedule, apply, load_trained_layers,
                                         save_trained_layers)
from peft_kernels.nn.linear4bit import Linear4bit

from _tiny_models import build, sample_ids
from _tolerance import assert_close_to_reference, rel_error

# ----------------------------------------------------------------------------- expected counts
# Derived from the tiny configs' sizes (tests/_tiny_models.py), not from the models' parameters.
H, INTER, V, KV = 64, 128, 128, 32          # hidden, llama intermediate, vocab, llama k/v width (2 of 4 heads)
NPOS = 64                                   # gpt2 n_positions
SIZES = {
    "llama": dict(block=2 * H * H + 2 * H * KV + 3 * H * INTER + 2 * H, emb=V * H, head=V * H, norm=H,
                  mlp=3 * H * INTER, attn=2 * H * H + 2 * H * KV),
    "gpt2": dict(block=(H * 3 * H + 3 * H) + (H * H + H) + (H * 4 * H + 4 * H) + (4 * H * H + H) + 4 * H,
                 emb=V * H + NPOS * H, head=V * H, norm=2 * H,
                 mlp=(H * 4 * H + 4 * H) + (4 * H * H + H), attn=(H * 3 * H + 3 * H) + (H * H + H)),
}
TOTAL = {a: 2 * s["block"] + s["emb"] + s["norm"] + (s["head"] if a == "llama" else 0) for a, s in SIZES.items()}
ATTN_1 = r"(model\.layers|transformer\.h)\.1\.(self_attn|attn)"   # a regex: the attention of block 1

# (config kwargs, expected trainable count per arch, blocks that keep dense linears)
CASES = {
    "index": (dict(layers=[0]), lambda s, a: s["block"], {0}),
    "negative+head": (dict(layers=[-1], train_head=True), lambda s, a: s["block"] + s["head"], {1}),
    "last_k+emb+norm": (dict(last_k=2, train_embeddings=True, train_norms=True),
                        lambda s, a: 2 * s["block"] + s["emb"] + s["norm"], {0, 1}),
    # gpt2's head is tied to wte: training the embeddings already trains it.
    "last_k+emb+head": (dict(last_k=1, train_embeddings=True, train_head=True),
                        lambda s, a: s["block"] + s["emb"] + (s["head"] if a == "llama" else 0), {1}),
    "pattern": (dict(layer_patterns=["mlp"]), lambda s, a: 2 * s["mlp"], set()),
    "regex": (dict(layer_patterns=[ATTN_1]), lambda s, a: s["attn"], set()),
}


def _stack(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def _dense_type(arch):
    return nn.Linear if arch == "llama" else type(build("gpt2").transformer.h[0].attn.c_attn)


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("case", list(CASES))
def test_exact_trainable_counts_and_placement(arch, case):
    kwargs, expect, dense_blocks = CASES[case]
    model = build(arch)
    report = apply(model, FreezeConfig(**kwargs))
    sizes = SIZES[arch]
    want = expect(sizes, arch)
    assert report.trainable_params == want
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == want
    assert report.total_params == TOTAL[arch]
    if report.quantized:
        assert report.bytes_after < report.bytes_before
        assert report.bits_per_parameter_after < report.bits_per_parameter_before
    else:  # every block trains: nothing to quantize
        assert report.bytes_after == report.bytes_before and dense_blocks == {0, 1}
    linear_t = _dense_type(arch)
    for i, block in enumerate(_stack(model)):
        for name, m in block.named_modules():
            if not isinstance(m, (linear_t, Linear4bit)):
                continue
            trains = any(p.requires_grad for p in m.parameters())
            if i in dense_blocks or trains:
                assert type(m) is linear_t, f"block {i} {name}: trained linear must stay dense"
                assert trains
            else:
                assert isinstance(m, Linear4bit), f"block {i} {name}: frozen linear must be 4-bit"
                assert not m.bias.requires_grad if m.bias is not None else True
    # Embeddings and the head stay dense whether they train or not.
    assert type(model.get_output_embeddings()) is nn.Linear
    assert model.get_input_embeddings().weight.is_floating_point()
    if arch == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight  # still tied


def test_pattern_report_names_outermost_modules():
    model = build("llama")
    report = apply(model, FreezeConfig(layer_patterns=["mlp", "layers.1.mlp.up_proj", "post_attention_layernorm"]))
    assert report.trainable_modules == ["model.layers.0.mlp", "model.layers.0.post_attention_layernorm",
                                        "model.layers.1.mlp", "model.layers.1.post_attention_layernorm"]
    assert report.trainable_params == 2 * (SIZES["llama"]["mlp"] + H)
    assert report.trainable_layers == [0, 1]
    assert all(isinstance(model.get_submodule(f"model.layers.{i}.self_attn.{n}"), Linear4bit)
               for i in (0, 1) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))


def test_report_names_layers_and_bytes():
    model = build("llama")
    report = apply(model, FreezeConfig(layers=[1]))
    assert report.trainable_layers == [1] and report.frozen_layers == [0]
    assert report.trainable_modules == ["model.layers.1"]
    assert sorted(report.quantized) == sorted(f"model.layers.0.{n}" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    # Block 0's fp32 weights became NF4 + double quantization, per layer of n weights: n/2 packed bytes,
    # n/64 uint8 absmax, one float32 per 256 absmax, a 16-entry float32 code book and the 256-entry
    # float32 map of the nested absmax.
    shapes = [(H, H), (KV, H), (KV, H), (H, H), (INTER, H), (INTER, H), (H, INTER)]
    nf4 = sum(n * k // 2 + n * k // 64 + 4 * -(-(n * k // 64) // 256) + 16 * 4 + 256 * 4 for n, k in shapes)
    assert report.bytes_before - report.bytes_after == sum(4 * n * k for n, k in shapes) - nf4
    assert report.quantization.quantized_weight_bytes == nf4
    assert "trainable params: 36,992" in str(report)
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "lora_A")


def test_no_quantization_when_disabled():
    model = build("llama")
    report = apply(model, FreezeConfig(layers=[1], quantize_frozen=False))
    assert report.quantized == [] and report.quantization is None
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    assert report.trainable_params == SIZES["llama"]["block"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantized_frozen_model_equals_dequantized_reference(arch):
    model = build(arch)
    report = apply(model, FreezeConfig(layers=[1]))
    ref = build(arch).double()
    for name in report.quantized:
        w = model.get_submodule(name).dequantize(torch.float32).double()  # [out, in], exact in fp32
        dense = ref.get_submodule(name)
        with torch.no_grad():
            dense.weight.copy_(w if isinstance(dense, nn.Linear) else w.t())  # Conv1D stores [in, out]
    ids = sample_ids(2, 10)
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = ref(input_ids=ids).logits
        unquantized = build(arch)(input_ids=ids).logits
    assert_close_to_reference(got, want, torch.float32, f"{arch} logits")
    # The comparison can tell: the unquantized model is far off the reference.
    assert rel_error(unquantized, want) > 1e-3


@pytest.mark.parametrize("arch,kwargs", [("llama", dict(layers=[0])),
                                         ("gpt2", dict(layers=[1], train_embeddings=True))])
def test_training_lowers_loss_and_changes_only_trainable(arch, kwargs):
    torch.manual_seed(0)
    model = build(arch)
    apply(model, FreezeConfig(**kwargs))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = sample_ids(2, 12)
    losses = []
    for _ in range(4):
        loss = _loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = model.state_dict()
    for k, v in after.items():
        if k in trainable:
            assert not torch.equal(v, before[k]), f"{k} trains but did not change"
        else:
            assert torch.equal(v, before[k]), f"{k} is frozen but changed"
    assert any(k.endswith("weight.absmax") for k in after)  # the 4-bit tensors were part of the check


# ----------------------------------------------------------------------------- LISA
def _lisa_model(seed=0):
    return build("llama", seed=seed, num_hidden_layers=4)


def _run(schedule, steps):
    seq, flags = [], []
    for _ in range(steps):
        flags.append(schedule.step())
        seq.append(schedule.active)
    return seq, flags


def test_lisa_active_set_schedule_and_flags():
    model = _lisa_model()
    lisa = LisaSchedule(model, n_active=2, every=3, seed=1)
    first = lisa.active
    seq, flags = _run(lisa, 30)
    assert flags == [(t + 1) % 3 == 0 for t in range(30)]
    states = [first] + seq
    for t in range(1, 31):
        assert len(states[t]) == 2 and set(states[t]) <= {0, 1, 2, 3}
        if t % 3:
            assert states[t] == states[t - 1], f"active set changed at step {t}, not a multiple of 3"
    assert len(set(states)) >= 3
    stack = _stack(model)
    for i, block in enumerate(stack):
        assert all(p.requires_grad == (i in lisa.active) for p in block.parameters())
    assert model.model.embed_tokens.weight.requires_grad and model.lm_head.weight.requires_grad
    assert not model.model.norm.weight.requires_grad
    # Seeded: the same seed gives the same sequence, another seed another one.
    again = LisaSchedule(_lisa_model(), n_active=2, every=3, seed=1)
    assert [again.active] + _run(again, 30)[0] == states
    other = LisaSchedule(_lisa_model(), n_active=2, every=3, seed=2)
    assert [other.active] + _run(other, 30)[0] != states


def test_lisa_state_dict_resume_gives_same_sequence():
    a = LisaSchedule(_lisa_model(), n_active=1, every=2, seed=7)
    _run(a, 7)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-serialisable
    rest_a = _run(a, 20)[0]
    model_b = _lisa_model()
    b = LisaSchedule(model_b, n_active=1, every=2, seed=123)
    b.load_state_dict(state)
    assert b.active == tuple(state["active"]) and b.step_count == 7
    for i, block in enumerate(_stack(model_b)):
        assert all(p.requires_grad == (i in b.active) for p in block.parameters())
    assert _run(b, 20)[0] == rest_a
    with pytest.raises(ValueError, match="n_active"):
        LisaSchedule(_lisa_model(), n_active=2, every=2).load_state_dict(state)
    wrong = dict(state, active=[i for i in range(4) if i not in state["active"]][:1])
    with pytest.raises(ValueError, match="inconsistent"):
        LisaSchedule(_lisa_model(), n_active=1, every=2).load_state_dict(wrong)


def test_lisa_optimizer_state_and_frozen_params_untouched():
    model = _lisa_model()
    lisa = LisaSchedule(model, n_active=1, every=2, seed=3)
    params = lisa.parameters()
    assert len(params) == 4 * len(list(_stack(model)[0].parameters())) + 2  # 4 blocks + embeddings + head
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # built once, over every candidate
    stack = _stack(model)
    ids = sample_ids(2, 12)
    losses, switches = [], 0
    for _ in range(8):
        inactive = {id(p): p.detach().clone() for i, b in enumerate(stack) if i not in lisa.active
                    for p in b.parameters()}
        active = {id(p): p.detach().clone() for i in lisa.active for p in stack[i].parameters()}
        loss = _loss(model, ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        for p in model.parameters():
            if id(p) in inactive:
                # weight decay would move them if AdamW touched them: it skips params whose grad is None
                assert torch.equal(p, inactive[id(p)])
                assert p not in opt.state
            if id(p) in active:
                assert not torch.equal(p, active[id(p)])
        old = set(lisa.active)
        resampled = lisa.step(opt)
        new = set(lisa.active)
        if resampled and old != new:
            switches += 1
            for i in old - new:
                for p in stack[i].parameters():
                    assert not p.requires_grad and p.grad is None and p not in opt.state
            for i in new - old:
                for p in stack[i].parameters():
                    assert p.requires_grad and p not in opt.state  # fresh: AdamW starts it at step 0
        opt.zero_grad()  # after lisa.step: the grads of deactivated blocks were already dropped by it
        # The optimizer holds state only for what trains now (and what trained since the last switch).
        assert all(p.requires_grad for p in opt.state)
    assert switches >= 1, "the seed must produce at least one switch for this test to mean anything"
    # a block that started fresh has counted only its own steps
    steps = {int(opt.state[p]["step"]) for i in lisa.active for p in stack[i].parameters()}
    assert steps and max(steps) < 8
    assert int(opt.state[model.lm_head.weight]["step"]) == 8  # always trainable: never reset
    assert losses[-1] < losses[0], losses


def test_lisa_refuses_optimizer_without_candidates():
    model = _lisa_model()
    lisa = LisaSchedule(model, n_active=1, every=1, seed=0)
    opt = torch.optim.AdamW(lisa.active_parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="schedule.parameters"):
        lisa.step(opt)


def test_lisa_with_quantized_non_candidates():
    model = _lisa_model()
    apply(model, FreezeConfig(layers=[2, 3]))          # blocks 0, 1 frozen in 4-bit
    with pytest.raises(ValueError, match=r"candidate blocks \[0, 1\] hold 4-bit layers"):
        LisaSchedule(model, n_active=1, every=2)
    lisa = LisaSchedule(model, n_active=1, every=2, candidates=[2, -1], always_trainable=())
    assert lisa.candidates == [2, 3] and lisa.active[0] in (2, 3)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == SIZES["llama"]["block"]


# ----------------------------------------------------------------------------- files
def test_save_load_round_trip(tmp_path):
    cfg = FreezeConfig(layers=[1], train_head=True)
    model = build("llama")
    apply(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = sample_ids(2, 12)
    for _ in range(2):
        _loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    save_trained_layers(model, tmp_path / "ft")
    config, tensors = read_method_files(tmp_path / "ft")
    assert config["peft_type"] == "LAYER_FREEZE" and config["trained_layers"] == [1]
    assert config["freeze_config"]["layers"] == [1]
    assert set(tensors) == {n for n, p in model.named_parameters() if p.requires_grad}
    fresh = build("llama")
    apply(fresh, cfg)
    loaded = load_trained_layers(fresh, tmp_path / "ft")
    assert loaded == sorted(tensors)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)


def test_lisa_save_covers_every_candidate(tmp_path):
    model = _lisa_model()
    LisaSchedule(model, n_active=1, every=2)
    save_trained_layers(model, tmp_path / "lisa")
    config, tensors = read_method_files(tmp_path / "lisa")
    assert config["trained_layers"] == [0, 1, 2, 3] and config["lisa"]["n_active"] == 1
    assert len(tensors) == sum(1 for _ in model.parameters()) - 1  # all but the final norm


def test_load_refuses_another_model_and_leaves_model_unchanged(tmp_path):
    model = build("llama")
    apply(model, FreezeConfig(layers=[1]))
    save_trained_layers(model, tmp_path / "ft")
    for other in (build("llama", num_hidden_layers=3), build("gpt2")):
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(AdapterLoadError, match="made for another model"):
            load_trained_layers(other, tmp_path / "ft")
        assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    # One bad tensor among good ones: nothing is copied.
    config, tensors = read_method_files(tmp_path / "ft")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    tensors["model.layers.1.self_attn.q_proj.weight"] = torch.ones(H, H)
    write_method_files(tmp_path / "bad", config, tensors)
    target = build("llama")
    apply(target, FreezeConfig(layers=[1]))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(AdapterLoadError, match=r"up_proj.weight: shape \(3, 3\)"):
        load_trained_layers(target, tmp_path / "bad")
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    # Trained layers loaded into a model where that layer is 4-bit.
    quant0 = build("llama")
    apply(quant0, FreezeConfig(layers=[0]))
    with pytest.raises(AdapterLoadError, match="4-bit"):
        load_trained_layers(quant0, tmp_path / "ft")
    write_method_files(tmp_path / "bitfit", dict(config, peft_type="BITFIT"), tensors)
    with pytest.raises(AdapterLoadError, match="peft_type"):
        load_trained_layers(build("llama"), tmp_path / "bitfit")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=[0], last_k=1), "exactly one of layers, layer_patterns, last_k; got layers, last_k"),
    (dict(layers=[0], layer_patterns=["mlp"]), "exactly one"),
    (dict(), "got none"),
    (dict(layers=[]), "layers is empty"),
    (dict(last_k=0), "last_k must be a positive int"),
    (dict(layer_patterns=["mlp("]), "not a valid regular expression"),
    (dict(layer_patterns=["layers..1"]), "empty name component"),
    (dict(layers=[0], quant_type="int4"), "quant_type"),
    (dict(layers=[0], blocksize=48), "blocksize"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FreezeConfig(**kwargs)
    with pytest.raises(TypeError, match="ints"):
        FreezeConfig(layers=[0.5])


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=[2]), r"layers \[2\] do not exist: model.layers has 2 layers"),
    (dict(layers=[0, -3]), r"layers \[-3\] do not exist"),
    (dict(layers=[1, -1]), "names layer 1 twice"),
    (dict(last_k=3), "last_k=3 but model.layers has only 2 layers"),
    (dict(layer_patterns=["mlp", "ffn"]), "'ffn' matches no module inside model.layers"),
    (dict(layer_patterns=["lm_head"]), "outside the stack"),
    (dict(layer_patterns=["act_fn"]), "only modules without parameters"),
])
def test_bad_selection_leaves_model_untouched(kwargs, match):
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        apply(model, FreezeConfig(**kwargs))
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_model_parts_and_requantizing():
    with pytest.raises(ValueError, match="no norm module next to its layer stack"):
        apply(build("bert"), FreezeConfig(layers=[0], train_norms=True))
    model = build("llama")
    apply(model, FreezeConfig(layers=[1]))
    with pytest.raises(ValueError, match="model.layers.0 is chosen to train but holds 4-bit layers"):
        apply(model, FreezeConfig(layers=[0]))


def test_bad_lisa_arguments():
    model = _lisa_model()
    with pytest.raises(ValueError, match=r"n_active=5 but only 4 blocks can be sampled"):
        LisaSchedule(model, n_active=5, every=2)
    with pytest.raises(ValueError, match=r"candidates \[4\] do not exist"):
        LisaSchedule(model, n_active=1, every=2, candidates=[0, 4])
    with pytest.raises(ValueError, match="every must be a positive int"):
        LisaSchedule(model, n_active=1, every=0)
    with pytest.raises(ValueError, match="always_trainable entries"):
        LisaSchedule(model, n_active=1, every=2, always_trainable=("lm_head",))
