"""The fused cross-entropy in training: Trainer (TrainConfig.fused_cross_entropy), train/loss.py and the CLI flag.

The switch on and off must give the same losses and gradients (tolerance policy) on tiny models: LoRA over a
dense Llama, QLoRA with a 4-bit head, prompt tuning (virtual tokens in front), Gemma-2 (tied head, final
logit soft-capping read from its config) and Granite (logit scaling); under bf16/fp16 autocast with loss
scaling; with gradient accumulation. Models the fused path cannot serve fall back to the logits with a
warning; the first step's check against the model's own logits catches logit post-processing the config
does not describe. No [B, T, V] tensor is allocated when it is on.
"""
import math
import warnings

import pytest
import torch
from _alloc_tracker import AllocTracker
from _tiny_models import build, sample_ids
from _tolerance import REL_TOL, assert_close_to_reference, rel_error
from test_trainer import RECORDS, cfg, lora_model

from peft_kernels import cli, demo
from peft_kernels.methods import lora
from peft_kernels.methods.prompt_tuning import PromptTuningConfig, PromptTuningModel
from peft_kernels.nn import Linear4bit
from peft_kernels.quant import quantize_model
from peft_kernels.train import loss as L
from peft_kernels.train.data import IGNORE_INDEX, make_batches, tokenize_records
from peft_kernels.train.trainer import TrainConfig, Trainer
from test_train_data import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def examples():
    return tokenize_records(RECORDS, tiny_tokenizer(), 24)


