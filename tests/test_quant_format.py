"""Byte parity with bitsandbytes: packed codes, absmax and nested statistics, plus QuantState checks."""
import itertools
import json

import pytest
import torch

bnbF = pytest.importorskip("bitsandbytes.functional")

from peft_kernels.quant import QuantState, VALID_BLOCKSIZES, code4, dynamic_map, quantize_4bit  # noqa: E402
from peft_kernels.quant.quantize import quantize_blockwise_8bit  # noqa: E402

# Ragged shapes: element counts not multiples of any block, odd counts, a single element.
SHAPES = [(7, 33), (3, 1), (1, 1), (65, 129), (300, 301), (64, 64)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_code_books_equal_bitsandbytes():
    assert torch.equal(code4("nf4"), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(code4("fp4"), bnbF.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(), bnbF.create_dynamic_map(signed=True))


@pytest.mark.parametrize("quant_type,double_quant", list(itertools.product(["nf4", "fp4"], [False, True])))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
def test_quantize_4bit_bytes_equal_bitsandbytes(quant_type, double_quant, dtype, blocksize):
    gen = torch.Generator().manual_seed(blocksize)
    for shape in SHAPES:
        w = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        ref_packed, ref = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                             quant_type=quant_type)
        packed, st = quantize_4bit(w, blocksize, quant_type, double_quant)
        assert packed.shape == ref_packed.shape == ((w.numel() + 1) // 2, 1)
        assert torch.equal(packed, ref_packed), (shape, "packed codes differ")
        assert torch.equal(st.absmax, ref.absmax), (shape, "absmax differs")
        assert st.dtype == ref.dtype and tuple(st.shape) == tuple(ref.shape)
        if double_quant:
            assert torch.equal(st.nested.absmax, ref.state2.absmax)
            assert torch.equal(st.nested.code, ref.state2.code)
            assert st.nested.offset == ref.offset.item()
        # Our decoded absmax equals bitsandbytes' own decoding of its nested stats.
        ref_abs = bnbF.dequantize_blockwise(ref.absmax, ref.state2) + ref.offset if double_quant else ref.absmax
        assert torch.equal(st.absmax_float(), ref_abs)


def test_blockwise_8bit_equals_bitsandbytes_including_zero_blocks():
    x = torch.randn(256 * 40 + 17)
    x[256:512] = 0.0  # an all-zero block
    q, absmax = quantize_blockwise_8bit(x, 256)
    ref_q, ref_state = bnbF.quantize_blockwise(x, blocksize=256)
    assert torch.equal(q, ref_q.reshape(-1)) and torch.equal(absmax, ref_state.absmax)


@pytest.mark.parametrize("double_quant", [False, True])
def test_checkpoint_keys_equal_bitsandbytes_as_dict(double_quant):
    w = torch.randn(40, 72, dtype=torch.float16)
    ref_packed, ref = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    packed, st = quantize_4bit(w, 64, "nf4", double_quant)
    ours = st.to_checkpoint(packed, "weight")
    theirs = {"weight." + k: v for k, v in ref.as_dict(packed=True).items()}
    theirs["weight"] = ref_packed
    assert set(ours) == set(theirs)
    json_key = "weight.quant_state.bitsandbytes__nf4"
    for k in ours:
        if k != json_key:
            assert torch.equal(ours[k], theirs[k]), k
    assert json.loads(bytes(ours[json_key].tolist())) == json.loads(bytes(theirs[json_key].tolist()))
    # Both directions: bitsandbytes reads ours, we read theirs.
    back = bnbF.QuantState.from_dict({k[len("weight."):]: v for k, v in ours.items() if k != "weight"}, "cpu")
    assert torch.equal(back.absmax, ref.absmax) and back.blocksize == 64 and back.shape == ref.shape
    packed2, st2 = QuantState.from_checkpoint(theirs, "weight")
    assert torch.equal(packed2, packed) and torch.equal(st2.absmax_float(), st.absmax_float())


def test_bits_per_parameter_counts_statistics_exactly():
    packed, st = quantize_4bit(torch.randn(4096, 512), 64, "nf4", double_quant=True)
    n = 4096 * 512
    nblocks = n // 64
    expected_bytes = n // 2 + nblocks * 1 + (-(-nblocks // 256)) * 4 + 16 * 4 + 256 * 4 + 4
    assert packed.numel() + st.storage_bytes() == expected_bytes
    _, st_plain = quantize_4bit(torch.randn(4096, 512), 64, "nf4", double_quant=False)
    assert st_plain.storage_bytes() == nblocks * 4 + 16 * 4


# ------------------------------------------------------------------ bad input
def test_rejects_unsupported_blocksize_and_type():
    with pytest.raises(ValueError, match="blocksize 48"):
        quantize_4bit(torch.randn(8, 8), blocksize=48)
    with pytest.raises(ValueError, match="quant_type 'int4'"):
        quantize_4bit(torch.randn(8, 8), quant_type="int4")
    with pytest.raises(TypeError, match="dtype int32"):
        quantize_4bit(torch.ones(8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        quantize_4bit(torch.randn(0, 8))


def test_quant_state_that_does_not_match_its_bytes():
    packed, st = quantize_4bit(torch.randn(10, 10), 32)
    with pytest.raises(ValueError, match="does not match its bytes"):
        st.validate(packed[:-1])
    wrong = QuantState(st.quant_type, st.blocksize, torch.Size((20, 10)), st.dtype, st.absmax, st.code, st.nested)
    with pytest.raises(ValueError, match="does not belong to this weight"):
        wrong.validate(packed)
    ckpt = st.to_checkpoint(packed)
    ckpt["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="corrupt quant state JSON"):
        QuantState.from_checkpoint(ckpt)
    ckpt = st.to_checkpoint(packed)
    del ckpt["weight.absmax"]
    with pytest.raises(ValueError, match="lacks tensor 'weight.absmax'"):
        QuantState.from_checkpoint(ckpt)
