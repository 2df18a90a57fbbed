"""One entry point for every PEFT method: configs by name, apply by config type, save/load by file type.

    cfg = config_from_dict("lora", {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"})
    model = apply_method(model, cfg)                  # prompt/prefix tuning return their wrapper model
    applied_methods(model)                            # -> ["lora"]
    save_adapters(model, "out")                       # LoRA: PEFT's files in out/
    model2 = load_adapters(base2, "out")              # reads peft_type from adapter_config.json

Several methods on one model are saved side by side: ``out/<method>/`` per method (each in its own
format) plus ``out/peft_kernels_methods.json`` listing them in the order they were applied, so that
:func:`load_adapters` re-applies them in that order (prompt/prefix tuning, which wrap the model, last).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Union

from torch import nn

from ..io import method_files as mf
from ..io.atomic import fsync_file, replace_directory
from . import adapter as _adapter
from . import bitfit as _bitfit
from . import freeze as _freeze
from . import ia3 as _ia3
from . import lora as _lora
from . import prefix_tuning as _prefix
from . import prompt_tuning as _prompt
from . import sparse as _sparse
from .adapter import BottleneckConfig
from .bitfit import BitFitConfig
from .freeze import FreezeConfig
from .ia3 import IA3Config
from .lora import LoraConfig
from .prefix_tuning import PrefixTuningConfig, PrefixTuningModel
from .prompt_tuning import PromptTuningConfig, PromptTuningModel
from .sparse import SparseConfig

#: method name -> config class (the names ``config_from_dict``, the CLI and saved multi-method dirs use).
METHODS: dict[str, type] = {
    "lora": LoraConfig,
    "bitfit": BitFitConfig,
    "sparse": SparseConfig,
    "freeze": FreezeConfig,
    "adapter": BottleneckConfig,
    "ia3": IA3Config,
    "prompt_tuning": PromptTuningConfig,
    "prefix_tuning": PrefixTuningConfig,
}

#: Other accepted names: (method, defaults put under the user's keys).
ALIASES: dict[str, tuple[str, dict]] = {
    "dora": ("lora", {"use_dora": True}),
    "bottleneck": ("adapter", {}),
    "layer_freeze": ("freeze", {}),
    "prompt": ("prompt_tuning", {}),
    "prefix": ("prefix_tuning", {}),
}

#: ``peft_type`` in adapter_config.json -> method name.
PEFT_TYPES: dict[str, str] = {
    "LORA": "lora", "BITFIT": "bitfit", "SPARSE": "sparse", "LAYER_FREEZE": "freeze",
    "BOTTLENECK": "adapter", "IA3": "ia3", "PROMPT_TUNING": "prompt_tuning", "PREFIX_TUNING": "prefix_tuning",
}

#: the file listing the methods of a multi-method directory, in the order they were applied.
MANIFEST_NAME = "peft_kernels_methods.json"
MANIFEST_VERSION = 1

#: fields a config class has that are not user settings (objects set by __post_init__).
_INTERNAL_FIELDS = {PromptTuningConfig: {"tokenizer"}}

_WRAPPERS = (PromptTuningModel, PrefixTuningModel)


# ================================================================== configs
def config_fields(name: str) -> list[str]:
    """The keys ``config_from_dict(name, ...)`` accepts."""
    cls = METHODS[_canonical(name)[0]]
    return [f.name for f in dataclasses.fields(cls) if f.name not in _INTERNAL_FIELDS.get(cls, ())]


def _canonical(name) -> tuple[str, dict]:
    if not isinstance(name, str):
        raise ValueError(f"method name must be a string, got {name!r}")
    key = name.strip().lower().replace("-", "_")
    if key in METHODS:
        return key, {}
    if key in ALIASES:
        return ALIASES[key]
    raise ValueError(f"unknown method {name!r}; known methods: {', '.join(list(METHODS) + list(ALIASES))}")


def config_from_dict(name: str, d: dict | None = None):
    """Build method ``name``'s config from plain values (a YAML/JSON section).

    ``d`` may contain the key ``method`` (or ``peft_type``) only if it names the same method. Unknown keys
    and invalid values raise ValueError naming them (the config classes' own TypeErrors become ValueErrors
    with the method's name in front)."""
    method, defaults = _canonical(name)
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ValueError(f"{method} config must be a mapping of settings, got {type(d).__name__}")
    d = dict(d)
    for key in ("method", "peft_type"):
        if key in d:
            given = d.pop(key)
            other = PEFT_TYPES.get(str(given).upper()) if key == "peft_type" else None
            if other is None:
                try:
                    other = _canonical(given)[0]
                except ValueError:
                    other = given
            if other != method:
                raise ValueError(f"{method} config has {key}={given!r}, which names another method")
    cls = METHODS[method]
    allowed = config_fields(method)
    unknown = sorted(k for k in d if k not in allowed)
    if unknown:
        raise ValueError(f"unknown {method} config key(s) {unknown}; valid keys: {allowed}")
    kwargs = {**defaults, **d}
    if method == "prompt_tuning" and "num_virtual_tokens" not in kwargs:
        raise ValueError("prompt_tuning config needs num_virtual_tokens")
    if method == "prefix_tuning" and "num_virtual_tokens" not in kwargs:
        raise ValueError("prefix_tuning config needs num_virtual_tokens")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid {method} config: {e}") from e


def method_name(cfg) -> str:
    """The registry name of a config object ("lora" for a LoraConfig...)."""
    for name, cls in METHODS.items():
        if isinstance(cfg, cls):
            return name
    raise TypeError(f"not a method config: {type(cfg).__name__} (expected one of "
                    f"{', '.join(c.__name__ for c in METHODS.values())})")


# ================================================================== apply
def inner_model(model: nn.Module) -> nn.Module:
    """The model the layer methods act on: the base of a prompt/prefix tuning wrapper, else ``model``."""
    while isinstance(model, _WRAPPERS):
        model = model.base_model
    return model


def apply_method(model: nn.Module, cfg, **kwargs) -> nn.Module:
    """Apply the method ``cfg`` configures to ``model`` (in place where the method allows) and return the
    model to use from now on: ``model`` itself, or for prompt/prefix tuning the wrapper around it.

    ``kwargs`` go to the method's ``apply`` (sparse: ``calibration``, ``loss_fn``; lora/adapter/ia3:
    ``adapter_name``). A layer method applied to a prompt/prefix wrapper acts on its base model.
    Raises TypeError for an object that is not a method config, ValueError for a model the method
    cannot be applied to (the methods leave the model unchanged then)."""
    name = method_name(cfg)
    if isinstance(model, _WRAPPERS) and name in ("prompt_tuning", "prefix_tuning"):
        raise ValueError(f"{type(model).__name__} already wraps the model; prompt and prefix tuning cannot be "
                         f"stacked")
    target = inner_model(model)
    if name == "lora":
        _lora.apply(target, cfg, **kwargs)
    elif name == "bitfit":
        _bitfit.apply(target, cfg, **kwargs)
    elif name == "sparse":
        _sparse.apply(target, cfg, **kwargs)
    elif name == "freeze":
        report = _freeze.apply(target, cfg, **kwargs)
        target.peft_kernels_freeze_report = report  # kept for prepare()'s report
    elif name == "adapter":
        _adapter.apply(target, cfg, **kwargs)
    elif name == "ia3":
        _ia3.apply(target, cfg, **kwargs)
    elif name == "prompt_tuning":
        return PromptTuningModel(model, cfg, **kwargs)
    elif name == "prefix_tuning":
        return PrefixTuningModel(model, cfg, **kwargs)
    return model


def applied_methods(model: nn.Module) -> list[str]:
    """Names of the methods applied to ``model``, in :data:`METHODS` order (the wrapper ones last)."""
    base = inner_model(model)
    found = []
    if _lora.get_configs(base):
        found.append("lora")
    if _bitfit.get_config(base) is not None:
        found.append("bitfit")
    if any(True for _ in _sparse.sparse_layers(base)):
        found.append("sparse")
    if getattr(base, _freeze.RECORD_ATTR, None):
        found.append("freeze")
    if _adapter.get_configs(base):
        found.append("adapter")
    if _ia3.get_configs(base):
        found.append("ia3")
    m = model
    while isinstance(m, _WRAPPERS):
        found.append("prompt_tuning" if isinstance(m, PromptTuningModel) else "prefix_tuning")
        m = m.base_model
    return found


# ================================================================== files
def _save_one(model: nn.Module, name: str, directory: Path) -> None:
    base = inner_model(model)
    if name == "lora":
        from ..io.peft_format import save_adapter
        adapters = _lora.active_adapters(base) or sorted(_lora.get_configs(base))
        if len(adapters) != 1:
            raise ValueError(f"save_adapters saves one LoRA adapter; the model has active adapters {adapters} "
                             f"(save each with peft_kernels.io.save_adapter(model, dir, adapter_name))")
        save_adapter(base, directory, adapters[0])
    elif name == "bitfit":
        _bitfit.save_bitfit(base, directory)
    elif name == "sparse":
        _sparse.save_sparse(base, directory)
    elif name == "freeze":
        _freeze.save_trained_layers(base, directory)
    elif name == "adapter":
        adapters = _adapter.active_adapters(base) or sorted(_adapter.get_configs(base))
        _adapter.save_bottleneck(base, directory, adapters[0])
    elif name == "ia3":
        adapters = _ia3.active_adapters(base) or sorted(_ia3.get_configs(base))
        _ia3.save_ia3(base, directory, adapters[0])
    else:
        m = model
        want = PromptTuningModel if name == "prompt_tuning" else PrefixTuningModel
        while not isinstance(m, want):
            m = m.base_model
        (_prompt.save_prompt_tuning if name == "prompt_tuning" else _prefix.save_prefix_tuning)(m, directory)


def _owned(name: str) -> bool:
    """Entries of an adapter directory that a new save replaces (others, e.g. a README, are kept)."""
    return mf.owned(name) or name in METHODS or name == MANIFEST_NAME


def save_adapters(model: nn.Module, directory: Union[str, os.PathLike], methods: list[str] | None = None) -> Path:
    """Write every method applied to ``model`` (or ``methods``, in that order) to ``directory``, atomically.

    One method: its own files in ``directory`` itself (LoRA/IA3/prompt/prefix: PEFT's format). Several:
    ``directory/<method>/`` each plus :data:`MANIFEST_NAME` with their order. The whole directory is
    replaced in one step: a failure (a full disk, a NaN in a tensor) leaves the previous save intact.
    Returns the directory's absolute path."""
    if methods is None:
        methods = getattr(inner_model(model), "peft_kernels_methods", None) or applied_methods(model)
        have = applied_methods(model)
        methods = [m for m in methods if m in have] + [m for m in have if m not in methods]
    if not methods:
        raise ValueError(f"{type(model).__name__} has no PEFT method applied: nothing to save")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    with replace_directory(directory, owned=_owned) as staging:
        if len(methods) == 1:
            _save_one(model, methods[0], staging)
        else:
            for name in methods:
                _save_one(model, name, staging / name)
            path = staging / MANIFEST_NAME
            path.write_text(json.dumps({"format_version": MANIFEST_VERSION, "methods": list(methods)}, indent=2)
                            + "\n")
            fsync_file(path)
    return Path(os.path.abspath(directory))


def _peft_type_of(directory: Path) -> str:
    path = directory / mf.CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise mf.AdapterLoadError(f"{directory}: no {mf.CONFIG_NAME} (not an adapter directory)") from None
    except (OSError, ValueError) as e:
        raise mf.AdapterLoadError(f"{path}: not valid JSON ({e})") from None
    pt = config.get("peft_type") if isinstance(config, dict) else None
    if not isinstance(pt, str) or pt.upper() not in PEFT_TYPES:
        raise mf.AdapterLoadError(f"{path}: peft_type {pt!r} is not one this engine reads "
                                  f"({', '.join(PEFT_TYPES)})")
    return PEFT_TYPES[pt.upper()]


def _load_one(model: nn.Module, name: str, directory: Path, is_trainable: bool) -> nn.Module:
    base = inner_model(model)
    if name == "lora":
        from ..io.peft_format import load_adapter
        load_adapter(base, directory, is_trainable=is_trainable)
    elif name == "bitfit":
        _bitfit.load_bitfit(base, directory)
        _freeze_unless(base, is_trainable)
    elif name == "sparse":
        _sparse.load_sparse(base, directory)
        _freeze_unless(base, is_trainable)
    elif name == "freeze":
        if not getattr(base, _freeze.RECORD_ATTR, None):
            config, _ = mf.read_method_files(directory)
            fc = config.get("freeze_config")
            if fc:  # a base model: freeze (and quantize) it the way the saved one was
                mf.check_fingerprint(config, base, directory)
                _freeze.apply(base, FreezeConfig.from_dict(fc))
        _freeze.load_trained_layers(base, directory)
        if not is_trainable:
            for p in base.parameters():
                p.requires_grad_(False)
    elif name == "adapter":
        _adapter.load_bottleneck(base, directory, is_trainable=is_trainable)
    elif name == "ia3":
        _ia3.load_ia3(base, directory, is_trainable=is_trainable)
    elif name == "prompt_tuning":
        return _prompt.load_prompt_tuning(model, directory, is_trainable=is_trainable)
    elif name == "prefix_tuning":
        return _prefix.load_prefix_tuning(model, directory, is_trainable=is_trainable)
    return model


def _freeze_unless(base: nn.Module, is_trainable: bool) -> None:
    """bitfit/sparse loaders leave their tensors trainable; inference loads freeze them (as PEFT's default)."""
    if not is_trainable:
        for p in base.parameters():
            p.requires_grad_(False)


def load_adapters(model: nn.Module, directory: Union[str, os.PathLike], *, is_trainable: bool = False) -> nn.Module:
    """Load what :func:`save_adapters` wrote (or any single method's directory, PEFT's LoRA/IA3/prompt/prefix
    files included) into ``model``; returns the model to use (a wrapper for prompt/prefix tuning).

    The method of each directory comes from its ``peft_type``. ``is_trainable=False`` (default, as PEFT)
    freezes the loaded tensors. Each method's loader checks its files before changing the model; with
    several methods all directories are checked for a known peft_type first."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such adapter directory")
    if (directory / mf.CONFIG_NAME).exists():
        plan = [(_peft_type_of(directory), directory)]
    elif (directory / MANIFEST_NAME).exists():
        try:
            manifest = json.loads((directory / MANIFEST_NAME).read_text())
            names = manifest["methods"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("methods must be a list of names")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise mf.AdapterLoadError(f"{directory / MANIFEST_NAME}: unreadable manifest ({e})") from None
        plan = []
        for name in names:
            if name not in METHODS:
                raise mf.AdapterLoadError(f"{directory / MANIFEST_NAME}: unknown method {name!r}")
            got = _peft_type_of(directory / name)
            if got != name:
                raise mf.AdapterLoadError(f"{directory / name}: holds a {got} adapter, the manifest says {name}")
            plan.append((name, directory / name))
    else:
        raise mf.AdapterLoadError(f"{directory}: neither {mf.CONFIG_NAME} nor {MANIFEST_NAME} found "
                                  f"(not a directory save_adapters wrote)")
    trainable: set[int] = set()
    for name, sub in plan:
        model = _load_one(model, name, sub, is_trainable)
        # each loader freezes what it does not load (BitFit freezes everything but biases): keep the union
        trainable |= {id(p) for p in model.parameters() if p.requires_grad}
    for p in model.parameters():
        if id(p) in trainable:
            p.requires_grad_(True)
    try:
        inner_model(model).peft_kernels_methods = [n for n, _ in plan]
    except AttributeError:
        pass
    return model


__all__ = ["METHODS", "ALIASES", "PEFT_TYPES", "MANIFEST_NAME", "config_fields", "config_from_dict", "method_name",
           "inner_model", "apply_method", "applied_methods", "save_adapters", "load_adapters"]
