"""Interleaved CPU timing of one LoRA layer, forward + backward (dX, dA, dB): ours vs PEFT + bitsandbytes.

pytest-benchmark (``test_bench_lora_cpu.py``) runs each implementation's rounds one after the other, so on a
shared 2-core VM a slow spell (or a change in the allocator's state between tests) lands on one row of a
group and not on the other. Here both layers alternate within each repeat, over the same 4-bit bytes and
the same A and B, and the best of the repeats is kept per implementation: the ratio is the thing to read.

    PYTHONPATH=. .venv/bin/python bench/lora_interleaved_cpu.py --m 1,16,256 --r 8,16,64

Prints one line per (M, r): microseconds per step, ours / PEFT. 1024 -> 1024, fp32, NF4 blocksize 64 with
double quantization, alpha = 2r. Correctness of both layers is checked by test_bench_lora_cpu.py.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _frozen_bases import frozen_bases, peft_qlora  # noqa: E402

K = N = 1024


def _layers(r: int, ours_base: nn.Module, bnb_base: nn.Module) -> dict:
    """{impl: (module, lora_A weight, lora_B weight)} holding the same A, B and scale."""
    from peft_kernels.nn import LoraLinear
    g = torch.Generator().manual_seed(1000 + r)
    a = (torch.rand(r, K, generator=g) * 2 - 1) / math.sqrt(K)
    b = torch.randn(N, r, generator=g) / (2 * math.sqrt(r))  # non-zero: the LoRA branch does real work
    ours = LoraLinear(ours_base, "default", r=r, lora_alpha=2 * r)
    pm, theirs = peft_qlora(bnb_base, r, 2 * r)
    out = {}
    for impl, top, layer in (("ours", ours, ours), ("peft", pm, theirs)):
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
        out[impl] = (top.train(), layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", default="1,16,256", help="comma-separated row counts M")
    p.add_argument("--r", default="8,16,64", help="comma-separated ranks r")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    _, ours_base, bnb_base, _ = frozen_bases(K, N, seed=7)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {K}->{N} fp32, best of {args.repeats}")
    for m in (int(v) for v in args.m.split(",")):
        for r in (int(v) for v in args.r.split(",")):
            layers = _layers(r, ours_base, bnb_base)
            x = torch.randn(m, K).requires_grad_(True)
            dy = torch.randn(m, N)

            def step(impl):
                mod, la, lb = layers[impl]
                torch.autograd.grad(mod(x), (x, la, lb), dy)

            calls = 20 if m < 256 else 5
            best = {impl: math.inf for impl in layers}
            for _ in range(args.repeats):
                for impl in layers:
                    step(impl)  # warm
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        step(impl)
                    best[impl] = min(best[impl], (time.perf_counter() - t0) / calls)
            print(f"M={m:<4} r={r:<3} ours {best['ours'] * 1e6:8.0f} us   peft+bnb {best['peft'] * 1e6:8.0f} us   "
                  f"ours/peft {best['ours'] / best['peft']:.2f}", flush=True)


if __name__ == "__main__":
    main()
