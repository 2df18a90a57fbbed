"""peft_kernels.train.trainer / optim / checkpoint: the training loop and its bad-input cases.

Tiny llama models (tests/_tiny_models) with LoRA, dense or over a 4-bit base; the word-level tokenizer
of tests/test_train_data.py; everything on CPU.
"""
import errno
import json
import math
import os
import re
import signal

import pytest
import torch

from peft_kernels.io import method_files
from peft_kernels.methods import lora
from peft_kernels.methods.registry import load_adapters
from peft_kernels.quant import quantize_model
from peft_kernels.train import checkpoint as ckpt
from peft_kernels.train.data import IGNORE_INDEX, make_batches, tokenize_records
from peft_kernels.train.optim import build_optimizer, lr_lambda
from peft_kernels.train.trainer import TrainConfig, Trainer, causal_lm_loss_sum

from _tiny_models import build
from _tolerance import REL_TOL, rel_error
from test_train_data import tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")

RECORDS = [
    {"messages": [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"}]},
    {"messages": [{"role": "user", "content": "what color is the sky"},
                  {"role": "assistant", "content": "the sky is blue"}]},
    {"prompt": "what color is grass", "completion": "grass is green"},
    {"instruction": "say hello", "output": "hello world"},
    {"text": "the cat sat on a mat"},
    {"text": "a dog ran in the park"},
    {"prompt": "what is the answer", "completion": "four is the answer"},
    {"text": "the red cat sat on the blue mat"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def examples(tok):
    return tokenize_records(RECORDS, tok, 24)


def lora_model(*, quant=False, r=4, dropout=0.0, seed=0, **overrides):
    model = build("llama", seed=seed, **overrides)
    if quant:
        quantize_model(model)
    torch.manual_seed(seed + 1)
    lora.apply(model, lora.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules="all-linear"))
    return model


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=4, batch_size=2, lr=1e-2, scheduler="constant",
                progress=False, seq_len=24)
    return TrainConfig(**{**base, **kw})


def trainable_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------- config
def test_config_from_dict_and_bad_values(tmp_path):
    c = TrainConfig.from_dict({"output_dir": str(tmp_path), "max_steps": 10, "precision": "bf16", "packing": True})
    assert c.precision == "bf16" and c.packing and c.grad_accum == 1
    with pytest.raises(ValueError, match=r"unknown train config key\(s\) \['learning_rate', 'stepz'\]"):
        TrainConfig.from_dict({"output_dir": "o", "max_steps": 1, "learning_rate": 1e-3, "stepz": 3})
    with pytest.raises(ValueError, match="missing required key"):
        TrainConfig.from_dict({"output_dir": "o"})
    bad = {"max_steps": 0, "lr": -1.0, "batch_size": True, "scheduler": "cosine_with_restarts",
           "precision": "fp8", "optimizer": "sgd", "warmup_steps": -1, "grad_accum": 1.5, "seq_len": 1,
           "eval_every": 0, "max_grad_norm": float("nan"), "packing": "yes", "keep_last": 0, "distributed": "zero3"}
    for key, value in bad.items():
        with pytest.raises(ValueError, match=f"invalid TrainConfig: {key} must be"):
            TrainConfig(output_dir="o", **{"max_steps": 5, key: value})
    with pytest.raises(ValueError, match=r"warmup_steps \(9\) exceeds max_steps \(5\)"):
        TrainConfig(output_dir="o", max_steps=5, warmup_steps=9)


def test_lr_schedules():
    kw = dict(warmup_steps=2, max_steps=10)
    assert [lr_lambda(s, scheduler="constant", **kw) for s in (0, 1, 2, 9)] == [1 / 3, 2 / 3, 1.0, 1.0]
    assert lr_lambda(2, scheduler="cosine", **kw) == 1.0
    assert lr_lambda(6, scheduler="cosine", **kw) == pytest.approx(0.5)
    assert lr_lambda(10, scheduler="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda(6, scheduler="linear", **kw) == pytest.approx(0.5)
    assert lr_lambda(10, scheduler="linear", **kw) == 0.0
    with pytest.raises(ValueError, match="unknown scheduler"):
        lr_lambda(0, scheduler="step", **kw)


# ---------------------------------------------------------------------------- loss and gradients
def test_grad_accumulation_equals_one_big_batch(tmp_path, examples):
    """4 micro-batches of 1 (different label counts) give the gradient of one batch of 4."""
    model = lora_model()
    with torch.no_grad():  # LoRA's B starts at 0 (A's gradient would be 0): give every adapter a value
        g = torch.Generator().manual_seed(5)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    four = examples[:4]
    assert len({sum(1 for l in e["labels"][1:] if l != IGNORE_INDEX) for e in four}) > 1
    big = next(make_batches(four, 4, packing=False, pad_token_id=0, seed=0, epoch=0))
    micro = list(make_batches(four, 1, packing=False, pad_token_id=0, seed=0, epoch=0))
    trainable = [p for p in model.parameters() if p.requires_grad]

    # reference: mean token cross-entropy of the big batch, straight from transformers' logits
    out = model(input_ids=big["input_ids"], attention_mask=big["attention_mask"])
    ref_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                                 big["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    ref = torch.autograd.grad(ref_loss, trainable)

    tr = Trainer(model, None, cfg(tmp_path, batch_size=1, grad_accum=4), four)
    for p in trainable:
        p.grad = None
    loss_sum, n = tr.accumulate_gradients(micro)
    assert n == sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    assert loss_sum / n == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    worst = max(rel_error(p.grad, r) for p, r in zip(trainable, ref))
    assert worst <= REL_TOL[torch.float32]

    # the naive mean of per-micro-batch means is measurably different (the test can fail)
    naive = [torch.zeros_like(p) for p in trainable]
    for b in micro:
        o = model(input_ids=b["input_ids"])
        lm = causal_lm_loss_sum(o.logits, b["labels"]) / int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) / 4
        for acc, gr in zip(naive, torch.autograd.grad(lm, trainable)):
            acc += gr
    assert max(rel_error(a, r) for a, r in zip(naive, ref)) > 100 * REL_TOL[torch.float32]


def test_packed_rows_keep_examples_apart(examples):
    """A packed row's summed loss equals the sum over its examples run alone (block-diagonal attention)."""
    model = build("llama", seed=3)
    batch = next(make_batches(examples, 1, packing=True, pad_token_id=0, seed=0, epoch=0, seq_len=48))
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3
    with torch.no_grad():
        # use_cache=False as the Trainer passes: with a KV cache transformers does not detect packed rows
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        packed = causal_lm_loss_sum(out.logits, batch["labels"])
        parts = torch.zeros((), dtype=torch.float64)
        for a, b in zip(starts, starts[1:] + [batch["input_ids"].shape[1]]):
            ids, labels = batch["input_ids"][:, a:b], batch["labels"][:, a:b]
            parts += causal_lm_loss_sum(model(input_ids=ids).logits, labels).double()
    assert rel_error(packed, parts) <= REL_TOL[torch.float32]


# ---------------------------------------------------------------------------- training
def test_qlora_trains_only_adapters(tmp_path, tok, examples):
    model = lora_model(quant=True)
    before = trainable_snapshot(model)
    ev = examples[:3]
    logs = []
    tr = Trainer(model, tok, cfg(tmp_path, max_steps=6, eval_every=3, grad_accum=2, packing=True,
                                 scheduler="cosine", warmup_steps=1, progress=True),
                 examples, ev, callbacks=[lambda t, l: logs.append(l)])
    e0 = tr.evaluate()
    res = tr.train()
    assert res.steps == 6 and len(res.losses) == 6 and all(math.isfinite(x) for x in res.losses)
    assert res.eval_losses[-1][1] < e0 and res.losses[-1] < res.losses[0]
    assert res.tokens_per_s > 0 and res.peak_bytes > 0
    assert [l["step"] for l in logs] == list(range(1, 7)) and "eval_loss" in logs[2]
    assert [l["lr"] for l in logs] == pytest.approx([1e-2 * lr_lambda(s, scheduler="cosine", warmup_steps=1,
                                                                     max_steps=6) for s in range(1, 7)])
    for n, p in model.named_parameters():
        same = torch.equal(before[n], p.detach())
        assert same != p.requires_grad, n   # adapters moved, the 4-bit base (and everything else) did not
    assert any(p.dtype == torch.uint8 for p in model.parameters())


def test_progress_bar_shows_loss_tokens_and_memory(tmp_path, examples, capsys):
    tr = Trainer(lora_model(), None, cfg(tmp_path, max_steps=2, progress=True), examples)
    tr.train()
    err = capsys.readouterr().err
    assert "loss=" in err and "tok/s=" in err and "mem=" in err and "2/2" in err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(tmp_path, examples, precision):
    """bf16/fp16 autocast on CPU (fp16 with GradScaler loss scaling); master weights stay fp32."""
    model = lora_model(quant=True)
    tr = Trainer(model, None, cfg(tmp_path, max_steps=4, precision=precision), examples)
    res = tr.train()
    assert all(math.isfinite(x) for x in res.losses) and res.losses[-1] < res.losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert tr.scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":
        assert tr.scaler.get_scale() > 1.0


def test_8bit_optimizers_on_cpu(tmp_path, examples):
    """bitsandbytes 0.50.2 runs AdamW8bit on CPU: 8-bit state for tensors of >= 4096 elements; it
    round-trips through a checkpoint. PagedAdamW8bit falls back to unpaged on CPU with a warning."""
    model = lora_model(r=64)  # lora_A of q_proj: 64 x 64 = 4096 elements -> 8-bit state
    tr = Trainer(model, None, cfg(tmp_path, max_steps=3, optimizer="adamw8bit", save_every=3), examples)
    res = tr.train()
    assert res.losses[-1] < res.losses[0]
    dtypes = {v.dtype for st in tr.optimizer.state.values() for k, v in st.items() if k == "state1"}
    assert torch.uint8 in dtypes
    fresh = Trainer(lora_model(r=64), None, cfg(tmp_path, max_steps=3, optimizer="adamw8bit"), examples)
    fresh.load_checkpoint(res.checkpoint)

    def same(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))

    assert same(tr.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"])
    with pytest.warns(UserWarning, match="paged_adamw8bit .* on CPU it behaves as adamw8bit"):
        opt = build_optimizer(list(lora_model().named_parameters()), "paged_adamw8bit")
    assert type(opt).__name__ == "PagedAdamW8bit"


@pytest.mark.gpu
def test_paged_adamw8bit_on_gpu(tmp_path, examples):
    model = lora_model(quant=True).cuda()
    res = Trainer(model, None, cfg(tmp_path, max_steps=3, optimizer="paged_adamw8bit", precision="bf16"),
                  examples).train()
    assert all(math.isfinite(x) for x in res.losses)


def test_evaluate_is_mean_token_loss(tmp_path, examples):
    model = lora_model()
    ev = examples[:5]
    tr = Trainer(model, None, cfg(tmp_path, batch_size=3), examples, ev)
    total, count = 0.0, 0
    with torch.no_grad():
        for e in ev:
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
            total += float(causal_lm_loss_sum(model(input_ids=ids).logits, labels))
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert tr.evaluate() == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(ValueError, match="no eval examples"):
        Trainer(model, None, cfg(tmp_path), examples).evaluate()


def test_refuses_models_without_trainable_parameters_and_bad_packing(tmp_path, examples):
    frozen = build("llama")
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(frozen, None, cfg(tmp_path), examples)
    from peft_kernels.methods.prompt_tuning import PromptTuningConfig, PromptTuningModel
    wrapped = PromptTuningModel(build("llama"), PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="packing=True cannot be used with prompt_tuning"):
        Trainer(wrapped, None, cfg(tmp_path, packing=True), examples)
    res = Trainer(wrapped, None, cfg(tmp_path, max_steps=2), examples).train()  # padded batches work
    assert len(res.losses) == 2


# ---------------------------------------------------------------------------- checkpoints and resume
def sparse_regrow_model():
    from peft_kernels.methods import sparse

    model = build("llama", seed=0)
    return sparse.apply(model, sparse.SparseConfig(density=0.05, regrow_every=2, regrow_fraction=0.25))


MODELS = {"qlora_dropout": lambda: lora_model(quant=True, dropout=0.2), "sparse_regrow": sparse_regrow_model}


@pytest.mark.parametrize("kind", list(MODELS))
def test_exact_resume_after_interrupt_inside_a_step(tmp_path, tok, examples, kind):
    """Ctrl-C in the middle of step 4 saves step 3's end state; resuming reproduces the uninterrupted loss
    curve and final adapters bit for bit. qlora_dropout: LoRA dropout draws from the RNG, which the checkpoint
    holds. sparse_regrow: drop-and-grow changes the selected positions every 2 steps and draws candidates
    from its own generator, both checkpointed."""
    kw = dict(max_steps=6, grad_accum=2, scheduler="cosine", warmup_steps=2)
    ref_model = MODELS[kind]()
    ref = Trainer(ref_model, tok, cfg(tmp_path / "a", **kw), examples).train()

    model = MODELS[kind]()
    calls = []

    def interrupt(module, args, kwargs):
        calls.append(1)
        if len(calls) == 8:  # the 2nd micro-batch of step 4
            raise KeyboardInterrupt

    h = model.register_forward_pre_hook(interrupt, with_kwargs=True)
    c = cfg(tmp_path / "b", save_every=2, **kw)
    tr = Trainer(model, tok, c, examples)
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    h.remove()
    assert tr.losses == ref.losses[:3]
    assert [s for s, _ in ckpt.list_checkpoints(c.output_dir)] == [2, 3]

    again = MODELS[kind]()
    resumed = Trainer(again, tok, c, examples).train(resume_from="latest")
    assert resumed.losses == ref.losses
    assert resumed.steps == 6
    want = dict(ref_model.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in again.named_parameters() if p.requires_grad)
    if kind == "sparse_regrow":
        b_ref = dict(ref_model.named_buffers())
        idx = {n: b for n, b in again.named_buffers() if n.endswith("delta_indices")}
        assert idx and all(torch.equal(b, b_ref[n]) for n, b in idx.items())
        first = build("llama", seed=0)
        from peft_kernels.methods import sparse
        sparse.apply(first, sparse.SparseConfig(density=0.05, regrow_every=2, regrow_fraction=0.25))
        moved = [n for n, b in idx.items() if not torch.equal(b, dict(first.named_buffers())[n])]
        assert moved  # the selection really changed during training


def test_sigint_from_callback_saves_then_exits(tmp_path, examples):
    def ctrl_c(trainer, logs):
        if logs["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    c = cfg(tmp_path, max_steps=5)
    tr = Trainer(lora_model(), None, c, examples, callbacks=[ctrl_c])
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    data = ckpt.read_checkpoint(ckpt.latest_checkpoint(c.output_dir))
    assert data.step == 2 and data.state["position"] == {"epoch": 0, "index": 2}  # 4 batches an epoch
    assert len(data.state["losses"]) == 2


def test_checkpoint_files_and_adapter(tmp_path, examples):
    model = lora_model(quant=True)
    c = cfg(tmp_path, max_steps=4, save_every=1, keep_last=2)
    res = Trainer(model, None, c, examples).train()
    assert [s for s, _ in ckpt.list_checkpoints(c.output_dir)] == [3, 4]
    assert sorted(os.listdir(c.output_dir)) == ["checkpoint-3", "checkpoint-4"]  # no staging leftovers
    path = tmp_path / "out" / "checkpoint-4"
    assert res.checkpoint == str(path)
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert files == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "state.safetensors",
                     "trainable.safetensors", "trainer_state.json"]
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["config"]["max_steps"] == 4 and len(state["losses"]) == 4
    # the adapter is LoRA in PEFT's format, loadable into a fresh 4-bit model: same logits
    assert json.loads((path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    fresh = build("llama")
    quantize_model(fresh)
    fresh = load_adapters(fresh, path / "adapter")
    ids = torch.tensor([examples[0]["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, fresh.eval()(input_ids=ids).logits)


def test_resume_refuses_another_runs_checkpoint(tmp_path, examples):
    c = cfg(tmp_path)
    tr = Trainer(lora_model(), None, c, examples)
    path = tr.save_checkpoint()
    assert path.name == "checkpoint-0"
    cases = [
        (lora_model(), examples[:-1], {}, "the training data differs"),
        (lora_model(r=2), examples, {}, "the PEFT methods / trainable tensors differ"),
        (lora_model(intermediate_size=96), examples, {}, "the base model differs"),
        (lora_model(), examples, {"batch_size": 4}, "batch settings differ"),
    ]
    for model, ex, over, msg in cases:
        other = Trainer(model, None, cfg(tmp_path, **over), ex)
        with pytest.raises(ckpt.CheckpointError, match=f"written by another run: .*{msg}"):
            other.train(resume_from=path)
    with pytest.raises(ckpt.CheckpointError, match=r"not a complete peft_kernels checkpoint: missing"):
        Trainer(lora_model(), None, c, examples).train(resume_from=tmp_path)
    (tmp_path / "fake").mkdir()
    torch.save({}, tmp_path / "fake" / "optimizer.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"pickle files \['optimizer.pt'\], which are never read"):
        Trainer(lora_model(), None, c, examples).load_checkpoint(tmp_path / "fake")
    # a changed learning rate is allowed, with a warning
    with pytest.warns(UserWarning, match="changed settings .*'lr'"):
        Trainer(lora_model(), None, cfg(tmp_path, lr=1e-3), examples).load_checkpoint(path)


@pytest.mark.parametrize("writer", ["state", "adapter"])
def test_full_disk_while_saving_leaves_previous_checkpoint(tmp_path, examples, monkeypatch, writer):
    c = cfg(tmp_path, max_steps=4, save_every=2)
    saved = {}

    def remember(trainer, logs):
        if logs["step"] == 2:
            p = tmp_path / "out" / "checkpoint-2"
            saved.update({f.name: f.read_bytes() for f in p.rglob("*") if f.is_file()})
            module = ckpt if writer == "state" else method_files
            real = module.save_file

            def full_disk(tensors, filename, metadata=None):
                real(tensors, filename, metadata=metadata)  # a partial file exists when the error comes
                raise OSError(errno.ENOSPC, "No space left on device", filename)

            monkeypatch.setattr(module, "save_file", full_disk)

    tr = Trainer(lora_model(), None, c, examples, callbacks=[remember])
    with pytest.raises(OSError, match="No space left on device"):
        tr.train()
    assert sorted(os.listdir(c.output_dir)) == ["checkpoint-2"]  # no checkpoint-4, no staging directory
    p = tmp_path / "out" / "checkpoint-2"
    assert {f.name: f.read_bytes() for f in p.rglob("*") if f.is_file()} == saved
    assert ckpt.read_checkpoint(p).step == 2


def test_diverged_loss_stops_before_updating(tmp_path, examples):
    model = lora_model()
    name, p = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        p[0, 0] = float("nan")
    before = trainable_snapshot(model)
    tr = Trainer(model, None, cfg(tmp_path, max_steps=3, save_every=1), examples)
    with pytest.raises(FloatingPointError, match="training loss is nan at step 1; the parameters were not updated"):
        tr.train()
    after = trainable_snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before if n != name)
    assert not os.path.exists(c_dir := tmp_path / "out") or not os.listdir(c_dir)


# ====================================================================== optimizer step inside backward
@pytest.mark.parametrize("optimizer,quant", [("adamw", True), ("adamw8bit", False)])
def test_optimizer_in_backward_equals_the_ordinary_step(tmp_path, examples, optimizer, quant):
    """Same losses and parameters, step for step, as the ordinary step (no clipping, one micro-batch), while
    no two gradients of the step are ever alive together; the checkpointed optimizer state is the same."""
    r = 64 if optimizer == "adamw8bit" else 4  # >= 4096 elements: 8-bit state in bitsandbytes
    runs = {}
    for in_bwd in (False, True):
        model = lora_model(quant=quant, r=r)
        params = [p for p in model.parameters() if p.requires_grad]
        worst = [0]

        def watch(p, params=params, worst=worst):  # registered first: runs before the step frees p's gradient
            worst[0] = max(worst[0], sum(1 for q in params if q.grad is not None))
        hooks = [p.register_post_accumulate_grad_hook(watch) for p in params]
        tr = Trainer(model, None, cfg(tmp_path / str(in_bwd), max_steps=3, optimizer=optimizer, max_grad_norm=None,
                                      scheduler="cosine", warmup_steps=1, optimizer_in_backward=in_bwd), examples)
        res = tr.train()
        for h in hooks:
            h.remove()
        runs[in_bwd] = (res.losses, trainable_snapshot(model), tr)
        if in_bwd:
            assert tr.step_in_backward.steps == 3 * len(params)
            assert worst[0] == 1, f"{worst[0]} gradients alive at once"
            assert all(p.grad is None for p in params)
        else:  # the ordinary step holds them all (the comparison can fail)
            assert worst[0] == len(params)
    (l0, p0, t0), (l1, p1, t1) = runs[False], runs[True]
    assert l0 == l1
    assert all(torch.equal(p0[n], p1[n]) for n in p0)
    def same(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))

    assert same(t0.optimizer.state_dict()["state"], t1.optimizer.state_dict()["state"])


def test_optimizer_in_backward_refuses_what_needs_all_gradients(tmp_path, examples):
    for kw, needle in (({"grad_accum": 2}, "grad_accum=2"), ({}, "max_grad_norm=1.0"),
                       ({"precision": "fp16", "max_grad_norm": None}, "precision='fp16'")):
        with pytest.raises(ValueError, match=f"optimizer_in_backward=True cannot be used with {re.escape(needle)}"):
            cfg(tmp_path, optimizer_in_backward=True, **kw)
    with pytest.raises(ValueError, match="optimizer_in_backward must be true or false"):
        cfg(tmp_path, optimizer_in_backward="yes")


def test_optimizer_in_backward_skips_a_diverged_step(tmp_path, examples):
    model = lora_model()
    name, p = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        p[0, 0] = float("nan")
    before = trainable_snapshot(model)
    tr = Trainer(model, None, cfg(tmp_path, max_steps=2, max_grad_norm=None, optimizer_in_backward=True), examples)
    with pytest.raises(FloatingPointError, match="training loss is nan at step 1; the parameters were not updated"):
        tr.train()
    after = trainable_snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before if n != name)
    assert tr.step_in_backward.steps == 0


def test_step_in_backward_does_not_keep_the_model_alive():
    """The per-parameter hooks sit on the tensors, out of the garbage collector's sight: they must hold the
    StepInBackward weakly, or a dropped model + optimizer would never be freed."""
    import gc
    import weakref

    from peft_kernels.train.optim import StepInBackward

    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sib = StepInBackward(opt)
    sib.active = True
    w0 = model.weight.detach().clone()
    model(torch.randn(2, 8)).sum().backward()
    assert sib.steps == 2 and model.weight.grad is None and not torch.equal(model.weight, w0)
    alive = weakref.ref(model.weight)
    del model, opt, sib
    gc.collect()
    assert alive() is None
