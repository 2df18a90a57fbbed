"""CPU benchmarks of one bottleneck adapter, forward + backward: the fused op vs the unfused torch module.

Run (times every benchmark, ~15 s on 2 cores):

    PYTHONPATH=. .venv/bin/python -m pytest bench/test_bench_adapter_cpu.py --benchmark-only

One pytest-benchmark group per (M, r), d = 1024, fp32 activations and parameters, gelu, s = 0.5:

* ``fused``: ``peft_kernels.nn.Adapter`` — on CPU tensors the op's plain-torch path (its closed-form
  backward recomputes act(z) instead of keeping a = act(z)); the Triton kernels are timed on a GPU by
  ``bench/gpu_suite.py`` section i;
* ``unfused``: the same parameters through torch autograd (``reference_adapter.adapter_autograd``).

Each step returns out and the gradients of h, W_d, b_d, W_u, b_u; all are checked against a float64
reference under the project's tolerance policy (``tests/_tolerance.py``) before timing. ``extra_info``
holds the bytes each implementation keeps for backward (``saved_tensors_hooks``, unique storages,
parameters excluded) and the backend.
"""
from __future__ import annotations

import math

import pytest
import torch

from peft_kernels.nn.adapter import Adapter
from peft_kernels.ops import backend
from _saved import load_tolerance, saved_bytes
from peft_kernels.ops import reference_adapter as R

pytestmark = pytest.mark.benchmark(min_rounds=5, max_time=0.5, warmup=True, warmup_iterations=2)

D = 1024
MS = (16, 512)
RANKS = (16, 64)
ACT, SCALE = "gelu", 0.5


_tol = load_tolerance()


@pytest.fixture(scope="module", params=RANKS, ids=[f"r{r}" for r in RANKS])
def adapter(request):
    r = request.param
    torch.manual_seed(r)
    mod = Adapter(D, r, activation=ACT, scaling=SCALE, init="random")
    with torch.no_grad():  # an up branch as large as h: the check sees the adapter, not just h
        mod.up.weight.mul_(math.sqrt(r))
    return mod


def _saved_bytes(fn, params) -> int:
    return saved_bytes(fn, {p.untyped_storage().data_ptr() for p in params})["bytes"]


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("impl", ("fused", "unfused"))
def test_adapter_fwd_bwd(benchmark, impl, m, adapter):
    r = adapter.bottleneck
    params = [adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias]
    benchmark.group = f"adapter fwd+bwd fp32 M={m} d={D} r={r} {ACT}"
    benchmark.extra_info.update(threads=torch.get_num_threads(),
                                backend=backend.select(torch.device("cpu")) if impl == "fused" else "torch")
    g = torch.Generator().manual_seed(m)
    h = torch.randn(m, D, generator=g).requires_grad_(True)
    dy = torch.randn(m, D, generator=g)
    fn = adapter if impl == "fused" else (lambda x: R.adapter_autograd(x, *params, adapter.scaling, ACT))

    def step():
        out = fn(h)
        return (out, *torch.autograd.grad(out, [h, *params], dy))  # no accumulation into .grad

    got = benchmark(step)

    h64, dy64 = h.detach().double().requires_grad_(True), dy.double()
    p64 = [p.detach().double().requires_grad_(True) for p in params]
    out64 = R.adapter_autograd(h64, *p64, adapter.scaling.double(), ACT)
    want = (out64, *torch.autograd.grad(out64, [h64, *p64], dy64))
    names = ("out", "dh", "dW_d", "db_d", "dW_u", "db_u")
    benchmark.extra_info.update({f"rel_err_{n}": _tol.rel_error(a, b) for n, a, b in zip(names, got, want)})
    for n, a, b in zip(names, got, want):
        _tol.assert_close_to_reference(a, b, torch.float32, f"{impl} {n}")
    benchmark.extra_info["saved_bytes"] = _saved_bytes(lambda: fn(h), params + [adapter.scaling])
