"""Named-adapter bookkeeping shared by the methods that wrap target layers (LoRA, IA3).

Such a method swaps each targeted module for an adapter layer (``LoraLinear``, ``IA3Linear``) holding one
entry per adapter in a per-adapter container (``lora_A``, ``ia3_l``), wraps ``modules_to_save`` modules in a
:class:`~peft_kernels.nn.ModulesToSaveWrapper`, and keeps the configs and active adapter names on the model.
:class:`LayerMethod` describes one such method; its functions do the model-level work the same way for each.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from ..nn.lora import ModulesToSaveWrapper
from ._common import disabled, get_parent


def check_adapter_name(adapter_name) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {adapter_name!r}")


def wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    """(name, wrapper) of every ModulesToSaveWrapper in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, ModulesToSaveWrapper):
            yield name, m


def wrap_modules_to_save(model: nn.Module, names: Iterable[str], adapter_name: str) -> None:
    """Give each module in ``names`` a trainable copy for ``adapter_name`` (wrapping it on first use)."""
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, ModulesToSaveWrapper):
            m.add_adapter(adapter_name)
        else:
            parent, child = get_parent(model, name)
            setattr(parent, child, ModulesToSaveWrapper(m, adapter_name))


@dataclass(frozen=True)
class LayerMethod:
    """One layer-wrapping method: its adapter layer type and where it keeps things.

    ``store`` is the layer's per-adapter container (its keys are the adapter names the layer holds);
    ``param_stores`` the containers holding the adapter's trainable parameters; ``label`` prefixes
    "adapter" in messages (``"IA3 "``).
    """

    layer_type: type
    config_type: type
    store: str
    param_stores: tuple
    config_attr: str
    active_attr: str
    label: str = ""

    # ------------------------------------------------------------------ lookups
    def layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, m in model.named_modules():
            if isinstance(m, self.layer_type):
                yield name, m

    def holds(self, layer: nn.Module, adapter_name: str) -> bool:
        return adapter_name in getattr(layer, self.store)

    def get_configs(self, model: nn.Module) -> dict:
        return getattr(model, self.config_attr, None) or {}

    def active_adapters(self, model: nn.Module) -> list[str]:
        return list(getattr(model, self.active_attr, None) or [])

    def _check_known(self, model: nn.Module, names: Iterable[str]) -> None:
        known = self.get_configs(model)
        for n in names:
            if n not in known:
                raise KeyError(f"unknown {self.label}adapter {n!r}; the model has {sorted(known)}")

    # ------------------------------------------------------------------ adding
    def check_new(self, model: nn.Module, cfg, adapter_name: str) -> None:
        """The checks before adding ``adapter_name`` with ``cfg``: config type, name, not taken yet."""
        t = self.config_type.__name__
        if not isinstance(cfg, self.config_type):
            raise TypeError(f"cfg must be a peft_kernels {t}, got {type(cfg).__name__} "
                            f"(use {t}.from_peft_dict(peft_config.to_dict()) for a PEFT config)")
        check_adapter_name(adapter_name)
        if adapter_name in self.get_configs(model):
            raise ValueError(f"the model already has an {self.label}adapter named {adapter_name!r}")

    def inject(self, model: nn.Module, cfg, adapter_name: str, targets: list[str], modules_to_save: list[str],
               new_layer: Callable[[str, nn.Module], nn.Module], add: Callable[[str, nn.Module], None]) -> None:
        """Add ``adapter_name`` to every module in ``targets`` (a new layer ``new_layer(name, module)`` over a
        plain module, then ``add(name, layer)``), all or nothing; then swap the new layers in, wrap
        ``modules_to_save`` and store ``cfg`` (``fan_in_fan_out`` set as PEFT records it: True when it
        targets transformers Conv1D layers)."""
        done, new_layers, grad_flags = [], {}, {}
        try:
            for name in targets:
                m = model.get_submodule(name)
                if not isinstance(m, self.layer_type):
                    grad_flags.update({p: p.requires_grad for p in m.parameters()})
                layer = m if isinstance(m, self.layer_type) else new_layer(name, m)
                add(name, layer)
                done.append(layer)
                if layer is not m:
                    new_layers[name] = layer
        except Exception:
            for layer in done:  # nothing half-applied
                if self.holds(layer, adapter_name):
                    layer.delete_adapter(adapter_name)
            for p, flag in grad_flags.items():
                p.requires_grad_(flag)
            raise
        for name, layer in new_layers.items():
            parent, child = get_parent(model, name)
            setattr(parent, child, layer)
        wrap_modules_to_save(model, modules_to_save, adapter_name)
        conv1d = any(getattr(model.get_submodule(n), "fan_in_fan_out", False) for n in targets)
        configs = {**self.get_configs(model), adapter_name: dataclasses.replace(cfg, fan_in_fan_out=conv1d)}
        setattr(model, self.config_attr, configs)

    def freeze_base(self, model: nn.Module) -> None:
        """Freeze everything that is not adapter state (the layers' adapter parameters, modules_to_save copies)."""
        keep = set()
        for _, layer in self.layers(model):
            for store in self.param_stores:
                keep.update(id(p) for p in getattr(layer, store).parameters())
        for _, w in wrappers(model):
            keep.update(id(p) for p in w.modules_to_save.parameters())
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)

    # ------------------------------------------------------------------ managing
    def set_adapter(self, model: nn.Module, adapter_name: Union[str, list[str]]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_known(model, names)
        for _, layer in self.layers(model):
            layer.set_adapter([n for n in names if self.holds(layer, n)])
        for wname, w in wrappers(model):
            have = [n for n in names if n in w.modules_to_save]
            if len(have) > 1:
                raise ValueError(f"adapters {have} each have a modules_to_save copy of {wname!r}; only one can be "
                                 f"active there")
            w.set_adapter(have[0] if have else None)
        setattr(model, self.active_attr, names)

    def delete_adapter(self, model: nn.Module, adapter_name: str) -> None:
        self._check_known(model, [adapter_name])
        for name, layer in self.layers(model):
            if adapter_name in layer.merged_adapters:
                raise ValueError(f"adapter {adapter_name!r} is merged into {name}; unmerge it before deleting it")
        for name, layer in list(self.layers(model)):
            if self.holds(layer, adapter_name):
                layer.delete_adapter(adapter_name)
            if not getattr(layer, self.store) and not layer.merged_adapters:
                parent, child = get_parent(model, name)
                setattr(parent, child, layer.base_layer)
        for name, w in list(wrappers(model)):
            w.delete_adapter(adapter_name)
            if not w.modules_to_save:
                parent, child = get_parent(model, name)
                setattr(parent, child, w.original_module)
        setattr(model, self.config_attr, {k: v for k, v in self.get_configs(model).items() if k != adapter_name})
        setattr(model, self.active_attr, [a for a in self.active_adapters(model) if a != adapter_name])

    def disable_adapters(self, model: nn.Module):
        """Context manager: the model computes as its base (adapter layers and modules_to_save disabled)."""
        return disabled(model, [m for _, m in self.layers(model)] + [w for _, w in wrappers(model)])

    def merge_and_unload(self, model: nn.Module, mode: str = "exact", adapter_names: Optional[list[str]] = None,
                         dtype: Optional[torch.dtype] = None) -> nn.Module:
        layers = list(self.layers(model))
        if mode not in ("exact", "requantize", "dequantize"):
            raise ValueError(f"mode must be 'exact', 'requantize' or 'dequantize', got {mode!r}")
        if mode == "exact" and any(layer._kind == "4bit" for _, layer in layers):
            raise ValueError("the model has 4-bit base layers: pass mode='dequantize' (16-bit result, exactly what "
                             "was trained) or mode='requantize' (stays 4-bit, one more rounding)")
        if adapter_names is not None:
            self._check_known(model, adapter_names)
        for name, layer in layers:
            want = adapter_names if adapter_names is not None else layer.active_adapters
            layer.disabled = False
            layer.merge([n for n in want if self.holds(layer, n)], mode=mode, dtype=dtype)
            parent, child = get_parent(model, name)
            setattr(parent, child, layer.base_layer)
        for name, w in list(wrappers(model)):
            parent, child = get_parent(model, name)
            setattr(parent, child, w.modules_to_save[w.active_adapter] if w.active_adapter is not None
                    else w.original_module)
        for attr in (self.config_attr, self.active_attr):
            model.__dict__.pop(attr, None)
        return model
