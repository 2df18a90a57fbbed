"""Prompt tuning: PromptTuningModel against a plain-torch reference (the base model called on a hand-built
``[P; embed(ids)]`` with a hand-extended mask), against Hugging Face PEFT 0.21.2 (files both ways, logits,
gradients, initialisation), training, generation, a 4-bit base, and every bad input the issue lists."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from _tiny_models import build, sample_ids
from _tolerance import assert_close_to_reference
from peft_kernels.io.method_files import (CONFIG_NAME, FINGERPRINT_KEY, WEIGHTS_NAME, AdapterLoadError,
                                          write_method_files)
from peft_kernels.methods.prompt_tuning import (PromptTuningConfig, PromptTuningModel, load_prompt_tuning,
                                                save_prompt_tuning)

peft = pytest.importorskip("peft")
P = 4  # virtual tokens
HIDDEN = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about position ids / deprecated cache names on every call
        yield


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny word-level tokenizer (ids 0..99 for 'w0'..'w99', BOS 101 prepended) saved to disk."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(100)}
    vocab.update({"[UNK]": 100, "<s>": 101})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 101)])
    d = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>").save_pretrained(d)
    return str(d)


def _ours(seed=7, init="random", base=None, **kw):
    torch.manual_seed(seed)
    return PromptTuningModel(base if base is not None else build("llama"), PromptTuningConfig(P, init=init, **kw))


def _peft(seed=7, **kw):
    torch.manual_seed(seed)
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **kw)
    return peft.get_peft_model(build("llama"), cfg)


def _reference(base, prompt, ids, mask, labels=None, position_ids=None):
    """The plain definition in float64: the base called on [P; embed(ids)] with [1..1, mask] (and -100 labels)."""
    base64 = copy.deepcopy(base).double()
    b, p = ids.shape[0], prompt.shape[0]
    embeds = torch.cat([prompt.detach().double().expand(b, -1, -1), base64.get_input_embeddings()(ids)], 1)
    kw = dict(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(b, p, dtype=mask.dtype), mask], 1))
    if labels is not None:
        kw["labels"] = torch.cat([torch.full((b, p), -100), labels], 1)
    if position_ids is not None:
        kw["position_ids"] = torch.cat([torch.arange(p).expand(b, p), position_ids + p], 1)
    return base64(**kw)


def _padded_batch():
    ids = sample_ids(3, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, -2:] = 0  # right padding
    return ids, mask


# ====================================================================== forward vs the reference
def test_forward_matches_plain_reference_and_extends_everything():
    model = _ours()
    ids, mask = _padded_batch()
    labels = ids.clone()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    ref = _reference(model.base_model, model.prompt_encoder.embedding.weight, ids, mask, labels)
    assert out.logits.shape == (3, P + 9, 128)  # logits cover the virtual positions too, as PEFT
    assert_close_to_reference(out.logits, ref.logits, torch.float32, "logits")
    assert_close_to_reference(out.loss, ref.loss, torch.float32, "loss")
    # inputs_embeds give the same thing as input_ids
    emb = model.get_input_embeddings()(ids)
    assert torch.equal(model(inputs_embeds=emb, attention_mask=mask).logits, out.logits)
    # explicit position ids: the prompt takes 0..p-1, the tokens theirs shifted by p
    pos = torch.arange(9).expand(3, 9) * 2
    got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    ref = _reference(model.base_model, model.prompt_encoder.embedding.weight, ids, mask, position_ids=pos).logits
    assert_close_to_reference(got, ref, torch.float32, "logits with position_ids")


def test_prompt_gradient_matches_reference():
    model = _ours()
    ids, mask = _padded_batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    got = model.prompt_encoder.embedding.weight.grad
    prompt64 = model.prompt_encoder.embedding.weight.detach().double().requires_grad_()
    base64 = copy.deepcopy(model.base_model).double()
    embeds = torch.cat([prompt64.expand(3, -1, -1), base64.get_input_embeddings()(ids)], 1)
    loss = base64(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(3, P, dtype=torch.long), mask], 1),
                  labels=torch.cat([torch.full((3, P), -100), ids], 1)).loss
    loss.backward()
    assert_close_to_reference(got, prompt64.grad, torch.float32, "dL/dP")
    assert all(p.grad is None for p in model.base_model.parameters())


def test_no_compute_beyond_the_extra_positions():
    """FLOPs of the wrapped forward on L tokens == FLOPs of the bare base on p + L positions."""
    model = _ours()
    ids = sample_ids(2, 10)
    with FlopCounterMode(display=False) as ours:
        model(input_ids=ids)
    embeds = torch.randn(2, P + 10, HIDDEN)
    with FlopCounterMode(display=False) as bare:
        model.base_model(inputs_embeds=embeds)
    assert ours.get_total_flops() == bare.get_total_flops() > 0


def test_autograd_saves_nothing_beyond_the_extra_positions():
    """What autograd keeps for our forward on L tokens == what it keeps for the bare base on p + L positions
    whose embeddings need a gradient: the concatenation and the broadcast of P save no tensors."""
    model = _ours()
    ids = sample_ids(2, 10)

    def saved(fn):
        out = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: out.append((tuple(t.shape), t.dtype)) or t,
                                                      lambda t: t):
            fn().logits.sum().backward()
        return sorted(out, key=repr)

    ours = saved(lambda: model(input_ids=ids))
    embeds = torch.randn(2, P + 10, HIDDEN, requires_grad=True)
    bare = saved(lambda: model.base_model(inputs_embeds=embeds))
    assert ours == bare and len(ours) > 0


# ====================================================================== PEFT
def test_peft_loads_our_files_and_we_load_peft_files(tmp_path):
    ids, mask = _padded_batch()
    ours = _ours(init="vocab")
    save_prompt_tuning(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["prompt_tuning_init"] == "SAMPLE_VOCAB"
    assert config["token_dim"] == HIDDEN and config["num_virtual_tokens"] == P and config[FINGERPRINT_KEY]
    theirs = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "ours")
    assert torch.equal(theirs(input_ids=ids, attention_mask=mask).logits,
                       ours(input_ids=ids, attention_mask=mask).logits)

    pm = _peft(seed=3)
    pm.save_pretrained(tmp_path / "peft")
    loaded = load_prompt_tuning(build("llama"), tmp_path / "peft")
    assert torch.equal(loaded.prompt_encoder.embedding.weight, pm.prompt_encoder["default"].embedding.weight)
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, pm(input_ids=ids, attention_mask=mask).logits)
    assert not loaded.prompt_encoder.embedding.weight.requires_grad  # inference unless is_trainable


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("llama", torch.float16),
                                        ("llama", torch.bfloat16), ("gpt2", torch.float32)])
def test_logits_and_gradients_match_peft(tmp_path, arch, dtype):
    """P stays float32 over a 16-bit base and is cast after broadcasting, as PEFT: same logits, same dP."""
    ids, mask = _padded_batch()
    torch.manual_seed(5)
    pm = peft.get_peft_model(build(arch, dtype=dtype), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                               num_virtual_tokens=P))
    pm.save_pretrained(tmp_path)
    ours = load_prompt_tuning(build(arch, dtype=dtype), tmp_path, is_trainable=True)
    assert ours.prompt_encoder.embedding.weight.dtype == torch.float32
    a = ours(input_ids=ids, attention_mask=mask, labels=ids)
    b = pm(input_ids=ids, attention_mask=mask, labels=ids)
    assert_close_to_reference(a.logits, b.logits, dtype, "logits vs PEFT")
    a.loss.backward()
    b.loss.backward()
    ref = pm.prompt_encoder["default"].embedding.weight.grad
    assert_close_to_reference(ours.prompt_encoder.embedding.weight.grad, ref, dtype, "dL/dP vs PEFT")


@pytest.mark.parametrize("init,peft_init", [("random", "RANDOM"), ("vocab", "SAMPLE_VOCAB")])
def test_random_inits_match_peft_for_the_same_seed(init, peft_init):
    ours = _ours(seed=11, init=init)
    theirs = _peft(seed=11, prompt_tuning_init=peft_init)
    assert torch.equal(ours.prompt_encoder.embedding.weight, theirs.prompt_encoder["default"].embedding.weight)
    table = ours.get_input_embeddings().weight
    rows_from_vocab = all(any(torch.equal(r, t) for t in table) for r in ours.prompt_encoder.embedding.weight)
    assert rows_from_vocab == (init == "vocab")


def test_text_init_matches_peft_and_repeats_the_text(tokenizer_dir):
    from transformers import AutoTokenizer

    text = "w5 w17 w3"  # -> [101, 5, 17, 3], repeated/cut to P
    ours = _ours(init="text", init_text=text, tokenizer_name_or_path=tokenizer_dir)
    theirs = _peft(prompt_tuning_init="TEXT", prompt_tuning_init_text=text, tokenizer_name_or_path=tokenizer_dir)
    assert torch.equal(ours.prompt_encoder.embedding.weight, theirs.prompt_encoder["default"].embedding.weight)
    table = ours.get_input_embeddings().weight
    assert torch.equal(ours.prompt_encoder.embedding.weight, table[[101, 5, 17, 3]])
    # a tokenizer object works the same, and a short text is repeated
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    short = _ours(init="text", init_text="w9", tokenizer_name_or_path=tok)
    assert torch.equal(short.prompt_encoder.embedding.weight, table[[101, 9, 101, 9]])
    assert short.peft_config.tokenizer_name_or_path == tokenizer_dir  # recorded for the saved config


# ====================================================================== training, counts, generation
def test_loss_decreases_and_only_the_prompt_trains():
    model = _ours()
    ids = sample_ids(4, 12)
    before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # a random tiny model leaves little to learn (its loss starts near ln(vocab)); the drop is steady
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(v, model.base_model.state_dict()[k]) for k, v in before.items())


def test_trainable_count_is_p_times_hidden():
    model = _ours()
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == P * HIDDEN
    assert (trainable, total) == _peft().get_nb_trainable_parameters()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.embedding.weight"]


def _greedy_reference(model, ids, steps):
    """Greedy decoding by hand: full recompute of [P; embed(ids + generated)] at every step, no cache."""
    seq = ids
    for _ in range(steps):
        emb = model.get_input_embeddings()(seq)
        logits = model.base_model(inputs_embeds=torch.cat([model.get_prompt(seq.shape[0]), emb], 1)).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


def test_greedy_generation_is_deterministic_and_matches_reference(tmp_path):
    model = _ours(init="vocab")
    ids = sample_ids(2, 6)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 11) and torch.equal(out[:, :6], ids)  # PEFT's convention: input ids + new tokens
    assert torch.equal(out, model.generate(input_ids=ids, max_new_tokens=5, do_sample=False))
    with torch.no_grad():
        assert torch.equal(out, _greedy_reference(model, ids, 5))
    # max_length counts the real input tokens (as PEFT); inputs_embeds give only the new tokens
    assert torch.equal(model.generate(input_ids=ids, max_length=9, do_sample=False), out[:, :9])
    new = model.generate(inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=5, do_sample=False)
    assert torch.equal(new, out[:, 6:])
    # the same weights in PEFT decode to the same tokens (greedy through PEFT's forward; see the docs for why
    # PEFT's own generate() is not the comparison on transformers 5.24)
    save_prompt_tuning(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(build("llama"), tmp_path)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, pm(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_generation_prefills_the_prompt_once_and_handles_padding():
    model = _ours(init="vocab")
    lengths = []
    hook = model.base_model.register_forward_pre_hook(
        lambda m, a, kw: lengths.append((kw.get("inputs_embeds") if kw.get("inputs_embeds") is not None
                                         else kw["input_ids"]).shape[1]), with_kwargs=True)
    ids = sample_ids(2, 6)
    try:
        model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    finally:
        hook.remove()
    assert lengths == [P + 6, 1, 1, 1]  # the prompt runs once, in the prefill; each step is one token
    # a left-padded row generates what it generates alone
    alone = model.generate(input_ids=ids[1:, 2:], max_new_tokens=4, do_sample=False)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(batch[1, 6:], alone[0, 4:])


# ====================================================================== 4-bit base
def test_over_a_4bit_base():
    from peft_kernels.nn.linear4bit import Linear4bit
    from peft_kernels.quant import quantize_model

    base = build("llama")
    quantize_model(base)
    assert isinstance(base.model.layers[0].self_attn.q_proj, Linear4bit)
    model = _ours(base=base, init="vocab")
    ids, mask = _padded_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    b = ids.shape[0]
    ref = base(inputs_embeds=torch.cat([model.get_prompt(b), base.get_input_embeddings()(ids)], 1),
               attention_mask=torch.cat([torch.ones(b, P, dtype=torch.long), mask], 1),
               labels=torch.cat([torch.full((b, P), -100), ids], 1))
    assert torch.equal(out.logits, ref.logits)
    opt = torch.optim.Adam([model.prompt_encoder.embedding.weight], lr=0.3)
    losses = [out.loss.item()]
    out.loss.backward()
    opt.step()
    for _ in range(5):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.05, losses
    gen = model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(gen, model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False))
    with torch.no_grad():
        assert torch.equal(gen, _greedy_reference(model, ids[:1], 3))


# ====================================================================== bad input
def test_too_long_input_is_refused():
    model = _ours()
    ctx = model.config.max_position_embeddings  # 64
    ok = sample_ids(1, ctx - P)
    model(input_ids=ok)  # exactly fills the context
    too_long = torch.zeros(1, ctx - P + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"4 virtual tokens \+ 61 input tokens = 65 positions exceed .* 64"):
        model(input_ids=too_long)
    with pytest.raises(ValueError, match="exceed the model's context"):
        model.generate(input_ids=too_long, max_new_tokens=1)
    with pytest.raises(ValueError, match="leaves no room"):
        PromptTuningModel(build("llama"), PromptTuningConfig(ctx))


def test_bad_arguments_are_refused():
    model = _ours()
    ids = sample_ids(2, 5)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(input_ids=ids, inputs_embeds=torch.zeros(2, 5, HIDDEN))
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, length\] = \[2, 5\]"):
        model(input_ids=ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="labels must be"):
        model(input_ids=ids, labels=ids[:1])
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        model(inputs_embeds=torch.zeros(2, 5, HIDDEN + 1))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(input_ids=ids.float())
    with pytest.raises(ValueError, match="passing cache is not supported"):
        model(input_ids=ids, cache=object())
    with pytest.raises(ValueError, match="max_length=5 leaves nothing"):
        model.generate(input_ids=ids, max_length=5)
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int"):
        PromptTuningConfig(0)
    with pytest.raises(ValueError, match="init must be one of"):
        PromptTuningConfig(2, init="zeros")
    with pytest.raises(ValueError, match="needs a non-empty init_text"):
        PromptTuningConfig(2, init="text", tokenizer_name_or_path="x")
    with pytest.raises(ValueError, match="needs tokenizer_name_or_path"):
        PromptTuningConfig(2, init="text", init_text="hello")
    import transformers as tf

    t5 = tf.T5ForConditionalGeneration(tf.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                                   vocab_size=64))
    with pytest.raises(ValueError, match="is an encoder-decoder model"):
        PromptTuningModel(t5, PromptTuningConfig(2))


def _saved(tmp_path, seed=7):
    model = _ours(seed=seed)
    save_prompt_tuning(model, tmp_path)
    return model


def _unchanged(base):
    assert all(p.requires_grad for p in base.parameters()), "a failed load must leave the model as it was"


def test_a_file_for_another_model_is_refused(tmp_path):
    _saved(tmp_path / "ours")
    other = build("llama", hidden_size=32, intermediate_size=64)
    with pytest.raises(AdapterLoadError, match=r"made for another model \(hidden_size: file 64 vs model 32"):
        load_prompt_tuning(other, tmp_path / "ours")
    _unchanged(other)
    # PEFT's files carry no fingerprint: the tensor's shape still gives it away
    _peft().save_pretrained(tmp_path / "peft")
    assert FINGERPRINT_KEY not in json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    with pytest.raises(AdapterLoadError, match=r"shape \(4, 64\), this model needs \(4, 32\)"):
        load_prompt_tuning(other, tmp_path / "peft")
    _unchanged(other)


def test_corrupt_missing_and_foreign_files_are_refused(tmp_path):
    _saved(tmp_path / "a")
    w = tmp_path / "a" / WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[:-7])  # truncated
    base = build("llama")
    with pytest.raises(AdapterLoadError, match="not a readable safetensors file"):
        load_prompt_tuning(base, tmp_path / "a")
    good = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    write_method_files(tmp_path / "b", good, {"embedding.weight": torch.zeros(P, HIDDEN)})
    with pytest.raises(AdapterLoadError, match="has no tensor 'prompt_embeddings'"):
        load_prompt_tuning(base, tmp_path / "b")
    write_method_files(tmp_path / "c", {**good, "peft_type": "LORA"}, {"prompt_embeddings": torch.zeros(P, HIDDEN)})
    with pytest.raises(AdapterLoadError, match="peft_type is 'LORA'"):
        load_prompt_tuning(base, tmp_path / "c")
    write_method_files(tmp_path / "d", {**good, "num_virtual_tokens": 0}, {"prompt_embeddings": torch.zeros(P, HIDDEN)})
    with pytest.raises(AdapterLoadError, match="num_virtual_tokens must be a positive int"):
        load_prompt_tuning(base, tmp_path / "d")
    with pytest.raises(FileNotFoundError):
        load_prompt_tuning(base, tmp_path / "nowhere")
    _unchanged(base)


def test_round_trip_keeps_the_prompt_and_trains_when_asked(tmp_path):
    model = _saved(tmp_path)
    loaded = load_prompt_tuning(build("llama"), tmp_path, is_trainable=True)
    assert torch.equal(loaded.prompt_encoder.embedding.weight, model.prompt_encoder.embedding.weight)
    assert loaded.get_nb_trainable_parameters()[0] == P * HIDDEN


def test_text_init_without_a_tokenizer_path_still_loads_in_peft(tmp_path, tokenizer_dir):
    """PEFT refuses a TEXT config without tokenizer_name_or_path; such a save records RANDOM for PEFT and
    keeps TEXT under our own key."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=f"{tokenizer_dir}/tokenizer.json")
    assert not tok.name_or_path
    model = _ours(init="text", init_text="w1 w2", tokenizer_name_or_path=tok)
    save_prompt_tuning(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (config["prompt_tuning_init"], config["peft_kernels_prompt_tuning_init"]) == ("RANDOM", "TEXT")
    ids = sample_ids(2, 5)
    theirs = peft.PeftModel.from_pretrained(build("llama"), tmp_path)
    assert torch.equal(theirs(input_ids=ids).logits, model(input_ids=ids).logits)
    assert load_prompt_tuning(build("llama"), tmp_path).peft_config.init == "text"
