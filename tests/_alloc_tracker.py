"""Record the size of every tensor an op produces, to assert that no [N, K]-sized tensor is ever allocated.

    with AllocTracker() as tr:
        y = layer(x)
        y.sum().backward()
    tr.assert_below(n * k, what="sparse layer fwd+bwd")

``AllocTracker`` is a ``TorchDispatchMode``: every aten op that runs while it is active (forward and,
because autograd runs the backward's ops on the same thread with the mode still on the stack,
backward) reports the shapes of the tensors it allocates. Outputs that alias an input (views such
as ``W.t()``, in-place results) are skipped: they allocate nothing — an [N, K] view of the frozen
weight the caller passed in is not a new [N, K] tensor. The bodies of ``torch.library`` custom ops
(``peft_kernels::...``), which a mode otherwise sees as one opaque call, are entered and recorded op
by op (see ``__torch_dispatch__``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


_ATEN_LIKE = ("aten", "prim", "prims", "_c10d_functional")


def _backend_keys(args, kwargs) -> torch._C.DispatchKeySet:
    """The dispatch key of the tensors' device (CPU, CUDA, ...): where a custom op's implementation lives."""
    flat, _ = tree_flatten((args, kwargs))
    dev = next((t.device for t in flat if isinstance(t, torch.Tensor)), torch.device("cpu"))
    key = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}[dev.type]
    return torch._C.DispatchKeySet(key)


@dataclass
class AllocRecord:
    op: str
    shape: tuple[int, ...]
    numel: int
    dtype: torch.dtype


class AllocTracker(TorchDispatchMode):
    """Records (op, shape, numel, dtype) of every tensor output of every aten op while active."""

    def __init__(self):
        super().__init__()
        self.records: list[AllocRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in _ATEN_LIKE:
            # A torch.library custom op (peft_kernels::...) reaches a mode as ONE call and its body would run
            # with the mode popped, unseen. Re-activate the mode and run the body on the backend key
            # (past the Python dispatcher) so every aten op inside it is recorded too.
            with self:
                out = func.redispatch(_backend_keys(args, kwargs), *args, **kwargs)
        elif torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            # A composite op (matmul, einsum, ...) reaches the mode whole when called from inside a
            # re-entered custom op: decompose it with the mode active so its internal copies count too.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out  # its ops were recorded one by one
            out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: aliases an existing tensor, allocates nothing
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                self.records.append(AllocRecord(str(func), tuple(t.shape), t.numel(), t.dtype))
        return out

    # ------------------------------------------------------------------ queries
    def largest(self) -> AllocRecord | None:
        return max(self.records, key=lambda r: r.numel, default=None)

    def at_least(self, numel: int) -> list[AllocRecord]:
        return [r for r in self.records if r.numel >= numel]

    def assert_below(self, numel: int, what: str = "code under test") -> None:
        """No recorded tensor has ``numel`` or more elements (and something was recorded at all)."""
        assert self.records, f"{what}: no op outputs were recorded (is the tracker active around the code?)"
        big = self.at_least(numel)
        assert not big, (f"{what}: {len(big)} tensor(s) with >= {numel} elements, e.g. "
                         + "; ".join(f"{r.op} -> {r.shape} {r.dtype}" for r in big[:5]))
