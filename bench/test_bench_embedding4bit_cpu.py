"""CPU benchmark of the 4-bit embedding lookup: ``Embedding4bit`` (NF4, blocksize 64, double quant) vs
``nn.Embedding`` (fp32), table 32000 x 512, 2048 ids (one pytest-benchmark group, rows read side by side).
``ours`` is what ``auto`` runs on CPU (the rows' bytes gathered and decoded by the CPU C library when it is
built); ``ours-reference`` is the same module forced onto the plain-torch gather (PEFT_KERNELS_BACKEND=reference).

Run (~5 s on 2 idle cores):

    PYTHONPATH=. .venv/bin/python -m pytest bench/test_bench_embedding4bit_cpu.py --benchmark-only

Each lookup is checked first against the float64 rows of the table it reads (the dequantized 4-bit table for
ours, the dense one for nn.Embedding) under the project's tolerance policy. ``extra_info["table_bytes"]`` is
the exact storage of each table (ours: codes + absmax + nested absmax + code books, bitsandbytes' layout),
``extra_info["out_bytes"]`` the looked-up rows.
"""
from __future__ import annotations

import os

import pytest
import torch

from peft_kernels.nn import Embedding4bit
from peft_kernels.ops import reference
from _saved import load_tolerance

pytestmark = pytest.mark.benchmark(min_rounds=5, max_time=0.5, warmup=True, warmup_iterations=2)

V, H, M = 32000, 512, 2048


@pytest.fixture(scope="module")
def tables():
    torch.manual_seed(0)
    dense = torch.nn.Embedding(V, H).requires_grad_(False)
    ours = Embedding4bit.from_embedding(dense)
    qs = ours.quant_state
    w64 = reference.dequantize_4bit(ours.weight, qs.absmax_float(), qs.code, qs.blocksize, qs.numel,
                                    torch.float64).view(V, H)
    ids = torch.randint(0, V, (M,), generator=torch.Generator().manual_seed(1))
    return {"ours": (ours, w64, ours.quantized_weight_tensors()),
            "dense": (dense, dense.weight.double(), [dense.weight])}, ids


@pytest.mark.parametrize("impl", ("ours", "ours-reference", "dense"))
def test_embedding_lookup(benchmark, tables, impl, monkeypatch):
    layers, ids = tables
    if impl == "ours-reference":
        monkeypatch.setenv("PEFT_KERNELS_BACKEND", "reference")
    mod, w64, ts = layers["ours" if impl.startswith("ours") else impl]
    tol = load_tolerance()
    with torch.no_grad():
        out = mod(ids)
    tol.assert_close_to_reference(out, w64[ids], torch.float32, f"{impl} rows")
    benchmark.group = f"embedding lookup {V}x{H}, {M} ids, fp32"
    benchmark.extra_info.update(table_bytes=sum(t.numel() * t.element_size() for t in ts),
                                out_bytes=out.numel() * out.element_size(),
                                backend=os.environ.get("PEFT_KERNELS_BACKEND", "auto"))
    if impl.startswith("ours"):
        n = V * H
        assert benchmark.extra_info["table_bytes"] == n // 2 + n // 64 + 4 * -(-n // 64 // 256) + 4 * 256 + 4 * 16
    with torch.no_grad():
        benchmark(mod, ids)
