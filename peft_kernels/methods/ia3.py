"""(IA)³ on any transformers model: config, apply, adapter management, report, and PEFT-format files.

    cfg = IA3Config()                         # PEFT's defaults per model type (llama: k_proj, v_proj, down_proj)
    model = apply(model, cfg)                 # IA3Linear over every target; only the vectors train
    save_ia3(model, "out/ia3")                # peft.PeftModel.from_pretrained(base, "out/ia3") loads it
    load_ia3(other_model, "out/ia3")          # and ours loads PEFT's files

Module matching is PEFT 0.21's (``methods/targets.py``, shared with ``methods/lora.py``): ``target_modules`` as a string is a regex
that must ``re.fullmatch`` a module's full name (``"all-linear"``: every linear layer but the output head); as a
list, a name equal to an entry or ending with ``"." + entry``. ``exclude_modules`` and ``modules_to_save``
modules are never targeted. ``feedforward_modules`` follows PEFT's own rule: a string is a ``re.fullmatch``
regex, a list entry matches a name that *ends with* it (no dot boundary: for BERT ``"output.dense"`` matches
both ``attention.output.dense`` and ``output.dense``, as in PEFT). Without ``target_modules`` /
``feedforward_modules``, PEFT's defaults for ``model.config.model_type`` apply.

Files (``save_ia3`` / ``load_ia3``) are PEFT's: ``adapter_config.json`` with ``peft_type`` "IA3" (plus
``peft_kernels_base_fingerprint``, ignored by PEFT) and ``adapter_model.safetensors`` with
``base_model.model.<module>.ia3_l`` ([N, 1] or [1, K] float32) and ``base_model.model.<module>.<param>`` for
``modules_to_save`` copies.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch import nn

from ..io.method_files import (CONFIG_NAME, FINGERPRINT_KEY, WEIGHTS_NAME, AdapterLoadError, check_fingerprint,
                               check_peft_type, is_peft_model, model_fingerprint, name_or_path, read_method_files,
                               write_method_files)
from ..nn.ia3 import IA3Linear
from ..nn.lora import LoraLinear, ModulesToSaveWrapper
from ._adapter_layers import LayerMethod, check_adapter_name
from ._adapter_layers import wrappers as _wrappers
from ._common import print_trainable_parameters, trainable_parameters  # noqa: F401 (re-exported)
from .targets import ALL_LINEAR, SEQ_CLS_HEAD_NAMES  # noqa: F401 (re-exported)
from .targets import find_linear_targets, linear_names, resolve_modules_to_save, with_seq_cls_heads

CONFIG_ATTR = "peft_kernels_ia3_configs"
ACTIVE_ATTR = "peft_kernels_ia3_active_adapters"
#: PEFT's key prefix (PeftModel.base_model is an IA3Model whose .model is the transformers model).
PEFT_PREFIX = "base_model.model."

#: PEFT 0.21.2's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.
DEFAULT_TARGET_MODULES = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"], "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"], "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"], "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"], "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"], "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"], "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"], "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
}
#: PEFT 0.21.2's TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.
DEFAULT_FEEDFORWARD_MODULES = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"], "roberta": ["output.dense"],
    "opt": ["fc2"], "gptj": ["fc_out"], "gpt_neox": ["dense_4h_to_h"], "gpt_neo": ["c_proj"], "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"], "llama": ["down_proj"], "llama4": ["down_proj"], "mistral": ["down_proj"],
    "mixtral": ["w2"], "bert": ["output.dense"], "deberta-v2": ["output.dense"], "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"], "RefinedWebModel": ["dense_4h_to_h"], "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"], "gemma": ["down_proj"], "gemma2": ["down_proj"], "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"], "qwen3": ["down_proj"],
}


# ================================================================== config
@dataclass
class IA3Config:
    """(IA)³ settings with the meaning and defaults of PEFT's ``IA3Config`` (see the module docstring).

    ``fan_in_fan_out`` is set per layer automatically (True for transformers ``Conv1D``); the field is kept
    for PEFT's file format. ``init_ia3_weights=False`` draws the vectors from N(0, 1) (PEFT: "discouraged").
    """

    target_modules: Optional[Union[list[str], str]] = None
    feedforward_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    init_ia3_weights: bool = True
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False

    def __post_init__(self):
        # Name lists are sets in PEFT (order carries no meaning): keep them sorted and unique.
        for name in ("target_modules", "feedforward_modules", "exclude_modules", "modules_to_save"):
            v = getattr(self, name)
            if isinstance(v, (set, tuple, list)):
                if not all(isinstance(t, str) for t in v):
                    raise TypeError(f"{name} must be a string (regex) or a list of strings, got {v!r}")
                setattr(self, name, sorted(set(v)))
            elif v is not None and not isinstance(v, str):
                raise TypeError(f"{name} must be a string (regex) or a list of strings, got {v!r}")
        if isinstance(self.modules_to_save, str):
            raise TypeError(f"modules_to_save must be a list of names, got {self.modules_to_save!r}")
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        # PEFT's check (run when both are lists).
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules must be a subset of target_modules; {extra} are not targets")

    def to_peft_dict(self) -> dict:
        """The fields of PEFT's ``adapter_config.json`` (``peft_type`` "IA3"), JSON-serialisable."""
        return {
            "peft_type": "IA3", "task_type": self.task_type, "base_model_name_or_path": self.base_model_name_or_path,
            "revision": self.revision, "inference_mode": self.inference_mode,
            "target_modules": self.target_modules, "feedforward_modules": self.feedforward_modules,
            "exclude_modules": self.exclude_modules, "fan_in_fan_out": self.fan_in_fan_out,
            "modules_to_save": None if self.modules_to_save is None else list(self.modules_to_save),
            "init_ia3_weights": self.init_ia3_weights,
        }

    @classmethod
    def from_peft_dict(cls, d: dict) -> "IA3Config":
        """Read PEFT's ``adapter_config.json`` fields; unknown keys (``auto_mapping``, ``peft_version``, newer
        PEFT fields, our fingerprint) are ignored. A non-IA3 config is a ValueError."""
        if not isinstance(d, dict):
            raise TypeError(f"expected a dict of adapter_config.json fields, got {type(d).__name__}")
        pt = d.get("peft_type", "IA3")
        pt = getattr(pt, "value", pt)
        if str(pt).upper() != "IA3":
            raise ValueError(f"not an IA3 adapter config: peft_type is {pt!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        tt = kwargs.get("task_type")
        if tt is not None:
            kwargs["task_type"] = getattr(tt, "value", tt)
        return cls(**kwargs)


# ================================================================== matching
_ADAPTER_TYPES = (IA3Linear,)
_OPAQUE = (IA3Linear, LoraLinear, ModulesToSaveWrapper)  # never targeted inside


def _model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def _effective(model: nn.Module, cfg: IA3Config) -> IA3Config:
    """``cfg`` with PEFT's per-model-type defaults filled in (raises when there are none)."""
    mt = _model_type(model)
    tm, ff = cfg.target_modules, cfg.feedforward_modules
    if tm is None:
        if mt not in DEFAULT_TARGET_MODULES:
            raise ValueError(f"target_modules is not set and PEFT has no IA3 default for model type {mt!r}: pass "
                             f"target_modules (and feedforward_modules)")
        tm = list(DEFAULT_TARGET_MODULES[mt])
    if ff is None:
        if mt not in DEFAULT_FEEDFORWARD_MODULES:
            raise ValueError(f"feedforward_modules is not set and PEFT has no IA3 default for model type {mt!r}: "
                             f"pass feedforward_modules ([] for none)")
        ff = list(DEFAULT_FEEDFORWARD_MODULES[mt])
    return dataclasses.replace(cfg, target_modules=tm, feedforward_modules=ff)


def is_feedforward(cfg: IA3Config, name: str) -> bool:
    """PEFT's ``_check_target_module_feedforward``: regex fullmatch, or a list entry the name ends with."""
    ff = cfg.feedforward_modules or []
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name.endswith(t) for t in ff)


