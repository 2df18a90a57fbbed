"""CPU benchmarks of the causal-LM loss, loss + dH through a frozen head: fused linear cross-entropy vs full logits.

Run (times every benchmark, ~10 s on 2 idle cores):

    PYTHONPATH=. .venv/bin/python -m pytest bench/test_bench_ce_cpu.py --benchmark-only

One pytest-benchmark group per head (dense fp32, 4-bit NF4), T = 512 tokens (10% ignored), H = 256, V = 32,000:

* ``full``: what a transformers model does: the [T, V] logits, ``.float()``, ``F.cross_entropy``;
* ``fused``: ``peft_kernels.ops.fused_ce.fused_linear_cross_entropy`` over the same head (chunks of rows,
  never the whole [T, V]).

Each step's loss and dH are checked against a float64 full-logits reference from the same (dequantized)
weight under the tests' one tolerance policy. ``extra_info["saved_bytes"]``: what autograd keeps for backward
(``saved_tensors_hooks``; the head's own tensors excluded) — the full loss keeps float32 logits-sized tensors,
the fused one its float32 dH [n, H] and the n row indices only; the assertion below is that exact count.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_kernels.nn import Linear4bit
from peft_kernels.ops import reference
from peft_kernels.ops.fused_ce import fused_linear_cross_entropy
from peft_kernels.ops.reference_ce import linear_cross_entropy_reference
from _saved import load_tolerance, owned_storages, saved_bytes

pytestmark = pytest.mark.benchmark(min_rounds=5, max_time=0.5, warmup=True, warmup_iterations=1)

T, H, V = 512, 256, 32000
_tol = load_tolerance()


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(3)
    dense = nn.Linear(H, V, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(V, H, generator=g) / H ** 0.5)
    dense.weight.requires_grad_(False)
    head4 = Linear4bit.from_linear(dense)
    qs = head4.quant_state
    w4 = reference.dequantize_4bit(head4.weight, qs.absmax_float(), qs.code, qs.blocksize, qs.numel,
                                   torch.float64).view(V, H)
    hidden = (torch.randn(T, H, generator=g) * 2.0).requires_grad_(True)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < 0.1] = -100
    return {"dense": (dense, dense.weight.double()), "4bit": (head4, w4)}, hidden, labels


@pytest.mark.parametrize("head_kind", ("dense", "4bit"))
@pytest.mark.parametrize("impl", ("full", "fused"))
def test_causal_lm_loss(benchmark, impl, head_kind, case):
    heads, hidden, labels = case
    head, w64 = heads[head_kind]
    benchmark.group = f"loss + dH, {head_kind} head, T={T} H={H} V={V} fp32"
    benchmark.extra_info["threads"] = torch.get_num_threads()

    def loss_fn():
        if impl == "fused":
            return fused_linear_cross_entropy(hidden, head, labels)
        return F.cross_entropy(head(hidden).float(), labels, ignore_index=-100)

    def step():
        loss = loss_fn()
        return (loss, *torch.autograd.grad(loss, (hidden,)))

    loss, dh = benchmark(step)

    h64 = hidden.detach().double().requires_grad_(True)
    ref_loss, _ = linear_cross_entropy_reference(h64, w64, labels)
    (ref_dh,) = torch.autograd.grad(ref_loss, (h64,))
    for name, got, want in (("loss", loss.reshape(1), ref_loss.reshape(1)), ("dH", dh, ref_dh)):
        benchmark.extra_info[f"rel_err_{name}"] = _tol.rel_error(got, want)
        _tol.assert_close_to_reference(got, want, torch.float32, f"{impl} {head_kind} {name}")
    saved = saved_bytes(loss_fn, owned_storages(head) | {hidden.untyped_storage().data_ptr()})
    benchmark.extra_info.update(saved_bytes=saved["bytes"], saved_tensors=saved["tensors"])
    if impl == "fused":
        n_valid = int((labels != -100).sum())
        # dH float32 [n, H] and the int64 indices of the n rows with a label: nothing logits-sized.
        assert saved["bytes"] == n_valid * H * 4 + n_valid * 8, saved
    else:
        assert saved["bytes"] >= T * V * 4, saved  # the float32 logits (log-softmax output) at least
