"""LoRA adapters in Hugging Face PEFT's file format, both ways, and in-place conversion of a PeftModel.

An adapter directory holds what ``peft.PeftModel.save_pretrained`` writes::

    adapter_config.json         PEFT's LoraConfig fields (peft_type "LORA")
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight           [r, in_features]
                                base_model.model.<module>.lora_B.weight           [out_features, r]
                                base_model.model.<module>.lora_B.bias             [out_features]  (lora_bias)
                                base_model.model.<module>.lora_magnitude_vector   [out_features]  (DoRA; no ".weight")
                                base_model.model.<module>.base_layer.bias, ...    (bias "lora_only" / "all")
                                base_model.model.<module>.<param>                 (modules_to_save copies)

The adapter name never appears in the file (it is chosen when loading). Only safetensors and JSON
are read or written; pickle files (``adapter_model.bin``) are refused.

:func:`load_adapter` checks everything (keys, shapes, ranks, values, config) before it touches the
model, and restores the model if anything fails afterwards: a failed load leaves it as it was.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Optional

import torch
from torch import nn

from ..methods import lora as lora_methods
from ..methods.lora import LoraConfig
from ..nn.linear4bit import Linear4bit
from ..nn.lora import LoraLinear, LoraMagnitude, ModulesToSaveWrapper
from ..methods.targets import pattern_value
from .method_files import AdapterLoadError, is_peft_model, name_or_path, read_method_files, write_method_files
from .method_files import CONFIG_NAME, PICKLE_NAMES, WEIGHTS_NAME  # noqa: F401 (part of this module's API)

#: PEFT's key prefix (PeftModel.base_model is a LoraModel whose .model is the transformers model).
PEFT_PREFIX = "base_model.model."
#: Initialisations after which PEFT rewrites the base weights when it loads the adapter.
_BASE_MUTATING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")

_LORA_KEY = re.compile(r"^(?P<mod>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector)$")
_UNSUPPORTED_LORA_KEY = re.compile(r"(^|\.)(lora_embedding_[AB]|lora_E|lora_ranknum|lora_[A-Za-z_]+)(\.|$)")


# ============================================================================ shared helpers
def _lora_layers(root: nn.Module):
    return [(n, m) for n, m in root.named_modules() if isinstance(m, LoraLinear)]


def _base_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a LoRA-able module (or of the base of a LoraLinear)."""
    if isinstance(module, LoraLinear):
        return module.out_features, module.in_features
    if isinstance(module, (nn.Linear, Linear4bit)):
        return module.out_features, module.in_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        k, n = module.weight.shape
        return n, k
    raise TypeError(type(module).__name__)


