"""Embedding4bit and Linear4bitHead: the gather-dequant kernel (interpreter) and CPU path against a float64
reference, bytes against bitsandbytes, nn.Embedding semantics, trainable token rows, state dicts, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from peft_kernels.kernels._launch import is_interpreted
from peft_kernels.kernels.embedding4bit import _embedding4bit_kernel, embedding_4bit as triton_embedding_4bit
from peft_kernels.nn import Embedding4bit, Linear4bit, Linear4bitHead
from peft_kernels.ops import backend, cpu_lib
from peft_kernels.ops import reference as R
from peft_kernels.ops.embedding4bit import embedding4bit_op
from peft_kernels.quant import quantize_4bit

from _tolerance import assert_close_to_reference
from _weights import weight64

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16)
# (V, H, blocksize): odd H (rows start mid-byte) and H % blocksize != 0 (blocks cross rows); H = 1;
# H over one program's 512 columns; an aligned case (whole bytes and blocks per row: the CPU fast path).
SHAPES = ((37, 33, 32), (11, 100, 64), (5, 1, 32), (3, 700, 128), (50, 64, 64))


def _table(v, h, blocksize, quant_type="nf4", double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, h, generator=g)
    packed, st = quantize_4bit(w.to(DEVICE), blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    return packed, st


def _ids(v, m, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (m,), generator=g)
    ids[0], ids[-1] = v - 1, 0           # the ends of the table
    return ids.to(DEVICE)


def _ref_rows(packed, st, ids):
    """float64 rows: the whole table dequantized in float64, then indexed."""
    full = R.dequantize_4bit(packed, st.absmax_float(), st.code, st.blocksize, st.numel, torch.float64)
    return full.view(st.shape)[ids.long()]


def _nested_args(st):
    n = st.nested
    return {} if n is None else {"nested_absmax": n.absmax, "nested_code": n.code, "nested_offset": n.offset}


# ---------------------------------------------------------------------------------- kernel
@pytest.mark.skipif(DEVICE == "cpu" and not is_interpreted(_embedding4bit_kernel),
                    reason="no GPU and triton was imported without TRITON_INTERPRET=1")
@pytest.mark.parametrize("v,h,blocksize", SHAPES)
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_triton_gather_matches_float64_reference(v, h, blocksize, quant_type, double_quant):
    packed, st = _table(v, h, blocksize, quant_type, double_quant, seed=v * h)
    for m in (1, 7):                      # M = 1, and M ragged over BLOCK_M = 4
        ids = _ids(v, m)
        want = _ref_rows(packed, st, ids)
        for dtype in DTYPES:
            out = torch.full((m, h), float("nan"), dtype=dtype, device=DEVICE)  # unwritten -> NaN -> fails
            got = triton_embedding_4bit(ids, packed, st.absmax, st.code, blocksize, h, dtype, out=out,
                                        **_nested_args(st))
            assert got.data_ptr() == out.data_ptr()
            assert_close_to_reference(got, want, dtype, f"rows V={v} H={h} bs={blocksize} {dtype}")


@pytest.mark.parametrize("v,h,blocksize", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_cpu_gather_is_bit_identical_to_dequantizing_the_table(v, h, blocksize, double_quant):
    packed, st = _table(v, h, blocksize, double_quant=double_quant, seed=v + h)
    ids = _ids(v, 9)
    for dtype in DTYPES + (torch.bfloat16,):
        full = R.dequantize_4bit(packed, st.absmax_float(), st.code, st.blocksize, st.numel, dtype).view(v, h)
        got = R.embedding_4bit_rows(ids, packed, st.absmax, st.code, blocksize, h, dtype,
                                    *(_nested_args(st).values()))
        assert torch.equal(got, full[ids])
        assert_close_to_reference(got.float() if dtype == torch.bfloat16 else got, _ref_rows(packed, st, ids),
                                  dtype, "cpu rows")


def test_cpu_gather_decodes_only_the_needed_blocks(monkeypatch):
    # The CPU path must not dequantize the whole table: reference.dequantize_4bit is never called.
    packed, st = _table(64, 96, 32)
    called = []
    monkeypatch.setattr(R, "dequantize_4bit", lambda *a, **k: called.append(1))
    R.embedding_4bit_rows(_ids(64, 5), packed, st.absmax, st.code, 32, 96, torch.float32,
                          *(_nested_args(st).values()))
    assert not called


@pytest.mark.skipif(not backend.cpu_lib_usable(), reason="the CPU C library is not built")
@pytest.mark.parametrize("v,h,blocksize", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_op_through_the_cpu_library_is_bit_identical_and_decodes_only_the_rows(v, h, blocksize, double_quant,
                                                                               monkeypatch):
    # auto on CPU tensors: aligned rows (H % blocksize == 0) go through the C dequantization of the gathered
    # rows; the others through the reference gather. Either way the bits of dequantizing the table, indexed.
    if DEVICE != "cpu":
        pytest.skip("the CPU C library path takes CPU tensors")
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "auto")
    packed, st = _table(v, h, blocksize, double_quant=double_quant, seed=v + h)
    ids = torch.cat([_ids(v, 9), _ids(v, 4, seed=5)]).view(13, 1)    # repeats, the table's ends, 2-D ids
    calls = []
    real = cpu_lib.dequantize_4bit_cpu
    monkeypatch.setattr(cpu_lib, "dequantize_4bit_cpu", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    n = st.nested
    nested = (None, None, 0.0) if n is None else (n.absmax, n.code, n.offset)
    for dtype in DTYPES + (torch.bfloat16,):
        full = R.dequantize_4bit(packed, st.absmax_float(), st.code, blocksize, st.numel, dtype).view(v, h)
        got = embedding4bit_op(ids, packed, st.absmax, st.code, *nested, blocksize, h, dtype)
        assert got.shape == (13, 1, h) and got.dtype == dtype
        assert torch.equal(got, full[ids])
    # the C library decoded exactly the 13 looked-up rows per dtype (never the table), and only when aligned
    assert calls == ([13 * h] * 3 if h % blocksize == 0 else [])


@pytest.mark.parametrize("h", [40, 64])   # the reference gather; on CPU with the C library, its path
def test_op_opcheck_and_fake(h):
    packed, st = _table(19, h, 32)
    ids = torch.tensor([[0, 18, 3], [4, 4, 1]], device=DEVICE)
    n = st.nested
    torch.library.opcheck(embedding4bit_op, (ids, packed, st.absmax, st.code, n.absmax, n.code, n.offset, 32, h,
                                             torch.float32))


# ---------------------------------------------------------------------------------- module
def _embedding(v=37, h=33, padding_idx=None, seed=0, **kw):
    torch.manual_seed(seed)
    emb = nn.Embedding(v, h, padding_idx=padding_idx)
    return emb, Embedding4bit.from_embedding(emb, **kw)


@pytest.mark.parametrize("blocksize", [32, 64])
@pytest.mark.parametrize("double_quant", [True, False])
def test_bytes_equal_bitsandbytes(blocksize, double_quant):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    emb, e4 = _embedding(37, 33, blocksize=blocksize, double_quant=double_quant)
    ref_packed, ref = bnbF.quantize_4bit(emb.weight.detach().clone(), blocksize=blocksize,
                                         compress_statistics=double_quant, quant_type="nf4")
    assert torch.equal(e4.weight.reshape(-1), ref_packed.reshape(-1))
    assert torch.equal(e4.absmax, ref.absmax)
    if double_quant:
        assert torch.equal(e4.nested_absmax, ref.state2.absmax) and e4.nested_offset == pytest.approx(
            float(ref.offset), abs=0)
    # ... and they are the bytes a 4-bit head [V, H] of the same matrix has (what a tied head shares)
    head = Linear4bit.from_linear(nn.Linear(33, 37, bias=False).requires_grad_(False), blocksize=blocksize,
                                  double_quant=double_quant)
    head.quantize_(emb.weight)
    assert torch.equal(head.weight, e4.weight) and torch.equal(head.absmax, e4.absmax)


def test_storage_bytes_and_bits_per_parameter_exact():
    v, h, bs = 37, 33, 32
    _, e4 = _embedding(v, h, blocksize=bs)
    nb = math.ceil(v * h / bs)
    table = (v * h + 1) // 2 + nb + 16 * 4 + 4 * math.ceil(nb / 256) + 256 * 4   # codes, absmax, code books
    assert sum(t.numel() * t.element_size() for t in e4.quantized_weight_tensors()) == table
    assert e4.bits_per_parameter == pytest.approx(8 * (table + 4) / (v * h))       # + the float nested offset


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_semantics_as_nn_embedding(dtype):
    emb, e4 = _embedding(37, 33, padding_idx=3, blocksize=32)
    e4 = Embedding4bit.from_embedding(emb.to(dtype), blocksize=32)
    ids = torch.tensor([[0, 36, 3, 3], [5, 5, 1, 0]])
    out = e4(ids)
    assert out.shape == (2, 4, 33) and out.dtype == dtype and not out.requires_grad
    assert torch.equal(out[0, 2], torch.zeros(33, dtype=dtype))          # the padding row reads as stored: zero
    assert_close_to_reference(out, weight64(e4)[ids], dtype, "rows")
    assert torch.equal(e4(ids.int()), out)                               # int32 ids too
    e16 = Embedding4bit.from_embedding(emb.float(), blocksize=32, compute_dtype=torch.float16)
    assert e16(ids).dtype == torch.float16
    assert e4(torch.tensor(5)).shape == (33,) and e4(torch.zeros(0, dtype=torch.long)).shape == (0, 33)
    assert all(not p.requires_grad for p in e4.parameters())


@pytest.mark.skipif(DEVICE == "cpu" and not is_interpreted(_embedding4bit_kernel),
                    reason="no GPU and triton was imported without TRITON_INTERPRET=1")
def test_module_through_the_triton_backend(monkeypatch):
    _, e4 = _embedding(37, 33, padding_idx=3, blocksize=32)
    e4.set_trainable_tokens([5])
    ids = torch.tensor([[0, 36, 3, 5], [5, 2, 1, 0]])
    cpu = e4(ids)
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "triton")
    got = e4(ids)
    assert_close_to_reference(got, cpu.double(), torch.float32, "triton backend")
    got.sum().backward()
    assert e4.trainable_tokens_delta.grad is not None


def test_state_dict_keys_and_round_trip():
    emb, e4 = _embedding(20, 24, blocksize=32)
    sd = e4.state_dict()
    assert set(sd) == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    other = Embedding4bit(20, 24, blocksize=64)
    other.load_state_dict(sd)
    ids = torch.arange(20)
    assert other.blocksize == 32 and torch.equal(other(ids), e4(ids))
    fresh = Embedding4bit(20, 24, blocksize=32)
    fresh.load_state_dict(emb.state_dict())                               # a dense table quantizes on load
    assert torch.equal(fresh.weight, e4.weight)


# ---------------------------------------------------------------------------------- trainable rows
def test_trainable_rows_replace_frozen_rows_and_only_they_get_gradients():
    emb, e4 = _embedding(37, 33, padding_idx=3, blocksize=32)
    e4.set_trainable_tokens([30, 3, 7])
    assert e4.trainable_token_indices.tolist() == [3, 7, 30]
    ids = torch.tensor([[7, 30, 3, 1], [30, 30, 0, 7]])
    assert torch.equal(e4(ids), weight64(e4).float()[ids])               # initialised: a no-op
    with torch.no_grad():
        e4.trainable_tokens_delta.add_(torch.randn(3, 33))
    out = e4(ids)
    rows = e4.trainable_tokens_delta
    ref = weight64(e4)[ids].clone()
    for j, t in enumerate((3, 7, 30)):
        ref[ids == t] = rows[j].detach().double()
    assert_close_to_reference(out, ref, torch.float32, "rows")
    g = torch.randn_like(out)
    out.backward(g)
    want = torch.zeros(3, 33, dtype=torch.float64)
    for j, t in enumerate((3, 7, 30)):
        if t != 3:                                                          # padding_idx: never updated
            want[j] = g[ids == t].double().sum(0)
    assert_close_to_reference(rows.grad, want, torch.float32, "row grads")
    assert torch.equal(rows.grad[0], torch.zeros(33))
    assert [n for n, p in e4.named_parameters() if p.requires_grad] == ["trainable_tokens_delta"]
    sd = e4.state_dict()
    back = Embedding4bit(37, 33, padding_idx=3, blocksize=32)
    back.load_state_dict(sd)
    assert torch.equal(back(ids), out.detach())


@pytest.mark.parametrize("bias", [False, True])
def test_head_rows_logits_and_gradients_against_float64(bias):
    torch.manual_seed(0)
    dense = nn.Linear(24, 37, bias=bias)
    head = Linear4bitHead.from_linear(dense, blocksize=32)
    assert isinstance(head, Linear4bit)
    x = torch.randn(2, 5, 24, requires_grad=True)
    assert torch.equal(head(x), Linear4bit.from_linear(dense, blocksize=32)(x))   # no rows: the plain head
    head.set_trainable_tokens([36, 0, 11])
    with torch.no_grad():
        head.trainable_tokens_delta.add_(torch.randn(3, 24))
    y = head(x)
    idx = head.trainable_token_indices
    w = weight64(head).clone()
    w[idx] = head.trainable_tokens_delta.detach().double()
    w.requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    b64 = None if not bias else head.bias.detach().double().requires_grad_(True)
    y64 = nn.functional.linear(x64, w, b64)
    assert_close_to_reference(y, y64, torch.float32, "logits")
    g = torch.randn_like(y)
    y.backward(g)
    y64.backward(g.double())
    assert_close_to_reference(x.grad, x64.grad, torch.float32, "dx")
    assert_close_to_reference(head.trainable_tokens_delta.grad, w.grad[idx], torch.float32, "d rows")
    if bias:
        assert head.bias.requires_grad
        assert_close_to_reference(head.bias.grad, b64.grad, torch.float32, "d bias")


# ---------------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors():
    _, e4 = _embedding(10, 8, blocksize=32)
    with pytest.raises(ValueError, match=r"token id 10 is out of range .* \[0, 10\)"):
        e4(torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        e4(torch.tensor([-1]))
    with pytest.raises(TypeError, match="int64 \\(or int32\\)"):
        e4(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="tensor of token ids"):
        e4([1, 2])
    with pytest.raises(ValueError, match="same device"):
        e4(torch.tensor([1], device="meta"))
    with pytest.raises(ValueError, match="padding_idx"):
        Embedding4bit(10, 8, padding_idx=10)
    with pytest.raises(ValueError, match="num_embeddings must be a positive int"):
        Embedding4bit(0, 8)
    with pytest.raises(ValueError, match="max_norm"):
        Embedding4bit.from_embedding(nn.Embedding(10, 8, max_norm=1.0))
    with pytest.raises(TypeError, match="expected nn.Embedding"):
        Embedding4bit.from_embedding(nn.Linear(8, 10))
    with pytest.raises(ValueError, match=r"token indices must be in \[0, 10\)"):
        e4.set_trainable_tokens([3, 10])
    with pytest.raises(ValueError, match="unique"):
        e4.set_trainable_tokens([3, 3])
    with pytest.raises(ValueError, match="non-empty"):
        e4.set_trainable_tokens([])
    with pytest.raises(ValueError, match=r"values must be a \[2, 8\] tensor"):
        e4.set_trainable_tokens([1, 2], values=torch.zeros(2, 7))
    e4.set_trainable_tokens([1])
    with pytest.raises(ValueError, match="already has 1 trainable token rows"):
        e4.set_trainable_tokens([2])
    with pytest.raises(RuntimeError, match=r"\(10, 8\) weight but this layer is \[12, 8\]"):
        Embedding4bit(12, 8).load_state_dict(Embedding4bit(10, 8).state_dict())
