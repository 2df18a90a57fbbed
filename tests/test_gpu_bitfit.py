"""BitFit on a real GPU: bf16 (which Triton's interpreter cannot check), every kernel config, the large-M
path, model-sized shapes, saved bytes on CUDA, and a short 4-bit training run.

Run on a lent GPU with ``pytest -m gpu tests/test_gpu_bitfit.py`` (skipped without CUDA).
"""
import pytest
import torch
from torch import nn

from _tiny_models import build, sample_ids
from _tolerance import assert_close_to_reference
from peft_kernels.nn.bitfit import BitFitLinear
from peft_kernels.nn.linear4bit import Linear4bit
from peft_kernels.ops import reference as R
from peft_kernels.quant import quantize_4bit

pytestmark = pytest.mark.gpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weight(n, k, bs, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    packed, st = quantize_4bit(torch.randn(n, k, generator=g, device="cuda"), blocksize=bs, double_quant=False)
    absmax = st.absmax_float().contiguous()
    return packed, absmax, st.code, R.dequantize_4bit(packed, absmax, st.code, bs, n * k, torch.float64).view(n, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(1, 4096, 4096, 64, None), (16, 1000, 4000, 64, None), (64, 3000, 520, 32, None),
                                  (100, 777, 321, 64, "bitfit_nn_m16"), (300, 1000, 640, 64, "bitfit_nn_m64"),
                                  (500, 2048, 1024, 64, None)],
                         ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-{c[4]}")
def test_kernel_bf16_and_every_config(case, dtype):
    from peft_kernels.kernels import bitfit as K
    m, n, k, bs, config = case
    packed, absmax, code, w64 = _weight(n, k, bs, seed=n)
    g = torch.Generator(device="cuda").manual_seed(m)
    dy = torch.randn(m, n, generator=g, device="cuda").to(dtype)
    dx_out = torch.full((m, k), float("nan"), dtype=dtype, device="cuda")
    db_out = torch.full((n,), float("nan"), device="cuda")
    dx, db = K.bitfit_grad_4bit(dy, packed, absmax, code, bs, k, dx_out=dx_out, db_out=db_out, config=config)
    assert_close_to_reference(dx, dy.double() @ w64, dtype, "dx")
    assert_close_to_reference(db, dy.double().sum(0), torch.float32, "db")
    again = K.bitfit_grad_4bit(dy, packed, absmax, code, bs, k, config=config)
    assert torch.equal(again[0], dx) and torch.equal(again[1], db)  # deterministic: no atomics


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["linear", "4bit"])
@pytest.mark.parametrize("m", [1, 48, 700])
def test_layer_bf16_against_float64_bias_only_model(kind, m, dtype):
    torch.manual_seed(0)
    k, n = 1000, 1536
    dense = nn.Linear(k, n, bias=True, device="cuda")
    base = Linear4bit.from_linear(dense) if kind == "4bit" else dense.to(dtype)
    layer = BitFitLinear(base)
    if kind == "4bit":
        qs = base.quant_state
        w64 = R.dequantize_4bit(base.weight, qs.absmax_float(), qs.code, qs.blocksize, qs.numel,
                                torch.float64).view(n, k)
    else:
        w64 = base.weight.double()
    x = torch.randn(2, m, k, device="cuda").to(dtype).requires_grad_(True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().double()
    b64 = layer.bias.detach().double()
    assert_close_to_reference(y, x64 @ w64.t() + b64, dtype, "y")
    assert_close_to_reference(x.grad, dy.double() @ w64, dtype, "dx")
    assert_close_to_reference(layer.bias.grad, dy.double().reshape(-1, n).sum(0), torch.float32, "db")
    assert layer.bias.grad.dtype == torch.float32


def test_saves_nothing_of_x_on_cuda_under_autocast():
    base = Linear4bit.from_linear(nn.Linear(512, 768, device="cuda"))
    layer = BitFitLinear(base)
    x = torch.randn(64, 512, device="cuda", requires_grad=True)
    saved = []
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = layer(x)
    qs = base.quant_state
    owned = {t.untyped_storage().data_ptr() for t in (base.weight, qs.absmax, qs.code, qs.nested.absmax,
                                                       qs.nested.code)}
    assert {t.untyped_storage().data_ptr() for t in saved} == owned
    y.float().sum().backward()
    assert x.grad is not None and layer.bias.grad.dtype == torch.float32


def test_bitfit_trains_a_4bit_llama_in_bf16():
    from peft_kernels.methods import bitfit as M
    from peft_kernels.quant.model import quantize_model
    model = build("llama").cuda()
    quantize_model(model, compute_dtype=torch.bfloat16)
    M.apply(model, M.BitFitConfig(train_norms=True))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = sample_ids(4, 16).cuda()
    losses = []
    for _ in range(6):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
