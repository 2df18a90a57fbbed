"""``Adapter``: a bottleneck adapter module, ``h + s·up(act(down(h)))`` (Houlsby et al., 2019).

    adapter = Adapter(d_model=4096, bottleneck=64, activation="gelu_tanh")
    h = adapter(h)               # [..., 4096] in any float dtype -> same shape and dtype

Parameters (float32 by default, whatever the input dtype): ``down`` = nn.Linear(d_model, bottleneck)
(weight [r, d], bias [r]) and ``up`` = nn.Linear(bottleneck, d_model) (weight [d, r], bias [d]); with
``scaling="learned"`` also ``scaling`` (a float32 [1] parameter, initialised to 1). The computation
runs in the input's dtype (parameters cast per call) through the fused op ``ops/adapter.py``, which
saves only h and the [.., r] pre-activation for backward.

Initialisation (``init``):

* ``"houlsby"`` (default): down weight ~ N(0, 0.01²) truncated at ±2σ (Houlsby's near-identity
  init), up weight and both biases zero: the module is exactly the identity until trained.
* ``"kaiming"``: down as nn.Linear's default (Kaiming-uniform), up and biases zero (identity too).
* ``"random"``: nn.Linear's default for both layers (not the identity; for tests and benchmarks).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..ops import reference_adapter as ref
from ..ops.adapter import bottleneck_adapter

INITS = ("houlsby", "kaiming", "random")


class Adapter(nn.Module):
    """Bottleneck adapter ``h + s·(act(h W_dᵀ + b_d) W_uᵀ + b_u)`` over inputs [..., d_model].

    d_model: input/output width d. bottleneck: r (>= 1). activation: relu, gelu (erf), gelu_tanh,
    silu (or an alias). scaling: a float s, or ``"learned"`` for a trainable scalar. init: see module doc.
    dtype/device: of the parameters (float32 by default).
    """

    def __init__(self, d_model: int, bottleneck: int, activation: str = "relu",
                 scaling: Union[float, str] = 1.0, init: str = "houlsby", *, dtype: torch.dtype = torch.float32,
                 device: Optional[Union[str, torch.device]] = None):
        super().__init__()
        for name, v in (("d_model", d_model), ("bottleneck", bottleneck)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.d_model, self.bottleneck = d_model, bottleneck
        self.activation = ref.canonical_activation(activation)
        self.init = init
        self.scaling_value: Optional[float] = None if scaling == "learned" else scaling
        self.down = nn.Linear(d_model, bottleneck, dtype=dtype, device=device)
        self.up = nn.Linear(bottleneck, d_model, dtype=dtype, device=device)
        if scaling == "learned":
            self.learned_scaling = True
            self.scaling = nn.Parameter(torch.ones(1, dtype=torch.float32, device=device))
        elif isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and math.isfinite(scaling):
            self.learned_scaling = False
            # A buffer, so the kernels read s from device memory like a learned one; not in the state dict.
            self.register_buffer("scaling", torch.full((1,), float(scaling), dtype=torch.float32, device=device),
                                 persistent=False)
        else:
            raise ValueError(f"scaling must be a finite number or 'learned', got {scaling!r}")
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init == "random":
            self.down.reset_parameters()
            self.up.reset_parameters()
            return
        if self.init == "houlsby":
            nn.init.trunc_normal_(self.down.weight, std=1e-2, a=-2e-2, b=2e-2)
        else:
            self.down.reset_parameters()
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != self.d_model:
            raise ValueError(f"Adapter expects inputs [..., {self.d_model}], got shape {tuple(h.shape)}")
        return bottleneck_adapter(h, self.down.weight, self.down.bias, self.up.weight, self.up.bias, self.scaling,
                                  self.activation)

    def num_parameters_formula(self) -> int:
        """2·d·r + r + d (+1 for a learned scaling): what this module trains."""
        return 2 * self.d_model * self.bottleneck + self.bottleneck + self.d_model + int(self.learned_scaling)

    def extra_repr(self) -> str:
        s = "learned" if self.learned_scaling else f"{self.scaling_value:g}"
        return f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation}, scaling={s}"


class AdapterSlot(nn.ModuleDict):
    """The named adapters placed on one module's output, applied by a forward hook on that module.

    Registered as a child of the hooked module (so the adapters' parameters live in the model's
    state dict under ``<module>.<attr>.<adapter name>.…`` and move with ``model.to``), while the base
    module's own code, parameters and state-dict keys stay untouched. The hook rewrites the output:
    a tensor h, or the first element of a tuple (attention blocks return ``(h, attn_weights)``), becomes
    ``adapter_k(…adapter_1(h))`` for the active adapters in order (AdapterHub's ``Stack``).
    """

    def __init__(self):
        super().__init__()
        self.active: list[str] = []
        self.disabled = False
        self.handle = None

    def attach(self, module: nn.Module) -> None:
        """Start rewriting ``module``'s output (once)."""
        if self.handle is None:
            self.handle = module.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _apply_active(self, h: torch.Tensor) -> torch.Tensor:
        for name in self.active:
            h = self[name](h)
        return h

    def _hook(self, module: nn.Module, args, output):
        if self.disabled or not self.active:
            return output
        if isinstance(output, torch.Tensor):
            return self._apply_active(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self._apply_active(output[0]), *output[1:])
        raise TypeError(f"a bottleneck adapter is placed on {type(module).__name__}, whose output is a "
                        f"{type(output).__name__}; expected a tensor or a tuple starting with one")

    def extra_repr(self) -> str:
        return f"active={self.active}" + (", disabled" if self.disabled else "")
