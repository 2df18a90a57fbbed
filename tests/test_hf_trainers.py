"""A model prepared by peft_kernels (4-bit NF4 base + our LoRA) trains under transformers' Trainer and
TRL's SFTTrainer unchanged: the loss goes down and only the adapter tensors change."""
import pytest
import torch

from peft_kernels.methods import lora
from peft_kernels.quant import quantize_model
from peft_kernels.train.data import make_batches, tokenize_records
from peft_kernels.train.trainer import causal_lm_loss_sum

from _tiny_models import build
from test_train_data import tiny_tokenizer

PAIRS = [("what is two plus two", "four"), ("what color is the sky", "the sky is blue"),
         ("what color is grass", "grass is green"), ("say hello", "hello world"),
         ("what is the answer", "four is the answer"), ("what color is the mat", "the mat is red")]


pytestmark = pytest.mark.usefixtures("one_thread")


def qlora_model():
    model = build("llama", seed=0)
    quantize_model(model)
    torch.manual_seed(1)
    lora.apply(model, lora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return model


def state(model):
    return {**{n: p.detach().clone() for n, p in model.named_parameters()},
            **{n: b.detach().clone() for n, b in model.named_buffers()}}


def mean_loss(model, examples):
    batch = next(make_batches(examples, len(examples), packing=False, pad_token_id=0, seed=0, epoch=0))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return float(causal_lm_loss_sum(logits, batch["labels"])) / int((batch["labels"][:, 1:] != -100).sum())


def check_only_adapters_changed(before, model):
    after = state(model)
    assert before.keys() == after.keys()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    changed = {n for n in after if not torch.equal(before[n], after[n])}
    # every lora_B moved off zero (so each adapter trained); nothing outside the adapters changed
    assert {n for n in trainable if "lora_B" in n} <= changed
    assert changed <= trainable, sorted(changed - trainable)[:5]
    assert any(t.dtype == torch.uint8 for n, t in after.items())  # the base is still 4-bit


def test_transformers_trainer(tmp_path):
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok = tiny_tokenizer()
    examples = tokenize_records([{"prompt": p, "completion": c} for p, c in PAIRS], tok, 32)
    model = qlora_model()
    before, loss0 = state(model), mean_loss(model, examples)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=3,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, bf16=False, fp16=False, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10
    assert mean_loss(model, examples) < loss0 - 0.25  # from ~4.77 (ln 128 = 4.85)
    check_only_adapters_changed(before, model)


def test_trl_sft_trainer(tmp_path):
    import datasets
    from trl import SFTConfig, SFTTrainer

    tok = tiny_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
            for p, c in PAIRS]
    model = qlora_model()
    examples = tokenize_records([{"prompt": p, "completion": c} for p, c in PAIRS], tok, 32)
    before, loss0 = state(model), mean_loss(model, examples)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=3, learning_rate=1e-2,
                     lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                     use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, bf16=False, fp16=False,
                     max_length=32, seed=0, activation_checkpointing=True,
                     activation_checkpointing_kwargs={"use_reentrant": False})
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok)
    # TRL renders the conversations with the tokenizer's chat template and masks the prompt: the same
    # input_ids and labels as peft_kernels.train.data gives for the same pairs
    assert [r["input_ids"] for r in trainer.train_dataset] == [e["input_ids"] for e in examples]
    assert [r["labels"] for r in trainer.train_dataset] == [e["labels"] for e in examples]
    trainer.train()
    assert model.is_activation_checkpointing  # TRL turned transformers' checkpointing on over our layers
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10
    assert mean_loss(model, examples) < loss0 - 0.25  # from ~4.77 (ln 128 = 4.85)
    check_only_adapters_changed(before, model)
