"""``apply_fused_kernels(model)``: swap a transformers model's RMSNorms and SwiGLU MLPs for the fused modules,
and route its attention modules' ``apply_rotary_pos_emb`` to the fused RoPE.

    report = apply_fused_kernels(model, rmsnorm=True, swiglu=True, rope=True)
    print(report)     # which modules were swapped, which were left and why

RMSNorm and SwiGLU: modules are swapped (``peft_kernels.nn.fused``). Every candidate is checked before it
is swapped: on a small probe input, on the module's own device, the module's output must equal — bit for
bit — the plain-torch expression the fused op stands for (``ops/reference_fused.py``: the Llama or the
Gemma RMSNorm form; ``down(silu(gate(x)) * up(x))`` for an MLP). A module whose forward computes anything
else (another norm, another activation, hooks that change the result) fails the probe and is left as it
is, with the reason in the report.

RoPE: transformers calls ``apply_rotary_pos_emb`` as a module-level function, decorated with
``kernels.use_kernel_forward_from_hub("rotary_pos_emb")``, and decorates the attention classes that call
it with ``kernels.use_kernelized_func(apply_rotary_pos_emb)``, which gives each attention module a private
wrapper of the function (``module._kernel_funcs``). That is the supported extension point: the wrapper's
forward is replaced by ``kernels.kernelize`` with a layer from a kernel repository. This project ships
one, in the Hub layout, inside the package (``peft_kernels/hub_kernels/rotary``, build variant
``torch-universal``; its layer ``apply_rotary_transformers`` is ``nn.fused.FusedRotaryPosEmb``, which calls
``ops.fused_layers.apply_rotary_pos_emb``), and loads it with ``kernels.LocalLayerRepository``: offline,
nothing downloaded. Only each attention module's rotary wrapper is kernelized, under a kernel mapping
that holds "rotary_pos_emb" alone (``use_kernel_mapping(..., inherit_mapping=False)``: neither
transformers' nor any global mapping), so no other layer is touched. No transformers source or function
is edited. An attention module is kernelized only after a probe on its own device: its own
``apply_rotary_pos_emb`` must equal ``q * cos + rotate_half(q) * sin`` bit for bit (in the module's dtype,
and with bfloat16 q/k over float32 cos/sin, which rules out the variants that compute in float32), and
the kernelized function must give transformers' result bit for bit in the module's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as TF
from torch import nn

from .methods._common import replace_module
from .nn.fused import FusedRMSNorm, FusedSwiGLUMLP, norm_eps
from .ops import reference_fused as ref

_PROBE_ROWS = 3

#: transformers' kernel name for ``apply_rotary_pos_emb`` (``@use_kernel_forward_from_hub("rotary_pos_emb")``).
ROPE_KERNEL_NAME = "rotary_pos_emb"
#: The kernel repository shipped in the package (Hub layout: ``build/torch-universal/``) and its layer.
ROPE_REPO_PATH = Path(__file__).resolve().parent / "hub_kernels" / "rotary"
ROPE_LAYER_NAME = "apply_rotary_transformers"


@dataclass
class FusedReport:
    """What :func:`apply_fused_kernels` swapped (module names; ``rope``: the attention modules whose
    ``apply_rotary_pos_emb`` was kernelized) and what it left (name -> reason)."""

    rmsnorm: list[str] = field(default_factory=list)
    swiglu: list[str] = field(default_factory=list)
    rope: list[str] = field(default_factory=list)     # attention modules whose rotary function was kernelized
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused kernels: {len(self.rmsnorm)} RMSNorm, {len(self.swiglu)} SwiGLU MLP modules swapped, "
                 f"RoPE in {len(self.rope)} attention modules"]
        lines += [f"  left {n}: {why}" for n, why in self.skipped.items()]
        return "\n".join(lines + self.notes)


def _probe(module: nn.Module, shape_last: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(1234)
    return torch.randn(_PROBE_ROWS, shape_last, generator=g).to(device=device, dtype=dtype)


def _carries_more(module: nn.Module, children: tuple[str, ...]) -> str:
    """Why swapping ``module`` would lose something (hooks, child modules the fused module does not keep), or "".

    The probe alone cannot see these: a freshly initialised adapter attached by a hook is the identity, so
    the module passes the probe, and the swap would silently drop the adapter and its parameters."""
    hooks = [name for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
             if getattr(module, name, None)]
    if hooks:
        return f"it has {', '.join(h.strip('_') for h in hooks)} (a swap would drop them)"
    extra = sorted(n for n, _ in module.named_children() if n not in children)
    if extra:
        return f"it has child modules {extra} the fused module would not keep"
    own = sorted(n for n, _ in module.named_parameters(recurse=False) if n != "weight")
    own += sorted(n for n, _ in module.named_buffers(recurse=False))
    if own:
        return f"it has parameters / buffers {own} the fused module would not keep"
    return ""


def _norm_form(module: nn.Module) -> tuple[bool | None, str]:
    """(gemma flag, "") when ``module`` computes one of the two RMSNorm forms exactly, else (None, why)."""
    why = _carries_more(module, ())
    if why:
        return None, why
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
    why = _carries_more(module, ("gate_proj", "up_proj", "down_proj", "act_fn"))
    if why:
        return False, why
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


# ------------------------------------------------------------------ RoPE (kernels' extension point)
def _rotary_func(module: nn.Module):
    """(key, wrapper) of the module's private ``apply_rotary_pos_emb`` wrapper (``use_kernelized_func``), or None."""
    funcs = module.__dict__.get("_kernel_funcs")
    if isinstance(funcs, dict):
        for key, fn in funcs.items():
            if isinstance(fn, nn.Module) and getattr(type(fn), "kernel_layer_name", None) == ROPE_KERNEL_NAME:
                return key, fn
    return None


