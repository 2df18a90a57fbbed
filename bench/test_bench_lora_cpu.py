"""CPU benchmarks of one LoRA linear layer, forward + backward: peft_kernels vs PEFT + bitsandbytes vs dense.

Run (times every benchmark, ~1 minute on 2 cores; with the rest of bench/ as in bench/README.md):

    PYTHONPATH=. .venv/bin/python -m pytest bench/test_bench_lora_cpu.py --benchmark-only

One pytest-benchmark group per (M, r), 1024->1024, fp32, its rows read side by side:

* ``ours``: ``peft_kernels.nn.LoraLinear`` over ``peft_kernels.nn.Linear4bit`` (NF4, blocksize 64,
  double quant);
* ``peft``: ``peft.get_peft_model`` over a module holding ``bitsandbytes.nn.Linear4bit`` with the same
  4-bit bytes (PEFT's QLoRA layer, ``peft.tuners.lora.bnb.Linear4bit``);
* ``dense``: ``LoraLinear`` over a frozen ``nn.Linear`` (the dense limit: no dequantization at all).

Every step computes y and the gradients of x, lora_A and lora_B, and each is checked against a
float64 reference built from the same (dequantized) weight and adapter values, under the project's
one tolerance policy (``tests/_tolerance.py``). B is random (not PEFT's zero init) so the LoRA branch
is part of what is checked. ``extra_info`` holds the errors, the backend, and the bytes each
implementation saves for backward (``saved_tensors_hooks``; unique storages, the layer's own
parameters and quantized weight excluded), with PEFT's and ours side by side.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from peft_kernels.ops import backend
from _saved import load_tolerance, owned_storages
from _saved import saved_bytes as _saved_bytes
from _frozen_bases import frozen_bases, peft_qlora

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

# Shorter than test_bench_cpu.py's (27 rows here): about 40 s on 2 idle cores; medians still use >= 5 rounds.
pytestmark = pytest.mark.benchmark(min_rounds=5, max_time=0.5, warmup=True, warmup_iterations=2)

N = K = 1024  # divisible by the blocksize: bnb 0.50.2's AVX-512 CPU dequant is wrong otherwise
MS = (1, 16, 256)
RANKS = (8, 16, 64)
IMPLS = ("ours", "peft", "dense")


_tol = load_tolerance()


def _lora_linear():
    """peft_kernels.nn.LoraLinear, or a skip naming what is missing (it is being written alongside)."""
    try:
        from peft_kernels.nn import LoraLinear
    except Exception as e:  # pragma: no cover - only while the module is absent or broken
        pytest.skip(f"peft_kernels.nn.LoraLinear not importable: {type(e).__name__}: {e}")
    return LoraLinear


def saved_bytes(module: nn.Module, x: torch.Tensor) -> dict:
    """Bytes the forward saves for backward in storages the layer does not already own (x counts)."""
    return _saved_bytes(lambda: module(x), owned_storages(module))


# ------------------------------------------------------------------ layers
@pytest.fixture(scope="module")
def bases():
    """Frozen dense fp32 layer, ours and bnb 4-bit layers over identical bytes, and the float64 weights."""
    dense, ours, theirs, w_q = frozen_bases(K, N, seed=7)
    return {"dense": dense, "ours": ours, "bnb": theirs, "w_q": w_q, "w_dense": dense.weight.double()}


@pytest.fixture(scope="module", params=RANKS, ids=[f"r{r}" for r in RANKS])
def lora_layers(request, bases):
    """For one rank r: the three implementations holding the same A, B and scale (alpha = 2r)."""
    LoraLinear = _lora_linear()
    r = request.param
    alpha = 2 * r
    g = torch.Generator().manual_seed(1000 + r)
    a = (torch.rand(r, K, generator=g) * 2 - 1) / math.sqrt(K)  # PEFT's Kaiming-uniform(a=sqrt 5) range
    # Non-zero B sized so the LoRA term is about as large as the base term (both are checked).
    b = torch.randn(N, r, generator=g) / (2 * math.sqrt(r))
    layers = {}
    for impl, base in (("ours", bases["ours"]), ("dense", bases["dense"])):
        mod = LoraLinear(base, "default", r=r, lora_alpha=alpha)
        with torch.no_grad():
            mod.lora_A["default"].weight.copy_(a)
            mod.lora_B["default"].weight.copy_(b)
        layers[impl] = (mod.train(), mod.lora_A["default"].weight, mod.lora_B["default"].weight)
    pm, pl = peft_qlora(bases["bnb"], r, alpha)
    with torch.no_grad():
        pl.lora_A["default"].weight.copy_(a)
        pl.lora_B["default"].weight.copy_(b)
    layers["peft"] = (pm.train(), pl.lora_A["default"].weight, pl.lora_B["default"].weight)
    scale = alpha / r
    for impl, (_, la, lb) in layers.items():
        assert la.requires_grad and lb.requires_grad, impl
    return r, scale, a.double(), b.double(), layers


def note_backend(benchmark, impl: str) -> None:
    if impl == "ours":
        benchmark.extra_info["backend"] = backend.select(torch.device("cpu"))
    elif impl == "peft":
        benchmark.extra_info["versions"] = f"peft {peft.__version__}, bitsandbytes {bnb.__version__}"
    benchmark.extra_info["threads"] = torch.get_num_threads()


# ------------------------------------------------------------------ forward + backward
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("impl", IMPLS)
def test_lora_fwd_bwd(benchmark, impl, m, lora_layers, bases):
    r, scale, a64, b64, layers = lora_layers
    module, la, lb = layers[impl]
    benchmark.group = f"lora fwd+bwd(dX,dA,dB) fp32 M={m} r={r} {K}->{N}"
    note_backend(benchmark, impl)
    g = torch.Generator().manual_seed(100 + m)
    x = torch.randn(m, K, generator=g).requires_grad_(True)
    dy = torch.randn(m, N, generator=g)

    def step():
        y = module(x)
        dx, da, db = torch.autograd.grad(y, (x, la, lb), dy)  # no accumulation into .grad
        return y, dx, da, db

    y, dx, da, db = benchmark(step)

    # float64 reference over the same weight: the dequantized 4-bit one, or the dense one.
    w = bases["w_q"] if impl in ("ours", "peft") else bases["w_dense"]
    x64, dy64 = x.detach().double(), dy.double()
    xa, dyb = x64 @ a64.t(), dy64 @ b64
    want = {"y": x64 @ w.t() + scale * xa @ b64.t(), "dx": dy64 @ w + scale * dyb @ a64,
            "dA": scale * dyb.t() @ x64, "dB": scale * dy64.t() @ xa}
    got = {"y": y, "dx": dx, "dA": da, "dB": db}
    benchmark.extra_info.update({f"rel_err_{k}": _tol.rel_error(got[k], want[k]) for k in want})
    for k in want:
        _tol.assert_close_to_reference(got[k], want[k], torch.float32, f"{impl} {k}")

    # Bytes kept for backward, this implementation and the two 4-bit ones side by side.
    mine = saved_bytes(module, x)
    benchmark.extra_info.update(saved_bytes=mine["bytes"], saved_tensors=mine["tensors"])
    if impl != "dense":
        other = "peft" if impl == "ours" else "ours"
        benchmark.extra_info[f"saved_bytes_{impl}"] = mine["bytes"]
        benchmark.extra_info[f"saved_bytes_{other}"] = saved_bytes(layers[other][0], x)["bytes"]
    if impl == "peft":
        assert not getattr(bases["bnb"].weight.quant_state, "packing_format_for_cpu", False), "bnb repacked"