def resolve_targets(model: nn.Module, cfg: IA3Config) -> list[tuple[str, bool]]:
    """(full name, feedforward?) of every module ``cfg`` targets in ``model`` (PEFT's matching).

    Raises ValueError when the config targets nothing or a module that is not a linear layer.
    """
    cfg = _effective(model, cfg)
    found = find_linear_targets(model, cfg.target_modules, method="IA3", wrappers=_ADAPTER_TYPES, opaque=_OPAQUE,
                                task_type=cfg.task_type, exclude_modules=cfg.exclude_modules,
                                modules_to_save=cfg.modules_to_save)
    if not found:
        raise ValueError(f"target_modules {cfg.target_modules!r} matched no module of {type(model).__name__} "
                         f"(exclude_modules={cfg.exclude_modules!r}); its linear layers are named like "
                         f"{linear_names(model, _OPAQUE, _ADAPTER_TYPES)}")
    return [(name, is_feedforward(cfg, name)) for name in found]


# ================================================================== model-level API
_METHOD = LayerMethod(IA3Linear, IA3Config, store="ia3_l", param_stores=("ia3_l",), config_attr=CONFIG_ATTR,
                      active_attr=ACTIVE_ATTR, label="IA3 ")


def get_configs(model: nn.Module) -> dict[str, IA3Config]:
    """name -> IA3Config of the IA3 adapters added to ``model`` (empty if none)."""
    return _METHOD.get_configs(model)


