"""Drop-in modules that run a transformers block's RMSNorm and SwiGLU MLP on the fused ops.

* :class:`FusedRMSNorm` replaces ``LlamaRMSNorm`` / ``Qwen2RMSNorm`` / ``MistralRMSNorm`` / ... (Llama
  form ``w * (x·rstd).to(x.dtype)``) or ``GemmaRMSNorm`` (``gemma=True``: ``((x·rstd)·(1 + w)).to(x.dtype)``).
  It holds the original module's ``weight`` Parameter itself (same object: optimizer state, tying,
  ``requires_grad`` and state-dict keys unchanged).
* :class:`FusedSwiGLUMLP` replaces ``LlamaMLP`` / ``Qwen2MLP`` / ``MistralMLP`` / ...: it keeps the MLP's
  own ``gate_proj`` / ``up_proj`` / ``down_proj`` modules (dense, 4-bit, LoRA... whatever they are) and
  fuses only ``silu(gate) * up``: ``down_proj(swiglu(gate_proj(x), up_proj(x)))``.

Shapes: x [..., hidden]. Dtypes: fp32/fp16/bf16 (float64 on the reference path).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import fused_layers as F


def norm_eps(module: nn.Module) -> float:
    """A transformers RMSNorm's epsilon (``variance_epsilon`` in Llama-likes, ``eps`` in Gemma)."""
    for attr in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(module, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    raise ValueError(f"{type(module).__name__} has no epsilon attribute (variance_epsilon / eps / epsilon)")


class FusedRMSNorm(nn.Module):
    """RMSNorm over the last dim on the fused op, sharing ``weight`` with the module it replaces."""

    def __init__(self, weight: nn.Parameter, eps: float = 1e-6, gemma: bool = False):
        super().__init__()
        if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
            raise TypeError(f"weight must be a 1-D nn.Parameter, got {type(weight).__name__} "
                            f"{tuple(getattr(weight, 'shape', ()))}")
        self.weight = weight
        self.variance_epsilon = float(eps)
        self.gemma = bool(gemma)

    @classmethod
    def from_module(cls, module: nn.Module, gemma: bool = False) -> "FusedRMSNorm":
        return cls(module.weight, norm_eps(module), gemma)

    @property
    def eps(self) -> float:
        return self.variance_epsilon

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(hidden_states, self.weight, self.variance_epsilon, self.gemma)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, form={'gemma' if self.gemma else 'llama'}"


class FusedSwiGLUMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` with the activation-times-up fused (the MLP's own
    projection modules kept as submodules under their own names)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    @classmethod
    def from_module(cls, mlp: nn.Module) -> "FusedSwiGLUMLP":
        new = cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        for attr in ("config", "hidden_size", "intermediate_size"):  # what code may read off the MLP
            if hasattr(mlp, attr) and not isinstance(getattr(mlp, attr), nn.Module):
                object.__setattr__(new, attr, getattr(mlp, attr))
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.swiglu(self.gate_proj(x), self.up_proj(x)))