def _rope_probe_args(head_dim: int, dtype: torch.dtype, table_dtype: torch.dtype, device: torch.device,
                     unsqueeze_dim: int):
    """q [2, 2, 5, D], k [2, 1, 5, D] (as transposed [B, S, H, D] views, like transformers' q/k; [B, S, H, D]
    themselves for ``unsqueeze_dim=2``), cos/sin [2, 5, D] as transformers' rotary embedding builds them."""
    g = torch.Generator(device="cpu").manual_seed(1234)
    q, k = torch.randn(2, 5, 2, head_dim, generator=g), torch.randn(2, 5, 1, head_dim, generator=g)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    positions = torch.arange(5, dtype=torch.float32)[None] + torch.tensor([[0.0], [7.0]])
    emb = torch.cat([positions[..., None] * inv_freq] * 2, dim=-1)
    to = dict(device=device)
    return (q.to(**to, dtype=dtype), k.to(**to, dtype=dtype), emb.cos().to(**to, dtype=table_dtype),
            emb.sin().to(**to, dtype=table_dtype))


def _same_pair(got, want) -> bool:
    return (isinstance(got, tuple) and isinstance(want, tuple) and len(got) == len(want) == 2
            and all(isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                    and a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, want)))


def _rope_probe(original: nn.Module, kernelized: nn.Module, head_dim: int, dtype: torch.dtype,
                device: torch.device) -> str:
    """"" when ``original`` (transformers' function) is the rotate_half expression and ``kernelized`` gives its
    results bit for bit on ``device``; else why not."""
    with torch.no_grad():
        for q_dtype, table_dtype in ((dtype, dtype), (torch.bfloat16, torch.float32)):
            for dim in (1, 2):
                q, k, cos, sin = _rope_probe_args(head_dim, q_dtype, table_dtype, device, dim)
                want = original(q, k, cos, sin, unsqueeze_dim=dim)
                expr = (ref.rope_forward(q, cos, sin, dim), ref.rope_forward(k, cos, sin, dim))
                if not _same_pair(want, expr):
                    return ("its apply_rotary_pos_emb is not q * cos + rotate_half(q) * sin in the input dtype "
                            "(probe differs)")
                if q_dtype == dtype and table_dtype == dtype and not _same_pair(
                        kernelized(q, k, cos, sin, unsqueeze_dim=dim), want):
                    return (f"the kernelized apply_rotary_pos_emb differs from transformers' on "
                            f"{device.type} in {str(dtype).replace('torch.', '')} (probe)")
    return ""


def _probe_dtype_device(module: nn.Module):
    params = [p for p in module.parameters() if p.is_floating_point()]
    frozen = [p for p in params if not p.requires_grad]  # the base weights' dtype, not a trainable adapter's
    p = (frozen or params or [None])[0]
    return (None, None) if p is None else (p.dtype, p.device)


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _kernelized_repo(fn: nn.Module, kernelized_layers):
    """The repository ``kernels`` recorded for the kernelized wrapper ``fn`` (None: not kernelized)."""
    entry = kernelized_layers(fn).layers.get("")
    return None if entry is None else entry.repo