def ia3_layers(model: nn.Module) -> Iterator[tuple[str, IA3Linear]]:
    return _METHOD.layers(model)


def _inject(model: nn.Module, cfg: IA3Config, adapter_name: str) -> None:
    _METHOD.check_new(model, cfg, adapter_name)
    cfg = with_seq_cls_heads(cfg)
    targets = dict(resolve_targets(model, cfg))  # raises before anything changes
    for name, ff in targets.items():
        m = model.get_submodule(name)
        if isinstance(m, IA3Linear) and m.is_feedforward != ff:
            raise ValueError(f"{name} already holds IA3 adapters {sorted(m.ia3_l)} with feedforward="
                             f"{m.is_feedforward}; this config makes it feedforward={ff} (one layer scales either "
                             f"its input or its output)")
    mts = resolve_modules_to_save(model, cfg.modules_to_save, _OPAQUE)
    _METHOD.inject(model, cfg, adapter_name, list(targets), mts,
                   lambda name, m: IA3Linear(m, adapter_name=None, feedforward=targets[name]),
                   lambda name, layer: layer.add_adapter(adapter_name, init_ia3_weights=cfg.init_ia3_weights))


def _freeze_base(model: nn.Module) -> None:
    """Freeze everything that is not adapter state (IA3 vectors, modules_to_save copies); the layers'
    ``set_adapter`` decides which vectors train."""
    _METHOD.freeze_base(model)


def apply(model: nn.Module, cfg: IA3Config, adapter_name: str = "default") -> nn.Module:
    """Add IA3 adapter ``adapter_name`` to ``model`` in place and make it the only active, trainable one.

    Every targeted module becomes an :class:`~peft_kernels.nn.ia3.IA3Linear` (a layer already holding IA3
    adapters gets one more); every other parameter is frozen except the ``modules_to_save`` copies. Raises
    ValueError — with the model unchanged — when the config targets nothing or a non-linear module.
    """
    _inject(model, cfg, adapter_name)
    set_adapter(model, adapter_name)
    _freeze_base(model)
    return model


def add_adapter(model: nn.Module, cfg: IA3Config, adapter_name: str) -> nn.Module:
    """Add another adapter without activating it (PEFT's ``add_adapter``); it stays frozen until
    :func:`set_adapter` selects it."""
    _inject(model, cfg, adapter_name)
    active = active_adapters(model)
    if active:
        set_adapter(model, active)
    _freeze_base(model)
    return model


def set_adapter(model: nn.Module, adapter_name: Union[str, list[str]]) -> None:
    """Activate one adapter or several (their vectors multiply, as in PEFT); the others are frozen."""
    _METHOD.set_adapter(model, adapter_name)


def active_adapters(model: nn.Module) -> list[str]:
    return _METHOD.active_adapters(model)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter everywhere; layers left without adapters go back to their base module."""
    _METHOD.delete_adapter(model, adapter_name)


def disable_adapters(model: nn.Module):
    """Context manager: the model computes as its base (no scaling, original modules_to_save)."""
    return _METHOD.disable_adapters(model)


def merge_and_unload(model: nn.Module, mode: str = "exact", adapter_names: Optional[list[str]] = None,
                     dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Merge adapters (default: the active ones) into their bases and remove every IA3 wrapper.

    Dense bases merge in place. A 4-bit base needs ``mode="requantize"`` (stays 4-bit) or ``"dequantize"``
    (becomes an ``nn.Linear`` in ``dtype``) — see :class:`~peft_kernels.nn.ia3.IA3Linear`. ``modules_to_save``
    wrappers are replaced by the active adapter's copy. Returns ``model``.
    """
    return _METHOD.merge_and_unload(model, mode, adapter_names, dtype)


