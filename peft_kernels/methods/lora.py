"""LoRA (and QLoRA, rsLoRA, DoRA) on any transformers model: config, apply, adapter management, report.

    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    model = apply(model, cfg)                    # LoraLinear over every targeted nn.Linear/Conv1D/Linear4bit
    print_trainable_parameters(model)            # "trainable params: ... || all params: ... || trainable%: ..."

Module matching follows Hugging Face PEFT 0.21 exactly, so a config means the same thing in both:

* ``target_modules`` as a string: a regex that must ``re.fullmatch`` the module's full name; ``"all-linear"``:
  every nn.Linear / Conv1D / Linear4bit except the output head (``model.get_output_embeddings()``; and
  ``classifier``/``score`` for ``task_type="SEQ_CLS"``).
* as a list: a module whose full name equals an entry or ends with ``"." + entry``; then
  ``layers_to_transform`` (int or list) keeps only modules under those layer indices, the index being the
  number after ``layers_pattern`` (or, without a pattern, the first ``<name>.<number>.`` in the name).
* ``exclude_modules`` (string regex or list, same rules) and anything under ``modules_to_save`` are never
  targeted. ``rank_pattern`` / ``alpha_pattern`` override r / alpha for matching names.
* Without ``target_modules``, PEFT's default for the model type (``q_proj``/``v_proj`` for Llama...).

After ``apply`` only adapter parameters train, plus biases per ``bias`` ("all": every ``*.bias``;
"lora_only": the biases of the wrapped layers) and ``modules_to_save``: each listed module (matched by
name suffix, as PEFT) is wrapped in a :class:`~peft_kernels.nn.ModulesToSaveWrapper` that keeps the frozen
original (``original_module``) and one trainable copy per adapter (``modules_to_save.<adapter>``).

The configs of a model's adapters live in ``model.peft_kernels_lora_configs`` (name -> LoraConfig);
``get_configs(model)`` returns them. ``to_peft_dict`` / ``from_peft_dict`` read and write the fields of
PEFT's ``adapter_config.json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch
from torch import nn

from ..nn.linear4bit import Linear4bit
from ..nn.lora import LoraLinear, ModulesToSaveWrapper
from ._common import get_parent, print_trainable_parameters, trainable_parameters  # noqa: F401 (re-exported)

CONFIG_ATTR = "peft_kernels_lora_configs"
ALL_LINEAR = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")

#: PEFT's default ``target_modules`` per ``model.config.model_type`` (the common architectures).
DEFAULT_TARGET_MODULES = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"], "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"], "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"], "bloom": ["query_key_value"], "gptj": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "t5": ["q", "v"], "bart": ["q_proj", "v_proj"],
}

# PEFT LoraConfig fields this engine does not implement: loading a config that sets one of them to
# anything but its default is an error (it would silently compute something else).
_UNSUPPORTED_DEFAULTS = {
    "layer_replication": None, "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
    "alora_invocation_tokens": None, "megatron_config": None, "use_bdlora": None, "arrow_config": None,
    "kasa_config": None, "velora_config": None, "monteclora_config": None,
}
# Fields written for PEFT with their defaults (so the file is a complete PEFT config).
_PEFT_DEFAULTS = {
    "alora_invocation_tokens": None, "arrow_config": None, "auto_mapping": None, "corda_config": None,
    "ensure_weight_tying": False, "eva_config": None, "kasa_config": None, "layer_replication": None,
    "loftq_config": {}, "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
    "monteclora_config": None, "qalora_group_size": 16, "target_parameters": None,
    "trainable_token_indices": None, "use_bdlora": None, "use_qalora": False, "velora_config": None,
}
_BIAS = ("none", "all", "lora_only")


# ================================================================== config
@dataclass
class LoraConfig:
    """LoRA hyper-parameters, with the meaning and defaults of PEFT's ``LoraConfig`` for these fields.

    ``fan_in_fan_out`` is set per layer automatically (True for transformers ``Conv1D``); the field is
    kept for PEFT's file format. ``lora_bias`` adds a trainable bias to lora_B (PEFT's ``lora_bias``).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False

    def __post_init__(self):
        # Name lists are sets in PEFT (order carries no meaning): keep them sorted and unique.
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            v = getattr(self, name)
            if isinstance(v, (set, tuple, list)):
                setattr(self, name, sorted(set(v)))
        if isinstance(self.layers_pattern, tuple):
            self.layers_pattern = list(self.layers_pattern)
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in _BIAS:
            raise ValueError(f"bias must be one of {_BIAS}, got {self.bias!r}")
        init = self.init_lora_weights
        if not (init is True or init is False or (isinstance(init, str) and (
                init.lower() == "gaussian" or init == "pissa" or re.fullmatch(r"pissa_niter_\d+", init)))):
            raise ValueError(f"init_lora_weights must be True, False, 'gaussian', 'pissa' or 'pissa_niter_<n>' "
                             f"(PEFT's other initialisations are not implemented), got {init!r}")
        for name in ("target_modules", "exclude_modules"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str) and not all(isinstance(t, str) for t in v):
                raise TypeError(f"{name} must be a string (regex) or a list of strings, got {v!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a string (regex)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform")
        if self.lora_bias and (self.use_dora or init not in (True, False)):
            raise ValueError("lora_bias=True works only with plain LoRA and init_lora_weights True/False (as PEFT)")
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern):
            pass  # allowed (PEFT only warns)

    # -------------------------------------------------------------- PEFT format
    def to_peft_dict(self) -> dict:
        """The fields of PEFT's ``adapter_config.json`` (``peft_type`` "LORA"), JSON-serialisable."""
        d = dict(_PEFT_DEFAULTS)
        d.update({
            "peft_type": "LORA", "task_type": self.task_type, "base_model_name_or_path": self.base_model_name_or_path,
            "revision": self.revision, "inference_mode": self.inference_mode, "r": self.r,
            "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "target_modules": (sorted(self.target_modules) if isinstance(self.target_modules, list)
                               else self.target_modules),
            "exclude_modules": (sorted(self.exclude_modules) if isinstance(self.exclude_modules, list)
                                else self.exclude_modules),
            "fan_in_fan_out": self.fan_in_fan_out, "bias": self.bias, "use_rslora": self.use_rslora,
            "use_dora": self.use_dora, "lora_bias": self.lora_bias,
            "modules_to_save": None if self.modules_to_save is None else list(self.modules_to_save),
            "init_lora_weights": self.init_lora_weights,
            "layers_to_transform": self.layers_to_transform, "layers_pattern": self.layers_pattern,
            "rank_pattern": dict(self.rank_pattern), "alpha_pattern": dict(self.alpha_pattern),
        })
        return d

    @classmethod
    def from_peft_dict(cls, d: dict) -> "LoraConfig":
        """Read PEFT's ``adapter_config.json`` fields. Unknown keys are ignored (newer PEFT versions); a
        non-LoRA config or a LoRA feature this engine does not implement is a ValueError."""
        if not isinstance(d, dict):
            raise TypeError(f"expected a dict of adapter_config.json fields, got {type(d).__name__}")
        pt = d.get("peft_type", "LORA")
        pt = getattr(pt, "value", pt)
        if str(pt).upper() != "LORA":
            raise ValueError(f"not a LoRA adapter config: peft_type is {pt!r}")
        bad = {k: d[k] for k, default in _UNSUPPORTED_DEFAULTS.items()
               if k in d and d[k] not in (default, None, False, [], {})}
        if bad:
            raise ValueError(f"this adapter uses PEFT LoRA features peft_kernels does not implement: {bad}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        tt = kwargs.get("task_type")
        if tt is not None:
            kwargs["task_type"] = getattr(tt, "value", tt)
        for k in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(k) is None:
                kwargs[k] = {}
        return cls(**kwargs)


# ================================================================== matching
def _is_linear(m: nn.Module) -> bool:
    return (isinstance(m, (nn.Linear, Linear4bit, LoraLinear))
            or (type(m).__name__ == "Conv1D" and hasattr(m, "nf")))


def _candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module outside LoRA layers' and ModulesToSaveWrappers' insides."""
    out, stop = [], []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in stop):
            continue
        out.append((name, m))
        if isinstance(m, (LoraLinear, ModulesToSaveWrapper)):
            stop.append(name)
    return out


def _output_head_names(model: nn.Module, cfg: LoraConfig) -> set[str]:
    heads = []
    get = getattr(model, "get_output_embeddings", None)
    out_emb = None
    if callable(get):
        try:
            out_emb = get()
        except (NotImplementedError, AttributeError):
            out_emb = None
    if out_emb is not None:
        heads.append(out_emb)
    elif str(cfg.task_type or "").upper() == "SEQ_CLS":
        for n in SEQ_CLS_HEAD_NAMES:
            if isinstance(getattr(model, n, None), nn.Module):
                heads.append(getattr(model, n))
                break
    ids = {id(h) for h in heads}
    names = set()
    for name, m in model.named_modules():
        if id(m) in ids:
            names.add(name)
        if isinstance(m, (LoraLinear, ModulesToSaveWrapper)) and any(
                id(c) in ids for c in m.modules() if c is not m):
            names.add(name)
    return names


def _list_match(targets, key: str) -> bool:
    return key in targets or any(key.endswith("." + t) for t in targets)


def _layer_index(key: str, layers_pattern) -> Optional[int]:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        m = None
        for pat in ([layers_pattern] if isinstance(layers_pattern, str) else layers_pattern):
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    return None if m is None else int(m.group("idx"))


def _matches(cfg: LoraConfig, targets, key: str) -> bool:
    ex = cfg.exclude_modules
    if ex:
        if (re.fullmatch(ex, key) if isinstance(ex, str) else _list_match(ex, key)):
            return False
    if cfg.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in cfg.modules_to_save):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if not _list_match(targets, key):
        return False
    lt = cfg.layers_to_transform
    if lt is None or (isinstance(lt, list) and not lt):
        return True
    idx = _layer_index(key, cfg.layers_pattern)
    if idx is None:
        return False
    return idx == lt if isinstance(lt, int) else idx in lt


def resolve_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Full names of the modules ``cfg`` targets in ``model``; raises if it targets nothing or a non-linear."""
    cands = _candidate_modules(model)
    targets = cfg.target_modules
    if targets is None:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        if mt not in DEFAULT_TARGET_MODULES:
            raise ValueError(f"target_modules is not set and there is no default for model type {mt!r}: "
                             f"pass target_modules (a list of names, a regex, or 'all-linear')")
        targets = DEFAULT_TARGET_MODULES[mt]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        heads = _output_head_names(model, cfg)
        targets = [n for n, m in cands if _is_linear(m) and n not in heads]
    found = []
    for name, m in cands:
        if not _matches(cfg, targets, name):
            continue
        if isinstance(m, ModulesToSaveWrapper):
            continue
        if not _is_linear(m):
            raise ValueError(f"target module {name!r} is a {type(m).__name__}; LoRA here supports nn.Linear, "
                             f"transformers Conv1D and Linear4bit layers")
        found.append(name)
    if not found:
        sample = [n for n, m in cands if _is_linear(m)][:6]
        raise ValueError(f"target_modules {cfg.target_modules!r} matched no module of {type(model).__name__} "
                         f"(with layers_to_transform={cfg.layers_to_transform!r}, exclude_modules="
                         f"{cfg.exclude_modules!r}); linear layers are named like {sample}")
    return found


def _pattern_value(patterns: dict, key: str, default):
    for k in patterns:
        if re.match(rf"(.*\.)?({k})$", key):
            return patterns[k]
    return default


# ================================================================== model-level API
def get_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """name -> LoraConfig of the adapters added to ``model`` (empty if none)."""
    return getattr(model, CONFIG_ATTR, None) or {}


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            yield name, m


def _wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for name, m in model.named_modules():
        if isinstance(m, ModulesToSaveWrapper):
            yield name, m


def _inject(model: nn.Module, cfg: LoraConfig, adapter_name: str) -> None:
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"cfg must be a peft_kernels LoraConfig, got {type(cfg).__name__} "
                        f"(use LoraConfig.from_peft_dict(peft_config.to_dict()) for a PEFT config)")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {adapter_name!r}")
    configs = get_configs(model)
    if adapter_name in configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    if str(cfg.task_type or "").upper() == "SEQ_CLS":
        # As PEFT's PeftModelForSequenceClassification: the (new) classification head trains in full.
        cfg = dataclasses.replace(cfg, modules_to_save=list(cfg.modules_to_save or []) + list(SEQ_CLS_HEAD_NAMES))
    targets = resolve_targets(model, cfg)  # raises before anything changes
    mts = []
    if cfg.modules_to_save:
        keys = [n for n, _ in _candidate_modules(model)]
        mts = [k for k in keys if any(k.endswith(t) for t in cfg.modules_to_save)]
        if not mts:  # (PEFT, too, only objects when none of the names is found)
            raise ValueError(f"modules_to_save {cfg.modules_to_save!r} matched no module of {type(model).__name__}")
    done: list[LoraLinear] = []
    new_layers: dict[str, LoraLinear] = {}
    grad_flags = {}
    try:
        for name in targets:
            m = model.get_submodule(name)
            if not isinstance(m, LoraLinear):
                grad_flags.update({p: p.requires_grad for p in m.parameters()})
            layer = m if isinstance(m, LoraLinear) else LoraLinear(m, adapter_name=None)
            layer.add_adapter(adapter_name, _pattern_value(cfg.rank_pattern, name, cfg.r),
                              _pattern_value(cfg.alpha_pattern, name, cfg.lora_alpha), lora_dropout=cfg.lora_dropout,
                              use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                              init_lora_weights=cfg.init_lora_weights, lora_bias=cfg.lora_bias)
            done.append(layer)
            if layer is not m:
                new_layers[name] = layer
    except Exception:
        for layer in done:  # nothing half-applied
            if adapter_name in layer.lora_A:
                layer.delete_adapter(adapter_name)
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        raise
    for name, layer in new_layers.items():
        parent, child = get_parent(model, name)
        setattr(parent, child, layer)
    for name in mts:
        m = model.get_submodule(name)
        if isinstance(m, ModulesToSaveWrapper):
            m.add_adapter(adapter_name)
        else:
            parent, child = get_parent(model, name)
            setattr(parent, child, ModulesToSaveWrapper(m, adapter_name))
    configs = dict(configs)
    # As PEFT does, the stored config says fan_in_fan_out=True when it targets transformers Conv1D layers.
    conv1d = any(getattr(model.get_submodule(n), "fan_in_fan_out", False) for n in targets)
    configs[adapter_name] = dataclasses.replace(cfg, fan_in_fan_out=conv1d)
    setattr(model, CONFIG_ATTR, configs)


