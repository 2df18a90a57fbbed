"""Plain-torch ground truth for the adapter kernels (re-exported by ``ops/reference.py``).

Same rules as reference.py: written for clarity, float64-capable, the CPU path and what the
Triton kernels are tested against.
"""
from __future__ import annotations

import torch  # noqa: F401

__all__: list[str] = []
