"""BitFit (bias-only fine-tuning) on any transformers model: config, apply, state, save/load, unload.

    cfg = BitFitConfig(target_modules="all-linear", train_norms=True)
    model = apply(model, cfg)             # BitFitLinear over every targeted nn.Linear / Conv1D / Linear4bit
    print_trainable_parameters(model)     # Σ out_features of the targets (+ the norms' weights and biases)
    save_bitfit(model, "out/bitfit")      # adapter_config.json + adapter_model.safetensors
    load_bitfit(fresh_model, "out/bitfit")
    model = merge_and_unload(model)       # plain layers again, the trained biases written into them

Matching (the same rules as ``methods.lora``, i.e. Hugging Face PEFT's):

* ``target_modules="all-linear"``: every nn.Linear / transformers Conv1D / Linear4bit except the output
  head (``model.get_output_embeddings()``); a string: a regex that must ``re.fullmatch`` the full
  module name; a list: names equal to an entry or ending with ``"." + entry``.
* ``exclude_modules`` (regex or list, same rules) is never targeted, nor tuned as a norm.
* ``modules_to_save`` (list, suffix match): these modules train in full (e.g. a new classifier head)
  and are saved; nothing inside them is wrapped.
* ``train_norms``: the weight and bias of every normalisation module also train ("norm tuning"): any
  module whose class name ends in ``Norm`` (LayerNorm, LlamaRMSNorm, Qwen2RMSNorm, T5LayerNorm, ...).

After :func:`apply` every other parameter is frozen. Linears without a bias get a zero one (so BitFit
on Llama/Mistral/Qwen trains a bias on every projection); existing biases are copied into the float32
trainable one. Trainable parameters: ``Σ out_features`` over the targets + the norms' parameters +
``modules_to_save``'s.

File format (``io/method_files.py``): ``adapter_config.json`` holds ``peft_type: "BITFIT"``, the config
fields, the exact lists ``bitfit_modules`` / ``norm_modules`` / ``modules_to_save_modules`` and the base
model's fingerprint; ``adapter_model.safetensors`` holds the model's own state-dict keys:
``<module>.bias`` [out_features] float32 per BitFit layer, ``<norm>.weight`` / ``<norm>.bias`` per tuned
norm, and every parameter of the ``modules_to_save`` modules. :func:`load_bitfit` checks all of it
against the model before changing anything.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..io.method_files import (FINGERPRINT_KEY, AdapterLoadError, check_fingerprint, check_peft_type,
                               model_fingerprint, read_method_files, write_method_files)
from ..nn.bitfit import BitFitLinear
from ._common import freeze, print_trainable_parameters, replace_module, trainable_parameters  # noqa: F401
from .targets import ALL_LINEAR, candidate_modules, is_linear, output_head_names

PEFT_TYPE = "BITFIT"
CONFIG_ATTR = "peft_kernels_bitfit_config"
FORMAT_VERSION = 1


# ================================================================== config
def _check_names(field: str, v, *, allow_regex: bool) -> None:
    if v is None:
        return
    if isinstance(v, str):
        if not allow_regex:
            raise TypeError(f"{field} must be a list of module names, got the string {v!r}")
        if not v:
            raise ValueError(f"{field} is an empty string")
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"{field} {v!r} is not a valid regular expression: {e}") from None
        return
    if not isinstance(v, list) or not all(isinstance(t, str) and t for t in v):
        raise TypeError(f"{field} must be {'a string (regex) or ' if allow_regex else ''}a list of non-empty "
                        f"strings, got {v!r}")


@dataclass
class BitFitConfig:
    """Which biases train. See the module docstring for the matching rules.

    target_modules: "all-linear" (default), a regex string, or a list of module names.
    train_norms: also train the weights and biases of normalisation modules.
    exclude_modules: regex or list; never targeted, never norm-tuned.
    modules_to_save: list of module names trained in full (not wrapped).
    """

    target_modules: Union[str, list[str]] = ALL_LINEAR
    train_norms: bool = False
    exclude_modules: Optional[Union[str, list[str]]] = None
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self):
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            v = getattr(self, name)
            if isinstance(v, (set, tuple)):
                setattr(self, name, list(v))
        if self.target_modules is None:
            raise ValueError("target_modules must be 'all-linear', a regex string or a list of module names")
        _check_names("target_modules", self.target_modules, allow_regex=True)
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is an empty list: BitFit would train nothing")
        _check_names("exclude_modules", self.exclude_modules, allow_regex=True)
        _check_names("modules_to_save", self.modules_to_save, allow_regex=False)
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            v = getattr(self, name)
            if isinstance(v, list):
                setattr(self, name, sorted(set(v)))  # name lists are sets (as PEFT): sorted, unique
        if not isinstance(self.train_norms, bool):
            raise TypeError(f"train_norms must be a bool, got {self.train_norms!r}")

    def to_dict(self) -> dict:
        """JSON fields, ``peft_type`` "BITFIT" included."""
        return {"peft_type": PEFT_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "BitFitConfig":
        """The config fields of ``d`` (other keys ignored); ValueError/TypeError for a wrong value."""
        if not isinstance(d, dict):
            raise TypeError(f"expected a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ================================================================== matching
def _is_norm(m: nn.Module) -> bool:
    """Normalisation layers by class name (transformers defines its own per model: LlamaRMSNorm, ...)."""
    return type(m).__name__.endswith("Norm") and any(True for _ in m.parameters(recurse=False))


def _is_wrapper(m: nn.Module) -> bool:
    """A layer wrapping another as ``base_layer`` (BitFitLinear, LoraLinear, PEFT's layers): its inside is
    not a candidate of its own."""
    return isinstance(getattr(m, "base_layer", None), nn.Module)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return candidate_modules(model, _is_wrapper)


def _match(pattern: Union[str, list[str]], name: str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return name in pattern or any(name.endswith("." + t) for t in pattern)


def _under(name: str, roots: list[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _resolve_modules_to_save(model: nn.Module, cfg: BitFitConfig) -> list[str]:
    if not cfg.modules_to_save:
        return []
    found = [n for n, _ in _candidates(model) if _match(cfg.modules_to_save, n)]
    missing = [t for t in cfg.modules_to_save if not any(_match([t], n) for n in found)]
    if missing:
        raise ValueError(f"modules_to_save {missing} matched no module of {type(model).__name__}")
    # Outermost only: a match inside another match trains anyway.
    return [n for n in found if not _under(n, [o for o in found if o != n])]


def resolve_targets(model: nn.Module, cfg: BitFitConfig) -> list[str]:
    """Full names of the linear modules ``cfg`` targets; ValueError if it matches nothing, a non-linear
    module, or a layer that is already wrapped."""
    cands = _candidates(model)
    mts = _resolve_modules_to_save(model, cfg)
    targets = cfg.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        heads = output_head_names(model)
        targets = [n for n, m in cands if is_linear(m) and n not in heads]
    found = []
    for name, m in cands:
        if not _match(targets, name) or _under(name, mts):
            continue
        if cfg.exclude_modules and _match(cfg.exclude_modules, name):
            continue
        if isinstance(m, BitFitLinear):
            raise ValueError(f"module {name!r} already has BitFit; call unload() before applying it again")
        if not is_linear(m):
            raise ValueError(f"target module {name!r} is a {type(m).__name__}; BitFit wraps nn.Linear, "
                             f"transformers Conv1D and Linear4bit layers (name those, or use 'all-linear')")
        found.append(name)
    if not found:
        sample = [n for n, m in cands if is_linear(m)][:6]
        raise ValueError(f"target_modules {cfg.target_modules!r} matched no linear module of "
                         f"{type(model).__name__} (exclude_modules={cfg.exclude_modules!r}); linear layers are "
                         f"named like {sample}")
    return found


def resolve_norms(model: nn.Module, cfg: BitFitConfig) -> list[str]:
    """Names of the normalisation modules norm tuning trains (empty unless ``cfg.train_norms``)."""
    if not cfg.train_norms:
        return []
    mts = _resolve_modules_to_save(model, cfg)
    return [n for n, m in _candidates(model)
            if _is_norm(m) and not _under(n, mts) and not (cfg.exclude_modules and _match(cfg.exclude_modules, n))]


# ================================================================== apply / state
def get_config(model: nn.Module) -> Optional[BitFitConfig]:
    """The BitFitConfig applied to ``model``, or None."""
    return getattr(model, CONFIG_ATTR, None)


def _bitfit_layers(model: nn.Module) -> list[tuple[str, BitFitLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BitFitLinear)]


def _recorded(model: nn.Module, key: str) -> list[str]:
    return list(getattr(model, "peft_kernels_bitfit_modules", {}).get(key, []))


def _apply_names(model: nn.Module, cfg: BitFitConfig, targets: list[str], norms: list[str], mts: list[str]) -> None:
    """Wrap ``targets``, freeze everything else, train norms / modules_to_save. All wrappers are built
    before the model changes, so a failure leaves it as it was."""
    wrappers = {name: BitFitLinear(model.get_submodule(name)) for name in targets}
    for name, layer in wrappers.items():
        replace_module(model, name, layer)
    freeze(model)
    for layer in wrappers.values():
        layer.bias.requires_grad_(True)
    for name in norms:
        for p in model.get_submodule(name).parameters(recurse=False):
            p.requires_grad_(True)
    for name in mts:
        model.get_submodule(name).requires_grad_(True)
    setattr(model, CONFIG_ATTR, cfg)
    model.peft_kernels_bitfit_modules = {"bitfit_modules": list(targets), "norm_modules": list(norms),
                                         "modules_to_save_modules": list(mts)}


def apply(model: nn.Module, cfg: BitFitConfig) -> nn.Module:
    """Apply BitFit in place: every targeted linear becomes a :class:`BitFitLinear` with a trainable
    float32 bias; norms (``train_norms``) and ``modules_to_save`` train too; everything else is frozen.
    Raises — with the model unchanged — for a config that matches nothing or a non-linear module, or a
    model that already has BitFit. Returns ``model``."""
    if not isinstance(cfg, BitFitConfig):
        raise TypeError(f"cfg must be a BitFitConfig, got {type(cfg).__name__}")
    if get_config(model) is not None or _bitfit_layers(model):
        raise ValueError(f"{type(model).__name__} already has BitFit applied; call unload() first")
    targets = resolve_targets(model, cfg)
    _apply_names(model, cfg, targets, resolve_norms(model, cfg), _resolve_modules_to_save(model, cfg))
    return model


def bitfit_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors under the model's own state-dict keys (detached, not copied): ``<layer>.bias``
    per BitFit layer, ``<norm>.<param>`` per tuned norm, every parameter of ``modules_to_save``."""
    if get_config(model) is None:
        raise ValueError(f"{type(model).__name__} has no BitFit applied (call apply(model, cfg) first)")
    out = {f"{n}.bias": m.bias.detach() for n, m in _bitfit_layers(model)}
    for name in _recorded(model, "norm_modules"):
        for pn, p in model.get_submodule(name).named_parameters(recurse=False):
            out[f"{name}.{pn}"] = p.detach()
    for name in _recorded(model, "modules_to_save_modules"):
        for pn, p in model.get_submodule(name).named_parameters():
            out[f"{name}.{pn}"] = p.detach()
    return out


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every BitFitLinear by its base layer: with ``merge`` the trained bias is written into the base
    (created where it had none), without it the base comes back as it was wrapped. Norms and
    modules_to_save keep their trained values. Returns ``model``."""
    for name, layer in _bitfit_layers(model):
        replace_module(model, name, layer.merge_and_unload() if merge else layer.unload())
    for attr in (CONFIG_ATTR, "peft_kernels_bitfit_modules"):
        if attr in model.__dict__:
            delattr(model, attr)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """:func:`unload` with ``merge=True``: plain layers holding the trained biases."""
    return unload(model, merge=True)


# ================================================================== files
def save_bitfit(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's BitFit state to ``directory`` (atomically; other files there are kept)."""
    cfg = get_config(model)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} has no BitFit applied (call apply(model, cfg) first)")
    config = cfg.to_dict()
    config.update({"bitfit_modules": sorted(n for n, _ in _bitfit_layers(model)),
                   "norm_modules": sorted(_recorded(model, "norm_modules")),
                   "modules_to_save_modules": sorted(_recorded(model, "modules_to_save_modules")),
                   "format_version": FORMAT_VERSION, FINGERPRINT_KEY: model_fingerprint(model)})
    return write_method_files(directory, config, bitfit_state_dict(model))