def _dropout_p(module: nn.Module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


# ============================================================================ save
def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", *,
                 base_model_name_or_path: Optional[str] = None) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to ``directory`` in PEFT's format.

    ``adapter_config.json`` gets PEFT's LoraConfig fields with ``target_modules`` as the exact list of
    modules carrying the adapter (and per-module ``rank_pattern``/``alpha_pattern`` where they differ
    from ``r``/``lora_alpha``), so ``peft.PeftModel.from_pretrained`` rebuilds exactly these layers.
    ``adapter_model.safetensors`` gets PEFT's key names. The directory is replaced atomically (an
    existing adapter there is never half overwritten); other files in it are kept. Returns its path.
    """
    if is_peft_model(model):
        raise TypeError("this is a peft.PeftModel: save it with its own save_pretrained() (which also works "
                        "after from_peft_model), or pass a model whose adapters peft_kernels added")
    root = model
    layers = [(n, m) for n, m in _lora_layers(root) if adapter_name in m.lora_A]
    wrappers = [(n, m) for n, m in root.named_modules()
                if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save]
    if not layers:
        have = sorted({a for _, m in _lora_layers(root) for a in m.lora_A})
        raise ValueError(f"{type(model).__name__} has no LoRA adapter named {adapter_name!r} "
                         f"(its adapters: {have or 'none'})")
    cfg = lora_methods.get_configs(root).get(adapter_name)
    config = _peft_config_dict(root, cfg, adapter_name, layers, wrappers)
    config["base_model_name_or_path"] = (base_model_name_or_path or config.get("base_model_name_or_path")
                                         or name_or_path(root))
    tensors = _adapter_tensors(root, config, adapter_name, layers, wrappers)
    return write_method_files(directory, config, tensors)


def _peft_config_dict(root: nn.Module, cfg: Optional[LoraConfig], adapter_name: str, layers, wrappers) -> dict:
    """PEFT's adapter_config.json fields for the adapter as its layers actually hold it."""
    def uniform(what: str, values: dict):
        vals = set(values.values())
        if len(vals) > 1:
            raise ValueError(f"adapter {adapter_name!r} mixes {what} across layers ({values}); PEFT's format "
                             f"stores one value per adapter")
        return vals.pop()

    ranks = {n: m.r[adapter_name] for n, m in layers}
    alphas = {n: m.lora_alpha[adapter_name] for n, m in layers}
    use_dora = uniform("use_dora", {n: bool(m.use_dora[adapter_name]) for n, m in layers})
    lora_bias = uniform("lora_bias", {n: bool(m.lora_bias[adapter_name]) for n, m in layers})
    if cfg is None:  # layers built by hand: describe them
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        drops = [_dropout_p(m.lora_dropout[adapter_name]) for _, m in layers]
        rs = {n: math.isclose(m.scaling[adapter_name], m.lora_alpha[adapter_name] / math.sqrt(m.r[adapter_name]))
              and not math.isclose(m.scaling[adapter_name], m.lora_alpha[adapter_name] / m.r[adapter_name])
              for n, m in layers}
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=max(drops), use_rslora=any(rs.values()),
                         use_dora=use_dora, lora_bias=lora_bias, init_lora_weights=True,
                         modules_to_save=sorted(n for n, _ in wrappers) or None)
    d = cfg.to_peft_dict()
    # PEFT's scaling is alpha/r (alpha/sqrt(r) with rsLoRA); a layer whose scaling was changed by hand
    # cannot be described by the file.
    for n, m in layers:
        r, a = m.r[adapter_name], m.lora_alpha[adapter_name]
        want = a / math.sqrt(r) if cfg.use_rslora else a / r
        if not math.isclose(m.scaling[adapter_name], want, rel_tol=1e-9):
            raise ValueError(f"{n}: adapter {adapter_name!r} has scaling {m.scaling[adapter_name]} but "
                             f"r={r}, lora_alpha={a}, use_rslora={cfg.use_rslora} give {want}; PEFT's format "
                             f"cannot store a changed scaling")
    # Exact module names: PEFT matches a list entry by name suffix, so a full name selects that module
    # alone, whatever patterns the config was built from (all-linear, regexes, layers_to_transform).
    d["target_modules"] = sorted(ranks)
    d["exclude_modules"] = None
    d["layers_to_transform"] = None
    d["layers_pattern"] = None
    d["use_dora"], d["lora_bias"] = use_dora, lora_bias
    # What PEFT records for GPT-2's Conv1D (weight [in, out]); PEFT warns when it has to correct it.
    d["fan_in_fan_out"] = all(m.fan_in_fan_out for _, m in layers)
    for key, per_layer, default in (("rank_pattern", ranks, cfg.r), ("alpha_pattern", alphas, cfg.lora_alpha)):
        pats = dict(getattr(cfg, key) or {})
        if any(pattern_value(pats, n, default) != v for n, v in per_layer.items()):
            pats = {re.escape(n): v for n, v in per_layer.items() if v != default}
        d[key] = pats
    d["inference_mode"] = True  # as PEFT writes it
    return d


