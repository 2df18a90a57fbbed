"""Trainable token rows on a tiny 4-bit Llama: only the chosen rows train, tied and untied heads, and
Hugging Face PEFT's TRAINABLE_TOKENS files in both directions (PEFT on the dense dequantized model)."""
from __future__ import annotations

import json

import pytest
import torch

from peft_kernels.io.method_files import AdapterLoadError
from peft_kernels.methods.trainable_tokens import add_trainable_tokens, load_trainable_tokens, save_trainable_tokens
from peft_kernels.nn import Embedding4bit
from peft_kernels.ops.functional import embedding_4bit
from peft_kernels.quant.model import quantize_model

from _tiny_models import VOCAB, build, sample_ids
from _tolerance import assert_close_to_reference
from _weights import weight64

peft = pytest.importorskip("peft")
NEW = 2


def _models(tied):
    """(the 4-bit model, a float64 dense model holding its dequantized tables), after adding NEW tokens."""
    model = build("llama", tie_word_embeddings=tied)
    model.resize_token_embeddings(VOCAB + NEW, mean_resizing=False)
    dense = build("llama", tie_word_embeddings=tied)
    dense.resize_token_embeddings(VOCAB + NEW, mean_resizing=False)
    quantize_model(model, quantize_embeddings=True, quantize_head=True, target_modules=["q_proj"])
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if "q_proj" not in k and "embed" not in k
                           and "lm_head" not in k}, strict=False)
    dense = dense.double()
    with torch.no_grad():
        for name in ("model.embed_tokens", "lm_head") + tuple(f"model.layers.{i}.self_attn.q_proj" for i in range(2)):
            dense.get_submodule(name).weight.copy_(weight64(model.get_submodule(name)))
    return model, dense


def _ids():
    return torch.cat([sample_ids(), torch.tensor([[VOCAB, VOCAB + 1, 3]] * 2)], 1)


@pytest.mark.parametrize("tied", (False, True))
def test_only_the_chosen_rows_get_gradients(tied):
    model, _ = _models(tied)
    for p in model.parameters():
        p.requires_grad_(False)
    report = add_trainable_tokens(model, token_ids=[VOCAB + 1, VOCAB, 4])
    assert report.token_indices == [4, VOCAB, VOCAB + 1] and report.tied == tied
    h = model.config.hidden_size
    assert report.trainable_params == (1 if tied else 2) * 3 * h and report.bytes == 4 * report.trainable_params
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    model(ids).logits.sum().backward()
    named = {n: p for n, p in model.named_parameters() if p.grad is not None}
    assert set(named) == {"model.embed_tokens.trainable_tokens_delta"} | (set() if tied
                                                                          else {"lm_head.trainable_tokens_delta"})
    g = named["model.embed_tokens.trainable_tokens_delta"].grad
    # id 4 is not in the batch: its embedding row gets no gradient, unless the (tied) head's logit uses it
    assert (g[0].abs().sum() > 0) == tied and g[1:].abs().min() > 0
    if not tied:
        assert named["lm_head.trainable_tokens_delta"].grad.abs().min() > 0  # every logit column is used
    # untrained rows are the frozen rows (bit for bit), so the model is unchanged by adding them: every
    # logit column the rows do not replace is bit-identical; a replaced column is x R^T computed by a GEMM
    # over n rows instead of V, whose summation order (so its last bit) depends on the CPU's BLAS kernel
    for m in (model.model.embed_tokens,) + (() if tied else (model.lm_head,)):
        frozen = embedding_4bit(m.trainable_token_indices, m.weight, m.quant_state, torch.float32)
        assert torch.equal(m.trainable_tokens_delta.detach(), frozen)
    model.zero_grad()
    for m in model.modules():
        if isinstance(m, Embedding4bit):
            m.clear_trainable_tokens()
    if not tied:
        model.lm_head.clear_trainable_tokens()
    with torch.no_grad():
        after = model(ids).logits
    keep = torch.ones(after.shape[-1], dtype=torch.bool)
    keep[report.token_indices] = tied  # a tied head's columns come from the unchanged 4-bit GEMM
    assert torch.equal(after[..., keep], before[..., keep])
    assert_close_to_reference(after.double(), before.double(), torch.float32, "logits after clearing the rows")


