"""What every method's ``apply`` needs: module lookup and replacement, the model's layer stack,
freezing, disabling adapters for a while, and the trainable-parameter report.

Methods stay one file each (``methods/<method>.py``); anything two of them would otherwise both
write lives here.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Iterable, Optional

from torch import nn

from ..nn._quant_weight import QuantizedWeight

#: Attribute paths of the repeated transformer blocks, most specific first (checked in order).
LAYER_STACK_PATHS = (
    "model.layers",              # Llama, Mistral, Qwen2, Gemma (…ForCausalLM.model.layers)
    "layers",                    # the bare …Model of those
    "model.decoder.layers",      # OPT
    "transformer.h",             # GPT-2, GPT-J, Falcon, Bloom
    "h",                         # bare GPT-2
    "gpt_neox.layers",
    "bert.encoder.layer",        # BERT / RoBERTa heads
    "roberta.encoder.layer",
    "encoder.layer",             # bare BERT
)


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of submodule ``name`` (a dotted path; '' is not allowed)."""
    if not name:
        raise ValueError("the root module has no parent")
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted path ``name`` in ``model``; returns the module it replaced."""
    parent, child = get_parent(model, name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the model's repeated transformer blocks.

    Tries :data:`LAYER_STACK_PATHS`, then falls back to the longest ``nn.ModuleList`` in the model.
    Raises ValueError naming the model class when it has none.
    """
    for path in LAYER_STACK_PATHS:
        try:
            m = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            return path, m
    best: Optional[tuple[str, nn.ModuleList]] = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (best is None or len(m) > len(best[1])):
            best = (name, m)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of transformer layers (no nn.ModuleList); "
                         f"looked for {', '.join(LAYER_STACK_PATHS)}")
    return best


def layer_index(name: str, stack_name: str) -> Optional[int]:
    """Index of the block a module named ``name`` lives in (``<stack_name>.<i>.…``), or None."""
    m = re.match(rf"^{re.escape(stack_name)}\.(\d+)(\.|$)", name)
    return None if m is None else int(m.group(1))


def freeze(model: nn.Module) -> None:
    """``requires_grad=False`` on every parameter of ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)


@contextlib.contextmanager
def disabled(model: nn.Module, modules: Iterable):
    """Context manager: ``disabled = True`` on each of ``modules``, restored afterwards; yields ``model``."""
    mods = list(modules)
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


def _logical_numel(model: nn.Module) -> dict[int, int]:
    """id(packed 4-bit weight) -> number of weights it stores (2 per byte): Linear4bit, Embedding4bit."""
    return {id(m.weight): math.prod(m._quant_shape()) for m in model.modules() if isinstance(m, QuantizedWeight)}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared tensors once; a 4-bit weight counts its weights (as PEFT)."""
    logical = _logical_numel(model)
    trainable = total = 0
    for p in model.parameters():
        n = logical.get(id(p), p.numel())
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: ``trainable params: X || all params: Y || trainable%: Z``."""
    t, a = trainable_parameters(model)
    print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")