# ================================================================== reporting
def ia3_parameter_count(model: nn.Module, adapter_name: str = "default") -> int:
    """Elements of adapter ``adapter_name``'s vectors: Σ out_features over output-scaling layers plus
    Σ in_features over feed-forward layers (without modules_to_save copies)."""
    return sum(layer.num_features for _, layer in ia3_layers(model) if adapter_name in layer.ia3_l)


def ia3_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under the model's own state-dict keys (``...ia3_l.<name>``,
    ``...modules_to_save.<name>.*``). Detached, not copied."""
    if adapter_name not in get_configs(model):
        raise KeyError(f"unknown IA3 adapter {adapter_name!r}; the model has {sorted(get_configs(model))}")
    marks = (f"ia3_l.{adapter_name}", f"modules_to_save.{adapter_name}.")
    return {k: v for k, v in model.state_dict().items()
            if k.endswith("." + marks[0]) or k == marks[0] or f".{marks[1]}" in k or k.startswith(marks[1])}


# ================================================================== files
def save_ia3(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", *,
             base_model_name_or_path: Optional[str] = None) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to ``directory`` in PEFT's IA3 format; returns its path.

    ``target_modules`` / ``feedforward_modules`` are written as the exact module names that carry the adapter
    (a full name selects that module alone under PEFT's matching), so ``peft.PeftModel.from_pretrained``
    rebuilds exactly these layers; the base model's fingerprint is recorded. Atomic: an existing adapter in
    ``directory`` is never half overwritten.
    """
    if is_peft_model(model, tuner=False):
        raise TypeError("this is a peft.PeftModel: save it with its own save_pretrained()")
    layers = [(n, m) for n, m in ia3_layers(model) if adapter_name in m.ia3_l]
    wrappers = [(n, w) for n, w in _wrappers(model) if adapter_name in w.modules_to_save]
    if not layers:
        have = sorted({a for _, m in ia3_layers(model) for a in m.ia3_l})
        raise ValueError(f"{type(model).__name__} has no IA3 adapter named {adapter_name!r} (its IA3 adapters: "
                         f"{have or 'none'})")
    cfg = get_configs(model).get(adapter_name) or IA3Config(modules_to_save=sorted(n for n, _ in wrappers) or None)
    d = cfg.to_peft_dict()
    d.update({
        "target_modules": sorted(n for n, _ in layers),
        "feedforward_modules": sorted(n for n, m in layers if m.is_feedforward),
        "exclude_modules": None,
        "fan_in_fan_out": all(m.fan_in_fan_out for _, m in layers),  # what PEFT records for GPT-2's Conv1D
        "inference_mode": True,  # as PEFT writes it
        "base_model_name_or_path": base_model_name_or_path or cfg.base_model_name_or_path or name_or_path(model),
        FINGERPRINT_KEY: model_fingerprint(model),
    })
    tensors = {f"{PEFT_PREFIX}{n}.ia3_l": m.ia3_l[adapter_name].detach() for n, m in layers}
    for n, w in wrappers:
        for k, t in w.modules_to_save[adapter_name].state_dict().items():
            tensors[f"{PEFT_PREFIX}{n}.{k}"] = t
    return write_method_files(directory, d, tensors)


@dataclass
class _Plan:
    cfg: IA3Config
    layers: dict[str, tuple[bool, torch.Tensor]]  # module -> (feedforward, value)
    msave: dict[str, dict[str, torch.Tensor]]  # modules_to_save module -> {param key: value}
    existing: bool


