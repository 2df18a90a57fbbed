"""Drop-in modules that run a transformers block's RMSNorm and SwiGLU MLP on the fused ops.

* :class:`FusedRMSNorm` replaces ``LlamaRMSNorm`` / ``Qwen2RMSNorm`` / ``MistralRMSNorm`` / ... (Llama
  form ``w * (x·rstd).to(x.dtype)``) or ``GemmaRMSNorm`` (``gemma=True``: ``((x·rstd)·(1 + w)).to(x.dtype)``).
  It holds the original module's ``weight`` Parameter itself (same object: optimizer state, tying,
  ``requires_grad`` and state-dict keys unchanged).
* :class:`FusedSwiGLUMLP` replaces ``LlamaMLP`` / ``Qwen2MLP`` / ``MistralMLP`` / ...: it keeps the MLP's
  own ``gate_proj`` / ``up_proj`` / ``down_proj`` modules (dense, 4-bit, LoRA... whatever they are) and
  fuses only ``silu(gate) * up``: ``down_proj(swiglu(gate_proj(x), up_proj(x)))``.
* :class:`FusedRotaryPosEmb` is not swapped in as a module: it is the layer that the kernel repository
  shipped in ``peft_kernels/hub_kernels/rotary`` exports, and that ``kernels.kernelize`` puts in place of
  the forward of an attention module's private ``apply_rotary_pos_emb`` wrapper (transformers'
  ``use_kernelized_func`` extension point; ``peft_kernels.fused.apply_fused_kernels(model, rope=True)``).

Shapes: x [..., hidden]. Dtypes: fp32/fp16/bf16 (float64 on the reference path).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import fused_layers as F
from ..ops import reference_fused as ref


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


def _fused_rope_takes(q, k, cos, sin, unsqueeze_dim) -> bool:
    """Whether the fused RoPE op accepts these arguments (4-D q/k, [B or 1, S, D] cos/sin without grad...)."""
    try:
        F.check_rope(q, cos, sin, unsqueeze_dim)
        F.check_rope(k, cos, sin, unsqueeze_dim)
    except (TypeError, ValueError):
        return False
    return True


def rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` on the fused op (``ops.fused_layers.apply_rotary_pos_emb``).

    Arguments the fused op does not take (Pixtral's ``unsqueeze_dim=0`` with [S, D] tables, cos/sin that
    require grad, ...) get transformers' own expression, ``q * cos + rotate_half(q) * sin``: the same
    result, without the fused kernel.
    """
    if _fused_rope_takes(q, k, cos, sin, unsqueeze_dim):
        return F.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    return ref.rope_forward(q, cos, sin, unsqueeze_dim), ref.rope_forward(k, cos, sin, unsqueeze_dim)


class FusedRotaryPosEmb(nn.Module):
    """The kernel layer for transformers' ``"rotary_pos_emb"`` (``apply_rotary_pos_emb``) on the fused op.

    Stateless, as ``kernels`` requires of a replacement layer: no constructor, no members besides
    ``has_backward`` / ``can_torch_compile``, and ``forward`` has the replaced function's signature
    (``q, k, cos, sin, unsqueeze_dim=1``). Defined here, not in the kernel repository, so that a
    kernelized model pickles by reference to an importable module.
    """

    has_backward = True        # the fused op has its own backward (kernelize(mode=Mode.TRAINING) needs it)
    can_torch_compile = False  # not checked under torch.compile

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
