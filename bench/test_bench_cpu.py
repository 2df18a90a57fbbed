"""CPU benchmarks: peft_kernels beside bitsandbytes 0.50.2 and dense torch, same inputs, same process.

Run (times every benchmark, ~1 minute on 2 cores):

    PYTHONPATH=. .venv/bin/python -m pytest bench --benchmark-only

``pytest bench`` without ``--benchmark-only`` runs each timed function once
(pyproject disables timing by default) and still checks every result.

Each pytest-benchmark group holds the rows to read side by side (ours,
bitsandbytes, dense). Every benchmark checks what it timed — the result the
timed call returned — against a float64 reference, so a broken path cannot
post a fast number. Our dequantization and Linear4bit rows come in two
variants with the backend forced: ``reference`` (``ops/reference.py``, plain
torch) and ``cpu-lib`` (the CPU C library, what ``auto`` picks on CPU tensors
when the library is built; skipped when it is not). The backend used is stored
in each row's ``extra_info``.
"""
from __future__ import annotations

import pytest
import torch

from peft_kernels.ops import backend, reference
from peft_kernels.ops.functional import dequantize
from peft_kernels.quant import quantize_4bit
from _frozen_bases import frozen_bases

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")

# Short runs: the whole file must stay well under two minutes on 2 cores.
pytestmark = pytest.mark.benchmark(min_rounds=10, max_time=1.0, warmup=True, warmup_iterations=3)

N = K = 1024  # divisible by the blocksize: bnb 0.50.2's AVX-512 CPU dequant is wrong otherwise
BLOCKSIZE = 64
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # DESIGN.md tolerance policy
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
#: Our variants of the dequantize and Linear4bit rows -> the PEFT_KERNELS_BACKEND each forces.
OUR_BACKENDS = {"reference": "reference", "cpu-lib": "cpu"}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error in float64; NaN/inf -> inf so it never passes."""
    out = out.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def fresh_weight(dtype: torch.dtype, seed: int, n: int = N, k: int = K) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.02).to(dtype)  # roughly an LLM weight's scale


def note_backend(benchmark, impl: str) -> None:
    if impl == "ours" or impl in OUR_BACKENDS:
        benchmark.extra_info["backend"] = backend.select(torch.device("cpu"), has_cpu_impl=True)
    benchmark.extra_info["threads"] = torch.get_num_threads()


def force_backend(monkeypatch, impl: str) -> None:
    """Pin our variant's backend (rows of other libraries are left alone)."""
    if impl not in OUR_BACKENDS:
        return
    if OUR_BACKENDS[impl] == "cpu" and not backend.cpu_lib_usable():
        from peft_kernels.ops import cpu_lib
        pytest.skip(f"CPU C library unavailable: {cpu_lib.unavailable_reason()}")
    monkeypatch.setenv(backend.ENV_VAR, OUR_BACKENDS[impl])


# ------------------------------------------------------------------ quantize
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("impl", ["ours", "bnb"])
def test_quantize(benchmark, impl, dtype):
    benchmark.group = f"quantize nf4 {N}x{K} {DTYPE_NAMES[dtype]} bs{BLOCKSIZE} double-quant"
    note_backend(benchmark, impl)
    w = fresh_weight(dtype, seed=1)
    if impl == "ours":
        packed, state = benchmark(quantize_4bit, w, BLOCKSIZE, "nf4", True)
        got = (packed, state.absmax, state.nested.absmax, state.nested.offset)
    else:
        packed, qs = benchmark(bnbF.quantize_4bit, w, blocksize=BLOCKSIZE, compress_statistics=True,
                               quant_type="nf4")
        got = (packed, qs.absmax, qs.state2.absmax, float(qs.offset))
    # The two must write the same bytes: compare the timed result with the other library's.
    if impl == "ours":
        rp, rqs = bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        want = (rp, rqs.absmax, rqs.state2.absmax, float(rqs.offset))
    else:
        rp, rst = quantize_4bit(w, BLOCKSIZE, "nf4", True)
        want = (rp, rst.absmax, rst.nested.absmax, rst.nested.offset)
    assert torch.equal(got[0].view(-1), want[0].view(-1)), "packed bytes differ from the other library's"
    assert torch.equal(got[1], want[1]), "absmax codes differ"
    assert torch.equal(got[2], want[2]), "nested absmax differs"
    assert got[3] == pytest.approx(want[3], rel=1e-6)