def _plan_load(model: nn.Module, directory: Path, adapter_name: str) -> _Plan:
    """Everything the load will write, checked against the model: raises AdapterLoadError, changes nothing."""
    config, tensors = read_method_files(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    check_peft_type(config, "IA3", directory)
    check_fingerprint(config, model, directory)
    try:
        cfg = IA3Config.from_peft_dict(config)
        targets = dict(resolve_targets(model, cfg))
    except (TypeError, ValueError) as e:
        raise AdapterLoadError(f"{cfg_path}: {e} (is the file made for another model?)") from None
    names = {n for n, _ in model.named_modules()}
    vecs: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if k.endswith(".ia3_l"):
            if not t.is_floating_point():
                raise AdapterLoadError(f"{w_path}: tensor {key} has dtype {t.dtype}; expected a float dtype")
            vecs[k[:-len(".ia3_l")]] = t
        else:
            rest[k] = t
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterLoadError(f"{w_path}: tensor {key} contains NaN or Inf values")
    if not vecs:
        raise AdapterLoadError(f"{w_path} has no IA3 tensors (keys like '{PEFT_PREFIX}<module>.ia3_l'); its keys "
                               f"look like {sorted(tensors)[:3]}")
    absent = sorted(m for m in vecs if m not in names)
    if absent:
        raise AdapterLoadError(f"{w_path} holds IA3 vectors for modules {type(model).__name__} does not have: "
                               f"{absent[:4]}{' ...' if len(absent) > 4 else ''} (a file for another model?)")
    extra = sorted(m for m in vecs if m not in targets)
    if extra:
        raise AdapterLoadError(f"{w_path}: unexpected keys {[PEFT_PREFIX + m + '.ia3_l' for m in extra][:4]}: "
                               f"{cfg_path} does not target these modules")
    missing = sorted(m for m in targets if m not in vecs)
    if missing:
        raise AdapterLoadError(f"{w_path}: missing keys {[PEFT_PREFIX + m + '.ia3_l' for m in missing][:4]}"
                               f"{' ...' if len(missing) > 4 else ''} for modules {cfg_path} targets")
    layers = {}
    for mod, ff in targets.items():
        base = model.get_submodule(mod)
        if isinstance(base, IA3Linear):
            n_out, n_in = base.out_features, base.in_features
        elif type(base).__name__ == "Conv1D":
            n_in, n_out = base.weight.shape
        else:
            n_out, n_in = base.out_features, base.in_features
        want = (1, n_in) if ff else (n_out, 1)
        got = tuple(vecs[mod].shape)
        if got != want:
            hint = (" (the orientation says the file treats it as " + ("feed-forward" if got[:1] == (1,) else
                    "output-scaling") + ")") if len(got) == 2 and sorted(got) == sorted(want) else \
                " (a file for another model?)"
            raise AdapterLoadError(f"{w_path}: {PEFT_PREFIX}{mod}.ia3_l has shape {got}, but {mod} "
                                   f"[{n_out}, {n_in}] as a {'feed-forward' if ff else 'output-scaling'} target needs "
                                   f"{want}{hint}")
        if isinstance(base, IA3Linear) and base.is_feedforward != ff:
            raise AdapterLoadError(f"{cfg_path}: {mod} already holds IA3 adapters {sorted(base.ia3_l)} with "
                                   f"feedforward={base.is_feedforward}, but this file makes it feedforward={ff}")
        layers[mod] = (ff, vecs[mod])
    # modules_to_save copies
    msave: dict[str, dict[str, torch.Tensor]] = {}
    if rest:
        mts = cfg.modules_to_save or []
        for k in sorted(rest):
            owner = next((n for n in sorted(names, key=len, reverse=True)
                          if k.startswith(n + ".") and any(n.endswith(t) for t in mts)), None)
            if owner is None:
                raise AdapterLoadError(f"{w_path}: unexpected key {PEFT_PREFIX}{k} (neither an IA3 vector nor a "
                                       f"parameter of a module in modules_to_save={mts})")
            msave.setdefault(owner, {})[k[len(owner) + 1:]] = rest[k]
    for owner, vals in msave.items():
        mod = model.get_submodule(owner)
        src = mod.original_module if isinstance(mod, ModulesToSaveWrapper) else mod
        own = src.state_dict()
        for k, v in vals.items():
            if k not in own:
                raise AdapterLoadError(f"{w_path}: unexpected key {PEFT_PREFIX}{owner}.{k}: {owner} has no {k!r}")
            if own[k].shape != v.shape:
                raise AdapterLoadError(f"{w_path}: {PEFT_PREFIX}{owner}.{k} has shape {tuple(v.shape)}, but {owner}."
                                       f"{k} is {tuple(own[k].shape)} (a file for another model?)")
        lacking = sorted(set(own) - set(vals))
        if lacking:
            raise AdapterLoadError(f"{w_path}: missing keys {[f'{PEFT_PREFIX}{owner}.{k}' for k in lacking]} of "
                                   f"modules_to_save module {owner}")
    existing = adapter_name in get_configs(model)
    if existing:
        have = {n: m.is_feedforward for n, m in ia3_layers(model) if adapter_name in m.ia3_l}
        if have != {m: ff for m, (ff, _) in layers.items()}:
            raise AdapterLoadError(f"the model already has an IA3 adapter {adapter_name!r} on other modules than "
                                   f"{directory} holds; delete it first or load under another name")
        have_ms = {n for n, w in _wrappers(model) if adapter_name in w.modules_to_save}
        if have_ms != set(msave):
            raise AdapterLoadError(f"the model's adapter {adapter_name!r} has modules_to_save copies {sorted(have_ms)}"
                                   f" but {directory} holds {sorted(msave)}")
    return _Plan(cfg=cfg, layers=layers, msave=msave, existing=existing)


def load_ia3(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", *,
             is_trainable: bool = False) -> nn.Module:
    """Load a PEFT-format IA3 adapter from ``directory`` into ``model`` as ``adapter_name``.

    Checked before the model changes: the files (safetensors + JSON only; a pickle is refused), ``peft_type``,
    the recorded fingerprint (PEFT's files have none: then the modules and shapes decide), that every vector
    belongs to a module the config targets and every target has one, each shape ([N, 1] or [1, K]), NaN/Inf,
    and the modules_to_save copies. Any error is an :class:`AdapterLoadError` naming the file and key, and the
    model is left exactly as it was. A model without IA3 adapters gets this one active (like
    ``PeftModel.from_pretrained``); otherwise it is added inactive; an existing ``adapter_name`` on the same
    modules has its values replaced in place. ``is_trainable=False`` freezes what the load wrote.
    """
    if is_peft_model(model, tuner=False):
        raise TypeError("this is a peft.PeftModel: load adapters into it with its own load_adapter(), or pass "
                        "the base transformers model here")
    check_adapter_name(adapter_name)
    plan = _plan_load(model, Path(directory), adapter_name)
    flags = {p: p.requires_grad for p in model.parameters()}
    attrs = {a: model.__dict__.get(a) for a in (CONFIG_ATTR, ACTIVE_ATTR)}
    old_values: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            if not plan.existing:
                make = dataclasses.replace(plan.cfg, target_modules=sorted(plan.layers),
                                           feedforward_modules=sorted(m for m, (ff, _) in plan.layers.items() if ff),
                                           exclude_modules=None, init_ia3_weights=True,
                                           modules_to_save=sorted(plan.msave) or None, task_type=None)
                if get_configs(model):
                    add_adapter(model, make, adapter_name)
                else:
                    apply(model, make, adapter_name)
                setattr(model, CONFIG_ATTR, {**get_configs(model), adapter_name: plan.cfg})
            written = []
            for mod, (_, value) in plan.layers.items():
                p = model.get_submodule(mod).ia3_l[adapter_name]
                old_values.append((p, p.detach().clone()))
                p.copy_(value)
                written.append(p)
            for owner, vals in plan.msave.items():
                own = model.get_submodule(owner).modules_to_save[adapter_name].state_dict(keep_vars=True)
                for k, v in vals.items():
                    old_values.append((own[k], own[k].detach().clone()))
                    own[k].copy_(v)
                    written.append(own[k])
            if not is_trainable:
                for t in written:
                    t.requires_grad_(False)
    except BaseException:
        with torch.no_grad():
            for t, v in old_values:
                t.copy_(v)
        if not plan.existing and adapter_name in get_configs(model):
            delete_adapter(model, adapter_name)  # puts the base modules back
        for a, v in attrs.items():
            if v is None:
                model.__dict__.pop(a, None)
            else:
                setattr(model, a, v)
        for p, f in flags.items():
            p.requires_grad_(f)
        raise
    return model
