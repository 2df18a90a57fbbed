"""The peak-memory estimator against measured CPU training steps, its persistent terms against real
models, its bad-input errors, and measure_peak_bytes itself."""
from __future__ import annotations

import warnings

import pytest
import torch

from peft_kernels.methods.lora import LoraConfig
from peft_kernels.prepare import prepare
from peft_kernels.quant.model import tensor_bytes
from peft_kernels.train.estimate import MemoryEstimate, estimate_memory, llama_config, model_shape
from peft_kernels.train.memory import LiveStorageTracker, measure_peak_bytes
from peft_kernels.train.optim import StepInBackward

from _tiny_models import build

warnings.filterwarnings("ignore", category=UserWarning)


pytestmark = pytest.mark.usefixtures("one_thread")


# ====================================================================== measure_peak_bytes
def test_measure_peak_counts_live_storage_exactly():
    def work():
        a = torch.empty(1 << 18)          # 1 MiB, kept
        b = torch.ones(1 << 19)           # 2 MiB, freed below
        v = b[: 1 << 10].view(32, 32)     # a view: no new storage
        v.add_(1)
        del b, v
        c = torch.zeros(1 << 17)          # 0.5 MiB, allocated after b died
        return a, c

    (a, c), peak = measure_peak_bytes(work, device="cpu", include_existing=False)
    assert peak == (1 << 20) + (2 << 20)
    assert a.numel() == 1 << 18 and c.numel() == 1 << 17


def test_measure_peak_includes_tensors_alive_before_the_call():
    held = torch.empty(1 << 20)  # 4 MiB alive before the call, only read inside
    _, without = measure_peak_bytes(lambda: held.sum(), device="cpu", include_existing=False)
    _, with_existing = measure_peak_bytes(lambda: torch.ones(16), device="cpu")
    assert without >= held.numel() * 4              # touched inside: counted
    assert with_existing >= held.numel() * 4        # found through the garbage collector


def test_measure_peak_bad_input():
    with pytest.raises(TypeError, match="callable"):
        measure_peak_bytes(42)
    with pytest.raises(ValueError, match="device"):
        measure_peak_bytes(lambda: None, device="tpu")
    tracker = LiveStorageTracker()
    with tracker:
        torch.ones(4) + 1
    assert tracker.peak > 0


# ====================================================================== estimate vs measured
def _llama(h=128, inter=352, layers=2, vocab=1024, heads=4, kv=2, attn="sdpa"):
    import transformers as tf

    return tf.LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=1024,
                          attn_implementation=attn)


def _measure_step(cfg, method, *, quantize, gc, batch, seq, precision="fp32", weight_dtype=None, ce_chunk=None,
                  optimizer_in_backward=False, **prepare_kw):
    """Peak bytes of the second of two training steps (forward, backward, AdamW step): steady state.

    The model is loaded in ``weight_dtype`` (default: ``precision``); fp32 weights with a 16-bit precision
    run the forward under torch.autocast and the loss the way the Trainer computes it. ``ce_chunk``: the loss
    is the Trainer's fused linear cross-entropy with that chunk budget (``train/loss.py``)."""
    import transformers as tf

    from peft_kernels.train.loss import causal_lm_loss

    torch.manual_seed(0)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtypes[weight_dtype or precision])
    model, _ = prepare(model, method, quantize=quantize, gradient_checkpointing=gc, precision=precision,
                       **prepare_kw)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    in_bwd = StepInBackward(opt) if optimizer_in_backward else None
    autocast = weight_dtype == "fp32" and precision != "fp32"

    def step():
        if ce_chunk is not None:
            with torch.autocast("cpu", dtype=dtypes[precision], enabled=autocast):
                loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids}, fused=True, chunk_bytes=ce_chunk)
        elif autocast:
            with torch.autocast("cpu", dtype=dtypes[precision]):
                logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, cfg.vocab_size),
                                                     ids[:, 1:].reshape(-1))
            del logits
        else:
            loss = model(input_ids=ids, labels=ids).loss
        if in_bwd is not None:  # the Trainer's optimizer_in_backward: each update inside backward
            in_bwd.active = True
            loss.backward()
            in_bwd.active = False
            return
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    _, peak = measure_peak_bytes(step, device="cpu")
    return peak


