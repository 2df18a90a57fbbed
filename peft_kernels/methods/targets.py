"""Hugging Face PEFT 0.21's module matching, shared by the methods that wrap linear layers (LoRA, IA3, ...).

* ``target_modules`` as a string: a regex that must ``re.fullmatch`` the module's full name;
  :data:`ALL_LINEAR` (``"all-linear"``): every linear layer except the output head.
* as a list: a module whose full name equals an entry or ends with ``"." + entry``; then
  ``layers_to_transform`` keeps only modules under those layer indices (see :func:`layer_index`).
* ``exclude_modules`` (regex or list, same rules) and anything under ``modules_to_save`` are never targeted.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Optional, Union

from torch import nn

from ..nn.linear4bit import Linear4bit
from ..nn.lora import ModulesToSaveWrapper

ALL_LINEAR = "all-linear"
#: The classification heads PEFT trains in full for ``task_type="SEQ_CLS"``.
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def is_linear(m: nn.Module, wrappers: tuple = ()) -> bool:
    """nn.Linear, transformers Conv1D, Linear4bit, or one of the adapter layer types ``wrappers``."""
    return (isinstance(m, (nn.Linear, Linear4bit) + tuple(wrappers))
            or (type(m).__name__ == "Conv1D" and hasattr(m, "nf")))


def candidate_modules(model: nn.Module, opaque: Union[tuple, Callable[[nn.Module], bool]]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every named module of ``model`` that is not inside an opaque module: one of a type in
    ``opaque``, or for which ``opaque(module)`` is true (adapter layers, ModulesToSaveWrappers: their insides
    are never targeted)."""
    is_opaque = opaque if callable(opaque) else (lambda m: isinstance(m, opaque))
    out, stop = [], []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in stop):
            continue
        out.append((name, m))
        if is_opaque(m):
            stop.append(name)
    return out


def output_embeddings(model: nn.Module) -> Optional[nn.Module]:
    """``model.get_output_embeddings()``, or None where the model has none (or does not implement it)."""
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        return get()
    except (NotImplementedError, AttributeError):
        return None


def output_head_names(model: nn.Module, task_type: Optional[str] = None, wrappers: tuple = ()) -> set[str]:
    """Names of the output head (for ``SEQ_CLS`` without output embeddings: ``score``/``classifier``) and of
    any module of a type in ``wrappers`` holding it; ``all-linear`` leaves these out."""
    heads = []
    out_emb = output_embeddings(model)
    if out_emb is not None:
        heads.append(out_emb)
    elif str(task_type or "").upper() == "SEQ_CLS":
        for n in SEQ_CLS_HEAD_NAMES:
            if isinstance(getattr(model, n, None), nn.Module):
                heads.append(getattr(model, n))
                break
    ids = {id(h) for h in heads}
    names = set()
    for name, m in model.named_modules():
        if id(m) in ids:
            names.add(name)
        if wrappers and isinstance(m, wrappers) and any(id(c) in ids for c in m.modules() if c is not m):
            names.add(name)
    return names


def list_match(targets: Iterable[str], key: str) -> bool:
    """PEFT's list rule: ``key`` equals an entry or ends with ``"." + entry``."""
    return key in targets or any(key.endswith("." + t) for t in targets)


def layer_index(key: str, layers_pattern) -> Optional[int]:
    """The layer index in ``key``: the number after ``layers_pattern`` (a name or list of names), or without
    a pattern the first ``<name>.<number>.``; None if there is none."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        m = None
        for pat in ([layers_pattern] if isinstance(layers_pattern, str) else layers_pattern):
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    return None if m is None else int(m.group("idx"))


def matches(targets, key: str, *, exclude_modules=None, modules_to_save=None, layers_to_transform=None,
            layers_pattern=None) -> bool:
    """Whether module ``key`` is targeted by ``targets`` (regex or list) under PEFT's rules."""
    ex = exclude_modules
    if ex:
        if (re.fullmatch(ex, key) if isinstance(ex, str) else list_match(ex, key)):
            return False
    if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if not list_match(targets, key):
        return False
    lt = layers_to_transform
    if lt is None or (isinstance(lt, list) and not lt):
        return True
    idx = layer_index(key, layers_pattern)
    if idx is None:
        return False
    return idx == lt if isinstance(lt, int) else idx in lt


def pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key k with ``(.*\\.)?(k)$`` matching."""
    for k in patterns:
        if re.match(rf"(.*\.)?({k})$", key):
            return patterns[k]
    return default


def find_linear_targets(model: nn.Module, targets, *, method: str, wrappers: tuple, opaque: tuple,
                        task_type: Optional[str] = None, **match_kw) -> list[str]:
    """Full names of the modules ``targets`` selects (``"all-linear"`` expanded, PEFT's :func:`matches` with
    ``match_kw``) among the modules outside those of the types in ``opaque``, skipping ModulesToSaveWrappers.

    Raises ValueError when a selected module is not a linear layer (``method`` names the method in the
    message). Returns an empty list when nothing matches: the caller words that error.
    """
    cands = candidate_modules(model, opaque)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        heads = output_head_names(model, task_type, opaque)
        targets = [n for n, m in cands if is_linear(m, wrappers) and n not in heads]
    found = []
    for name, m in cands:
        if not matches(targets, name, **match_kw) or isinstance(m, ModulesToSaveWrapper):
            continue
        if not is_linear(m, wrappers):
            raise ValueError(f"target module {name!r} is a {type(m).__name__}; {method} here supports nn.Linear, "
                             f"transformers Conv1D and Linear4bit layers")
        found.append(name)
    return found


def linear_names(model: nn.Module, opaque: tuple, wrappers: tuple = (), most: int = 6) -> list[str]:
    """The first ``most`` linear layer names (for "named like ..." error messages)."""
    return [n for n, m in candidate_modules(model, opaque) if is_linear(m, wrappers)][:most]


def with_seq_cls_heads(cfg):
    """``cfg`` (a dataclass with ``task_type`` / ``modules_to_save``) with, for ``SEQ_CLS``, the classification
    head names added to ``modules_to_save`` (as PEFT's PeftModelForSequenceClassification: the new head trains
    in full)."""
    if str(cfg.task_type or "").upper() != "SEQ_CLS":
        return cfg
    return dataclasses.replace(cfg, modules_to_save=list(cfg.modules_to_save or []) + list(SEQ_CLS_HEAD_NAMES))


def resolve_modules_to_save(model: nn.Module, modules_to_save: Optional[list[str]], opaque: tuple) -> list[str]:
    """Names of the modules ``modules_to_save`` selects (PEFT: a name ending with an entry); ValueError when
    entries are given but none matches (PEFT, too, only objects then)."""
    if not modules_to_save:
        return []
    keys = [n for n, _ in candidate_modules(model, opaque)]
    found = [k for k in keys if any(k.endswith(t) for t in modules_to_save)]
    if not found:
        raise ValueError(f"modules_to_save {modules_to_save!r} matched no module of {type(model).__name__}")
    return found