def _name_list(config: dict, key: str, where: Path) -> list[str]:
    v = config.get(key, [])
    if not isinstance(v, list) or not all(isinstance(t, str) and t for t in v):
        raise AdapterLoadError(f"{where}: {key} must be a list of module names, got {v!r}")
    return v


def _module(model: nn.Module, name: str, what: str, where: Path) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise AdapterLoadError(f"{where} has {what} {name!r}, which {type(model).__name__} does not have "
                               f"(a file for another model?)") from None


def _plan(model: nn.Module, config: dict, tensors: dict, directory: Path):
    """(cfg, targets, norms, mts, {key: destination shape}) after checking the file against the model."""
    where = directory / "adapter_config.json"
    try:
        cfg = BitFitConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise AdapterLoadError(f"{where}: invalid BitFit config: {e}") from None
    targets = _name_list(config, "bitfit_modules", where)
    norms = _name_list(config, "norm_modules", where)
    mts = _name_list(config, "modules_to_save_modules", where)
    if not targets:
        raise AdapterLoadError(f"{where}: bitfit_modules is empty")
    applied = get_config(model) is not None
    if applied:
        have = sorted(n for n, _ in _bitfit_layers(model))
        if have != sorted(targets) or sorted(_recorded(model, "norm_modules")) != sorted(norms) \
                or sorted(_recorded(model, "modules_to_save_modules")) != sorted(mts):
            raise AdapterLoadError(f"{directory}: the model already has BitFit on other modules than the file "
                                   f"(unload() it first, or load into the base model)")
    shapes: dict[str, tuple] = {}
    for name in targets:
        m = _module(model, name, "BitFit layer", where)
        if not (isinstance(m, BitFitLinear) or (not applied and is_linear(m))):
            raise AdapterLoadError(f"{where}: module {name!r} is a {type(m).__name__}, not a linear layer BitFit "
                                   f"can wrap (a file for another model?)")
        shapes[f"{name}.bias"] = (m.nf if type(m).__name__ == "Conv1D" else m.out_features,)
    for name in norms:
        m = _module(model, name, "norm module", where)
        if not _is_norm(m):
            raise AdapterLoadError(f"{where}: module {name!r} is a {type(m).__name__}, not a normalisation layer")
        shapes.update({f"{name}.{pn}": tuple(p.shape) for pn, p in m.named_parameters(recurse=False)})
    for name in mts:
        m = _module(model, name, "module to save", where)
        shapes.update({f"{name}.{pn}": tuple(p.shape) for pn, p in m.named_parameters()})
    wfile = directory / "adapter_model.safetensors"
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise AdapterLoadError(f"{wfile} does not match the model's BitFit tensors: missing {missing[:5]}"
                               f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                               f"{' ...' if len(extra) > 5 else ''}")
    for key, shape in shapes.items():
        t = tensors[key]
        if not t.is_floating_point():
            raise AdapterLoadError(f"{wfile}: tensor {key} has dtype {t.dtype}, expected a float dtype")
        if tuple(t.shape) != shape:
            raise AdapterLoadError(f"{wfile}: tensor {key} has shape {tuple(t.shape)}, the model needs {shape}")
        if not torch.isfinite(t).all():
            raise AdapterLoadError(f"{wfile}: tensor {key} contains NaN or Inf values")
    return cfg, targets, norms, mts


