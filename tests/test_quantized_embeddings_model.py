"""quantize_model(quantize_embeddings=, quantize_head=) on tiny transformers models: logits against a float64
model holding the dequantized tables, exact bytes against bitsandbytes' layout, one copy when tied,
save/load round trip bit-exact (trainable rows included), bad input."""
from __future__ import annotations

import copy

import pytest
import torch

from peft_kernels.methods.trainable_tokens import add_trainable_tokens
from peft_kernels.nn import Embedding4bit, Linear4bit, Linear4bitHead
from peft_kernels.quant.checkpoint import load_quantized, save_quantized
from peft_kernels.quant.model import quantize_model, tensor_bytes

from _tiny_models import VOCAB, build, sample_ids
from _tolerance import assert_close_to_reference
from _weights import weight64

CASES = (("llama", False), ("llama", True), ("qwen2", False), ("gpt2", True))


def _quantized(arch, tied):
    model = build(arch, tie_word_embeddings=tied)
    ref = copy.deepcopy(model)
    report = quantize_model(model, quantize_embeddings=True, quantize_head=True)
    return model, ref, report


def _reference64(model, ref):
    """``ref`` in float64 with every 4-bit weight of ``model`` put in dequantized (what the 4-bit model computes)."""
    ref = ref.double()
    for name, m in model.named_modules():
        if isinstance(m, (Linear4bit, Embedding4bit)):
            w = weight64(m)
            target = ref.get_submodule(name)
            if type(target).__name__ == "Conv1D":
                w = w.t()
            target.weight.data = w.contiguous()
    if getattr(ref.config, "tie_word_embeddings", False):
        ref.get_output_embeddings().weight = ref.get_input_embeddings().weight
    return ref


@pytest.mark.parametrize("arch,tied", CASES)
def test_logits_match_the_dequantized_float64_model(arch, tied):
    model, ref, report = _quantized(arch, tied)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, Embedding4bit) and isinstance(head, Linear4bitHead)
    assert report.embeddings and report.head and report.tied == tied
    assert (head.weight is emb.weight) == tied
    ids = sample_ids()
    ref64 = _reference64(model, ref)
    with torch.no_grad():
        got = model(ids).logits
        want = ref64(ids).logits
    assert_close_to_reference(got, want, torch.float32, f"{arch} logits (tied={tied})")


