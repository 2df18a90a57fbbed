"""CPU benchmark of the sparse fine-tuning values' gradient: sampled (SDDMM) vs dense dYᵀX + gather.

Run (times every benchmark, ~20 s on 2 idle cores):

    PYTHONPATH=. .venv/bin/python -m pytest bench/test_bench_sparse_cpu.py --benchmark-only

One pytest-benchmark group per (layout, density), 1024 -> 1024, M = 256, fp32, its two rows read side by side:

* ``sampled``: ``ops.sparse.sampled_grad`` — on CPU tensors the plain-torch path of
  ``ops/reference_sparse.py`` (chunked over the entries, never an [N, K] tensor);
* ``dense+gather``: ``dY.t() @ x`` (one [N, K] GEMM) then a gather of the selected entries / b x b tiles.

Densities 0.1 %, 1 % and 5 % of Δ's elements; layouts unstructured and block 16. Each result is checked
against a float64 reference under ``tests/_tolerance.py`` before timing. ``extra_info`` holds the largest
tensor each implementation allocates (elements, recorded by ``tests/_alloc_tracker.py``) next to N*K,
and the bytes of every tensor it allocates in one call (the memory cost of each).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from peft_kernels.ops import sparse as S

pytestmark = pytest.mark.benchmark(min_rounds=3, max_time=0.3, warmup=True, warmup_iterations=1)

M, N, K = 256, 1024, 1024
DENSITIES = (0.001, 0.01, 0.05)
LAYOUTS = (0, 16)
IMPLS = ("sampled", "dense+gather")


def _load_tests_module(name: str):
    """A helper module of tests/ loaded by path (tests/ is not a package): the one copy, not a duplicate."""
    path = Path(__file__).resolve().parent.parent / "tests" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_pk_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(mod)
    return mod


_tol = _load_tests_module("_tolerance")
_alloc = _load_tests_module("_alloc_tracker")


def _dense_gather(dy, x, idx, b):
    return _gather(dy.t() @ x, idx, b)


def _gather(full, idx, b):
    """Entries / b x b tiles (zero-padded at the ragged edge) of a dense [N, K] tensor."""
    if b == 0:
        return full.reshape(-1)[idx]
    nbn, nbk = -(-N // b), -(-K // b)
    tiles = torch.nn.functional.pad(full, (0, nbk * b - K, 0, nbn * b - N)).view(nbn, b, nbk, b)
    return tiles.permute(0, 2, 1, 3).reshape(nbn * nbk, b, b)[idx]


@pytest.fixture(scope="module")
def operands():
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    return x, dy, dy.double().t() @ x.double()


@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"{d:.1%}")
@pytest.mark.parametrize("b", LAYOUTS, ids=lambda b: "unstructured" if b == 0 else f"block{b}")
@pytest.mark.parametrize("impl", IMPLS)
def test_sampled_grad_vs_dense_gather(benchmark, impl, b, density, operands):
    x, dy, full64 = operands
    grid = S.grid_size(b, N, K)
    idx = torch.randperm(grid, generator=torch.Generator().manual_seed(1))[:max(1, round(density * grid))]
    idx = idx.sort().values
    layout = "unstructured" if b == 0 else f"block{b}"
    benchmark.group = f"values' gradient fp32 M={M} {K}->{N} {layout} density={density:.1%}"

    if impl == "sampled":
        def fn():
            return S.sampled_grad(dy, x, idx, b, N, K)
    else:
        def fn():
            return _dense_gather(dy, x, idx, b)

    with _alloc.AllocTracker() as tr:
        fn()
    big = tr.largest()
    benchmark.extra_info.update(largest_alloc_elems=big.numel if big else 0, n_times_k=N * K,
                                alloc_bytes=sum(r.numel * r.dtype.itemsize for r in tr.records),
                                backend=S.backend.select(x.device), threads=torch.get_num_threads())
    if impl == "sampled":
        assert big is None or big.numel < N * K, f"sampled path allocated {big}"
    out = benchmark(fn)
    # float64 reference: the full dense product, gathered (independent of the sampled code path)
    _tol.assert_close_to_reference(out, _gather(full64, idx, b), torch.float32, f"{impl} {layout} {density:.1%}")