def _adapter_tensors(root: nn.Module, config: dict, adapter_name: str, layers, wrappers) -> dict[str, torch.Tensor]:
    """The file's tensors under PEFT's names: own contiguous CPU copies (safetensors rejects shared storage)."""
    def own(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", copy=True).contiguous()

    out: dict[str, torch.Tensor] = {}
    for name, m in layers:
        p = PEFT_PREFIX + name
        out[f"{p}.lora_A.weight"] = own(m.lora_A[adapter_name].weight)
        out[f"{p}.lora_B.weight"] = own(m.lora_B[adapter_name].weight)
        if m.lora_B[adapter_name].bias is not None:
            out[f"{p}.lora_B.bias"] = own(m.lora_B[adapter_name].bias)
        if m.use_dora[adapter_name]:
            out[f"{p}.lora_magnitude_vector"] = own(m.lora_magnitude_vector[adapter_name].weight)
    for name, w in wrappers:
        for k, t in w.modules_to_save[adapter_name].state_dict().items():
            out[f"{PEFT_PREFIX}{name}.{k}"] = own(t)
    bias = config.get("bias", "none")
    if bias == "lora_only":
        for name, m in layers:
            if m.base_layer.bias is not None:
                out[f"{PEFT_PREFIX}{name}.base_layer.bias"] = own(m.base_layer.bias)
    elif bias == "all":
        inner = re.compile(r"(^|\.)(lora_A|lora_B|lora_magnitude_vector|lora_dropout|modules_to_save|"
                           r"original_module)\.")
        for k, t in root.state_dict().items():
            if k.endswith(".bias") and not inner.search(k):
                out.setdefault(PEFT_PREFIX + k, own(t))
    return out


# ============================================================================ load: reading and checking
@dataclass
class _LayerPlan:
    name: str
    r: int
    alpha: float
    tensors: dict[str, torch.Tensor]  # kind ("lora_A.weight", ...) -> value


@dataclass
class _Plan:
    cfg: LoraConfig
    layers: dict[str, _LayerPlan]
    writes: list[tuple[torch.Tensor, torch.Tensor, str]] = field(default_factory=list)  # (model tensor, value, key)
    msave: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # wrapper module -> {param: value}
    existing: bool = False  # the model already has this adapter: overwrite its values in place


_read_files = read_method_files


def _parse_config(config: dict, cfg_path: Path) -> LoraConfig:
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise AdapterLoadError(
            f"{cfg_path}: init_lora_weights={init!r}: such an adapter is trained against a base that PEFT "
            f"rewrites when it loads it; convert it to a plain LoRA adapter first (PEFT's save_pretrained("
            f"..., path_initial_model_for_weight_conversion=...)) and load that")
    try:
        cfg = LoraConfig.from_peft_dict(config)
    except (TypeError, ValueError) as e:
        raise AdapterLoadError(f"{cfg_path}: {e}") from None
    return cfg


def _candidates(root: nn.Module) -> dict[str, nn.Module]:
    """Modules an adapter may name: everything outside LoRA layers' and modules_to_save wrappers' insides."""
    out, stop = {}, []
    for name, m in root.named_modules():
        if not name or any(name.startswith(p + ".") for p in stop):
            continue
        out[name] = m
        if isinstance(m, (LoraLinear, ModulesToSaveWrapper)):
            stop.append(name)
    return out


def _plan_load(root: nn.Module, directory: Path, adapter_name: str) -> _Plan:
    """Everything the load will write, checked against the model; raises AdapterLoadError, changes nothing."""
    config, tensors = _read_files(directory)
    w_file = directory / WEIGHTS_NAME
    cfg = _parse_config(config, directory / CONFIG_NAME)
    cands = _candidates(root)
    configs = lora_methods.get_configs(root)
    existing = adapter_name in configs

    # 1. Split the keys: LoRA tensors per module, and the rest (biases, modules_to_save, embeddings).
    lora: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterLoadError(f"{w_file}: tensor {key} contains NaN or Inf values")
        m = _LORA_KEY.match(k)
        if (m or "lora_magnitude_vector" in k) and not t.is_floating_point():
            raise AdapterLoadError(f"{w_file}: LoRA tensor {key} has dtype {t.dtype}; expected a float dtype")
        if m:
            lora.setdefault(m["mod"], {})[m["kind"]] = t
        elif k.endswith(".lora_magnitude_vector.weight"):  # tolerate the in-memory name
            lora.setdefault(k[:-len(".lora_magnitude_vector.weight")], {})["lora_magnitude_vector"] = t
        elif _UNSUPPORTED_LORA_KEY.search(k):
            raise AdapterLoadError(f"{w_file}: tensor {key} is not a LoRA tensor peft_kernels can load (only "
                                   f"lora_A/lora_B/lora_magnitude_vector of linear layers; LoRA on embeddings or "
                                   f"other layer types is not supported)")
        else:
            other[k] = t
    if not lora:
        raise AdapterLoadError(f"{w_file} has no LoRA tensors (keys like '{PEFT_PREFIX}<module>.lora_A.weight'); "
                               f"its keys look like {sorted(tensors)[:3]}")

    # 2. Every LoRA module exists in this model, is a linear layer, and its tensors fit it and the config.
    layers: dict[str, _LayerPlan] = {}
    missing_mods = [m for m in lora if m not in cands]
    if missing_mods:
        some = [n for n, m in cands.items() if _is_loraable(m)][:4]
        raise AdapterLoadError(f"{w_file} has LoRA tensors for {len(missing_mods)} module(s) this "
                               f"{type(root).__name__} does not have, e.g. {sorted(missing_mods)[:3]}: the adapter "
                               f"was made for another model (this model's linear layers are named like {some})")
    for mod_name in sorted(lora):
        module = cands[mod_name]
        if not _is_loraable(module):
            raise AdapterLoadError(f"{w_file}: module {mod_name!r} is a {type(module).__name__}; LoRA loads into "
                                   f"nn.Linear, transformers Conv1D and peft_kernels Linear4bit layers")
        got = lora[mod_name]
        need = {"lora_A.weight", "lora_B.weight"}
        if cfg.use_dora:
            need.add("lora_magnitude_vector")
        if cfg.lora_bias:
            need.add("lora_B.bias")
        if need - set(got):
            raise AdapterLoadError(f"{w_file}: missing tensor(s) {sorted(need - set(got))} for module {mod_name!r}"
                                   f" (use_dora={cfg.use_dora}, lora_bias={cfg.lora_bias} in the config)")
        if set(got) - need:
            raise AdapterLoadError(f"{w_file}: unexpected tensor(s) {sorted(set(got) - need)} for module "
                                   f"{mod_name!r}: the config says use_dora={cfg.use_dora}, lora_bias={cfg.lora_bias}")
        r = pattern_value(cfg.rank_pattern, mod_name, cfg.r)
        alpha = pattern_value(cfg.alpha_pattern, mod_name, cfg.lora_alpha)
        n_out, n_in = _base_shape(module)
        want = {"lora_A.weight": (r, n_in), "lora_B.weight": (n_out, r), "lora_B.bias": (n_out,),
                "lora_magnitude_vector": (n_out,)}
        a, b = got["lora_A.weight"], got["lora_B.weight"]
        if a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1] and a.shape[0] != r:
            raise AdapterLoadError(f"{w_file}: {mod_name}.lora_A/lora_B have rank {a.shape[0]} but the config "
                                   f"says r={r} for this module (wrong rank, or a config from another adapter)")
        for kind, t in got.items():
            if tuple(t.shape) != want[kind]:
                raise AdapterLoadError(
                    f"{w_file}: {PEFT_PREFIX}{mod_name}.{kind} has shape {tuple(t.shape)} but this model's "
                    f"{mod_name} is [{n_out}, {n_in}] with r={r}, so it must be {want[kind]} (an adapter for "
                    f"another model or shape?)")
        if isinstance(module, LoraLinear) and adapter_name in module.lora_A:
            if not existing:
                raise AdapterLoadError(f"layer {mod_name!r} already holds an adapter named {adapter_name!r}")
            if (module.r[adapter_name], bool(module.use_dora[adapter_name]), bool(module.lora_bias[adapter_name])) \
                    != (r, cfg.use_dora, cfg.lora_bias):
                raise AdapterLoadError(
                    f"the model's adapter {adapter_name!r} at {mod_name} has r={module.r[adapter_name]}, "
                    f"use_dora={module.use_dora[adapter_name]}, lora_bias={module.lora_bias[adapter_name]}; the "
                    f"file has r={r}, use_dora={cfg.use_dora}, lora_bias={cfg.lora_bias}: load it under another "
                    f"name, or delete_adapter({adapter_name!r}) first")
        layers[mod_name] = _LayerPlan(mod_name, r, alpha, got)

    # 3. The config targets exactly the modules the file has tensors for.
    try:
        targeted = set(lora_methods.resolve_targets(root, cfg))
    except ValueError as e:
        raise AdapterLoadError(f"{directory / CONFIG_NAME}: {e}") from None
    if existing:
        have = {n for n, m in _lora_layers(root) if adapter_name in m.lora_A}
        if have != set(layers):
            raise AdapterLoadError(
                f"the model's adapter {adapter_name!r} covers {len(have)} modules and the file {len(layers)} "
                f"(differing: {sorted(have ^ set(layers))[:4]}); load it under another name, or "
                f"delete_adapter({adapter_name!r}) first")
        targeted |= have  # the existing adapter's layers are LoraLinear now; they need not match again
    if targeted - set(layers):
        raise AdapterLoadError(f"{w_file} is missing the LoRA tensors of {len(targeted - set(layers))} module(s) "
                               f"that {CONFIG_NAME} targets, e.g. {sorted(targeted - set(layers))[:3]}")
    if set(layers) - targeted:
        raise AdapterLoadError(f"{w_file} has LoRA tensors for module(s) {CONFIG_NAME}'s target_modules does "
                               f"not select: {sorted(set(layers) - targeted)[:3]}")
    if isinstance(cfg.target_modules, list):
        unused = [t for t in cfg.target_modules if not any(n == t or n.endswith("." + t) for n in layers)]
        if unused:
            warnings.warn(f"{CONFIG_NAME}: target_modules entries {unused} match no module of this model", stacklevel=3)

    plan = _Plan(cfg=cfg, layers=layers, existing=existing)
    _plan_other_tensors(root, plan, other, cands, w_file, adapter_name)

    name = cfg.base_model_name_or_path
    mine = name_or_path(root)
    if name and mine and os.path.basename(str(name).rstrip("/")) != os.path.basename(str(mine).rstrip("/")):
        warnings.warn(f"the adapter was trained on {name!r} and this model is {mine!r}; the shapes fit, so it "
                      f"loads, but check that it is the same base", stacklevel=3)
    return plan


