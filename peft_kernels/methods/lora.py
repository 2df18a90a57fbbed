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

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch
from torch import nn

from ..nn.lora import LoraLinear, ModulesToSaveWrapper
from ._adapter_layers import LayerMethod
from ._common import print_trainable_parameters, trainable_parameters  # noqa: F401 (re-exported)
from .targets import ALL_LINEAR, SEQ_CLS_HEAD_NAMES  # noqa: F401 (re-exported)
from .targets import (find_linear_targets, linear_names, pattern_value, resolve_modules_to_save,
                      with_seq_cls_heads)

CONFIG_ATTR = "peft_kernels_lora_configs"

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
_ADAPTER_TYPES = (LoraLinear,)
_OPAQUE = (LoraLinear, ModulesToSaveWrapper)  # never targeted inside


def resolve_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Full names of the modules ``cfg`` targets in ``model``; raises if it targets nothing or a non-linear."""
    targets = cfg.target_modules
    if targets is None:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        if mt not in DEFAULT_TARGET_MODULES:
            raise ValueError(f"target_modules is not set and there is no default for model type {mt!r}: "
                             f"pass target_modules (a list of names, a regex, or 'all-linear')")
        targets = DEFAULT_TARGET_MODULES[mt]
    found = find_linear_targets(model, targets, method="LoRA", wrappers=_ADAPTER_TYPES, opaque=_OPAQUE,
                                task_type=cfg.task_type, exclude_modules=cfg.exclude_modules,
                                modules_to_save=cfg.modules_to_save, layers_to_transform=cfg.layers_to_transform,
                                layers_pattern=cfg.layers_pattern)
    if not found:
        raise ValueError(f"target_modules {cfg.target_modules!r} matched no module of {type(model).__name__} "
                         f"(with layers_to_transform={cfg.layers_to_transform!r}, exclude_modules="
                         f"{cfg.exclude_modules!r}); linear layers are named like "
                         f"{linear_names(model, _OPAQUE, _ADAPTER_TYPES)}")
    return found


# ================================================================== model-level API
_METHOD = LayerMethod(LoraLinear, LoraConfig, store="lora_A", param_stores=("lora_A", "lora_B", "lora_magnitude_vector"),
                      config_attr=CONFIG_ATTR, active_attr="peft_kernels_active_adapters")


def get_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """name -> LoraConfig of the adapters added to ``model`` (empty if none)."""
    return _METHOD.get_configs(model)


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    return _METHOD.layers(model)


def _inject(model: nn.Module, cfg: LoraConfig, adapter_name: str) -> None:
    _METHOD.check_new(model, cfg, adapter_name)
    cfg = with_seq_cls_heads(cfg)
    targets = resolve_targets(model, cfg)  # raises before anything changes
    mts = resolve_modules_to_save(model, cfg.modules_to_save, _OPAQUE)

    def add(name: str, layer: LoraLinear) -> None:
        layer.add_adapter(adapter_name, pattern_value(cfg.rank_pattern, name, cfg.r),
                          pattern_value(cfg.alpha_pattern, name, cfg.lora_alpha), lora_dropout=cfg.lora_dropout,
                          use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                          init_lora_weights=cfg.init_lora_weights, lora_bias=cfg.lora_bias)

    _METHOD.inject(model, cfg, adapter_name, targets, mts, lambda name, m: LoraLinear(m, adapter_name=None), add)


def _freeze_base(model: nn.Module) -> None:
    """Freeze everything that is not adapter state (LoRA A/B/magnitude, modules_to_save copies)."""
    _METHOD.freeze_base(model)


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
    _METHOD.set_adapter(model, adapter_name)


def active_adapters(model: nn.Module) -> list[str]:
    return _METHOD.active_adapters(model)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter everywhere; layers left without adapters go back to their base module."""
    _METHOD.delete_adapter(model, adapter_name)


def disable_adapters(model: nn.Module):
    """Context manager: the model computes as its base (no LoRA term, original modules_to_save)."""
    return _METHOD.disable_adapters(model)


def merge_and_unload(model: nn.Module, mode: str = "exact", adapter_names: Optional[list[str]] = None,
                     dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Merge adapters (default: the active ones) into their bases and remove every LoRA wrapper.

    Dense bases merge exactly. A 4-bit base needs ``mode="requantize"`` (stays 4-bit) or
    ``mode="dequantize"`` (becomes an ``nn.Linear`` in ``dtype``, default the 4-bit weight's original
    dtype, holding exactly the trained ``dequant(W4) + sBA``) — see :class:`~peft_kernels.nn.LoraLinear`.
    ``modules_to_save`` wrappers are replaced by the active adapter's copy. Returns ``model``.
    """
    return _METHOD.merge_and_unload(model, mode, adapter_names, dtype)


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