def _apply_rope(model: nn.Module, report: FusedReport) -> None:
    try:
        from kernels import LocalLayerRepository, Mode, get_kernelized_layers, kernelize, use_kernel_mapping
    except Exception as e:  # transformers' decorators are no-ops then: no attention module has the wrapper
        unavailable = f"RoPE not applied: the kernels package is not importable ({type(e).__name__}: {e})"
        report.notes.append(unavailable)
    else:
        unavailable = ""
        repo = LocalLayerRepository(repo_path=ROPE_REPO_PATH, layer_name=ROPE_LAYER_NAME)
    probed: dict = {}
    for name, module in model.named_modules():
        if not name:
            continue
        found = _rotary_func(module)
        if found is None:
            if type(module).__name__.endswith("Attention"):
                report.skipped[name] = unavailable or (
                    "no kernelized apply_rotary_pos_emb (its class is not decorated with transformers' "
                    "use_kernelized_func(apply_rotary_pos_emb))")
            continue
        if unavailable:
            report.skipped[name] = unavailable
            continue
        _, fn = found
        current = _kernelized_repo(fn, get_kernelized_layers)
        if current is not None:
            if current != repo:
                report.skipped[name] = f"its apply_rotary_pos_emb is already kernelized from {current}"
            continue  # already ours: left alone, as already fused modules are
        dtype, device = _probe_dtype_device(module)
        if dtype is None or device.type == "meta":
            report.skipped[name] = "no floating parameters (or on the meta device)"
            continue
        head_dim = getattr(module, "head_dim", None)
        head_dim = head_dim if isinstance(head_dim, int) and head_dim > 0 and head_dim % 2 == 0 else 16
        mapping = {ROPE_KERNEL_NAME: {device.type: repo}}
        # One mode for training and inference (kernels takes one of the two): TRAINING, so that kernels
        # checks the layer has a backward; the mapping registers the repository for every mode (FALLBACK).
        settings = dict(mode=Mode.TRAINING, device=device.type, use_fallback=False)
        cache_key = (type(fn), head_dim, dtype, device)
        try:
            with use_kernel_mapping(mapping, inherit_mapping=False):
                why = probed.get(cache_key)
                if why is None:
                    trial = kernelize(type(fn)(), **settings)  # a fresh wrapper: the module's is not touched yet
                    if _kernelized_repo(trial, get_kernelized_layers) != repo:
                        why = "kernels left its original forward (is DISABLE_KERNEL_MAPPING set?)"
                    else:
                        try:
                            why = _rope_probe(type(fn)(), trial, head_dim, dtype, device)
                        except Exception as e:  # e.g. a rotary function with another signature
                            why = f"the probe failed: {_first_line(e)}"
                    probed[cache_key] = why
                if not why:
                    kernelize(fn, **settings)
                    if _kernelized_repo(fn, get_kernelized_layers) != repo:
                        why = "kernels left its original forward"
        except Exception as e:  # loading, validation or the probe failed: leave the module as it is
            why = f"kernelize failed: {_first_line(e)}"
            probed[cache_key] = why
        if why:
            report.skipped[name] = why
        else:
            report.rope.append(name)


def apply_fused_kernels(model: nn.Module, rmsnorm: bool = True, swiglu: bool = True, rope: bool = True
                        ) -> FusedReport:
    """Swap ``model``'s RMSNorm and SwiGLU MLP modules for the fused ones and kernelize its attention modules'
    ``apply_rotary_pos_emb`` with the fused RoPE, in place; returns the report.

    Candidates: modules whose class name ends in ``RMSNorm`` (swapped when they compute the Llama or the
    Gemma form), modules with ``gate_proj`` / ``up_proj`` / ``down_proj`` and a SiLU ``act_fn`` (swapped
    when they compute ``down(silu(gate(x)) * up(x))``), and attention modules with transformers' kernelized
    ``apply_rotary_pos_emb`` (see the module docstring; other modules whose class name ends in
    ``Attention`` are reported as left). Already fused modules are left alone. Call it with the model on
    the device it will run on: the probes run there.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    for name, v in (("rmsnorm", rmsnorm), ("swiglu", swiglu), ("rope", rope)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be True or False, got {v!r}")
    report = FusedReport()
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
    if rope:
        _apply_rope(model, report)
    return report


__all__ = ["apply_fused_kernels", "FusedReport"]
