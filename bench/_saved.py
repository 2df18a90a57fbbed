"""What the CPU benchmark files share: the tests' tolerance policy and the saved-for-backward count.

Not a test module (leading underscore): imported by bench/test_bench_*.py.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn


def load_tolerance():
    """tests/_tolerance.py, loaded by path (tests/ is not a package): the one policy, not a copy."""
    path = Path(__file__).resolve().parent.parent / "tests" / "_tolerance.py"
    spec = importlib.util.spec_from_file_location("_pk_tolerance", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def owned_storages(module: nn.Module) -> set[int]:
    """Storage addresses the layer already holds: parameters, buffers and the 4-bit quant-state tensors
    (ours are buffers; bitsandbytes keeps its QuantState on the weight, nested statistics in ``state2``)."""
    from peft_kernels.nn import Linear4bit

    ptrs = set()

    def add_state(qs, depth=0):
        if qs is None or depth > 2:
            return
        for v in vars(qs).values():
            if isinstance(v, torch.Tensor):
                ptrs.add(v.untyped_storage().data_ptr())
            elif hasattr(v, "__dict__") and not isinstance(v, (type, nn.Module)):
                add_state(v, depth + 1)

    for t in list(module.parameters()) + list(module.buffers()):
        ptrs.add(t.untyped_storage().data_ptr())
        add_state(getattr(t, "quant_state", None))
    for m in module.modules():
        if isinstance(m, Linear4bit):
            add_state(m.quant_state)
    return ptrs


def saved_bytes(fn: Callable[[], object], owned: Iterable[int]) -> dict:
    """Bytes ``fn()``'s forward saves for backward in storages not in ``owned`` (unique storages; an input
    counts: saving it keeps it alive) and how many tensors it saves.

    bitsandbytes' MatMul4Bit keeps some tensors as ctx attributes, which these hooks cannot see.
    """
    owned = set(owned)
    seen: dict[int, int] = {}
    n_tensors = 0

    def pack(t):
        nonlocal n_tensors
        n_tensors += 1
        s = t.untyped_storage()
        if s.data_ptr() not in owned:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return {"bytes": sum(seen.values()), "tensors": n_tensors}
