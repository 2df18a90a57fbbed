"""CPU benchmarks of one BitFit linear layer, forward + backward (dX, db): ours vs bitsandbytes vs dense.

Run (times every benchmark, ~15 s on 2 idle cores):

    PYTHONPATH=. .venv/bin/python -m pytest bench/test_bench_bitfit_cpu.py --benchmark-only

One pytest-benchmark group per M, 1024->1024, fp32, its rows read side by side:

* ``ours``: ``peft_kernels.nn.bitfit.BitFitLinear`` over ``peft_kernels.nn.Linear4bit`` (NF4, blocksize 64,
  double quant), its float32 bias trainable;
* ``bnb``: ``bitsandbytes.nn.Linear4bit`` over the same 4-bit bytes with a trainable bias (its weight is
  frozen): what BitFit over bitsandbytes amounts to;
* ``dense``: ``torch.nn.Linear`` with a frozen fp32 weight and a trainable bias (the dense limit).

Every step computes y and the gradients of x and of the bias, each checked against a float64 reference
built from the same (dequantized) weight under the project's one tolerance policy (``tests/_tolerance.py``).
``extra_info`` holds the errors, the backend and the bytes each implementation saves for backward
(``saved_tensors_hooks``; unique storages, the layer's own parameters and quantized weight excluded):
ours is 0 — BitFit keeps nothing of x.
"""
from __future__ import annotations


import pytest
import torch
from torch import nn

from peft_kernels.nn.bitfit import BitFitLinear
from peft_kernels.ops import backend
from _saved import load_tolerance, owned_storages
from _saved import saved_bytes as _saved_bytes
from _frozen_bases import frozen_bases

bnb = pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.benchmark(min_rounds=5, max_time=0.5, warmup=True, warmup_iterations=2)

N = K = 1024  # divisible by the blocksize: bnb 0.50.2's AVX-512 CPU dequant is wrong otherwise
MS = (1, 16, 256)
IMPLS = ("ours", "bnb", "dense")


_tol = load_tolerance()


def saved_bytes(module: nn.Module, x: torch.Tensor) -> dict:
    """Bytes the forward saves for backward in storages the layer does not already hold (x counts)."""
    return _saved_bytes(lambda: module(x), owned_storages(module))


@pytest.fixture(scope="module")
def layers():
    """The three implementations over one weight, each with the same trainable bias b [N]."""
    dense0, ours_base, theirs, w_q = frozen_bases(K, N, seed=11)
    g = torch.Generator().manual_seed(5)
    b = torch.randn(N, generator=g) * 0.1
    ours = BitFitLinear(ours_base)
    dense = nn.Linear(K, N)
    with torch.no_grad():
        ours.bias.copy_(b)
        dense.weight.copy_(dense0.weight)
        dense.bias.copy_(b)
    dense.weight.requires_grad_(False)
    theirs.bias = nn.Parameter(b.clone())  # bitsandbytes' layer with a trainable bias (weight frozen)
    theirs.weight.requires_grad_(False)
    mods = {"ours": ours.train(), "bnb": theirs.train(), "dense": dense.train()}
    for impl, mod in mods.items():
        assert [n for n, p in mod.named_parameters() if p.requires_grad] == ["bias"], impl
    return mods, {"ours": w_q, "bnb": w_q, "dense": dense0.weight.double()}, b.double()


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("impl", IMPLS)
def test_bitfit_fwd_bwd(benchmark, impl, m, layers):
    mods, weights, b64 = layers
    module = mods[impl]
    benchmark.group = f"bitfit fwd+bwd(dX,db) fp32 M={m} {K}->{N}"
    benchmark.extra_info["threads"] = torch.get_num_threads()
    if impl == "ours":
        benchmark.extra_info["backend"] = backend.select(torch.device("cpu"), has_cpu_impl=True)
    elif impl == "bnb":
        benchmark.extra_info["versions"] = f"bitsandbytes {bnb.__version__}"
    g = torch.Generator().manual_seed(100 + m)
    x = torch.randn(m, K, generator=g).requires_grad_(True)
    dy = torch.randn(m, N, generator=g)
    bias = module.bias

    def step():
        y = module(x)
        dx, db = torch.autograd.grad(y, (x, bias), dy)  # no accumulation into .grad
        return y, dx, db

    y, dx, db = benchmark(step)

    w = weights[impl]
    x64, dy64 = x.detach().double(), dy.double()
    want = {"y": x64 @ w.t() + b64, "dx": dy64 @ w, "db": dy64.sum(0)}
    got = {"y": y, "dx": dx, "db": db}
    benchmark.extra_info.update({f"rel_err_{k}": _tol.rel_error(got[k], want[k]) for k in want})
    for k in want:
        _tol.assert_close_to_reference(got[k], want[k], torch.float32, f"{impl} {k}")
    mine = saved_bytes(module, x)
    benchmark.extra_info.update(saved_bytes=mine["bytes"], saved_tensors=mine["tensors"])
    if impl == "ours":
        assert mine["bytes"] == 0, "BitFit saved something of x for backward"
    if impl == "bnb":
        assert not getattr(module.weight, "packing_format_for_cpu", False), "bnb repacked its weight"