# ---------------------------------------------------------------- dequantize
DEQUANT_CASES = [(1024, torch.float32), (1024, torch.float16), (1024, torch.bfloat16),
                 (4096, torch.float32), (4096, torch.bfloat16)]


@pytest.fixture(scope="module", params=DEQUANT_CASES, ids=[f"{n}-{DTYPE_NAMES[d]}" for n, d in DEQUANT_CASES])
def quantized(request):
    """(n, dtype, our packed+state, bnb packed+QuantState, float64 reference) for one n x n weight."""
    n, dtype = request.param
    w = fresh_weight(dtype, seed=2, n=n, k=n)
    packed, state = quantize_4bit(w, BLOCKSIZE, "nf4", True)
    bpacked, bqs = bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
    ref = reference.dequantize_4bit(packed, state.absmax_float(), state.code, BLOCKSIZE, state.numel,
                                    torch.float64).view(n, n)
    return n, dtype, (packed, state), (bpacked, bqs), ref


@pytest.mark.parametrize("impl", ["reference", "cpu-lib", "bnb"])
def test_dequantize(benchmark, monkeypatch, impl, quantized):
    n, dtype, (packed, state), (bpacked, bqs), ref = quantized
    benchmark.group = f"dequantize nf4 {n}x{n} -> {DTYPE_NAMES[dtype]} bs{BLOCKSIZE} double-quant"
    force_backend(monkeypatch, impl)
    note_backend(benchmark, impl)
    if impl in OUR_BACKENDS:
        out = benchmark(dequantize, packed, state, dtype)
    else:
        out = benchmark(bnbF.dequantize_4bit, bpacked, bqs, quant_type="nf4")
    assert out.dtype == dtype and out.shape == (n, n)
    err = rel_err(out, ref)
    benchmark.extra_info["rel_err"] = err
    assert err <= TOL[dtype], f"{impl} dequantize rel err {err:.3g} > {TOL[dtype]}"


# ------------------------------------------------- Linear forward + backward
@pytest.fixture(scope="module")
def layers():
    """Ours, bnb and dense layers over one fp32 weight (4-bit layers share identical bytes)."""
    dense, ours, theirs, w_q = frozen_bases(K, N, seed=3)
    return {"reference": (ours, w_q), "cpu-lib": (ours, w_q), "bnb": (theirs, w_q),
            "dense": (dense, dense.weight.double())}


@pytest.mark.parametrize("m", [1, 16, 256])
@pytest.mark.parametrize("impl", ["reference", "cpu-lib", "bnb", "dense"])
def test_linear_fwd_bwd(benchmark, monkeypatch, impl, m, layers):
    layer, w64 = layers[impl]
    benchmark.group = f"linear fwd+bwd(dX) fp32 M={m} {K}->{N}"
    force_backend(monkeypatch, impl)
    note_backend(benchmark, impl)
    g = torch.Generator().manual_seed(100 + m)
    x = torch.randn(m, K, generator=g).requires_grad_(True)
    dy = torch.randn(m, N, generator=g)

    def step():
        y = layer(x)
        (dx,) = torch.autograd.grad(y, x, dy)  # returns dX without accumulating into x.grad
        return y, dx

    y, dx = benchmark(step)
    err_y = rel_err(y, x.detach().double() @ w64.t())
    err_dx = rel_err(dx, dy.double() @ w64)
    benchmark.extra_info.update(rel_err_y=err_y, rel_err_dx=err_dx)
    assert err_y <= TOL[torch.float32] and err_dx <= TOL[torch.float32], (impl, err_y, err_dx)
    if impl == "bnb":
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False), "bnb repacked its weight"