def load_bitfit(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a BitFit state saved by :func:`save_bitfit` into ``model`` (a base model: BitFit is applied to
    the file's exact modules; or a model with BitFit on the same modules: values are replaced).

    Everything — peft_type, fingerprint, module names and kinds, tensor keys, shapes, dtypes, finite
    values — is checked before the model changes; an error (AdapterLoadError naming the file and what is
    wrong) leaves it as it was. Returns ``model``.
    """
    directory = Path(directory)
    config, tensors = read_method_files(directory)
    check_peft_type(config, PEFT_TYPE, directory)
    check_fingerprint(config, model, directory)
    cfg, targets, norms, mts = _plan(model, config, tensors, directory)
    fresh = get_config(model) is None
    flags = {p: p.requires_grad for p in model.parameters()}
    old_values: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        if fresh:
            _apply_names(model, cfg, targets, norms, mts)
        with torch.no_grad():
            for key, value in tensors.items():
                mod_name, _, pname = key.rpartition(".")
                p = getattr(model.get_submodule(mod_name), pname)
                old_values.append((p, p.detach().clone()))  # norms and modules_to_save are the model's own
                p.copy_(value.to(device=p.device, dtype=p.dtype))
    except BaseException:
        # Nothing half-loaded (the copies cannot fail after _plan's checks short of running out of memory).
        with torch.no_grad():
            for p, v in old_values:
                p.copy_(v)
        if fresh:
            unload(model, merge=False)
            for p, f in flags.items():
                p.requires_grad_(f)
        raise
    return model
