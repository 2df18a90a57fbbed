"""Decoder-layer gradient checkpointing (train/checkpointing.py) over LoRA on 4-bit layers: the recompute report,
gradients and losses equal with it on and off, saved bytes counted exactly with saved_tensors_hooks, and the
offload mechanics on CPU through CopyTransfer (the stash, prefetch order, bytes); the CUDA path is in tests/test_gpu_memory_switches.py (-m gpu)."""
from __future__ import annotations

import pytest
import torch

from peft_kernels.methods.lora import LoraConfig
from peft_kernels.prepare import prepare
from peft_kernels.train.checkpointing import ActivationOffloader, CopyTransfer, enable_checkpointing

from _tiny_models import build, sample_ids
from _tolerance import assert_close_to_reference
from _weights import weight64

B, T, H, LAYERS = 2, 12, 64, 3


def _model(ckpt=False, offloader=None, tables=False, dropout=0.1):
    qcfg = {"quantize_embeddings": True, "quantize_head": True} if tables else True
    model, report = prepare(build("llama", num_hidden_layers=LAYERS),
                            LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout,
                                       init_lora_weights="gaussian"), quantize=qcfg)
    ck = enable_checkpointing(model, offloader=offloader) if ckpt else None
    return model.train(), ck


def _saved_bytes(model, ids):
    """(bytes autograd saved outside checkpoints, the loss) for one forward, counted by a saved_tensors_hooks."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    return total, loss


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_report_declares_what_is_recomputed():
    model, rep = _model(ckpt=True)
    assert [lp.name for lp in rep.layers] == [f"model.layers.{i}" for i in range(LAYERS)]
    lp = rep.layers[0]
    assert "self_attn.q_proj" in lp.modules and "mlp.down_proj" in lp.modules and "input_layernorm" in lp.modules
    assert any("Linear4bit" in why or "dequantized again" in why for why in lp.engine.values())
    assert "model.embed_tokens" in rep.not_recomputed and "model.norm" in rep.not_recomputed
    assert not rep.offload_active and "recomputed in backward" in str(rep)


def test_gradients_equal_with_checkpointing_on_and_off_and_fewer_bytes_are_saved():
    ids = sample_ids(B, T)
    results = {}
    for ckpt in (False, True):
        model, rep = _model(ckpt=ckpt)
        torch.manual_seed(5)                     # the same dropout masks in both runs
        outside, loss = _saved_bytes(model, ids)
        loss.backward()
        kept = sum(rep.stats.kept_on_device.values()) if rep else 0
        results[ckpt] = (outside + kept, _grads(model), loss.detach(), rep)
    (b_off, g_off, l_off, _), (b_on, g_on, l_on, rep) = results[False], results[True]
    assert g_off.keys() == g_on.keys() and len(g_on) > 0
    for n in g_off:
        assert_close_to_reference(g_on[n].double(), g_off[n].double(), torch.float32, n)
    assert_close_to_reference(l_on.double(), l_off.double(), torch.float32, "loss")
    # each checkpoint keeps exactly the layer input [B, T, H] in float32
    assert rep.stats.kept_on_device == {f"model.layers.{i}": B * T * H * 4 for i in range(LAYERS)}
    assert rep.stats.offloaded == {f"model.layers.{i}": 0 for i in range(LAYERS)}
    assert b_on < b_off / 2


def test_offload_mechanics_with_a_copy_transfer():
    ids = sample_ids(B, T)
    off = ActivationOffloader(prefetch=1, transfer=CopyTransfer())
    model, rep = _model(ckpt=True, offloader=off)
    assert rep.offload_active and [lp.offloaded for lp in rep.layers] == [True, True, False]
    torch.manual_seed(5)
    loss = model(ids, labels=ids).loss
    per = B * T * H * 4
    assert rep.stats.offloaded == {"model.layers.0": per, "model.layers.1": per, "model.layers.2": 0}
    assert rep.stats.kept_on_device["model.layers.2"] == per
    assert off.stats.offloaded == 2 and off.stats.offloaded_bytes == 2 * per
    loss.backward()
    # backward runs the layers top down: layer 1 is fetched on demand and prefetches layer 0
    assert off.stats.fetch_order == [1, 0] and off.stats.fetched_on_demand == 1 and off.stats.prefetched == 1
    assert rep.checkpoint_bytes(B * T, H, 4) == {"model.layers.0": 0, "model.layers.1": 0, "model.layers.2": per}
    ref, _ = _model(ckpt=False)
    torch.manual_seed(5)
    ref(ids, labels=ids).loss.backward()
    g, g_ref = _grads(model), _grads(ref)
    for n in g_ref:
        assert_close_to_reference(g[n].double(), g_ref[n].double(), torch.float32, n)


def test_training_steps_are_identical_with_every_switch():
    ids = sample_ids(B, T)

    def losses(dense_from=None, **kw):
        model, _ = _model(**kw)
        if dense_from is not None:  # 4-bit tables off: dense tables holding the 4-bit ones' values
            with torch.no_grad():
                for name in ("model.embed_tokens", "lm_head"):
                    model.get_submodule(name).weight.copy_(weight64(dense_from.get_submodule(name)).float())
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        out = []
        torch.manual_seed(11)
        for _ in range(3):
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return torch.tensor(out, dtype=torch.float64)

    ref = losses(tables=True)
    assert ref[-1] < ref[0]
    assert_close_to_reference(losses(dense_from=_model(tables=True)[0]), ref, torch.float32, "dense tables")
    for kw in (dict(tables=True, ckpt=True),
               dict(tables=True, ckpt=True, offloader=ActivationOffloader(0, transfer=CopyTransfer()))):
        assert_close_to_reference(losses(**kw), ref, torch.float32, f"losses {kw}")


def test_bad_input_and_cpu_offload_note():
    with pytest.raises(ValueError, match="gradient_checkpointing=True"):
        prepare(build("llama"), "lora", offload_activations=True)
    with pytest.raises(ValueError, match="offload_activations must be True or False"):
        prepare(build("llama"), "lora", gradient_checkpointing=True, offload_activations="yes")
    with pytest.raises(ValueError, match="prefetch"):
        ActivationOffloader(prefetch=-1)
    with pytest.raises(TypeError, match="ActivationOffloader"):
        enable_checkpointing(build("llama"), offloader=object())
    _, report = prepare(build("llama"), "lora", gradient_checkpointing=True, offload_activations=True)
    assert report.checkpointing is not None and not report.checkpointing.offload_active
    assert any("no-op" in n for n in report.checkpointing.notes)


def test_cli_run_config_takes_offload_activations():
    from peft_kernels.cli import ConfigError, build_parser, normalize_run_config
    base = {"model": "m", "data": "d.jsonl", "output_dir": "o", "max_steps": 1}
    run, _ = normalize_run_config({**base, "gradient_checkpointing": True, "offload_activations": True})
    assert run["offload_activations"] is True
    with pytest.raises(ConfigError, match="offload_activations must be true or false"):
        normalize_run_config({**base, "offload_activations": "yes"})
    assert build_parser().parse_args(["train", "--offload-activations"]).offload_activations is True