def _is_loraable(m: nn.Module) -> bool:
    return isinstance(m, (LoraLinear, nn.Linear, Linear4bit)) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))


def _plan_other_tensors(root, plan: _Plan, other: dict[str, torch.Tensor], cands, w_file, adapter_name) -> None:
    """Biases (bias "all"/"lora_only"), modules_to_save copies and saved embedding layers."""
    cfg = plan.cfg
    msave_names = []
    if cfg.modules_to_save:
        msave_names = [n for n in cands if any(n.endswith(t) for t in cfg.modules_to_save)]
    embeddings = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            emb = getattr(root, getter)() if hasattr(root, getter) else None
        except (NotImplementedError, AttributeError):
            emb = None
        if emb is not None:
            embeddings.update(n for n, m in cands.items() if m is emb)
    current = root.state_dict(keep_vars=True)
    for k, t in sorted(other.items()):
        # modules_to_save: "<wrapper>.<param>" goes into the adapter's copy of that module.
        owner = next((n for n in sorted(msave_names, key=len, reverse=True) if k.startswith(n + ".")), None)
        if owner is not None:
            mod = cands[owner]
            rest = k[len(owner) + 1:]
            if cfg.bias == "all" and rest.endswith(".bias") and rest.startswith(("original_module.",
                                                                                   "modules_to_save.")):
                continue  # PEFT's bias="all" also writes its wrapper's inner biases: duplicates
            src = mod.original_module if isinstance(mod, ModulesToSaveWrapper) else mod
            ref = src.state_dict(keep_vars=True).get(rest)
            if ref is None:
                raise AdapterLoadError(f"{w_file}: {k} names no tensor of module {owner!r} (modules_to_save)")
            _check_same_shape(w_file, k, t, ref)
            plan.msave.setdefault(owner, {})[rest] = t
            continue
        # Otherwise the key is a tensor of the model itself. "<m>.base_layer.<p>" is "<m>.<p>" while
        # module m is not wrapped yet.
        ref = current.get(k)
        mod_name, _, pname = k.rpartition(".")
        if ref is None and mod_name.endswith(".base_layer") and mod_name[:-len(".base_layer")] in plan.layers:
            ref = current.get(f"{mod_name[:-len('.base_layer')]}.{pname}")
        if ref is None:
            raise AdapterLoadError(f"{w_file}: unexpected tensor {PEFT_PREFIX}{k}: this model has no such "
                                   f"parameter (an adapter for another model?)")
        is_bias = pname == "bias"
        lora_only_bias = is_bias and mod_name.endswith(".base_layer") and mod_name[:-11] in plan.layers
        top = mod_name.split(".base_layer")[0]
        allowed = ((cfg.bias == "all" and is_bias) or (cfg.bias == "lora_only" and lora_only_bias)
                   or top in embeddings)
        if not allowed:
            raise AdapterLoadError(f"{w_file}: unexpected tensor {PEFT_PREFIX}{k} (bias={cfg.bias!r}, "
                                   f"modules_to_save={cfg.modules_to_save!r} in the config do not account for it)")
        _check_same_shape(w_file, k, t, ref)
        plan.writes.append((ref, t, k))
    if plan.existing:
        for owner in plan.msave:
            mod = cands[owner]
            if not (isinstance(mod, ModulesToSaveWrapper) and adapter_name in mod.modules_to_save):
                raise AdapterLoadError(f"{w_file} has modules_to_save tensors for {owner!r}, which the model's "
                                       f"adapter {adapter_name!r} does not train: load it under another name")
    missing = [n for n in msave_names if n not in plan.msave]
    if missing:
        raise AdapterLoadError(f"{w_file} is missing the modules_to_save tensors of {missing[:3]}")


