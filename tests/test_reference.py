"""The plain-torch reference is itself checked: against bitsandbytes and against a naive element loop."""
import pytest
import torch

from peft_kernels.ops import reference
from peft_kernels.quant import code4, quantize_4bit

bnbF = pytest.importorskip("bitsandbytes.functional")


def _naive_dequant(packed, absmax, code, blocksize, numel):
    """Element by element, in float64: the definition of the format, written as plainly as possible."""
    out = []
    flat = packed.reshape(-1).tolist()
    for i in range(numel):
        byte = flat[i // 2]
        q = (byte >> 4) if i % 2 == 0 else (byte & 0xF)
        out.append(float(code[q]) * float(absmax[i // blocksize]))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,blocksize", [((7, 33), 32), ((5, 13), 64), ((3, 1), 64), ((9, 100), 128)])
def test_reference_dequant_matches_naive_definition(quant_type, shape, blocksize):
    w = torch.randn(shape)
    packed, st = quantize_4bit(w, blocksize, quant_type, double_quant=False)
    got = reference.dequantize_4bit(packed, st.absmax, st.code, blocksize, w.numel(), torch.float64)
    assert torch.equal(got, _naive_dequant(packed, st.absmax, code4(quant_type), blocksize, w.numel()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reference_dequant_equals_bitsandbytes(dtype, double_quant, quant_type):
    # Shapes whose row length is a multiple of the blocksize: bitsandbytes 0.50.2's
    # AVX-512 CPU dequantization is wrong otherwise (DESIGN.md), so it is no reference there.
    w = (torch.randn(48, 256) * 0.1).to(dtype)
    packed, st = quantize_4bit(w, 64, quant_type, double_quant)
    ref_packed, ref_state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant,
                                               quant_type=quant_type)
    theirs = bnbF.dequantize_4bit(ref_packed, ref_state)
    ours = reference.dequantize_4bit(packed, st.absmax_float(), st.code, 64, w.numel(), dtype).view(w.shape)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


def test_decode_absmax_matches_quant_state():
    _, st = quantize_4bit(torch.randn(33, 700), 32, double_quant=True)
    n = st.nested
    assert torch.equal(reference.decode_absmax(st.absmax, n.absmax, n.code, n.offset), st.absmax_float())


def test_reference_linear_forward_and_grad_input_are_the_dense_math():
    w = torch.randn(17, 31, dtype=torch.float64)
    packed, st = quantize_4bit(w.float(), 32, double_quant=False)
    wd = reference.dequantize_4bit(packed, st.absmax, st.code, 32, w.numel(), torch.float64).view(17, 31)
    x = torch.randn(5, 31, dtype=torch.float64)
    b = torch.randn(17, dtype=torch.float64)
    y = reference.linear4bit_forward(x, packed, st.absmax, st.code, 32, 17, b)
    assert torch.allclose(y, x @ wd.T + b, rtol=0, atol=1e-12)
    dy = torch.randn(5, 17, dtype=torch.float64)
    dx = reference.linear4bit_grad_input(dy, packed, st.absmax, st.code, 32, 31)
    assert torch.allclose(dx, dy @ wd, rtol=0, atol=1e-12)
