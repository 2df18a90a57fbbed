"""The decode path (M <= 16): the per-shape dispatch table, the torch.library ops, and generate().

On CPU the decode path is Triton's (TRITON_INTERPRET=1, backend 'triton'); the CUDA C GEMV's
arithmetic is checked in test_cuda_gemv.py (host emulation) and on a GPU by the ``gpu`` tests
below. ``decode_dispatch.counts`` records which kernel each call ran, so the tests check that the
path was taken instead of assuming it.
"""
from __future__ import annotations

import json

import pytest
import torch

from _tiny_models import build
from _tolerance import assert_close_to_reference
from peft_kernels.methods import lora
from peft_kernels.ops import backend, decode, decode_dispatch, reference
from peft_kernels.quant import quantize_4bit
from peft_kernels.quant.model import quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Empty counts and table cache; a helper that installs a table file."""
    decode_dispatch.reset_counts()
    decode_dispatch.clear_cache()

    def use_table(table):
        path = tmp_path / "table.json"
        path.write_text(json.dumps(table))
        monkeypatch.setenv(decode_dispatch.TABLE_ENV, str(path))
        decode_dispatch.clear_cache()
    yield monkeypatch, use_table
    decode_dispatch.clear_cache()
    decode_dispatch.reset_counts()


# ----------------------------------------------------------------- the table
def test_shipped_table_is_valid_and_defaults_to_triton(fresh):
    table = json.loads(decode_dispatch.TABLE_PATH.read_text())
    assert table["version"] == 1 and table["default"] == "triton"
    loaded = decode_dispatch.load_table()
    assert loaded["default"] == "triton"
    # every entry the GPU section may write must name a known kernel
    assert all(c in decode_dispatch.CHOICES for rows in loaded["index"].values() for _, c in rows)


def test_lookup_picks_smallest_measured_m_at_or_above(fresh):
    monkeypatch, use_table = fresh
    entry = dict(capability="sm_90", dtype="bfloat16", n=14336, k=4096, lora=False)
    use_table({"version": 1, "default": "triton", "entries": [
        {**entry, "m": 1, "choice": "cuda"}, {**entry, "m": 4, "choice": "triton_tiled"},
        {**entry, "m": 16, "choice": "cuda"}, {**entry, "m": 1, "lora": True, "choice": "triton_gemv"}]})
    look = decode_dispatch.lookup
    assert look(1, 14336, 4096, torch.bfloat16, "sm_90", False) == "cuda"
    assert look(3, 14336, 4096, torch.bfloat16, "sm_90", False) == "triton_tiled"
    assert look(5, 14336, 4096, torch.bfloat16, "sm_90", False) == "cuda"
    assert look(1, 14336, 4096, torch.bfloat16, "sm_90", True) == "triton_gemv"
    assert look(1, 14336, 4096, torch.float16, "sm_90", False) == "triton"  # other dtype: default
    assert look(1, 14336, 4096, torch.bfloat16, "sm_80", False) == "triton"  # other GPU: default
    monkeypatch.setenv(decode_dispatch.ENV_VAR, "triton_tiled")  # the env var beats the table
    assert look(1, 14336, 4096, torch.bfloat16, "sm_90", False) == "triton_tiled"
    monkeypatch.setenv(decode_dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="PEFT_KERNELS_DECODE='fastest'"):
        look(1, 8, 64, torch.float32, "cpu", False)


@pytest.mark.parametrize("table,msg", [
    ({"version": 2}, "version"),
    ({"version": 1, "default": "cublas"}, "default 'cublas'"),
    ({"version": 1, "entries": [{"capability": "sm_90", "m": 1}]}, "entry 0 lacks"),
    ({"version": 1, "entries": [dict(capability="sm_90", dtype="float16", m=1, n=8, k=64, choice="x")]},
     "entry 0 choice 'x'"),
])
def test_bad_table_is_rejected_with_the_file_named(fresh, table, msg):
    _, use_table = fresh
    use_table(table)
    with pytest.raises(ValueError, match=msg):
        decode_dispatch.load_table()


def test_resolve_falls_back_when_the_cuda_gemv_cannot_run(fresh):
    monkeypatch, _ = fresh
    monkeypatch.setenv(decode_dispatch.ENV_VAR, "cuda")
    packed = torch.zeros(256, dtype=torch.uint8)
    # CPU tensors: no CUDA C GEMV; Triton's own pick by M
    assert decode_dispatch.resolve(torch.zeros(1, 64), packed, 8, False) == "triton_gemv"
    assert decode_dispatch.resolve(torch.zeros(3, 64), packed, 8, True) == "triton_tiled"
    monkeypatch.setenv(decode_dispatch.ENV_VAR, "triton_gemv")  # the GEMV is M == 1 only
    assert decode_dispatch.resolve(torch.zeros(2, 64), packed, 8, False) == "triton_tiled"


# ----------------------------------------------------------------- the ops
def _weight(n, k, bs=64, double_quant=True, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    packed, st = quantize_4bit(w, blocksize=bs, quant_type="nf4", double_quant=double_quant)
    nested = (st.nested.absmax, st.nested.code, st.nested.offset) if st.nested else (None, None, 0.0)
    return packed, st, nested


def _ref64(x, packed, st, n, bias=None, xa=None, b=None, scale=1.0):
    k = x.shape[-1]
    w = reference.dequantize_4bit(packed, st.absmax_float(), st.code, st.blocksize, n * k, torch.float64)
    y = x.double().reshape(-1, k) @ w.view(n, k).t()
    if bias is not None:
        y = y + bias.double()
    if xa is not None:
        y = y + scale * xa.double() @ b.double().t()
    return y.reshape(*x.shape[:-1], n)


@pytest.mark.parametrize("choice", ("triton_gemv", "triton_tiled"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("fp32", "fp16"))
@pytest.mark.parametrize("lead", ((1,), (3,), (2, 8)), ids=("m1", "m3", "m16"))
def test_ops_match_float64_under_each_triton_choice(fresh, monkeypatch, choice, dtype, lead):
    fresh[0].setenv(decode_dispatch.ENV_VAR, choice)
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    n, k, r = 37, 96, 5  # odd N; K not a multiple of the blocksize
    packed, st, nested = _weight(n, k)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    m = x.numel() // k
    xa, b = torch.randn(m, r, generator=g).to(dtype), (0.2 * torch.randn(n, r, generator=g)).to(dtype)
    y = decode.gemv_4bit_op(x, packed, st.absmax, st.code, *nested, 64, n, bias)
    assert_close_to_reference(y, _ref64(x, packed, st, n, bias), dtype)
    y = decode.lora_gemv_4bit_op(x, packed, st.absmax, st.code, *nested, 64, n, None, xa, b, 0.5)
    assert_close_to_reference(y, _ref64(x, packed, st, n, None, xa, b, 0.5), dtype)
    want = choice if m == 1 or choice == "triton_tiled" else "triton_tiled"
    assert decode_dispatch.counts == {want: 2}


def test_ops_reference_backend_and_errors(fresh, monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    n, k = 9, 64
    packed, st, nested = _weight(n, k, double_quant=False)
    x = torch.randn(2, k)
    y = decode.gemv_4bit_op(x, packed, st.absmax, st.code, *nested, 64, n, None)
    assert_close_to_reference(y, _ref64(x, packed, st, n), torch.float32)
    assert sum(decode_dispatch.counts.values()) == 0  # the reference runs no decode kernel
    with pytest.raises(ValueError, match=r"1 <= M <= 16 rows \(decode\), got x \(17, 64\)"):
        decode.gemv_4bit_op(torch.randn(17, k), packed, st.absmax, st.code, *nested, 64, n, None)


def test_fake_impls_under_fake_tensors_and_compile(fresh):
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, k = 24, 64
    packed, st, nested = _weight(n, k)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, 3, k, dtype=torch.float16)
        y = torch.ops.peft_kernels.gemv_4bit(x, packed, st.absmax, st.code, *nested, 64, n, None)
        assert y.shape == (2, 3, n) and y.dtype == torch.float16
        y = torch.ops.peft_kernels.lora_gemv_4bit(x, packed, st.absmax, st.code, *nested, 64, n, None,
                                                  torch.empty(6, 4), torch.empty(n, 4), 2.0)
        assert y.shape == (2, 3, n)
    for op, extra in ((decode.gemv_4bit_op, ()), (decode.lora_gemv_4bit_op,
                                                  (torch.randn(3, 4), torch.randn(n, 4), 0.5))):
        torch.library.opcheck(op, (torch.randn(3, k), packed, st.absmax, st.code, *nested, 64, n, None, *extra),
                              test_utils=("test_schema", "test_faketensor"))
    f = torch.compile(lambda x: decode.gemv_4bit_op(x, packed, st.absmax, st.code, *nested, 64, n, None),
                      backend="eager", fullgraph=True)
    x = torch.randn(1, k)
    assert torch.equal(f(x), decode.gemv_4bit_op(x, packed, st.absmax, st.code, *nested, 64, n, None))


# ----------------------------------------------------------------- generate()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _quantized_lora_llama():
    model = build("llama")
    quantize_model(model, blocksize=64, double_quant=True)
    lora.apply(model, lora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter change the output
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def _generate(model, ids, steps):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                              do_sample=False, pad_token_id=0)


def test_generate_takes_the_decode_path_and_matches_the_unfused_path(fresh, monkeypatch):
    model = _quantized_lora_llama()
    n_layers = sum(1 for name, _ in model.named_modules() if name.endswith(tuple(TARGETS)) and "." in name
                   and type(_).__name__ == "LoraLinear")
    assert n_layers == 2 * len(TARGETS)
    steps = 4
    g = torch.Generator().manual_seed(2)
    single = torch.randint(1, 128, (1, 20), generator=g)  # prefill M = 20 > 16: not the decode path
    batch = torch.randint(1, 128, (2, 9), generator=g)    # prefill M = 18; decode steps M = 2

    monkeypatch.setenv(backend.ENV_VAR, "reference")       # unfused: W dequantized, torch matmuls
    want_single, want_batch = _generate(model, single, steps), _generate(model, batch, steps)
    assert sum(decode_dispatch.counts.values()) == 0

    monkeypatch.setenv(backend.ENV_VAR, "triton")
    got = _generate(model, single, steps)
    assert torch.equal(got, want_single), (got, want_single)
    # every quantized LoRA layer of every decode step (steps - 1 after the prefill) ran the fused GEMV
    assert decode_dispatch.counts == {"triton_gemv": n_layers * (steps - 1)}
    decode_dispatch.reset_counts()
    got = _generate(model, batch, steps)
    assert torch.equal(got, want_batch)
    assert decode_dispatch.counts == {"triton_tiled": n_layers * (steps - 1)}


# ----------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_generate_takes_the_cuda_gemv(fresh, monkeypatch):
    from peft_kernels.ops import cuda_lib
    if cuda_lib.load() is None:
        pytest.skip(f"no CUDA C library: {cuda_lib.unavailable_reason()}")
    model = _quantized_lora_llama().cuda()
    ids = torch.randint(1, 128, (1, 20), generator=torch.Generator().manual_seed(2)).cuda()
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    want = _generate(model, ids, 4)
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    fresh[0].setenv(decode_dispatch.ENV_VAR, "cuda")
    got = _generate(model, ids, 4)
    assert torch.equal(got, want)
    assert decode_dispatch.counts == {"cuda": 14 * 3}