def _check_same_shape(w_file, key, t, ref) -> None:
    if t.is_floating_point() != ref.is_floating_point():
        raise AdapterLoadError(f"{w_file}: {PEFT_PREFIX}{key} has dtype {t.dtype} but the model's tensor is "
                               f"{ref.dtype}")
    if tuple(t.shape) != tuple(ref.shape):
        raise AdapterLoadError(f"{w_file}: {PEFT_PREFIX}{key} has shape {tuple(t.shape)} but the model's tensor is "
                               f"{tuple(ref.shape)} (an adapter for another model or shape?)")


# ============================================================================ load: applying
class _Undo:
    """What a load changed, to put the model back exactly as it was if a later step fails."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.modules = {n: m for n, m in root.named_modules()}
        self.children = [(m, dict(m._modules)) for m in self.modules.values()]
        self.grads = {p: p.requires_grad for p in root.parameters()}
        self.attrs = {a: root.__dict__.get(a, _MISSING) for a in (lora_methods.CONFIG_ATTR,
                                                                  "peft_kernels_active_adapters")}
        self.layer_state = {m: (list(m.active_adapters), set(m.lora_A)) for m in self.modules.values()
                            if isinstance(m, LoraLinear)}
        self.wrapper_state = {m: (m.active_adapter, set(m.modules_to_save)) for m in self.modules.values()
                              if isinstance(m, ModulesToSaveWrapper)}
        self.values: list[tuple[torch.Tensor, torch.Tensor]] = []

    def save_values(self, tensors) -> None:
        self.values.extend((t, t.detach().clone()) for t in tensors)

    @torch.no_grad()
    def restore(self) -> None:
        for t, v in self.values:
            t.copy_(v)
        for layer, (active, names) in self.layer_state.items():
            for n in [n for n in layer.lora_A if n not in names]:
                layer.delete_adapter(n)
            layer.active_adapters = active
        for w, (active, names) in self.wrapper_state.items():
            for n in [n for n in w.modules_to_save if n not in names]:
                w.delete_adapter(n)
            w.active_adapter = active
        for m, kids in self.children:
            m._modules.clear()
            m._modules.update(kids)
        for p, flag in self.grads.items():
            p.requires_grad_(flag)
        for a, v in self.attrs.items():
            if v is _MISSING:
                self.root.__dict__.pop(a, None)
            else:
                setattr(self.root, a, v)


_MISSING = object()


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", *,
                 is_trainable: bool = False) -> nn.Module:
    """Load a PEFT-format LoRA / rsLoRA / DoRA adapter from ``directory`` into ``model`` as ``adapter_name``.

    Missing LoRA layers are created (``peft_kernels.methods.lora``) over dense or 4-bit bases. A model
    without adapters gets this one active (like ``PeftModel.from_pretrained``); a model that has
    adapters gets it inactive (like ``PeftModel.load_adapter``; use ``methods.lora.set_adapter``). If the
    model already has ``adapter_name`` with the same layers and ranks, its values are replaced in place.
    ``is_trainable=False`` freezes the adapter's tensors (and the biases it loads).

    Everything is checked before the model changes — keys for modules the model lacks, missing or
    unexpected keys, shapes against the base layers and the config's rank, NaN/Inf values, unsupported
    PEFT features — and an error (AdapterLoadError, naming the file and tensor) leaves the model exactly
    as it was. Returns ``model``.
    """
    if is_peft_model(model):
        raise TypeError("this is a peft.PeftModel: load adapters into it with its own load_adapter(), or pass "
                        "the base transformers model here")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {adapter_name!r}")
    plan = _plan_load(model, Path(directory), adapter_name)
    undo = _Undo(model)
    try:
        _apply_plan(model, plan, adapter_name, is_trainable, undo)
    except BaseException:
        undo.restore()
        raise
    return model


@torch.no_grad()
def _apply_plan(root: nn.Module, plan: _Plan, adapter_name: str, is_trainable: bool, undo: _Undo) -> None:
    cfg = plan.cfg
    if not plan.existing:
        # Exact names and no random init: the file says which layers and what values.
        make = LoraConfig.from_peft_dict({**cfg.to_peft_dict(), "target_modules": sorted(plan.layers),
                                          "exclude_modules": None, "layers_to_transform": None,
                                          "layers_pattern": None, "init_lora_weights": False})
        first = not lora_methods.get_configs(root)
        if first:
            lora_methods.apply(root, make, adapter_name)
        else:
            lora_methods.add_adapter(root, make, adapter_name)
        stored = dict(lora_methods.get_configs(root))
        stored[adapter_name] = cfg  # remember the file's own config (its patterns, its init)
        setattr(root, lora_methods.CONFIG_ATTR, stored)
    adapter_tensors = []
    for name, lp in plan.layers.items():
        layer = root.get_submodule(name)
        dst = {"lora_A.weight": layer.lora_A[adapter_name].weight, "lora_B.weight": layer.lora_B[adapter_name].weight,
               "lora_B.bias": layer.lora_B[adapter_name].bias}
        if layer.use_dora[adapter_name]:
            dst["lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight
        if plan.existing:
            undo.save_values(dst[k] for k in lp.tensors)
        for kind, value in lp.tensors.items():
            dst[kind].copy_(value)
            adapter_tensors.append(dst[kind])
    for wname, values in plan.msave.items():
        copy_ = root.get_submodule(wname).modules_to_save[adapter_name]
        own = copy_.state_dict(keep_vars=True)
        if plan.existing:
            undo.save_values(own[k] for k in values)
        for k, v in values.items():
            own[k].copy_(v)
            adapter_tensors.append(own[k])
    undo.save_values(t for t, _, _ in plan.writes)
    for t, v, _ in plan.writes:
        t.copy_(v)
        adapter_tensors.append(t)
    if not is_trainable:
        # Inference: what this load wrote, and whatever it made trainable (new adapter tensors, biases
        # per the config's bias rule), is frozen; what trained before keeps training.
        for t in adapter_tensors:
            t.requires_grad_(False)
        for p in root.parameters():
            if p.requires_grad and not undo.grads.get(p, False):
                p.requires_grad_(False)


# ============================================================================ PeftModel -> fused layers
class PeftLoraLinear(LoraLinear):
    """A fused :class:`LoraLinear` standing in for a PEFT ``lora.Linear`` inside a ``peft.PeftModel``.

    :func:`from_peft_model` registers it as a virtual subclass of ``peft.tuners.lora.LoraLayer``, so
    PEFT's save_pretrained, load_adapter, set_adapter, disable_adapter and merge find it; the methods
    below are the part of PEFT's layer interface those call. Defined here, not inside a function, so
    a converted model pickles.
    """

    # PEFT's LoraLayer names (its state-dict and status code iterate over them).
    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "use_rslora", "lora_bias")
    # Embedding LoRA does not exist here; PEFT's hooks only read these.
    lora_embedding_A = MappingProxyType({})
    lora_embedding_B = MappingProxyType({})

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def disable_adapters(self) -> bool:
        return self.disabled

    @property
    def active_adapter(self):
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    @property
    def use_rslora(self) -> dict[str, bool]:
        return {n: not math.isclose(self.scaling[n], self.lora_alpha[n] / self.r[n])
                and math.isclose(self.scaling[n], self.lora_alpha[n] / math.sqrt(self.r[n])) for n in self.lora_A}

    def enable_adapters(self, enabled: bool) -> None:
        self.disabled = not enabled

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        super().set_adapter([n for n in names if n in self.lora_A])
        if inference_mode:
            for n in names:
                if n in self.lora_A:
                    self._set_trainable(n, False)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config, **kwargs) -> None:
        """PEFT adds an adapter to an existing LoRA layer through this (PeftModel.add_adapter/load_adapter)."""
        init = config.init_lora_weights
        if not (init in (True, False) or (isinstance(init, str) and init.lower() == "gaussian")):
            raise ValueError(f"init_lora_weights={init!r} is not supported on fused peft_kernels layers")
        LoraConfig.from_peft_dict(config.to_dict())  # raises for PEFT features not implemented here
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout=config.lora_dropout,
                         use_rslora=config.use_rslora, use_dora=config.use_dora, init_lora_weights=init,
                         lora_bias=config.lora_bias)
        self.set_adapter(self.active_adapters, inference_mode=getattr(config, "inference_mode", False))

    def merge(self, safe_merge: bool = False, adapter_names=None, mode: Optional[str] = None, **kw) -> None:
        # PEFT's bitsandbytes layers merge by requantizing (the model stays 4-bit); do the same.
        if mode is None:
            mode = "requantize" if self._kind == "4bit" else "exact"
        super().merge(adapter_names=adapter_names, mode=mode, **kw)

    def _get_available_adapters(self) -> set[str]:
        return set(self.lora_A)

    def _all_available_adapter_names(self) -> list[str]:
        return sorted(self.lora_A)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        pass  # add_adapter already creates adapters on the base's device

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        for n in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            if n in self.lora_A:
                self._set_trainable(n, requires_grad)

    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:
        pass  # set_adapter already freezes the inactive adapters

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False


def _register_with_peft() -> None:
    """Make PEFT's isinstance(x, LoraLayer) (hence BaseTunerLayer) true for PeftLoraLinear."""
    from peft.tuners.lora import LoraLayer

    if not issubclass(PeftLoraLinear, LoraLayer):
        LoraLayer.register(PeftLoraLinear)


