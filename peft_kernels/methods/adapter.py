"""Bottleneck adapters (Houlsby / Pfeiffer placement) on any transformers model: config, apply, management,
report, save/load.

    cfg = BottleneckConfig(placement="houlsby", bottleneck=64, activation="gelu_tanh")
    model = apply(model, cfg)                  # adapters after every attention and feed-forward block
    print_trainable_parameters(model)
    save_bottleneck(model, "out/adapter")      # adapter_config.json + adapter_model.safetensors
    load_bottleneck(fresh_model, "out/adapter")

Placement. Each adapter rewrites the output of one sub-layer through a forward hook (the model's source
and its own modules are never patched or replaced; see ``nn.adapter.AdapterSlot``), before that output
meets the block's residual connection:

* ``"houlsby"``: after the attention block and after the feed-forward block of every transformer layer;
* ``"pfeiffer"``: after the feed-forward block only.

Which modules those are, per ``model.config.model_type`` (:data:`BLOCK_OUTPUTS`, paths inside one block):

* llama / mistral / qwen2 / qwen3 / gemma(2) / phi3: ``self_attn`` (its output tuple's first element,
  i.e. after ``o_proj``) and ``mlp`` — both before the decoder layer's residual add;
* gpt2: ``attn`` (after ``c_proj`` and the residual dropout) and ``mlp`` (after its dropout);
* bert / roberta / xlm-roberta: ``attention.output.dense`` and ``output.dense``: the projection back to
  the hidden size, before dropout, the residual add and the LayerNorm (Houlsby's position).

Other models: ``attn_modules`` / ``ffn_modules`` name the paths inside one block (e.g. ``"self_attention"``).
A placement that names no module is an error naming the block and its submodules; nothing changes.

Several adapters may live on one model (``add_adapter``); ``set_adapter`` activates one or a list (applied in
that order, each on the previous one's output) and makes exactly those trainable; ``disable_adapters()`` is a
context manager; ``delete_adapter`` removes one (and the hooks when none is left).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
from torch import nn

from ..io import method_files as mf
from ..nn.adapter import INITS, Adapter, AdapterSlot
from ..ops import reference_adapter as ref
from ._common import disabled, find_layer_stack, print_trainable_parameters, trainable_parameters  # noqa: F401

PEFT_TYPE = "BOTTLENECK"
FORMAT_VERSION = 1
PLACEMENTS = ("houlsby", "pfeiffer")
#: Attribute (child module) of a hooked module that holds its adapters.
SLOT_ATTR = "bottleneck_adapters"
CONFIG_ATTR = "peft_kernels_bottleneck_configs"
POINTS_ATTR = "peft_kernels_bottleneck_points"
ACTIVE_ATTR = "peft_kernels_bottleneck_active"

_DECODER = ("self_attn", "mlp")
_BERT = ("attention.output.dense", "output.dense")
#: model_type -> (attention block output, feed-forward block output), module paths inside one block.
BLOCK_OUTPUTS = {
    "llama": _DECODER, "mistral": _DECODER, "qwen2": _DECODER, "qwen3": _DECODER, "gemma": _DECODER,
    "gemma2": _DECODER, "phi3": _DECODER, "olmo": _DECODER, "olmo2": _DECODER, "starcoder2": _DECODER,
    "gpt2": ("attn", "mlp"),
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT,
}
#: Which blocks each placement puts an adapter after.
PLACEMENT_KINDS = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",)}


# ================================================================== config
@dataclass
class BottleneckConfig:
    """Bottleneck adapter hyper-parameters (the JSON keys of ``adapter_config.json``).

    placement: "houlsby" | "pfeiffer". bottleneck: r; or reduction_factor: r = d_model // factor (one of
    the two; neither: r = 64). activation: relu | gelu | gelu_tanh | silu (aliases accepted). scaling: a
    float s or "learned". init: houlsby | kaiming | random (``nn.adapter``). layers_to_transform: block
    indices (int or list; None: every block). attn_modules / ffn_modules: paths inside one block that
    override :data:`BLOCK_OUTPUTS` (needed for model types not in it).
    """

    placement: str = "houlsby"
    bottleneck: Optional[int] = None
    reduction_factor: Optional[float] = None
    activation: str = "relu"
    scaling: Union[float, str] = 1.0
    init: str = "houlsby"
    layers_to_transform: Optional[Union[int, list[int]]] = None
    attn_modules: Optional[str] = None
    ffn_modules: Optional[str] = None

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ValueError("give bottleneck or reduction_factor, not both")
        if self.bottleneck is not None and (isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int)
                                            or self.bottleneck < 1):
            raise ValueError(f"bottleneck must be a positive integer, got {self.bottleneck!r}")
        if self.reduction_factor is not None and (isinstance(self.reduction_factor, bool)
                                                  or not isinstance(self.reduction_factor, (int, float))
                                                  or not self.reduction_factor > 0):
            raise ValueError(f"reduction_factor must be a positive number, got {self.reduction_factor!r}")
        self.activation = ref.canonical_activation(self.activation)
        if not (self.scaling == "learned" or (isinstance(self.scaling, (int, float))
                                              and not isinstance(self.scaling, bool))):
            raise ValueError(f"scaling must be a number or 'learned', got {self.scaling!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        ltt = self.layers_to_transform
        items = [ltt] if isinstance(ltt, int) else (ltt or [])
        if ltt is not None and (not isinstance(ltt, (int, list)) or
                                any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items)):
            raise ValueError(f"layers_to_transform must be a non-negative int or a list of them, got {ltt!r}")
        for name in ("attn_modules", "ffn_modules"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip(".")):
                raise ValueError(f"{name} must be a module path inside one block (e.g. 'self_attn'), got {v!r}")

    def bottleneck_for(self, d_model: int) -> int:
        """r for an adapter on a d_model-wide output."""
        if self.bottleneck is not None:
            return self.bottleneck
        if self.reduction_factor is not None:
            return max(1, int(d_model // self.reduction_factor))
        return 64

    def layer_indices(self, n_layers: int) -> list[int]:
        if self.layers_to_transform is None:
            return list(range(n_layers))
        idx = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
        bad = [i for i in idx if i >= n_layers]
        if bad:
            raise ValueError(f"layers_to_transform {bad} out of range: the model has {n_layers} layers")
        return sorted(set(idx))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BottleneckConfig":
        """From a config dict (extra keys such as ``peft_type`` and the file's metadata are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ================================================================== placement
@dataclass(frozen=True)
class HookPoint:
    """One adapter position: the hooked module's full name, which block output it is, and its width."""

    name: str
    kind: str  # "attn" | "ffn"
    d_model: int


def _model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def _output_width(module: nn.Module, model: nn.Module, name: str) -> int:
    """Width of ``module``'s output: a linear layer's out_features (GPT-2 Conv1D: nf), else the hidden size."""
    for attr in ("out_features", "nf"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    cfg = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int):
            return v
    raise ValueError(f"cannot tell the output width of {name} ({type(module).__name__}): it has no "
                     f"out_features and the model config no hidden_size")


def _children_hint(block: nn.Module) -> str:
    names = [n for n, _ in block.named_modules() if n and n.count(".") < 2]
    return ", ".join(names[:24]) + (", ..." if len(names) > 24 else "")


def resolve_hook_points(model: nn.Module, cfg: BottleneckConfig) -> list[HookPoint]:
    """Every module ``cfg`` places an adapter on, in block order (attention before feed-forward).

    Raises ValueError, naming what is missing, when the model type has no placement table and no
    override is given, when a path names no module in some block, or for out-of-range layer indices.
    """
    stack_name, layers = find_layer_stack(model)
    mtype = _model_type(model)
    table = BLOCK_OUTPUTS.get(mtype, (None, None))
    rel = {"attn": cfg.attn_modules or table[0], "ffn": cfg.ffn_modules or table[1]}
    kinds = PLACEMENT_KINDS[cfg.placement]
    for kind in kinds:
        if rel[kind] is None:
            which = "attn_modules" if kind == "attn" else "ffn_modules"
            block = "attention" if kind == "attn" else "feed-forward"
            raise ValueError(f"placement {cfg.placement!r} needs the {block} block output, but model_type "
                             f"{mtype!r} has no entry in BLOCK_OUTPUTS (known: {sorted(BLOCK_OUTPUTS)}); pass "
                             f"{which}= a module path inside one block of {stack_name} (its submodules: "
                             f"{_children_hint(layers[0])})")
    points = []
    for i in cfg.layer_indices(len(layers)):
        block = layers[i]
        for kind in kinds:
            try:
                module = block.get_submodule(rel[kind])
            except AttributeError:
                raise ValueError(f"placement {cfg.placement!r}: {rel[kind]!r} names no module in block {i} "
                                 f"({stack_name}.{i}, {type(block).__name__}); its submodules: "
                                 f"{_children_hint(block)}") from None
            if isinstance(module, AdapterSlot) or isinstance(module, Adapter):
                raise ValueError(f"{rel[kind]!r} in block {i} is an adapter itself, not a block output")
            full = f"{stack_name}.{i}.{rel[kind]}"
            points.append(HookPoint(full, kind, _output_width(module, model, full)))
    return points


# ================================================================== model-level state
def get_configs(model: nn.Module) -> dict[str, BottleneckConfig]:
    """name -> BottleneckConfig of the adapters on ``model``."""
    return dict(getattr(model, CONFIG_ATTR, None) or {})


def hook_points(model: nn.Module, adapter_name: str) -> list[HookPoint]:
    return list((getattr(model, POINTS_ATTR, None) or {})[adapter_name])


def active_adapters(model: nn.Module) -> list[str]:
    return list(getattr(model, ACTIVE_ATTR, None) or [])


def _slots(model: nn.Module) -> Iterator[tuple[str, AdapterSlot]]:
    for name, m in model.named_modules():
        if isinstance(m, AdapterSlot):
            yield name, m


def _check_new_name(model: nn.Module, adapter_name: str) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {adapter_name!r}")
    if adapter_name in get_configs(model):
        raise ValueError(f"the model already has a bottleneck adapter named {adapter_name!r}")


def _param_device(module: nn.Module, model: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(model.parameters()):
        return t.device
    return torch.device("cpu")


def _build(model: nn.Module, cfg: BottleneckConfig, points: list[HookPoint]) -> list[Adapter]:
    """New float32 adapters for ``points`` (not attached yet), on each hooked module's device."""
    return [Adapter(p.d_model, cfg.bottleneck_for(p.d_model), cfg.activation, cfg.scaling, cfg.init,
                    device=_param_device(model.get_submodule(p.name), model)) for p in points]


def _attach(model: nn.Module, cfg: BottleneckConfig, adapter_name: str, points: list[HookPoint],
            adapters: list[Adapter]) -> None:
    """Put built adapters in place (cannot fail once the checks passed) and record the config."""
    for p, ad in zip(points, adapters):
        module = model.get_submodule(p.name)
        slot = getattr(module, SLOT_ATTR, None)
        if slot is None:
            slot = AdapterSlot()
            setattr(module, SLOT_ATTR, slot)
            slot.attach(module)
        slot[adapter_name] = ad
    setattr(model, CONFIG_ATTR, {**get_configs(model), adapter_name: cfg})
    setattr(model, POINTS_ATTR, {**(getattr(model, POINTS_ATTR, None) or {}), adapter_name: list(points)})


def _adapter_modules(model: nn.Module, adapter_name: str) -> list[tuple[str, Adapter]]:
    """(hooked module name, Adapter) of one adapter, in hook-point order."""
    return [(p.name, getattr(model.get_submodule(p.name), SLOT_ATTR)[adapter_name])
            for p in hook_points(model, adapter_name)]


# ================================================================== public API
def add_adapter(model: nn.Module, cfg: BottleneckConfig, adapter_name: str) -> nn.Module:
    """Place another adapter without activating it (its parameters stay frozen until :func:`set_adapter`)."""
    if not isinstance(cfg, BottleneckConfig):
        raise TypeError(f"cfg must be a BottleneckConfig, got {type(cfg).__name__}")
    _check_new_name(model, adapter_name)
    points = resolve_hook_points(model, cfg)  # raises before anything changes
    adapters = _build(model, cfg, points)
    for ad in adapters:
        ad.requires_grad_(False)
    _attach(model, cfg, adapter_name, points, adapters)
    return model


def apply(model: nn.Module, cfg: BottleneckConfig, adapter_name: str = "default") -> nn.Module:
    """Place adapter ``adapter_name`` per ``cfg``, freeze every base parameter and make it the only active,
    trainable adapter. Raises ValueError/TypeError — with the model unchanged — on a bad config or a
    placement that names no module. Returns ``model``."""
    add_adapter(model, cfg, adapter_name)
    adapter_params = {id(p) for _, slot in _slots(model) for p in slot.parameters()}
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)
    set_adapter(model, adapter_name)
    return model


def set_adapter(model: nn.Module, adapter_name: Union[str, list[str]]) -> None:
    """Activate one adapter or several (applied in the given order, each on the previous output); the
    active adapters' parameters train, every other adapter's are frozen."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    known = get_configs(model)
    for n in names:
        if n not in known:
            raise KeyError(f"unknown bottleneck adapter {n!r}; the model has {sorted(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names repeat in {names}")
    for _, slot in _slots(model):
        slot.active = [n for n in names if n in slot]
        for n, ad in slot.items():
            ad.requires_grad_(n in names)
    setattr(model, ACTIVE_ATTR, names)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter everywhere; a module left without adapters loses its hook and slot."""
    configs = get_configs(model)
    if adapter_name not in configs:
        raise KeyError(f"unknown bottleneck adapter {adapter_name!r}; the model has {sorted(configs)}")
    for p in hook_points(model, adapter_name):
        module = model.get_submodule(p.name)
        slot = getattr(module, SLOT_ATTR)
        del slot[adapter_name]
        slot.active = [n for n in slot.active if n != adapter_name]
        if not len(slot):
            slot.detach()
            delattr(module, SLOT_ATTR)
    configs.pop(adapter_name)
    setattr(model, CONFIG_ATTR, configs)
    points = dict(getattr(model, POINTS_ATTR))
    points.pop(adapter_name)
    setattr(model, POINTS_ATTR, points)
    setattr(model, ACTIVE_ATTR, [n for n in active_adapters(model) if n != adapter_name])


def disable_adapters(model: nn.Module):
    """Context manager: every bottleneck adapter is bypassed (the model computes as its base)."""
    return disabled(model, [s for _, s in _slots(model)])


def adapter_parameter_count(model: nn.Module, adapter_name: str) -> int:
    """Parameters of one adapter (all its placed modules)."""
    return sum(p.numel() for _, ad in _adapter_modules(model, adapter_name) for p in ad.parameters())


def expected_parameter_count(cfg: BottleneckConfig, points: list[HookPoint]) -> int:
    """Σ over hook points of 2·d·r + r + d (+1 for a learned scaling): the formula apply must match."""
    learned = int(cfg.scaling == "learned")
    return sum(2 * p.d_model * cfg.bottleneck_for(p.d_model) + cfg.bottleneck_for(p.d_model) + p.d_model + learned
               for p in points)


# ================================================================== save / load
_PARAM_NAMES = ("down.weight", "down.bias", "up.weight", "up.bias")


def _tensor_keys(point: HookPoint, learned: bool) -> list[str]:
    return [f"{point.name}.adapter.{n}" for n in _PARAM_NAMES + (("scaling",) if learned else ())]


def bottleneck_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """``<hooked module>.adapter.{down,up}.{weight,bias}`` (+ ``.scaling`` when learned) -> tensor (detached)."""
    if adapter_name not in get_configs(model):
        raise KeyError(f"unknown bottleneck adapter {adapter_name!r}; the model has {sorted(get_configs(model))}")
    out = {}
    for name, ad in _adapter_modules(model, adapter_name):
        for pname, p in ad.named_parameters():
            out[f"{name}.adapter.{pname}"] = p.detach()
    return out


def save_bottleneck(model: nn.Module, directory, adapter_name: str = "default"):
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory`` (atomically).

    Config keys: ``peft_type`` ("BOTTLENECK"), ``format_version``, the :class:`BottleneckConfig` fields,
    ``hook_points`` (list of {name, kind, d_model, bottleneck}) and the base model's fingerprint
    (``peft_kernels_base_fingerprint``). Returns the directory's path.
    """
    tensors = bottleneck_state_dict(model, adapter_name)
    cfg = get_configs(model)[adapter_name]
    config = {"peft_type": PEFT_TYPE, "format_version": FORMAT_VERSION, **cfg.to_dict(),
              "hook_points": [{"name": p.name, "kind": p.kind, "d_model": p.d_model,
                               "bottleneck": cfg.bottleneck_for(p.d_model)} for p in hook_points(model, adapter_name)],
              mf.FINGERPRINT_KEY: mf.model_fingerprint(model)}
    return mf.write_method_files(directory, config, tensors)


def load_bottleneck(model: nn.Module, directory, adapter_name: str = "default", is_trainable: bool = False,
                    activate: bool = True) -> nn.Module:
    """Place the adapter saved in ``directory`` on ``model`` under ``adapter_name`` and load its tensors.

    Everything is checked before the model changes (a failed load leaves it exactly as it was): file
    format and ``peft_type``, the base model's fingerprint (a file for another model is refused), the
    config, that the placement resolves on this model to the recorded hook points, and every tensor's
    name and shape. The base is frozen; the adapter trains only with ``is_trainable``. ``activate``:
    make it the active adapter (default). Raises ``AdapterLoadError`` (a ValueError) otherwise.
    """
    config, tensors = mf.read_method_files(directory)
    mf.check_peft_type(config, PEFT_TYPE, directory)
    mf.check_fingerprint(config, model, directory)
    where = f"{directory}/{mf.CONFIG_NAME}"
    if config.get("format_version") != FORMAT_VERSION:
        raise mf.AdapterLoadError(f"{where}: format_version {config.get('format_version')!r} is not "
                                  f"{FORMAT_VERSION}, the one this version reads")
    try:
        cfg = BottleneckConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise mf.AdapterLoadError(f"{where}: invalid bottleneck config: {e}") from None
    try:
        _check_new_name(model, adapter_name)
        points = resolve_hook_points(model, cfg)
    except ValueError as e:
        raise mf.AdapterLoadError(f"cannot load {directory} into {type(model).__name__}: {e}") from None
    recorded = config.get("hook_points")
    mine = [{"name": p.name, "kind": p.kind, "d_model": p.d_model, "bottleneck": cfg.bottleneck_for(p.d_model)}
            for p in points]
    if recorded != mine:
        raise mf.AdapterLoadError(f"{where}: the adapter was placed on {recorded!r}, but on this model its "
                                  f"placement gives {mine!r}")
    learned = cfg.scaling == "learned"
    expected = {k for p in points for k in _tensor_keys(p, learned)}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise mf.AdapterLoadError(f"{directory}: tensors do not match the config: missing {missing[:8]}, "
                                  f"unexpected {unexpected[:8]}")
    adapters = _build(model, cfg, points)
    with torch.no_grad():
        for p, ad in zip(points, adapters):
            for pname, param in ad.named_parameters():
                t = tensors[f"{p.name}.adapter.{pname}"]
                if tuple(t.shape) != tuple(param.shape) or not t.is_floating_point():
                    raise mf.AdapterLoadError(f"{directory}: tensor {p.name}.adapter.{pname} is "
                                              f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)}, expected "
                                              f"a floating tensor of shape {tuple(param.shape)}")
                param.copy_(t)
    # Checks done: from here on nothing can fail.
    had_adapters = bool(get_configs(model))
    for ad in adapters:
        ad.requires_grad_(False)
    _attach(model, cfg, adapter_name, points, adapters)
    if not had_adapters:
        adapter_params = {id(q) for _, slot in _slots(model) for q in slot.parameters()}
        for q in model.parameters():
            if id(q) not in adapter_params:
                q.requires_grad_(False)
    if activate:
        set_adapter(model, adapter_name)
    for ad in adapters:
        ad.requires_grad_(is_trainable)
    return model
