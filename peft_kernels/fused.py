"""``apply_fused_kernels(model)``: swap a transformers model's RMSNorms and SwiGLU MLPs for the fused modules.

    report = apply_fused_kernels(model, rmsnorm=True, swiglu=True)
    print(report)     # which modules were swapped, which were left and why

Only modules are swapped (``peft_kernels.nn.fused``); no transformers source or function is touched.
Every candidate is checked before it is swapped: on a small probe input, on the module's own device,
the module's output must equal — bit for bit — the plain-torch expression the fused op stands for
(``ops/reference_fused.py``: the Llama or the Gemma RMSNorm form; ``down(silu(gate(x)) * up(x))`` for
an MLP). A module whose forward computes anything else (another norm, another activation, hooks that
change the result) fails the probe and is left as it is, with the reason in the report.

RoPE is not swapped: transformers calls ``apply_rotary_pos_emb`` as a module-level function from the
attention's forward; the one supported way to replace it is the ``kernels`` package's ``kernelize`` with
a kernel repository in the Hub's layout, which this project does not ship (docs/training/fused_kernels.md).
The fused op is ``peft_kernels.ops.fused_layers.apply_rotary_pos_emb`` for models written against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as TF
from torch import nn

from .methods._common import replace_module
from .nn.fused import FusedRMSNorm, FusedSwiGLUMLP, norm_eps
from .ops import reference_fused as ref

ROPE_NOTE = ("RoPE is not swapped: transformers applies it through a module-level function; see "
             "docs/training/fused_kernels.md and peft_kernels.ops.fused_layers.apply_rotary_pos_emb")
_PROBE_ROWS = 3


@dataclass
class FusedReport:
    """What :func:`apply_fused_kernels` swapped (module names) and what it left (name -> reason)."""

    rmsnorm: list[str] = field(default_factory=list)
    swiglu: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused kernels: {len(self.rmsnorm)} RMSNorm, {len(self.swiglu)} SwiGLU MLP modules swapped"]
        lines += [f"  left {n}: {why}" for n, why in self.skipped.items()]
        return "\n".join(lines + self.notes)


def _probe(module: nn.Module, shape_last: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(1234)
    return torch.randn(_PROBE_ROWS, shape_last, generator=g).to(device=device, dtype=dtype)


def _norm_form(module: nn.Module) -> tuple[bool | None, str]:
    """(gemma flag, "") when ``module`` computes one of the two RMSNorm forms exactly, else (None, why)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 1 or not w.is_floating_point():
        return None, "no 1-D floating weight Parameter"
    try:
        eps = norm_eps(module)
    except ValueError as e:
        return None, str(e)
    if w.device.type == "meta":
        return None, "weight on the meta device"
    # Inputs in the model's activation dtype (the weight's): what the module sees in use.
    x = _probe(module, w.shape[0], w.dtype, w.device)
    with torch.no_grad():
        got = module(x)
        for gemma in (False, True):
            want = ref.rmsnorm_forward(x, w, eps, gemma)[0]
            if got.dtype == want.dtype and torch.equal(got, want):
                return gemma, ""
    return None, "its forward is neither the Llama nor the Gemma RMSNorm expression (probe differs)"


def _is_swiglu_mlp(module: nn.Module) -> tuple[bool, str]:
    if not all(isinstance(getattr(module, a, None), nn.Module) for a in ("gate_proj", "up_proj", "down_proj")):
        return False, "no gate_proj/up_proj/down_proj"
    act = getattr(module, "act_fn", None)
    if not isinstance(act, nn.SiLU) and type(act).__name__ != "SiLUActivation":
        return False, f"activation {type(act).__name__} is not SiLU"
    w = next((p for p in module.parameters() if p.is_floating_point()), None)
    if w is None or w.device.type == "meta":
        return False, "no floating parameters (or on the meta device)"
    hidden = getattr(module, "hidden_size", None) or getattr(module.gate_proj, "in_features", None)
    if not isinstance(hidden, int):
        return False, "hidden size unknown"
    x = _probe(module, hidden, w.dtype, w.device)
    was_training = module.training
    module.eval()  # dropout (LoRA's) off for the probe
    try:
        with torch.no_grad():
            got = module(x)
            want = module.down_proj(TF.silu(module.gate_proj(x)) * module.up_proj(x))
    finally:
        module.train(was_training)
    if got.dtype != want.dtype or not torch.equal(got, want):
        return False, "its forward is not down_proj(silu(gate_proj(x)) * up_proj(x)) (probe differs)"
    return True, ""


def apply_fused_kernels(model: nn.Module, rmsnorm: bool = True, swiglu: bool = True, rope: bool = False
                        ) -> FusedReport:
    """Swap ``model``'s RMSNorm and SwiGLU MLP modules for the fused ones, in place; returns the report.

    Candidates: modules whose class name ends in ``RMSNorm`` (swapped when they compute the Llama or the
    Gemma form) and modules with ``gate_proj`` / ``up_proj`` / ``down_proj`` and a SiLU ``act_fn``
    (swapped when they compute ``down(silu(gate(x)) * up(x))``); already fused modules are left alone.
    ``rope=True`` is refused (no supported extension point; see the module docstring).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    for name, v in (("rmsnorm", rmsnorm), ("swiglu", swiglu), ("rope", rope)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be True or False, got {v!r}")
    if rope:
        raise ValueError("rope=True is not offered: transformers calls apply_rotary_pos_emb as a module-level "
                         "function, and swapping it would mean patching transformers' source. Use "
                         "peft_kernels.ops.fused_layers.apply_rotary_pos_emb in your own attention code "
                         "(docs/training/fused_kernels.md)")
    report = FusedReport(notes=[ROPE_NOTE])
    targets = []
    for name, module in model.named_modules():
        if not name or isinstance(module, (FusedRMSNorm, FusedSwiGLUMLP)):
            continue
        if rmsnorm and type(module).__name__.endswith("RMSNorm"):
            gemma, why = _norm_form(module)
            if gemma is None:
                report.skipped[name] = why
            else:
                targets.append((name, FusedRMSNorm.from_module(module, gemma)))
        elif swiglu and hasattr(module, "gate_proj") and hasattr(module, "down_proj"):
            ok, why = _is_swiglu_mlp(module)
            if ok:
                targets.append((name, FusedSwiGLUMLP.from_module(module)))
            else:
                report.skipped[name] = why
    for name, new in targets:  # after the walk: never change the tree while iterating it
        old = replace_module(model, name, new)
        new.train(old.training)
        (report.rmsnorm if isinstance(new, FusedRMSNorm) else report.swiglu).append(name)
    return report


__all__ = ["apply_fused_kernels", "FusedReport"]