def _peft_layer_kind(layer: nn.Module) -> str:
    """'dense' or 'bnb4bit' for PEFT LoRA layers this converts; raises for anything else."""
    cls = type(layer)
    base = layer.base_layer
    if cls.__module__ == "peft.tuners.lora.layer" and cls.__name__ == "Linear":
        if isinstance(base, nn.Linear) or (type(base).__name__ == "Conv1D" and hasattr(base, "nf")):
            return "dense"
    if cls.__module__ == "peft.tuners.lora.bnb" and cls.__name__ == "Linear4bit":
        if type(base).__name__ == "Linear4bit" and type(base).__module__.startswith("bitsandbytes"):
            return "bnb4bit"
    raise TypeError(f"cannot convert a PEFT {cls.__module__}.{cls.__name__} over {type(base).__name__}: "
                    f"peft_kernels converts lora.Linear (over nn.Linear / Conv1D) and lora.bnb.Linear4bit")


def _check_peft_layer(name: str, layer: nn.Module) -> str:
    kind = _peft_layer_kind(layer)
    if layer.merged_adapters:
        raise ValueError(f"{name}: adapters {layer.merged_adapters} are merged into the base; unmerge them first")
    if len(layer.lora_embedding_A) or len(layer.lora_embedding_B):
        raise ValueError(f"{name}: LoRA embedding adapters are not supported")
    for n in layer.lora_A:
        variant = getattr(layer, "lora_variant", {}).get(n)
        if variant is not None and type(variant).__name__ != "DoraLinearVariant":
            raise ValueError(f"{name}: adapter {n!r} uses the LoRA variant {type(variant).__name__}; only plain "
                             f"LoRA, rsLoRA and DoRA convert")
        if bool(layer.use_dora.get(n, False)) != (variant is not None):
            raise ValueError(f"{name}: adapter {n!r} has an inconsistent DoRA state")
        if not isinstance(layer.lora_A[n], nn.Linear) or not isinstance(layer.lora_B[n], nn.Linear):
            raise ValueError(f"{name}: adapter {n!r} has non-Linear lora_A/lora_B modules")
        if type(layer.lora_dropout[n]) not in (nn.Dropout, nn.Identity):
            raise ValueError(f"{name}: adapter {n!r} has an unsupported dropout module "
                             f"{type(layer.lora_dropout[n]).__name__}")
    is_conv1d = type(layer.base_layer).__name__ == "Conv1D"
    if kind == "dense" and bool(getattr(layer, "fan_in_fan_out", False)) != is_conv1d:
        raise ValueError(f"{name}: fan_in_fan_out={layer.fan_in_fan_out} over a {type(layer.base_layer).__name__}"
                         f" is not supported")
    if kind == "bnb4bit":
        w = layer.base_layer.weight
        if getattr(w, "quant_state", None) is None or getattr(w, "packing_format_for_cpu", False):
            raise ValueError(f"{name}: the bitsandbytes weight is not in NF4/FP4 bytes (not quantized yet, or "
                             f"repacked by bitsandbytes after an eval-mode CPU forward)")
    return kind


