"""Bottleneck adapter kernels on a real GPU: bf16 (which the interpreter cannot check), model-sized shapes,
both row-kernel tile heights, the largest bottleneck, every activation, saved bytes, and a tiny model.

Run on a lent GPU with ``pytest -m gpu tests/test_gpu_adapter.py`` (skipped without CUDA).
"""
import math

import pytest
import torch
from _tolerance import assert_close_to_reference

from peft_kernels.ops import reference_adapter as R

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _inputs(m, d, r, dtype, learned=True, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEV)

    h = rnd(m, d).to(dtype).requires_grad_(True)
    ps = [rnd(r, d, scale=1 / math.sqrt(d)), rnd(r, scale=0.5), rnd(d, r, scale=1.5 / math.sqrt(r)),
          rnd(d, scale=0.5)]
    ps = [p.requires_grad_(True) for p in ps]
    s = torch.tensor([0.7], device=DEV).requires_grad_(learned)
    return h, ps, s


def _check(m, d, r, dtype, act, learned=True):
    from peft_kernels.ops import adapter as ops
    from peft_kernels.ops import backend
    assert backend.select(torch.device(DEV)) == "triton"
    h, ps, s = _inputs(m, d, r, dtype, learned)
    out = ops.bottleneck_adapter(h, *ps, s, act)
    dy = torch.randn(m, d, device=DEV).to(dtype)
    out.backward(dy)
    h64 = h.detach().double().requires_grad_(True)
    # The float32 parameters as every implementation computes with them: rounded to h's dtype.
    p64 = [p.detach().to(dtype).double().requires_grad_(True) for p in ps]
    s64 = s.detach().double().requires_grad_(learned)
    ref = R.adapter_autograd(h64, *p64, s64, act)
    ref.backward(dy.double())
    assert_close_to_reference(out, ref, dtype, f"out {act}")
    for name, t, t64 in zip(("h", "w_down", "b_down", "w_up", "b_up", "scale"), [h, *ps, s], [h64, *p64, s64]):
        if t.requires_grad:
            assert t.grad.dtype == t.dtype
            assert_close_to_reference(t.grad, t64.grad, dtype, f"d{name} {act} m={m} r={r}")


@pytest.mark.parametrize("act", R.ADAPTER_ACTIVATIONS)
def test_bf16_each_activation(act):
    _check(300, 1000, 64, torch.bfloat16, act)


@pytest.mark.parametrize("m,d,r", [(1, 4096, 64), (4100, 4096, 64), (257, 1000, 8), (300, 777, 200), (2100, 520, 256)])
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=("bf16", "fp16", "fp32"))
def test_shapes_and_dtypes(m, d, r, dtype):
    # 4100 / 2100 rows take the large-M row tiles (64 rows at r=64, 16 at R_PAD=256).
    _check(m, d, r, dtype, "gelu_tanh", learned=dtype == torch.bfloat16)


def test_saved_bytes_on_gpu():
    from peft_kernels.ops import adapter as ops
    m, d, r = 512, 4096, 64
    h, ps, s = _inputs(m, d, r, torch.bfloat16)
    own = {p.untyped_storage().data_ptr() for p in [*ps, s]}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ops.bottleneck_adapter(h, *ps, s, "silu")
    out.sum().backward()
    assert sum(seen.values()) == m * d * 2 + m * r * 2


def test_tiny_model_trains_in_bf16():
    from _tiny_models import build, sample_ids
    from peft_kernels.methods import adapter as A
    model = build("llama", dtype=torch.bfloat16).to(DEV).train()
    A.apply(model, A.BottleneckConfig(bottleneck=16, activation="silu"))
    ids = sample_ids(4, 16, seed=3).to(DEV)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