LORA = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
CASES = {
    # name: (config kwargs, method, quantize, checkpointing, batch, seq, precision, expected peak phase);
    # precision "fp32>bf16": fp32 weights under bf16 autocast
    "lora": ({}, LORA, False, False, 2, 128, "fp32", "loss_backward"),
    "lora_ckpt": ({}, LORA, False, True, 1, 256, "fp32", "loss_backward"),
    "qlora": ({}, LORA, True, False, 2, 64, "fp32", "loss_backward"),
    "qlora_ckpt_3_layers": ({"layers": 3}, LORA, True, True, 1, 128, "fp32", None),
    "qlora_ckpt_small_vocab": ({"inter": 704, "vocab": 128}, LORA, True, True, 2, 128, "fp32", "backward"),
    "full_finetune": ({}, None, False, False, 1, 32, "fp32", "optimizer_step"),
    "lora_eager_attention": ({"vocab": 512, "attn": "eager"}, LORA, False, False, 2, 128, "fp32", None),
    "qlora_bf16": ({}, LORA, True, False, 2, 64, "bf16", "loss_backward"),
    "lora_autocast_bf16": ({}, LORA, False, False, 4, 32, "fp32>bf16", "loss_backward"),
    "qlora_autocast_bf16_ckpt": ({"inter": 704, "vocab": 256}, LORA, True, True, 2, 128, "fp32>bf16", None),
    "adapter": ({}, {"method": "adapter", "bottleneck": 16}, False, False, 2, 64, "fp32", None),
    "ia3_4bit": ({}, {"method": "ia3"}, True, False, 2, 64, "fp32", None),
    "prompt_tuning_4bit": ({}, {"method": "prompt_tuning", "num_virtual_tokens": 8}, True, False, 2, 64, "fp32", None),
    "freeze_last_block_ckpt": ({"layers": 3}, {"method": "freeze", "last_k": 1}, True, True, 2, 64, "fp32", None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_within_10_percent_of_measured_cpu_step(name):
    kw, method, quantize, gc, batch, seq, precision, phase = CASES[name]
    weight_dtype, _, precision = precision.rpartition(">")
    cfg = _llama(**kw)
    measured = _measure_step(cfg, method, quantize=quantize, gc=gc, batch=batch, seq=seq, precision=precision,
                             weight_dtype=weight_dtype or None)
    est = estimate_memory(cfg, method=method if method is not None else "full", seq_len=seq, batch_size=batch,
                          quantize=quantize, precision=precision, weight_dtype=weight_dtype or None,
                          gradient_checkpointing=gc, device="cpu")
    err = est.total_bytes / measured - 1
    assert abs(err) <= 0.10, f"{name}: estimate {est.total_bytes:,} vs measured {measured:,} ({100 * err:+.1f}%)\n{est}"
    if phase is not None:  # the cases exercise different terms of the model
        assert est.peak_phase.startswith(phase), est.phases
    assert sum(est.breakdown.values()) == est.total_bytes


# The memory switches of issue #7, each measured: (config kwargs, method, quantize, checkpointing, batch, seq,
# precision, fused-loss chunk bytes or None, estimate_memory switches).
SWITCH_CASES = {
    # 16 rows per 64 KiB logits chunk: the fused loss runs in 8 chunks, its peak is the chunk, not [T, V]
    "qlora_fused_ce": ({}, LORA, True, False, 2, 64, "fp32", 64 << 10, {}),
    "qlora_fused_ce_ckpt": ({"inter": 704, "vocab": 4096}, LORA, True, True, 2, 128, "fp32", 256 << 10, {}),
    "qlora_fused_ce_autocast_bf16": ({"vocab": 2048}, LORA, True, False, 2, 64, "fp32>bf16", 64 << 10, {}),
    "qlora_fused_ce_bf16_whole_chunk": ({}, LORA, True, False, 2, 64, "bf16", None, {}),
    # all-linear LoRA over fp32 dense weights: the gradients are a large share of the peak without it
    "lora_fused_ce_step_in_backward": ({"vocab": 512}, LORA, False, True, 1, 64, "fp32", 64 << 10,
                                       {"optimizer_in_backward": True}),
    # a large vocabulary so the tables dominate: 4-bit embedding and head (untied) instead of fp32 ones
    "qlora_4bit_tables": ({"vocab": 8192}, LORA, True, True, 1, 64, "fp32", 64 << 10,
                          {"quantize_embeddings": True, "quantize_head": True}),
    "qlora_4bit_tables_bf16": ({"vocab": 8192}, LORA, True, False, 2, 64, "bf16", 64 << 10,
                               {"quantize_embeddings": True, "quantize_head": True}),
    # the fused RMSNorm / SwiGLU modules (CPU: the reference path, which saves what the kernels save)
    "qlora_fused_kernels": ({"inter": 704}, LORA, True, False, 2, 128, "fp32", 64 << 10, {"fused_kernels": True}),
    "qlora_fused_kernels_bf16_ckpt": ({"inter": 704}, LORA, True, True, 2, 128, "bf16", 64 << 10,
                                      {"fused_kernels": True}),
}
_TABLE_SWITCHES = ("quantize_embeddings", "quantize_head")  # prepare() takes these inside its quantize dict


@pytest.mark.parametrize("name", list(SWITCH_CASES))
def test_estimate_with_memory_switches_within_10_percent_of_measured(name):
    kw, method, quantize, gc, batch, seq, precision, chunk, switches = SWITCH_CASES[name]
    weight_dtype, _, precision = precision.rpartition(">")
    cfg = _llama(**kw)
    chunk = chunk if chunk is not None else 32 << 20
    tables = {k: v for k, v in switches.items() if k in _TABLE_SWITCHES}
    prepare_kw = {k: v for k, v in switches.items() if k not in _TABLE_SWITCHES}
    measured = _measure_step(cfg, method, quantize=tables or quantize, gc=gc, batch=batch, seq=seq,
                             precision=precision, weight_dtype=weight_dtype or None, ce_chunk=chunk, **prepare_kw)
    est = estimate_memory(cfg, method=method, seq_len=seq, batch_size=batch, quantize=quantize, precision=precision,
                          weight_dtype=weight_dtype or None, gradient_checkpointing=gc, device="cpu",
                          fused_cross_entropy=True, ce_chunk_bytes=chunk, **switches)
    err = est.total_bytes / measured - 1
    assert abs(err) <= 0.10, f"{name}: estimate {est.total_bytes:,} vs measured {measured:,} ({100 * err:+.1f}%)\n{est}"
    assert sum(est.breakdown.values()) == est.total_bytes


def test_fused_cross_entropy_replaces_the_logits_terms():
    kw = dict(method="qlora", seq_len=2048, batch_size=1, quantize=True, precision="bf16", gradient_checkpointing=True)
    full = estimate_memory(llama_config("llama-3-8b"), **kw)
    fused = estimate_memory(llama_config("llama-3-8b"), fused_cross_entropy=True, **kw)
    n, h, v, chunk = 2047, 4096, 128256, 128 << 20
    rows = chunk // (v * 2)
    # selected hidden rows (bf16), dH fp32, indices + loss/lse rows, one bf16 logits chunk; CUDA: no row temporaries
    assert fused.phases["forward"] - full.phases["forward"] == (
        n * h * 2 + n * h * 4 + n * 16 + rows * v * 2) - (2048 * v * 2 + 2 * 2048 * v * 4)
    assert fused.total_bytes < full.total_bytes - 2 * 2 ** 30
    assert fused.settings["fused_cross_entropy"] is True


def test_fused_kernels_rope_switch_changes_no_term():
    """``fused_kernels`` takes a "rope" key (prepare passes it) and it changes nothing: the fused RoPE saves cos
    and sin, as transformers' expression does (tests/test_fused_model.py::test_rope_saves_what_transformers_saves)."""
    kw = dict(method="qlora", seq_len=1024, batch_size=1, quantize=True, precision="bf16")
    cfg = llama_config("llama-3-8b")
    on, off = estimate_memory(cfg, fused_kernels=True, **kw), estimate_memory(cfg, fused_kernels=False, **kw)
    assert on.total_bytes != off.total_bytes  # RMSNorm / SwiGLU do change terms
    for rope in (True, False):
        assert estimate_memory(cfg, fused_kernels={"rope": rope}, **kw).phases == on.phases
        assert estimate_memory(cfg, fused_kernels={"rmsnorm": False, "swiglu": False, "rope": rope},
                               **kw).phases == off.phases
    with pytest.raises(ValueError, match="'rmsnorm' / 'swiglu' / 'rope' booleans"):
        estimate_memory(cfg, fused_kernels={"rope": "yes"}, **kw)


# ====================================================================== persistent terms vs real models
@pytest.mark.parametrize("method,quantize", [
    ("lora", False), ({"method": "lora", "r": 4, "target_modules": "all-linear", "use_dora": True}, True),
    ("bitfit", True), ("ia3", True), ("adapter", False), ({"method": "prompt_tuning", "num_virtual_tokens": 4}, False),
    ({"method": "freeze", "last_k": 1}, True), ({"method": "sparse", "density": 0.05}, True), (None, False),
])
def test_estimated_parameters_and_weight_bytes_match_the_prepared_model(method, quantize):
    model, report = prepare(build("llama"), method, quantize=quantize)
    est = report.estimate
    assert est is not None
    assert est.trainable_params == report.trainable
    # model tensors (weights, 4-bit statistics, buffers, trainable parameters) to the byte
    assert est.breakdown["weights"] + est.breakdown["trainable"] == tensor_bytes(model)


def test_8b_and_70b_shapes_behave():
    e8 = estimate_memory(llama_config("llama-3-8b"), method="qlora", seq_len=2048, batch_size=1, quantize=True,
                         precision="bf16", gradient_checkpointing=True)
    lora8 = estimate_memory(llama_config("llama-3-8b"), method="lora", seq_len=2048, batch_size=1, quantize=False,
                            precision="bf16", gradient_checkpointing=True)
    no_ckpt = estimate_memory(llama_config("llama-3-8b"), method="qlora", seq_len=2048, batch_size=1, quantize=True,
                              precision="bf16", gradient_checkpointing=False)
    e70 = estimate_memory(llama_config("llama-3-70b"), method="qlora", seq_len=2048, batch_size=1, quantize=True,
                          precision="bf16", gradient_checkpointing=True)
    assert e8.total_bytes < lora8.total_bytes < no_ckpt.total_bytes
    assert e8.total_bytes < e70.total_bytes
    # r=16 on all 7 linears of 32 blocks: 16 * (in + out) summed
    assert e8.trainable_params == 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert e8.breakdown["optimizer_state"] == 8 * e8.trainable_params
    # the logits term: 3 fp32 [T, V] arrays in the loss backward
    assert e8.breakdown["logits"] == 3 * 2048 * 128256 * 4
    assert "GiB" in str(e8) and isinstance(e8, MemoryEstimate)


# ====================================================================== bad input
@pytest.mark.parametrize("config,needle", [
    ({**llama_config("llama-3-8b"), "hidden_sizee": 10}, "hidden_sizee"),
    ({**llama_config("llama-3-8b"), "hidden_size": -4}, "hidden_size=-4"),
    ({**llama_config("llama-3-8b"), "num_key_value_heads": 5}, "num_key_value_heads=5"),
    ({**llama_config("llama-3-8b"), "hidden_size": 4097}, "not divisible"),
    ({**llama_config("llama-3-8b"), "model_type": "bert"}, "model_type='bert'"),
    ({k: v for k, v in llama_config("llama-3-8b").items() if k != "vocab_size"}, "vocab_size is missing"),
    ("not a config", "PretrainedConfig or a dict"),
])
def test_bad_model_config_is_named(config, needle):
    with pytest.raises(ValueError, match=needle):
        estimate_memory(config, method="lora", seq_len=16)


@pytest.mark.parametrize("kwargs,needle", [
    ({"seq_len": 0}, "seq_len=0"), ({"batch_size": 1.5}, "batch_size=1.5"), ({"precision": "fp8"}, "precision='fp8'"),
    ({"optimizer": "adam"}, "optimizer='adam'"), ({"device": "tpu"}, "device='tpu'"),
    ({"quantize": "yes"}, "quantize='yes'"), ({"weight_dtype": "int8"}, "weight_dtype='int8'"),
    ({"blocksize": 48}, "blocksize=48"), ({"method": "lorax"}, "lorax"),
    ({"method": {"method": "lora", "rank": 8}}, "rank"), ({"method": {"method": "lora", "r": 0}}, "r must be"),
    ({"method": "full", "quantize": True}, "full fine-tuning"),
    ({"method": {"method": "prefix_tuning", "num_virtual_tokens": 4}, "gradient_checkpointing": True}, "prefix"),
    ({"fused_cross_entropy": 1}, "fused_cross_entropy=1"), ({"ce_chunk_bytes": 0}, "ce_chunk_bytes=0"),
    ({"offload_activations": True}, "needs gradient_checkpointing"),
    ({"quantize_head": "yes"}, "quantize_head='yes'"),
])
def test_bad_estimate_arguments_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        estimate_memory(llama_config("llama-3-8b"), **{"method": "lora", **kwargs})


def test_model_shape_reads_transformers_configs():
    shape = model_shape(_llama(h=256, heads=8, kv=2))
    assert (shape.hidden, shape.heads, shape.kv_heads, shape.head_dim) == (256, 8, 2, 32)
    assert shape.attn_implementation == "sdpa"