def _convert_peft_layer(layer: nn.Module, kind: str) -> LoraLinear:
    """A fused layer holding the very same modules and Parameters as the PEFT layer."""
    if kind == "bnb4bit":
        bnb = layer.base_layer
        base = Linear4bit.from_bnb(bnb)  # the same packed bytes and statistics, no requantization
        if bnb.bias is not None:
            base.bias = bnb.bias  # share the Parameter itself (from_bnb copies it)
    else:
        base = layer.base_layer
    flags = {p: p.requires_grad for p in base.parameters()}
    new = PeftLoraLinear(base, adapter_name=None)
    for p, f in flags.items():  # LoraLinear freezes its base; keep what PEFT had (bias="all"/"lora_only")
        p.requires_grad_(f)
    for n in layer.lora_A:
        new.lora_A[n] = layer.lora_A[n]
        new.lora_B[n] = layer.lora_B[n]
        new.lora_dropout[n] = layer.lora_dropout[n]
        new.r[n] = layer.r[n]
        new.lora_alpha[n] = layer.lora_alpha[n]
        new.scaling[n] = layer.scaling[n]
        new.use_dora[n] = bool(layer.use_dora.get(n, False))
        new.lora_bias[n] = bool(layer.lora_bias.get(n, False))
        if new.use_dora[n]:
            mag = LoraMagnitude(torch.empty(0))
            mag.weight = layer.lora_magnitude_vector[n].weight  # the same Parameter
            new.lora_magnitude_vector[n] = mag
    new.active_adapters = [a for a in layer.active_adapters if a in new.lora_A]
    new.disabled = bool(layer.disable_adapters)
    new.train(layer.training)
    return new


