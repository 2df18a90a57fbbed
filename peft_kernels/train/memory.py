"""Measure the peak memory of a piece of work: ``measure_peak_bytes(fn) -> (fn(), peak_bytes)``.

On CUDA (``device="cuda"``, or "auto" when CUDA is available) this is
``torch.cuda.max_memory_allocated`` over the call. On CPU there is no allocator statistic, so a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` watches every ATen operator call: each
storage an operator reads or writes is recorded (with its size, once, however many views share it)
together with a weak reference; a storage whose weak reference has expired is no longer live. The
running sum over live storages, taken after every operator, gives the peak. Every CPU tensor alive
when the call starts (parameters, optimizer state: found through the garbage collector) counts from
the start, so, as on CUDA, the number is the process's live tensor bytes.

What the CPU measurement cannot see: memory an operator allocates and frees inside itself (a
custom op's scratch buffers such as a dequantized 4-bit weight, a BLAS workspace), and tensors that
only C++ holds and that no operator touches during ``fn``.
"""
from __future__ import annotations

import gc
from typing import Any, Callable, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter


class LiveStorageTracker(TorchDispatchMode):
    """Tracks live tensor storage bytes across ATen calls; ``peak`` and ``current`` in bytes.

    ``trace``: when True, ``events`` gets one (op name, live bytes after it) per call, for finding what
    dominates a peak (costly; tests leave it off)."""

    def __init__(self, trace: bool = False):
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0
        self.peak_op: Optional[str] = None
        self.trace = trace
        self.events: list[tuple[str, int]] = []

    def _sweep(self) -> None:
        """Drop storages that died since the last call (their Python owners were freed)."""
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.current -= self._live.pop(k)[1]

    def track(self, t) -> None:
        """Count the storage of tensor ``t`` (CPU only) as live from now until it dies."""
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / tensor subclasses without a storage
            return
        n = s.nbytes()
        ref = StorageWeakRef(s)
        old = self._live.get(ref.cdata)
        if old is None:
            self._live[ref.cdata] = (ref, n)
            self.current += n
        elif old[1] != n:  # resized in place (an out= op)
            self._live[ref.cdata] = (old[0], n)
            self.current += n - old[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_iter((args, kwargs)):
            self.track(t)
        out = func(*args, **kwargs)
        for t in tree_iter(out):
            self.track(t)
        # ``current`` counts storages freed since the last sweep, so it can only over-state the live bytes:
        # sweep only when it would set a new peak (or when tracing, to record exact values).
        if self.current > self.peak or self.trace:
            self._sweep()
            if self.current > self.peak:
                self.peak = self.current
                self.peak_op = str(func)
        if self.trace:
            self.events.append((str(func), self.current))
        return out


def _cuda_wanted(device: str) -> bool:
    if device == "auto":
        return torch.cuda.is_available()
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    return device == "cuda"


def live_cpu_tensors() -> list[torch.Tensor]:
    """Every CPU tensor the garbage collector can reach now (parameters, buffers, optimizer state...)."""
    gc.collect()
    out = []
    for obj in gc.get_objects():
        try:
            if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":
                out.append(obj)
        except Exception:  # objects whose isinstance/device probing fails (proxies, half-built tensors)
            continue
    return out


def measure_peak_bytes(fn: Callable[[], Any], *, device: str = "auto", include_existing: bool = True
                       ) -> tuple[Any, int]:
    """Run ``fn()`` and return ``(its result, peak bytes of live tensor storage during the call)``.

    CUDA: ``torch.cuda.max_memory_allocated()`` (everything allocated on the current device, which
    includes what was allocated before the call). CPU: every storage an ATen operator touches during
    the call (see the module docstring); with ``include_existing`` (default) also every CPU tensor alive
    when the call starts (found through the garbage collector), so that, like on CUDA, the number is
    the process's live tensor bytes — model, optimizer state and all — not just what ``fn`` allocates.
    Raises TypeError when ``fn`` is not callable.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if _cuda_wanted(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        return result, int(torch.cuda.max_memory_allocated())
    tracker = LiveStorageTracker()
    if include_existing:
        for t in live_cpu_tensors():
            tracker.track(t)
        tracker.peak = tracker.current
    with tracker:
        result = fn()
    return result, int(tracker.peak)


__all__ = ["measure_peak_bytes", "LiveStorageTracker"]