@pytest.mark.parametrize("tied", (False, True))
def test_our_file_loads_in_peft_with_the_same_logits(tied, tmp_path):
    model, dense = _models(tied)
    add_trainable_tokens(model, token_ids=[VOCAB, VOCAB + 1], train_head=False)  # a tied head shares them
    with torch.no_grad():
        model.model.embed_tokens.trainable_tokens_delta.add_(torch.randn(2, 64))
    out = save_trainable_tokens(model, tmp_path / "tok")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "TRAINABLE_TOKENS" and cfg["token_indices"] == [VOCAB, VOCAB + 1]
    from safetensors.torch import load_file
    # a tied head's key holds the embedding's rows, as PEFT writes it
    assert sorted(load_file(out / "adapter_model.safetensors")) == sorted(
        ["base_model.model.model.embed_tokens.trainable_tokens_delta"]
        + (["base_model.model.lm_head.trainable_tokens_delta"] if tied else []))
    assert cfg["target_modules"] == "model.embed_tokens"
    pm = peft.PeftModel.from_pretrained(dense, str(out))
    ids = _ids()
    with torch.no_grad():
        assert_close_to_reference(model(ids).logits, pm(ids).logits, torch.float32, "ours vs PEFT")


@pytest.mark.parametrize("tied", (False, True))
def test_peft_file_loads_here_with_the_same_logits(tied, tmp_path):
    model, dense = _models(tied)
    cfg = peft.TrainableTokensConfig(token_indices=[VOCAB + 1, 7, VOCAB], target_modules=["embed_tokens"])
    pm = peft.get_peft_model(dense, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "peft"))
    report = load_trainable_tokens(model, tmp_path / "peft")
    assert report.tied == tied and report.token_indices == [7, VOCAB, VOCAB + 1]
    assert not model.model.embed_tokens.trainable_tokens_delta.requires_grad
    ids = _ids()
    with torch.no_grad():
        assert_close_to_reference(model(ids).logits, pm(ids).logits, torch.float32, "PEFT file, our model")


def test_bad_input_raises_clear_errors(tmp_path):
    model, _ = _models(tied=False)
    with pytest.raises(ValueError, match=r"in \[0, 130\)"):
        add_trainable_tokens(model, token_ids=[VOCAB + NEW])
    with pytest.raises(ValueError, match="unique"):
        add_trainable_tokens(model, token_ids=[3, 3])
    with pytest.raises(ValueError, match="exactly one"):
        add_trainable_tokens(model)
    with pytest.raises(TypeError, match="Embedding4bit"):
        add_trainable_tokens(build("llama"), n_new=1)
    with pytest.raises(ValueError, match="no trainable token rows"):
        save_trainable_tokens(model, tmp_path / "none")
    add_trainable_tokens(model, n_new=NEW)
    with pytest.raises(ValueError, match="already has"):
        add_trainable_tokens(model, n_new=1)
    out = save_trainable_tokens(model, tmp_path / "tok")
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LORA"}))
    with pytest.raises(AdapterLoadError, match="LORA|TRAINABLE_TOKENS"):
        load_trainable_tokens(model, out)
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "token_indices": [1, 2, 3]}))
    with pytest.raises(AdapterLoadError, match=r"\[3, 64\]"):
        load_trainable_tokens(model, out)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file
    t = load_file(out / "adapter_model.safetensors")
    save_file({k.replace("embed_tokens", "norm"): v for k, v in t.items()}, out / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="model.norm.trainable_tokens_delta"):
        load_trainable_tokens(model, out)
    assert model.model.embed_tokens.trainable_token_indices.tolist() == [VOCAB, VOCAB + 1]  # unchanged
