"""Prefix tuning: PrefixTuningModel against a plain-torch float64 Llama written out here (RMSNorm, rotary
embeddings, grouped-query attention with the prefix keys/values in front, SwiGLU), against Hugging Face
PEFT 0.21.2 (files both ways, logits, gradients, parameter counts), training, generation, a 4-bit base,
and the bad inputs the issue lists."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from _tiny_models import build, sample_ids
from _tolerance import assert_close_to_reference
from peft_kernels.io.method_files import (CONFIG_NAME, FINGERPRINT_KEY, WEIGHTS_NAME, AdapterLoadError,
                                          write_method_files)
from peft_kernels.methods.prefix_tuning import (PrefixTuningConfig, PrefixTuningModel, load_prefix_tuning,
                                                save_prefix_tuning)
from peft_kernels.nn.linear4bit import Linear4bit

peft = pytest.importorskip("peft")
P = 3
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16  # the tiny llama: 4 query heads, 2 key/value heads
TOKEN_DIM = KV_HEADS * HEAD_DIM


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT passes the deprecated `past_key_values` name
        yield


def _ours(seed=5, base=None, **kw):
    torch.manual_seed(seed)
    return PrefixTuningModel(base if base is not None else build("llama"), PrefixTuningConfig(P, **kw))


def _peft(seed=5, arch="llama", **kw):
    torch.manual_seed(seed)
    return peft.get_peft_model(build(arch), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **kw))


def _weight(linear) -> torch.Tensor:
    return linear.dequantize(torch.float32).double() if isinstance(linear, Linear4bit) else linear.weight.double()


def llama_reference(model, ids, mask, prefix=None, position_ids=None):
    """Logits of a Llama written out in float64. ``prefix``: per layer (k, v) [B, kv_heads, p, head_dim],
    used as already-rotated keys in front of the layer's own; the tokens sit at positions p..p+L-1
    (``position_ids`` + p when given); the mask [B, L] gets p leading ones."""
    cfg, m = model.config, model.model
    b, length = ids.shape
    p = prefix[0][0].shape[2] if prefix else 0
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // hq
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    pos = (torch.arange(length) + p).expand(b, length) if position_ids is None else position_ids + p
    angles = pos[..., None].double() / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w.double()

    def rotate(x):
        return torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin + x * cos

    keys_visible = torch.cat([torch.ones(b, p, dtype=torch.bool), mask.bool()], 1)
    causal = torch.ones(length, p + length, dtype=torch.bool).tril(diagonal=p)
    allowed = (causal[None] & keys_visible[:, None, :])[:, None]  # [B, 1, L, p + L]
    h = m.embed_tokens.weight.double()[ids]
    for i, layer in enumerate(m.layers):
        a = layer.self_attn
        x = rms(h, layer.input_layernorm.weight)
        q = rotate((x @ _weight(a.q_proj).T).view(b, length, hq, d).transpose(1, 2))
        k = rotate((x @ _weight(a.k_proj).T).view(b, length, hkv, d).transpose(1, 2))
        v = (x @ _weight(a.v_proj).T).view(b, length, hkv, d).transpose(1, 2)
        if prefix:
            k, v = torch.cat([prefix[i][0].double(), k], 2), torch.cat([prefix[i][1].double(), v], 2)
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
        att = torch.softmax(scores, -1).nan_to_num(0.0) @ v  # fully masked (padding) queries: zeros, not NaN
        h = h + att.transpose(1, 2).reshape(b, length, hq * d) @ _weight(a.o_proj).T
        x = rms(h, layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        h = h + (torch.nn.functional.silu(x @ _weight(mlp.gate_proj).T) * (x @ _weight(mlp.up_proj).T)) \
            @ _weight(mlp.down_proj).T
    return rms(h, m.norm.weight) @ _weight(model.lm_head).T


def _prefix_of(model, batch):
    """Per layer (k, v) from the encoder's flat output, in PEFT's documented layout [p, L, k|v, heads, dim]."""
    flat = model.prompt_encoder().double().view(P, LAYERS, 2, KV_HEADS, HEAD_DIM)
    return [tuple(flat[:, i, j].permute(1, 0, 2).expand(batch, -1, -1, -1) for j in range(2)) for i in range(LAYERS)]


def _padded_batch():
    ids = sample_ids(3, 8)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, -3:] = 0
    return ids, mask


# ====================================================================== forward vs the reference
def test_reference_itself_matches_transformers_without_prefix():
    model = build("llama")
    ids, mask = _padded_batch()
    got = model(input_ids=ids, attention_mask=mask).logits
    ref = llama_reference(model, ids, mask)
    keep = mask.bool()  # fully masked padding queries are not defined by the reference
    assert_close_to_reference(got[keep], ref[keep], torch.float32, "reference without prefix")


@pytest.mark.parametrize("projection", [False, True])
def test_forward_and_gradient_match_plain_reference(projection):
    model = _ours(prefix_projection=projection, encoder_hidden_size=24)
    ids, mask = _padded_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.shape == (3, 8, 128)
    ref = llama_reference(model.base_model, ids, mask, _prefix_of(model, 3))
    assert_close_to_reference(out.logits, ref, torch.float32, "logits")
    pos = torch.arange(8).expand(3, 8) + 5
    got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert_close_to_reference(got, llama_reference(model.base_model, ids, mask, _prefix_of(model, 3), pos),
                              torch.float32, "logits with position_ids")
    # gradient of the prefix parameters: the reference's float64 autograd through the same encoder
    out.loss.backward()
    enc64 = {n: p.detach().double().requires_grad_() for n, p in model.prompt_encoder.named_parameters()}
    flat = torch.func.functional_call(model.prompt_encoder, enc64, ())
    kv = flat.view(P, LAYERS, 2, KV_HEADS, HEAD_DIM)
    prefix = [tuple(kv[:, i, j].permute(1, 0, 2).expand(3, -1, -1, -1) for j in range(2)) for i in range(LAYERS)]
    logits = llama_reference(model.base_model, ids, mask, prefix)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    loss.backward()
    for n, p in model.prompt_encoder.named_parameters():
        assert_close_to_reference(p.grad, enc64[n].grad, torch.float32, f"d loss / d {n}")
    assert all(p.grad is None for p in model.base_model.parameters())


# ====================================================================== PEFT
@pytest.mark.parametrize("arch,projection,dtype", [
    ("llama", False, torch.float32), ("llama", True, torch.float32), ("qwen2", False, torch.float32),
    ("qwen2", True, torch.float32), ("mistral", False, torch.float32), ("gpt2", False, torch.float32),
    ("llama", False, torch.float16), ("llama", True, torch.bfloat16)])
def test_logits_and_gradients_match_peft(arch, projection, dtype):
    """Same seed, same init; same logits and parameter gradients (16-bit bases: the prefix is cast to the
    base dtype after broadcasting over the batch, as PEFT, so the batch sum of its gradient is float32)."""
    torch.manual_seed(5)
    pm = peft.get_peft_model(build(arch, dtype=dtype), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=24))
    torch.manual_seed(5)
    ours = PrefixTuningModel(build(arch, dtype=dtype),
                             PrefixTuningConfig(P, prefix_projection=projection, encoder_hidden_size=24))
    theirs = pm.prompt_encoder["default"]
    assert all(torch.equal(a, b) for a, b in zip(ours.prompt_encoder.state_dict().values(),
                                                 theirs.state_dict().values()))  # same seed, same init
    ids, mask = _padded_batch()
    a = ours(input_ids=ids, attention_mask=mask, labels=ids)
    b = pm(input_ids=ids, attention_mask=mask, labels=ids)
    assert_close_to_reference(a.logits, b.logits, dtype, f"{arch} logits vs PEFT")
    a.loss.backward()
    b.loss.backward()
    for (n, x), y in zip(ours.prompt_encoder.named_parameters(), theirs.parameters()):
        assert_close_to_reference(x.grad, y.grad, dtype, f"{arch} d loss / d {n} vs PEFT")


@pytest.mark.parametrize("projection", [False, True])
def test_peft_loads_our_files_and_we_load_peft_files(tmp_path, projection):
    ids, mask = _padded_batch()
    ours = _ours(seed=1, prefix_projection=projection)
    save_prefix_tuning(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert (config["peft_type"], config["token_dim"], config["num_attention_heads"], config["num_layers"]) == \
        ("PREFIX_TUNING", TOKEN_DIM, KV_HEADS, LAYERS) and config[FINGERPRINT_KEY]
    theirs = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "ours")
    assert_close_to_reference(ours(input_ids=ids, attention_mask=mask).logits,
                              theirs(input_ids=ids, attention_mask=mask).logits, torch.float32, "PEFT on our file")

    pm = _peft(seed=2, prefix_projection=projection)
    pm.save_pretrained(tmp_path / "peft")
    loaded = load_prefix_tuning(build("llama"), tmp_path / "peft")
    assert loaded.peft_config.prefix_projection == projection
    assert_close_to_reference(loaded(input_ids=ids, attention_mask=mask).logits,
                              pm(input_ids=ids, attention_mask=mask).logits, torch.float32, "our load of PEFT's file")
    assert not any(p.requires_grad for p in loaded.parameters())


# ====================================================================== training, counts, generation
@pytest.mark.parametrize("projection", [False, True])
def test_loss_decreases(projection):
    model = _ours(prefix_projection=projection)
    ids = sample_ids(4, 12)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05 if projection else 0.3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("projection,enc", [(False, None), (True, None), (True, 24)])
def test_trainable_counts_follow_peft_formula(projection, enc):
    model = _ours(prefix_projection=projection, encoder_hidden_size=enc)
    flat = 2 * LAYERS * TOKEN_DIM
    if projection:
        e = enc or TOKEN_DIM  # PEFT: encoder_hidden_size defaults to token_dim (the key width, not hidden_size)
        formula = P * TOKEN_DIM + (TOKEN_DIM * e + e) + (e * flat + flat)
    else:
        formula = P * flat
    assert model.get_nb_trainable_parameters()[0] == formula
    assert model.get_nb_trainable_parameters() == _peft(prefix_projection=projection,
                                                        encoder_hidden_size=enc).get_nb_trainable_parameters()


def test_greedy_generation_is_deterministic_and_matches_reference(tmp_path):
    model = _ours()
    ids = sample_ids(2, 6)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 11) and torch.equal(out[:, :6], ids)
    assert torch.equal(out, model.generate(input_ids=ids, max_new_tokens=5, do_sample=False))
    seq = ids
    with torch.no_grad():
        for _ in range(5):  # greedy by hand with the float64 reference, full recompute per step
            logits = llama_reference(model.base_model, seq, torch.ones_like(seq), _prefix_of(model, 2))
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    assert torch.equal(model.generate(input_ids=ids, max_length=9, do_sample=False), out[:, :9])
    new = model.generate(inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=5, do_sample=False)
    assert torch.equal(new, out[:, 6:])
    beams = model.generate(input_ids=ids, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, 9)
    # the same weights in PEFT decode to the same tokens (greedy through PEFT's forward; the docs say why
    # PEFT's generate() is not the comparison on transformers 5.24)
    save_prefix_tuning(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(build("llama"), tmp_path)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, pm(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_generation_with_left_padding():
    model = _ours()
    ids = sample_ids(2, 6)
    alone = model.generate(input_ids=ids[1:, 2:], max_new_tokens=4, do_sample=False)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(batch[1, 6:], alone[0, 4:])


# ====================================================================== 4-bit base
def test_over_a_4bit_base():
    from peft_kernels.quant import quantize_model

    base = build("llama")
    quantize_model(base)
    assert isinstance(base.model.layers[0].self_attn.k_proj, Linear4bit)
    model = _ours(base=base)
    ids, mask = _padded_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    ref = llama_reference(base, ids, mask, _prefix_of(model, 3))  # dequantized weights in float64
    assert_close_to_reference(out.logits, ref, torch.float32, "logits over 4-bit")
    opt = torch.optim.Adam([model.prompt_encoder.embedding.weight], lr=0.3)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    gen = model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 11) and torch.equal(gen, model.generate(input_ids=ids[:1], max_new_tokens=3,
                                                                     do_sample=False))


# ====================================================================== bad input
def test_too_long_input_is_refused():
    model = _ours()
    ctx = model.config.max_position_embeddings
    model(input_ids=sample_ids(1, ctx - P))
    with pytest.raises(ValueError, match=r"3 virtual tokens \+ 62 input tokens = 65 positions exceed .* 64"):
        model(input_ids=torch.zeros(1, ctx - P + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed the model's context"):
        model.generate(input_ids=torch.zeros(1, ctx, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match="leaves no room"):
        PrefixTuningModel(build("llama"), PrefixTuningConfig(ctx))


def test_bad_configurations_are_refused():
    base = build("llama")
    with pytest.raises(ValueError, match=r"token_dim=64 does not match the model \(32"):
        PrefixTuningModel(base, PrefixTuningConfig(P, token_dim=64))
    with pytest.raises(ValueError, match="init_weights must be None or 'zero'"):
        PrefixTuningConfig(P, init_weights="ones")
    import transformers as tf

    t5 = tf.T5ForConditionalGeneration(tf.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                                   vocab_size=64))
    with pytest.raises(ValueError, match="is an encoder-decoder model"):
        PrefixTuningModel(t5, PrefixTuningConfig(P))
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="does not work with gradient checkpointing"):
        PrefixTuningModel(base, PrefixTuningConfig(P))
    base.gradient_checkpointing_disable()
    model = PrefixTuningModel(base, PrefixTuningConfig(P, init_weights="zero"))
    assert not model.prompt_encoder.embedding.weight.any()
    with pytest.raises(ValueError, match="passing cache is not supported"):
        model(input_ids=sample_ids(1, 4), cache=object())
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, length\] = \[1, 4\]"):
        model(input_ids=sample_ids(1, 4), attention_mask=torch.ones(1, 5))


def test_a_file_for_another_model_is_refused(tmp_path):
    save_prefix_tuning(_ours(), tmp_path / "ours")
    other = build("llama", num_hidden_layers=3)
    with pytest.raises(AdapterLoadError, match=r"made for another model \(num_hidden_layers: file 2 vs model 3"):
        load_prefix_tuning(other, tmp_path / "ours")
    _peft().save_pretrained(tmp_path / "peft")  # no fingerprint in PEFT's files: the geometry check catches it
    with pytest.raises(AdapterLoadError, match=r"num_layers=2 does not match the model \(3"):
        load_prefix_tuning(other, tmp_path / "peft")
    assert all(p.requires_grad for p in other.parameters()), "a failed load must leave the model as it was"


def test_corrupt_missing_and_untrainable_files_are_refused(tmp_path):
    save_prefix_tuning(_ours(prefix_projection=True), tmp_path / "a")
    base = build("llama")
    with pytest.raises(AdapterLoadError, match="holds only the projected prefix"):
        load_prefix_tuning(base, tmp_path / "a", is_trainable=True)
    good = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    write_method_files(tmp_path / "b", good, {"prompt_embeddings": torch.zeros(P, 2 * LAYERS * TOKEN_DIM + 1)})
    with pytest.raises(AdapterLoadError, match=r"shape \(3, 129\), this model needs \(3, 128\)"):
        load_prefix_tuning(base, tmp_path / "b")
    write_method_files(tmp_path / "c", good, {"prefix": torch.zeros(P, 2 * LAYERS * TOKEN_DIM)})
    with pytest.raises(AdapterLoadError, match="has no tensor 'prompt_embeddings'"):
        load_prefix_tuning(base, tmp_path / "c")
    w = tmp_path / "a" / WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[:40])
    with pytest.raises(AdapterLoadError, match="not a readable safetensors file"):
        load_prefix_tuning(base, tmp_path / "a")
    assert all(p.requires_grad for p in base.parameters())