def _freeze_base(model: nn.Module) -> None:
    """Freeze everything that is not adapter state (LoRA A/B/magnitude, modules_to_save copies)."""
    adapter_params = set()
    for _, layer in _lora_layers(model):
        for mod in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
            adapter_params.update(id(p) for p in mod.parameters())
    for _, w in _wrappers(model):
        adapter_params.update(id(p) for p in w.modules_to_save.parameters())
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)


def _apply_bias_rule(model: nn.Module, bias: str) -> None:
    if bias == "all":
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for _, layer in _lora_layers(model):
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)


def apply(model: nn.Module, cfg: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add LoRA adapter ``adapter_name`` to ``model`` in place and make it the only active, trainable one.

    Every module ``cfg`` targets becomes a :class:`~peft_kernels.nn.LoraLinear` (a layer already holding
    adapters gets one more); every other parameter is frozen except biases per ``cfg.bias`` and the
    ``modules_to_save`` copies. Raises ValueError — with the model unchanged — when a target matches no
    module or a non-linear one. Returns ``model``.
    """
    _inject(model, cfg, adapter_name)
    set_adapter(model, adapter_name)
    _freeze_base(model)
    _apply_bias_rule(model, cfg.bias)
    return model


def add_adapter(model: nn.Module, cfg: LoraConfig, adapter_name: str) -> nn.Module:
    """Add another adapter without activating it (PEFT's ``add_adapter``); its parameters stay frozen
    until :func:`set_adapter` selects it."""
    _inject(model, cfg, adapter_name)
    active = active_adapters(model)
    if active:
        set_adapter(model, active)
    _freeze_base(model)
    for name in active:
        _apply_bias_rule(model, get_configs(model)[name].bias)
    return model


def set_adapter(model: nn.Module, adapter_name: Union[str, list[str]]) -> None:
    """Activate one adapter, or several at once (their outputs add up); the others are frozen."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    known = get_configs(model)
    for n in names:
        if n not in known:
            raise KeyError(f"unknown adapter {n!r}; the model has {sorted(known)}")
    for _, layer in _lora_layers(model):
        layer.set_adapter([n for n in names if n in layer.lora_A])
    for wname, w in _wrappers(model):
        have = [n for n in names if n in w.modules_to_save]
        if len(have) > 1:
            raise ValueError(f"adapters {have} each have a modules_to_save copy of {wname!r}; only one can be "
                             f"active there")
        w.set_adapter(have[0] if have else None)
    model.peft_kernels_active_adapters = names


def active_adapters(model: nn.Module) -> list[str]:
    return list(getattr(model, "peft_kernels_active_adapters", None) or [])


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter everywhere; layers left without adapters go back to their base module."""
    configs = get_configs(model)
    if adapter_name not in configs:
        raise KeyError(f"unknown adapter {adapter_name!r}; the model has {sorted(configs)}")
    for _, layer in _lora_layers(model):
        if adapter_name in layer.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before deleting it")
    for name, layer in list(_lora_layers(model)):
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
        if not layer.lora_A and not layer.merged_adapters:
            parent, child = get_parent(model, name)
            setattr(parent, child, layer.base_layer)
    for name, w in list(_wrappers(model)):
        w.delete_adapter(adapter_name)
        if not w.modules_to_save:
            parent, child = get_parent(model, name)
            setattr(parent, child, w.original_module)
    configs = {k: v for k, v in configs.items() if k != adapter_name}
    setattr(model, CONFIG_ATTR, configs)
    model.peft_kernels_active_adapters = [a for a in active_adapters(model) if a != adapter_name]


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Context manager: the model computes as its base (no LoRA term, original modules_to_save)."""
    mods = [m for _, m in _lora_layers(model)] + [w for _, w in _wrappers(model)]
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


def merge_and_unload(model: nn.Module, mode: str = "exact", adapter_names: Optional[list[str]] = None,
                     dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Merge adapters (default: the active ones) into their bases and remove every LoRA wrapper.

    Dense bases merge exactly. A 4-bit base needs ``mode="requantize"`` (stays 4-bit) or
    ``mode="dequantize"`` (becomes an ``nn.Linear`` in ``dtype``, default the 4-bit weight's original
    dtype, holding exactly the trained ``dequant(W4) + sBA``) — see :class:`~peft_kernels.nn.LoraLinear`.
    ``modules_to_save`` wrappers are replaced by the active adapter's copy. Returns ``model``.
    """
    layers = list(_lora_layers(model))
    if mode not in ("exact", "requantize", "dequantize"):
        raise ValueError(f"mode must be 'exact', 'requantize' or 'dequantize', got {mode!r}")
    if mode == "exact" and any(layer._kind == "4bit" for _, layer in layers):
        raise ValueError("the model has 4-bit base layers: pass mode='dequantize' (16-bit result, exactly what "
                         "was trained) or mode='requantize' (stays 4-bit, one more rounding)")
    if adapter_names is not None:
        known = get_configs(model)
        for n in adapter_names:
            if n not in known:
                raise KeyError(f"unknown adapter {n!r}; the model has {sorted(known)}")
    for name, layer in layers:
        want = adapter_names if adapter_names is not None else layer.active_adapters
        layer.disabled = False
        layer.merge([n for n in want if n in layer.lora_A], mode=mode, dtype=dtype)
        parent, child = get_parent(model, name)
        setattr(parent, child, layer.base_layer)
    for name, w in list(_wrappers(model)):
        parent, child = get_parent(model, name)
        keep = w.modules_to_save[w.active_adapter] if w.active_adapter is not None else w.original_module
        setattr(parent, child, keep)
    for attr in (CONFIG_ATTR, "peft_kernels_active_adapters"):
        if attr in model.__dict__:
            delattr(model, attr)
    return model


# ================================================================== reporting / state
def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under the model's own state-dict keys (``...lora_A.<name>.weight``,
    ``...lora_B.<name>.weight``/``.bias``, ``...lora_magnitude_vector.<name>.weight``,
    ``...modules_to_save.<name>.*``) plus the biases its ``bias`` setting trains. Detached, not copied."""
    configs = get_configs(model)
    if adapter_name not in configs:
        raise KeyError(f"unknown adapter {adapter_name!r}; the model has {sorted(configs)}")
    cfg = configs[adapter_name]
    sd = model.state_dict()
    marks = [f"lora_A.{adapter_name}.", f"lora_B.{adapter_name}.", f"lora_magnitude_vector.{adapter_name}.",
             f"modules_to_save.{adapter_name}."]
    out = {k: v for k, v in sd.items() if any(k.startswith(m) or f".{m}" in k for m in marks)}
    if cfg.bias == "all":
        other = re.compile(r"(^|\.)(lora_A|lora_B|lora_magnitude_vector|modules_to_save)\.")
        out.update({k: v for k, v in sd.items() if k.endswith(".bias") and not other.search(k)})
    elif cfg.bias == "lora_only":
        for name, layer in _lora_layers(model):
            if adapter_name in layer.lora_A and layer.base_layer.bias is not None:
                out[f"{name}.base_layer.bias"] = sd[f"{name}.base_layer.bias"]
    return out