def from_peft_model(peft_model: nn.Module) -> nn.Module:
    """Swap a ``peft.PeftModel``'s LoRA layers for fused peft_kernels layers, in place; returns it.

    Works for dense bases (``nn.Linear``, GPT-2 ``Conv1D``) and bitsandbytes 4-bit bases
    (``bnb.nn.Linear4bit``, converted with ``Linear4bit.from_bnb``: same bytes). The new layers hold the
    PEFT layers' own lora_A / lora_B / magnitude modules and dropout (shared, not copied), so optimizer
    state stays valid, and they pass as PEFT LoRA layers: the PeftModel's save_pretrained, load_adapter,
    set_adapter and disable_adapter keep working. Every layer is checked before any is swapped.
    """
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer, LoraModel
    except ImportError as e:  # pragma: no cover - peft is a dev dependency
        raise ImportError("from_peft_model needs the peft package") from e
    if not isinstance(peft_model, PeftModel) or not isinstance(peft_model.base_model, LoraModel):
        raise TypeError(f"expected a peft.PeftModel with LoRA adapters, got {type(peft_model).__name__}")
    _register_with_peft()
    todo = []
    for name, m in peft_model.named_modules():
        if isinstance(m, LoraLayer) and not isinstance(m, PeftLoraLinear):
            todo.append((name, m, _check_peft_layer(name, m)))
    if not todo:
        raise ValueError("the PeftModel has no PEFT LoRA layers left to convert")
    new = [(name, _convert_peft_layer(m, kind)) for name, m, kind in todo]  # nothing swapped yet
    for name, layer in new:
        parent_name, _, child = name.rpartition(".")
        setattr(peft_model.get_submodule(parent_name), child, layer)
    return peft_model
