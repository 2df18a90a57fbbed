"""quantize_model on tiny Llama / Qwen2 / Mistral / GPT-2 / BERT: which layers, exact bytes, outputs, gradients."""
import pytest
import torch
from torch import nn

from _tiny_models import ARCHS, build, sample_ids
from peft_kernels.nn import Linear4bit
from peft_kernels.quant import quantize_4bit
from peft_kernels.quant.model import QuantizationReport, name_matches, quantize_model, select_linears, tensor_bytes

transformers = pytest.importorskip("transformers")


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]


def _expected_targets(arch, model):
    # lm_head stays dense by default; BERT's MLM decoder is tied to the word embeddings.
    excluded = {"lm_head", "cls.predictions.decoder"}
    return [n for n in _linear_names(model) if n not in excluded]


def _packed_layer_bytes(n_out, n_in, blocksize=64, double_quant=True):
    """Independent count of a 4-bit weight's own storage from the format (DESIGN.md "NF4 bytes"),
    without the code books (float32 [16] and, with double quantization, float32 [256])."""
    numel = n_out * n_in
    nblocks = -(-numel // blocksize)
    if double_quant:
        return (numel + 1) // 2 + nblocks + 4 * -(-nblocks // 256)  # codes, uint8 absmax, float32 absmax2
    return (numel + 1) // 2 + 4 * nblocks


def _code_book_bytes(double_quant=True):
    # Each layer owns its NF4 book (float32 [16]) and 8-bit map (float32 [256]), as in bitsandbytes.
    return 16 * 4 + (256 * 4 if double_quant else 0)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _dequantized_twin(arch, quantized):
    """The dense model (same seed) with every quantized weight replaced by its dequantized value."""
    twin = build(arch)
    with torch.no_grad():
        for name, layer in quantized.named_modules():
            if isinstance(layer, Linear4bit):
                dense = twin.get_submodule(name)
                w = layer.dequantize(torch.float32)
                dense.weight.copy_(w.t() if type(dense).__name__ == "Conv1D" else w)
    return twin


@pytest.mark.parametrize("arch", ARCHS)
def test_replaces_the_right_layers_and_counts_bytes_exactly(arch):
    model = build(arch)
    dense_linears = {n: (m.weight.shape, m.weight.element_size()) for n, m in model.named_modules()
                     if n in _linear_names(model)}
    before = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    targets = _expected_targets(arch, model)

    report = quantize_model(model)

    assert isinstance(report, QuantizationReport)
    assert report.replaced == targets and report.num_replaced == len(targets)
    for name in targets:
        assert isinstance(model.get_submodule(name), Linear4bit), name
    for name in set(_linear_names(build(arch))) - set(targets):
        assert not isinstance(model.get_submodule(name), Linear4bit), name
    # Tied weights survive: the head still shares the embedding matrix.
    if arch == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight
    if arch == "bert":
        assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
        assert report.skipped == {"cls.predictions.decoder": "weight tied to another module"}

    # Bytes: before counted here independently; after = before - dense weights + format sizes.
    after = before
    q_bytes = q_params = 0
    for name in targets:
        shape, esize = dense_linears[name]
        after -= shape.numel() * esize
        n_out, n_in = (shape[1], shape[0]) if arch == "gpt2" else tuple(shape)
        q_bytes += _packed_layer_bytes(n_out, n_in) + _code_book_bytes()
        q_params += shape.numel()
    after += q_bytes
    assert report.bytes_before == before == tensor_bytes(build(arch))
    assert report.bytes_after == after
    assert report.quantized_weight_bytes == q_bytes and report.quantized_params == q_params
    assert report.bits_per_parameter == pytest.approx(8 * q_bytes / q_params)
    text = str(report)
    assert f"{before:,}" in text and f"{after:,}" in text and f"{len(targets)} layers" in text

    qc = model.config.quantization_config
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] is True
    bnb_cfg = transformers.BitsAndBytesConfig.from_dict(dict(qc))
    assert bnb_cfg.load_in_4bit and bnb_cfg.bnb_4bit_quant_type == "nf4"


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_and_input_gradients(arch):
    """The 4-bit model computes exactly the dense model with dequantized weights, and approximates the original.

    NF4 on Gaussian-like weights has a relative (Frobenius) weight error of about 0.1 per layer; through two
    tiny blocks the logits' relative error measures 0.07-0.12 (seeds 0-2), so < 0.25 leaves a 2x margin.
    Random-init logits are near ties (std 0.16 over 128 classes), so the original's top-1 moves on ~10-20%
    of positions; it must stay within the quantized top-5 everywhere.
    """
    ids = sample_ids(4, 32)
    original = build(arch)
    model = build(arch)
    quantize_model(model)
    twin = _dequantized_twin(arch, model)
    with torch.no_grad():
        ref, q, deq = original(ids).logits, model(ids).logits, twin(ids).logits
    assert torch.isfinite(q).all()
    assert _rel(q, deq) < 1e-5  # DESIGN.md fp32 tolerance
    assert torch.equal(q.argmax(-1), deq.argmax(-1))
    assert _rel(q, ref) < 0.25
    assert (q.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.7
    assert (q.topk(5, -1).indices == ref.argmax(-1, keepdim=True)).any(-1).all()

    # Gradients flow through the 4-bit layers to the input embeddings, as through the dequantized twin.
    grads = []
    for m in (model, twin):
        emb = m.get_input_embeddings()(ids).detach().requires_grad_()
        m(inputs_embeds=emb).logits.square().mean().backward()
        grads.append(emb.grad)
    assert grads[0].abs().sum() > 0 and torch.isfinite(grads[0]).all()
    assert _rel(grads[0], grads[1]) < 1e-4


def test_training_step_touches_no_4bit_weight():
    model = build("llama").train()
    quantize_model(model)
    ids = sample_ids()
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name, layer in model.named_modules():
        if isinstance(layer, Linear4bit):
            assert layer.weight.grad is None and not layer.weight.requires_grad and layer.training, name
    assert model.model.embed_tokens.weight.grad is not None
    assert model.model.norm.weight.grad is not None


def test_gpt2_conv1d_is_transposed_into_out_by_in():
    model = build("gpt2")
    conv = model.transformer.h[0].attn.c_attn
    assert type(conv).__name__ == "Conv1D"
    w_t = conv.weight.detach().t().clone()  # Conv1D stores [in, out]
    quantize_model(model)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, Linear4bit) and (layer.out_features, layer.in_features) == tuple(w_t.shape)
    packed, state = quantize_4bit(w_t.contiguous())
    assert torch.equal(layer.weight, packed) and torch.equal(layer.absmax, state.absmax)
    err = _rel(layer.dequantize(), w_t)
    assert 0.02 < err < 0.12, err  # NF4 on N(0, 0.02^2) weights: about 0.1
    x = torch.randn(3, w_t.shape[1])
    assert _rel(layer(x), conv(x)) < 0.15


