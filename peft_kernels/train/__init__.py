"""Training: ``Trainer``/``TrainConfig`` (trainer.py), data loading (data.py), the peak-memory estimator
(estimate.py) and its CPU/GPU measurement (memory.py).

Names are exported lazily: ``import peft_kernels.train`` loads nothing heavy; ``peft_kernels.train.Trainer``
imports trainer.py (and transformers) on first use.
"""
from __future__ import annotations

import importlib

#: public name -> submodule that defines it
_EXPORTS = {
    "Trainer": "trainer",
    "TrainConfig": "trainer",
    "TrainResult": "trainer",
    "estimate_memory": "estimate",
    "MemoryEstimate": "estimate",
    "measure_peak_bytes": "memory",
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{module}":
            raise AttributeError(f"{__name__}.{name} is not available: {__name__}.{module} does not exist "
                                 f"yet") from None
        raise
    value = getattr(mod, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = list(_EXPORTS)