def _randomize(model, seed=5):
    """Trainable tensors to random values (LoRA's B starts at zero: A's gradient would be 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _models(kind):
    """Two identical models of ``kind`` (one per switch position)."""
    out = []
    for _ in range(2):
        if kind == "lora":
            m = lora_model()
        elif kind == "qlora-4bit-head":
            m = build("llama", seed=0)
            quantize_model(m, skip_modules=())
            assert isinstance(m.lm_head, Linear4bit)
            torch.manual_seed(1)
            lora.apply(m, lora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        elif kind == "prompt":
            torch.manual_seed(3)
            m = PromptTuningModel(build("llama", seed=0), PromptTuningConfig(4))
        else:
            raise ValueError(kind)
        out.append(_randomize(m))
    return out


def _accumulate(model, examples, tmp_path, fused, name, **kw):
    tr = Trainer(model, None, cfg(tmp_path / name, batch_size=2, grad_accum=2, fused_cross_entropy=fused, **kw),
                 examples)
    micro = list(make_batches(examples[:4], 2, packing=False, pad_token_id=0, seed=0, epoch=0))
    loss, n = tr.accumulate_gradients(micro)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return tr, loss / n, grads


# ---------------------------------------------------------------------------- on == off
@pytest.mark.parametrize("kind", ["lora", "qlora-4bit-head", "prompt"])
def test_switch_on_and_off_give_the_same_loss_and_gradients(tmp_path, examples, kind):
    on_model, off_model = _models(kind)
    tr_on, loss_on, g_on = _accumulate(on_model, examples, tmp_path, True, "on")
    tr_off, loss_off, g_off = _accumulate(off_model, examples, tmp_path, False, "off")
    assert tr_on.fused_cross_entropy_active and not tr_off.fused_cross_entropy_active
    assert loss_on == pytest.approx(loss_off, rel=REL_TOL[torch.float32])
    assert g_on.keys() == g_off.keys() and g_on
    for k in g_on:
        assert_close_to_reference(g_on[k], g_off[k], torch.float32, k)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_loss_curve_on_equals_off(tmp_path, examples, precision):
    """Four optimizer steps (accumulation 2, clipping, the GradScaler for fp16): the same loss curve."""
    curves = []
    for fused in (True, False):
        model = lora_model(quant=True)
        tr = Trainer(model, None, cfg(tmp_path / str(fused), max_steps=4, grad_accum=2, precision=precision,
                                      fused_cross_entropy=fused), examples)
        curves.append(tr.train().losses)
        assert tr.fused_cross_entropy_active == fused
        if precision == "fp16":
            assert tr.scaler.get_scale() > 1.0
    tol = REL_TOL[{"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]]
    assert all(math.isfinite(x) for x in curves[0]) and curves[0][-1] < curves[0][0]
    assert rel_error(torch.tensor(curves[0]), torch.tensor(curves[1])) <= tol, curves


# ---------------------------------------------------------------------------- models that post-process logits
def _gemma2():
    import transformers as tf

    c = tf.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64,
                        final_logit_softcapping=2.0)  # a strong cap: logits are ~ +-2 after it
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(c).eval()


def _granite():
    import transformers as tf

    c = tf.GraniteConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, logits_scaling=4.0)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(c).eval()


def _batch(seed=1):
    ids = sample_ids(2, 12, seed=seed)
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _loss_and_grads(model, batch, fused):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = L.causal_lm_loss(model, batch, fused=fused)
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("make", [_gemma2, _granite], ids=["gemma2-softcap-tied", "granite-logits-scaling"])
def test_logit_post_processing_read_from_the_config(make):
    model = make()
    softcap, scale = L.logit_transform(model)
    assert (softcap, scale) in ((2.0, 1.0), (None, 0.25))
    if softcap:
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: dW would reach the embeddings
    batch = _batch()
    want, want_g = _loss_and_grads(model, batch, fused=False)
    got, got_g = _loss_and_grads(model, batch, fused=True)
    assert L.fused_loss_of(model).active and L.fused_loss_of(model).verified
    assert_close_to_reference(got, want, torch.float32, "loss")
    for g, w in zip(got_g, want_g):  # full fine-tuning: every weight, the tied head/embedding included
        assert_close_to_reference(g, w, torch.float32, "grad")


def test_causal_lm_loss_does_not_keep_the_model_alive():
    """The per-model fused-loss state lives on the model: a dropped model is freed (no global table holding it)."""
    import gc
    import weakref

    model = _granite()
    L.causal_lm_loss(model, _batch(), fused=True)
    assert L.fused_loss_of(model) is not None and "_peft_kernels_fused_loss" not in model.state_dict()
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_first_call_check_refuses_unknown_logit_processing(monkeypatch):
    """Without the config's soft-cap the fused loss would be wrong: the check against the model's own logits
    turns it off (with a warning) and the loss comes from the logits."""
    model = _gemma2()
    monkeypatch.setattr(L, "logit_transform", lambda m: (None, 1.0))
    batch = _batch()
    want = L.causal_lm_loss(model, batch, fused=False)
    with pytest.warns(UserWarning, match="fused cross-entropy is off for Gemma2ForCausalLM: its own logits differ"):
        got = L.causal_lm_loss(model, batch, fused=True)
    assert not L.fused_loss_of(model).active
    assert_close_to_reference(got, want.detach(), torch.float32, "loss after fallback")


def test_trainer_falls_back_for_a_hooked_head_and_for_an_adapter_on_the_head(tmp_path, examples):
    # a forward hook that rescales the head's output: found by the first step's check
    model = lora_model()
    model.lm_head.register_forward_hook(lambda mod, args, out: out * 2.0)
    tr = Trainer(model, None, cfg(tmp_path / "a", max_steps=1), examples)
    batch = next(make_batches(examples, 2, packing=False, pad_token_id=0, seed=0, epoch=0))
    with pytest.warns(UserWarning, match="its own logits differ from head"):
        got = tr.loss_sum(batch)
    assert not tr.fused_cross_entropy_active
    with torch.no_grad():
        want = L.causal_lm_loss_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    batch["labels"])
    assert_close_to_reference(got.detach(), want, torch.float32, "loss")
    # LoRA on lm_head: the head is not a plain linear map any more -> refused when the Trainer is built
    model = build("llama")
    lora.apply(model, lora.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.warns(UserWarning, match="its output head is a LoraLinear"):
        tr = Trainer(model, None, cfg(tmp_path / "b", max_steps=1), examples)
    assert not tr.fused_cross_entropy_active
    assert math.isfinite(float(tr.loss_sum(batch).detach()))


# ---------------------------------------------------------------------------- memory
def test_no_batch_by_seq_by_vocab_tensor(tmp_path, examples):
    """With the switch on no [B, T, V] tensor exists in forward or backward; off, the logits are one."""
    found = {}
    for fused in (True, False):
        model = _randomize(lora_model(vocab_size=1000))
        tr = Trainer(model, None, cfg(tmp_path / str(fused), max_steps=1, fused_cross_entropy=fused), examples)
        batch = next(make_batches(examples, 2, packing=False, pad_token_id=0, seed=0, epoch=0))
        b, t = batch["input_ids"].shape
        with AllocTracker() as tracker:
            tr.loss_sum(batch).backward()
        found[fused] = tracker.at_least(b * t * 1000)
    assert not found[True], found[True][:3]
    assert found[False]


# ---------------------------------------------------------------------------- helpers, edge cases, config
def test_causal_lm_loss_helper_and_all_masked():
    model = _randomize(lora_model())
    batch = _batch()
    for reduction in ("mean", "sum"):
        a = L.causal_lm_loss(model, batch, reduction=reduction)
        b = L.causal_lm_loss(model, batch, fused=False, reduction=reduction)
        assert_close_to_reference(a.detach(), b.detach(), torch.float32, reduction)
    masked = dict(batch, labels=torch.full_like(batch["labels"], IGNORE_INDEX))
    assert float(L.causal_lm_loss(model, masked, reduction="sum")) == 0.0
    with pytest.warns(UserWarning, match="no label tokens; the mean loss is 0"):
        loss = L.causal_lm_loss(model, masked)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert float(loss) == 0.0 and all(g is None or not g.any() for g in grads)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        L.causal_lm_loss(model, batch, reduction="none")
    # the summed form from hidden states: virtual positions in front are dropped, shapes are checked
    hidden = torch.randn(2, 15, 64)
    s = L.fused_causal_lm_loss_sum(hidden, model.lm_head, batch["labels"])
    with torch.no_grad():
        want = L.causal_lm_loss_sum(model.lm_head(hidden), batch["labels"])
    assert_close_to_reference(s.detach(), want, torch.float32, "virtual-token alignment")
    with pytest.raises(ValueError, match=r"hidden must be \[B, T', H\]"):
        L.fused_causal_lm_loss_sum(hidden[:, :5], model.lm_head, batch["labels"])


def test_config_switch_and_cli_flag(tmp_path, capsys):
    assert TrainConfig(output_dir="o", max_steps=1).fused_cross_entropy is True
    with pytest.raises(ValueError, match="fused_cross_entropy must be true or false"):
        TrainConfig(output_dir="o", max_steps=1, fused_cross_entropy="yes")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(demo.DEMO_DATA.read_text().splitlines(keepends=True)[:4]))
    out = tmp_path / "run"
    code = cli.main(["train", "--model", str(demo.DEMO_MODEL), "--data", str(data), "--method", "lora", "--max-steps",
                     "1", "--batch-size", "2", "--output-dir", str(out), "--no-progress", "--no-fused-cross-entropy"])
    assert code == 0, capsys.readouterr().err
    import json

    assert json.loads((out / "run_config.json").read_text())["train"]["fused_cross_entropy"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the demo model is served by the fused path: no fallback warning
        model, _ = demo.load_causal_lm(demo.DEMO_MODEL)
        assert L.FusedCausalLMLoss(model).active