def test_settings_pass_through_and_big_layers_cost_about_4_13_bits():
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 256, bias=False))
    report = quantize_model(model, quant_type="fp4", blocksize=128, double_quant=False,
                            compute_dtype=torch.bfloat16)
    assert report.replaced == ["0", "2"]
    for layer in (model[0], model[2]):
        assert (layer.quant_type, layer.blocksize, layer.double_quant, layer.compute_dtype) == \
            ("fp4", 128, False, torch.bfloat16)
    expected = _packed_layer_bytes(1024, 1024, 128, False) + _packed_layer_bytes(256, 1024, 128, False) \
        + 2 * _code_book_bytes(False)
    assert report.quantized_weight_bytes == expected
    assert report.bits_per_parameter == pytest.approx(4 + 32 / 128, abs=0.01)
    assert model(torch.randn(2, 1024)).shape == (2, 256)

    model = nn.Sequential(nn.Linear(4096, 4096))
    assert quantize_model(model).bits_per_parameter == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)


def test_skip_and_target_patterns():
    assert name_matches("model.layers.0.self_attn.q_proj", "q_proj")
    assert name_matches("model.layers.0.self_attn.q_proj", "self_attn.q_proj")
    assert name_matches("model.layers.0.mlp.up_proj", "mlp")
    assert name_matches("model.layers.0.mlp.up_proj", "layers.0")
    assert not name_matches("model.layers.0.self_attn.q_proj", "proj")
    assert not name_matches("model.layers.10.mlp.up_proj", "layers.1")

    model = build("llama")
    report = quantize_model(model, skip_modules=["q_proj", "layers.1.mlp", "lm_head"])
    assert isinstance(model.model.layers[0].self_attn.k_proj, Linear4bit)
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit)
    assert isinstance(model.model.layers[1].self_attn.q_proj, nn.Linear)
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.Linear)
    assert report.num_replaced == 14 - 2 - 3
    # Recorded as full names, which transformers' own (prefix/regex/suffix) matching reads the same way.
    assert model.config.quantization_config["llm_int8_skip_modules"] == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    should_convert_module = pytest.importorskip("transformers.quantizers.quantizers_utils").should_convert_module
    skip = model.config.quantization_config["llm_int8_skip_modules"]
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Linear4bit)):
            assert should_convert_module(name, skip) == isinstance(module, Linear4bit), name

    model = build("llama")
    report = quantize_model(model, target_modules=("self_attn",))
    assert report.num_replaced == 8
    assert all(".self_attn." in n for n in report.replaced)
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)


def test_bad_patterns_and_nothing_to_quantize():
    with pytest.raises(ValueError, match=r"skip_modules pattern\(s\) \['qproj'\] match no module"):
        quantize_model(build("llama"), skip_modules=["qproj"])
    with pytest.raises(ValueError, match=r"target_modules pattern\(s\) \['attn'\] match no module"):
        quantize_model(build("llama"), target_modules="attn")
    with pytest.raises(ValueError, match="non-empty dotted names"):
        quantize_model(build("llama"), skip_modules=[""])
    with pytest.raises(ValueError, match="no nn.Linear/Conv1D layers"):
        quantize_model(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="all 15 linear layers are excluded"):
        quantize_model(build("llama"), target_modules=["lm_head"])
    model = build("llama")
    quantize_model(model)
    with pytest.raises(ValueError, match="14 layers are already Linear4bit"):
        quantize_model(model)
    # The default skip pattern may match nothing (BERT has no lm_head): no error.
    assert select_linears(build("bert")).targets


def test_dense_weight_is_released_layer_by_layer():
    model = build("llama")
    refs = {n: torch.utils.weak.WeakTensorKeyDictionary() for n in ("q", "down")}
    first = model.model.layers[0].self_attn.q_proj.weight
    last = model.model.layers[1].mlp.down_proj.weight
    refs["q"][first] = 1
    refs["down"][last] = 1
    del first, last
    seen = []
    orig = Linear4bit.from_linear.__func__

    def spy(cls, linear, **kw):
        seen.append(len(refs["q"]))  # is the first layer's dense weight still alive?
        return orig(cls, linear, **kw)

    Linear4bit.from_linear = classmethod(spy)
    try:
        quantize_model(model)
    finally:
        Linear4bit.from_linear = classmethod(orig)
    assert seen[0] == 1 and seen[1:] == [0] * (len(seen) - 1)
    assert len(refs["down"]) == 0
    assert len(seen) == 14