def _bnb_bytes(w: torch.Tensor) -> int:
    """Bytes of bitsandbytes' NF4 form of ``w`` (blocksize 64, nested statistics): codes + absmax + code books."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    packed, st = bnbf.quantize_4bit(w.float(), blocksize=64, quant_type="nf4", compress_statistics=True)
    ts = [packed, st.absmax, st.code, st.state2.absmax, st.state2.code]
    return sum(t.numel() * t.element_size() for t in ts)


@pytest.mark.parametrize("tied", (False, True))
def test_table_bytes_equal_bitsandbytes_and_a_tied_pair_is_stored_once(tied):
    model = build("llama", tie_word_embeddings=tied)
    emb_w, head_w = model.get_input_embeddings().weight.detach().clone(), model.lm_head.weight.detach().clone()
    before = tensor_bytes(model)
    report = quantize_model(model, quantize_embeddings=True, quantize_head=True)
    emb, head = model.get_input_embeddings(), model.lm_head
    table = sum(t.numel() * t.element_size() for t in emb.quantized_weight_tensors())
    assert table == _bnb_bytes(emb_w)
    head_bytes = sum(t.numel() * t.element_size() for t in head.quantized_weight_tensors())
    assert head_bytes == _bnb_bytes(head_w)
    # 4 bits per parameter + one uint8 absmax per 64 + nested float32 absmax per 256 blocks + code books
    v, h = emb_w.shape
    assert table == v * h // 2 + v * h // 64 + 4 * -(-v * h // 64 // 256) + 4 * 256 + 4 * 16
    dense_tables = (1 if tied else 2) * v * h * 4
    assert report.bytes_before == before
    dense_linears = sum(4 * model.get_submodule(n).in_features * model.get_submodule(n).out_features
                        for n in report.replaced if n not in (report.embeddings, report.head))
    linear4 = sum(sum(t.numel() * t.element_size() for t in model.get_submodule(n).quantized_weight_tensors())
                  for n in report.replaced if n not in (report.embeddings, report.head))
    assert before - tensor_bytes(model) == dense_tables + dense_linears - linear4 - (1 if tied else 2) * table
    assert report.quantized_weight_bytes == linear4 + (1 if tied else 2) * table


@pytest.mark.parametrize("arch,tied", (("llama", False), ("llama", True)))
def test_save_load_round_trip_is_bit_exact_with_trainable_rows(arch, tied, tmp_path):
    model = build(arch, tie_word_embeddings=tied)
    model.resize_token_embeddings(VOCAB + 3, mean_resizing=False)
    quantize_model(model, quantize_embeddings=True, quantize_head=True)
    add_trainable_tokens(model, n_new=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (Embedding4bit, Linear4bitHead)) and m.has_trainable_tokens:
                m.trainable_tokens_delta.add_(torch.randn_like(m.trainable_tokens_delta))
    save_quantized(model, tmp_path / "ckpt")
    back = load_quantized(tmp_path / "ckpt")
    emb, head = back.get_input_embeddings(), back.get_output_embeddings()
    assert isinstance(emb, Embedding4bit) and isinstance(head, Linear4bitHead)
    assert (head.weight is emb.weight) == tied
    assert (head.trainable_tokens_delta is emb.trainable_tokens_delta) == tied
    sd_a, sd_b = model.state_dict(), back.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert sd_a[k].dtype == sd_b[k].dtype and torch.equal(sd_a[k], sd_b[k]), k
    ids = torch.cat([sample_ids(), torch.tensor([[VOCAB, VOCAB + 1, VOCAB + 2] * 4] * 2)], 1)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_new_tokens_after_resize_read_their_rows_and_padding_idx_is_kept():
    model = build("llama", pad_token_id=1)
    model.resize_token_embeddings(VOCAB + 2, mean_resizing=False)
    dense = model.get_input_embeddings()
    quantize_model(model, quantize_embeddings=True, quantize_head=True)
    emb = model.get_input_embeddings()
    assert emb.num_embeddings == VOCAB + 2 and emb.padding_idx == dense.padding_idx
    ids = torch.tensor([0, 1, VOCAB, VOCAB + 1])
    assert_close_to_reference(emb(ids).double(), weight64(emb)[ids], torch.float32, "rows incl. new ids")
    with pytest.raises(ValueError, match="out of range|must be in|range"):
        emb(torch.tensor([VOCAB + 2]))


def test_bad_flags_raise_clear_errors():
    with pytest.raises(ValueError, match="tie"):
        quantize_model(build("llama", tie_word_embeddings=True), quantize_embeddings=True, quantize_head=False)
    with pytest.raises(ValueError, match="True or False"):
        quantize_model(build("llama"), quantize_embeddings=1)
    with pytest.raises(ValueError, match="skip_modules"):
        quantize_model(build("llama"), quantize_head=True, skip_modules=["lm_head"])
    model = build("llama")
    quantize_model(model, quantize_embeddings=True)
    with pytest.raises(ValueError, match="already Embedding4bit"):
        quantize_model(model, quantize_embeddings=True, target_modules=["q_proj"])


@pytest.mark.parametrize("emb,head", ((True, False), (False, True)))
def test_save_load_round_trip_with_only_one_table_in_4bit(emb, head, tmp_path):
    model = build("llama")
    report = quantize_model(model, quantize_embeddings=emb, quantize_head=head)
    assert (report.embeddings is not None) == emb and (report.head is not None) == head
    save_quantized(model, tmp_path / "ckpt")
    back = load_quantized(tmp_path / "ckpt")
    assert isinstance(back.get_input_embeddings(), Embedding4bit) == emb
    assert isinstance(back.get_output_embeddings(), Linear4bitHead) == head
    sd_a, sd_b = model.state_dict(), back.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    ids = sample_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_dense_checkpoint_quantizes_the_tables_on_load_like_quantize_model(tmp_path):
    dense = build("llama")
    dense.save_pretrained(tmp_path / "dense")
    back = load_quantized(tmp_path / "dense", quantize_embeddings=True, quantize_head=True)
    model = build("llama")
    quantize_model(model, quantize_embeddings=True, quantize_head=True)
    sd_a, sd_b = model.state_dict(), back.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
