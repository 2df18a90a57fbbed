"""``AdapterPool``: N preallocated LoRA slots per layer, hot-loaded at run time, served in mixed batches.

    pool = AdapterPool(model, slots=64, max_rank=16)          # every linear layer but the head gets slots
    pool.load("sql", "adapters/sql")                          # a PEFT-format directory (safetensors + JSON)
    pool.load("chat", "adapters/chat", pin=True)               # pinned: never evicted
    with mixed_adapters(model, ["sql", None, "chat"]):          # one name per sequence; None / "__base__": none
        logits = model(input_ids).logits
    out = generate(model, input_ids, adapter_names=[...], max_new_tokens=32)
    model(input_ids, adapter_names=[...])                     # PEFT's spelling (a forward pre-hook)
    pool.unload("sql")

Fixed shapes: each targeted layer becomes a :class:`~peft_kernels.nn.multi_lora.MultiLoraLinear` whose slot
buffers (A [S, R, K], B [S, N, R], scale [S], rank [S]) are allocated once. Loading copies an adapter into its
slot in place (zero-padded to R), unloading zeroes the slot's rank and scale, switching adapters changes only
the values of the per-batch slot-index tensor: a compiled model sees the same tensors with the same shapes
and does not recompile (tested by counting compiles).

Eviction: ``load`` into a full pool evicts the least recently used adapter that is not pinned (use = named in
a batch, or loaded); ``evict=False`` raises :class:`PoolFullError` instead, as does a pool whose every slot is
pinned. :attr:`AdapterPool.last_evicted` names what the last load evicted.

Adapters served: plain LoRA and rsLoRA with per-module ranks (``rank_pattern``/``alpha_pattern``) up to
``max_rank``, covering any subset of the pool's layers. Refused with an error naming the problem: DoRA,
``lora_bias``, trained biases or ``modules_to_save`` (they change more than the low-rank term), a module
without slots, a rank above ``max_rank``, a shape that does not fit, NaN/Inf values. Everything is checked
before any slot is written, and a failed load leaves the pool as it was.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from collections import OrderedDict
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..methods._common import replace_module
from ..methods.lora import _OPAQUE
from ..methods.targets import find_linear_targets, pattern_value
from ..nn.lora import LoraLinear
from ..nn.multi_lora import MultiLoraLinear

#: The name that selects no adapter in a batch (as does None).
BASE = "__base__"
#: Where the pool is attached on the model (so ``mixed_adapters(model, ...)`` finds it).
POOL_ATTR = "peft_kernels_adapter_pool"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight)$")


class PoolFullError(RuntimeError):
    """Every slot is taken and nothing may be evicted (``evict=False``, or every adapter is pinned)."""


class AdapterPool:
    """Preallocated adapter slots over ``model`` (changed in place: targeted layers become MultiLoraLinear).

    Args:
        model: a transformers model (or any module) with nn.Linear / Conv1D / Linear4bit layers and no
            LoraLinear layers (load adapters into the pool instead).
        slots: adapters resident at once (N). max_rank: the slot size R; adapters of lower rank are padded.
        target_modules: which layers get slots (PEFT's matching; default every linear layer but the head).
        dtype: slot dtype (default: each base's compute dtype, else the dtype its weight is stored in or was
            quantized from). Use the dtype the model runs in: the GPU kernels take the slots in the compute
            dtype (another dtype is cast on every call).
    """

    def __init__(self, model: nn.Module, slots: int, max_rank: int, *,
                 target_modules: Union[str, Sequence[str]] = "all-linear", dtype: Optional[torch.dtype] = None):
        if getattr(model, POOL_ATTR, None) is not None:
            raise ValueError("this model already has an AdapterPool (peft_kernels_adapter_pool)")
        if any(isinstance(m, LoraLinear) for m in model.modules()):
            raise ValueError("the model has LoraLinear layers: build the pool over the base model and load the "
                             "adapters into it (pool.load(name, directory))")
        for what, v in (("slots", slots), ("max_rank", max_rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{what} must be a positive integer, got {v!r}")
        names = find_linear_targets(model, target_modules, method="AdapterPool", wrappers=(), opaque=_OPAQUE)
        if not names:
            raise ValueError(f"target_modules={target_modules!r} matches no linear layer of this model")
        self.model = model
        self.num_slots, self.max_rank = slots, max_rank
        self.layers: dict[str, MultiLoraLinear] = {}
        for name in names:
            layer = MultiLoraLinear(model.get_submodule(name), slots, max_rank, dtype=dtype)
            replace_module(model, name, layer)
            self.layers[name] = layer
        self._slot_of: "OrderedDict[str, int]" = OrderedDict()  # LRU order: least recently used first
        self._pinned: set[str] = set()
        self._info: dict[str, dict] = {}
        self.last_evicted: Optional[str] = None
        model.__dict__[POOL_ATTR] = self  # a plain attribute (not a submodule, not in the state dict)
        self._hook = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        self._post = model.register_forward_hook(self._post_hook, with_kwargs=True)
        self._hook_set = False

    # ------------------------------------------------------------------ state
    @property
    def loaded(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._slot_of)

    @property
    def slot_bytes(self) -> int:
        """Bytes of every layer's slot buffers: Σ S·R·(K + N)·itemsize + 8·S (scale and rank)."""
        return sum(t.numel() * t.element_size() for layer in self.layers.values()
                   for t in (layer.lora_A, layer.lora_B, layer.scaling, layer.ranks))

    def __contains__(self, name: str) -> bool:
        return name in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def slot_of(self, name: str) -> int:
        self._check_known(name)
        return self._slot_of[name]

    def info(self, name: str) -> dict:
        """``{"slot", "r", "lora_alpha", "use_rslora", "modules", "pinned"}`` of a resident adapter."""
        self._check_known(name)
        return {**self._info[name], "slot": self._slot_of[name], "pinned": name in self._pinned}

    def pin(self, name: str) -> None:
        self._check_known(name)
        self._pinned.add(name)

    def unpin(self, name: str) -> None:
        self._check_known(name)
        self._pinned.discard(name)

    def _check_known(self, name) -> None:
        if name not in self._slot_of:
            raise KeyError(f"adapter {name!r} is not loaded in this pool; loaded: {self.loaded}")

    # ------------------------------------------------------------------ load / unload
    def load(self, name: str, source: Union[str, os.PathLike, tuple], *, pin: bool = False, evict: bool = True,
             replace: bool = False) -> int:
        """Copy adapter ``name`` into a slot; returns the slot.

        ``source``: a PEFT-format adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``;
        pickle files are refused), or ``(config, tensors)``: a PEFT config dict (or ``LoraConfig``) and PEFT
        keys -> tensors (``base_model.model.<module>.lora_A.weight`` [r, K], ``...lora_B.weight`` [N, r]; the
        prefix is optional). ``replace=True`` overwrites a resident adapter of that name in its slot.
        A full pool evicts its least recently used unpinned adapter (``evict=False``: PoolFullError).
        """
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"adapter name must be a non-empty string other than {BASE!r}, got {name!r}")
        if name in self._slot_of and not replace:
            raise ValueError(f"adapter {name!r} is already loaded (slot {self._slot_of[name]}); unload it first or "
                             f"pass replace=True")
        plan, info = self._plan(source)
        return self._write(name, plan, info, pin=pin, evict=evict)

    def _write(self, name: str, plan: dict, info: dict, *, pin: bool, evict: bool) -> int:
        """Copy a checked plan ({layer: (A, B, scale)}) into ``name``'s slot (a free or evicted one)."""
        # Choose the slot last: nothing is evicted for an adapter that fails its checks.
        if name in self._slot_of:
            slot = self._slot_of[name]
        else:
            slot = self._free_slot(evict)
        for lname, layer in self.layers.items():
            a_b = plan.get(lname)
            layer.write_slot(slot, *(a_b if a_b is not None else (None, None, 0.0)))
        self._slot_of[name] = slot
        self._slot_of.move_to_end(name)
        self._info[name] = info
        if pin:
            self._pinned.add(name)
        return slot

    @classmethod
    def from_lora_model(cls, model: nn.Module, slots: Optional[int] = None, max_rank: Optional[int] = None, *,
                        dtype: Optional[torch.dtype] = None) -> "AdapterPool":
        """A pool holding the adapters a model already has in its ``LoraLinear`` layers (``io.load_adapter``,
        ``methods.lora``, ``io.from_peft_model``): each LoraLinear becomes its base plus slots, every adapter is
        copied into a slot under its own name. ``slots`` defaults to the number of adapters, ``max_rank`` to
        their largest rank. Merged, DoRA and ``lora_bias`` adapters are refused (before anything changes)."""
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]
        if not layers:
            raise ValueError("the model has no LoraLinear layers; build AdapterPool(model, ...) and load adapters")
        names: list[str] = []
        for lname, m in layers:
            if m.merged_adapters:
                raise ValueError(f"layer {lname!r} has merged adapters {m.merged_adapters}; unmerge them first")
            for a in m.lora_A:
                if m.use_dora[a] or m.lora_bias[a]:
                    raise ValueError(f"adapter {a!r} at {lname!r} uses DoRA or lora_bias: the pool serves the "
                                     f"low-rank term only")
                if a not in names:
                    names.append(a)
        ranks = [m.r[a] for _, m in layers for a in m.lora_A]
        max_rank = max(ranks) if max_rank is None else max_rank
        slots = len(names) if slots is None else slots
        if len(names) > slots:
            raise PoolFullError(f"the model has {len(names)} adapters ({names}) for {slots} slots")
        if max(ranks) > max_rank:
            raise ValueError(f"the model's adapters have ranks up to {max(ranks)}, above max_rank={max_rank}")
        plans = {a: {} for a in names}
        for lname, m in layers:
            for a in m.lora_A:
                plans[a][lname] = (m.lora_A[a].weight.detach(), m.lora_B[a].weight.detach(), float(m.scaling[a]))
        for lname, m in layers:
            replace_module(model, lname, m.base_layer)
        from ..methods.lora import CONFIG_ATTR
        model.__dict__.pop(CONFIG_ATTR, None)  # the adapters now live in the pool
        pool = cls(model, slots, max_rank, target_modules=[n for n, _ in layers], dtype=dtype)
        for a in names:
            pool._write(a, plans[a], {"r": max(pl[0].shape[0] for pl in plans[a].values()), "lora_alpha": None,
                                      "use_rslora": None, "modules": sorted(plans[a])}, pin=False, evict=False)
        return pool

    def unload(self, name: str) -> int:
        """Free ``name``'s slot (its rank and scale become 0 in every layer); returns the slot."""
        self._check_known(name)
        slot = self._slot_of.pop(name)
        self._pinned.discard(name)
        self._info.pop(name, None)
        for layer in self.layers.values():
            layer.write_slot(slot, None, None, 0.0)
        return slot

    def _free_slot(self, evict: bool) -> int:
        used = set(self._slot_of.values())
        free = [s for s in range(self.num_slots) if s not in used]
        self.last_evicted = None
        if free:
            return free[0]
        if not evict:
            raise PoolFullError(f"the pool's {self.num_slots} slots are all taken ({self.loaded}) and evict=False: "
                                f"unload an adapter first")
        victim = next((n for n in self._slot_of if n not in self._pinned), None)
        if victim is None:
            raise PoolFullError(f"the pool's {self.num_slots} slots hold pinned adapters only ({self.loaded}): "
                                f"unpin or unload one first")
        slot = self.unload(victim)
        self.last_evicted = victim
        return slot

    def _plan(self, source) -> tuple[dict, dict]:
        """{layer name: (A [r, K], B [N, r], scale)} for the source, every check done; changes nothing."""
        from ..io.method_files import read_method_files
        from ..io.peft_format import _parse_config
        from ..methods.lora import LoraConfig

        where = "adapter"
        if isinstance(source, (str, os.PathLike)):
            where = str(source)
            config, tensors = read_method_files(source)
            cfg = _parse_config(config, os.path.join(where, "adapter_config.json"))
        elif isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], Mapping):
            config, tensors = source
            cfg = config if isinstance(config, LoraConfig) else LoraConfig.from_peft_dict(dict(config))
        else:
            raise TypeError(f"source must be an adapter directory or a (config, tensors) pair, got "
                            f"{type(source).__name__}")
        for flag, what in ((cfg.use_dora, "DoRA (use_dora)"), (cfg.lora_bias, "lora_bias"),
                           (cfg.bias != "none", f"bias={cfg.bias!r}"), (bool(cfg.modules_to_save), "modules_to_save")):
            if flag:
                raise ValueError(f"{where}: {what} adapters cannot be served from the pool (only the low-rank "
                                 f"term x Aᵀ Bᵀ is); merge or load them with peft_kernels.io.load_adapter")
        per_mod: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            m = _KEY.match(key)
            if m is None:
                raise ValueError(f"{where}: tensor {key!r} is not a LoRA lora_A/lora_B weight the pool can serve")
            per_mod.setdefault(m["mod"], {})[m["kind"]] = t
        if not per_mod:
            raise ValueError(f"{where} holds no LoRA tensors")
        plan = {}
        for mod, got in sorted(per_mod.items()):
            layer = self.layers.get(mod)
            if layer is None:
                raise ValueError(f"{where}: module {mod!r} has no slots in this pool (pool layers are named like "
                                 f"{list(self.layers)[:3]}); build the pool with target_modules covering it")
            if set(got) != {"lora_A.weight", "lora_B.weight"}:
                raise ValueError(f"{where}: module {mod!r} needs both lora_A.weight and lora_B.weight, got "
                                 f"{sorted(got)}")
            a, b = got["lora_A.weight"], got["lora_B.weight"]
            r = pattern_value(cfg.rank_pattern, mod, cfg.r)
            alpha = pattern_value(cfg.alpha_pattern, mod, cfg.lora_alpha)
            if r > self.max_rank:
                raise ValueError(f"{where}: module {mod!r} has rank r={r}, above the pool's slot size "
                                 f"max_rank={self.max_rank}; build the pool with max_rank >= {r}")
            n, k = layer.out_features, layer.in_features
            if tuple(a.shape) != (r, k) or tuple(b.shape) != (n, r):
                raise ValueError(f"{where}: module {mod!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                                 f"this layer is [{n}, {k}] and the config says r={r}, so they must be ({r}, {k}) "
                                 f"and ({n}, {r})")
            for what, t in (("lora_A", a), ("lora_B", b)):
                if not t.is_floating_point() or not torch.isfinite(t).all():
                    raise ValueError(f"{where}: {mod}.{what} must hold finite float values")
            scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
            plan[mod] = (a, b, scale)
        info = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.use_rslora, "modules": sorted(plan)}
        return plan, info

    # ------------------------------------------------------------------ batches
    def index(self, adapter_names: Sequence[Optional[str]], device: Optional[torch.device] = None) -> torch.Tensor:
        """int32 slot index per name (-1 for None / ``"__base__"``) on the model's device; marks them used."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(f"adapter_names must be a list of names (one per sequence), got {adapter_names!r}")
        unknown = sorted({n for n in adapter_names if n is not None and n != BASE and n not in self._slot_of},
                         key=str)
        if unknown:
            raise KeyError(f"adapter(s) {unknown} are not loaded in this pool; loaded: {self.loaded} (None or "
                           f"{BASE!r} selects no adapter)")
        idx = [-1 if n is None or n == BASE else self._slot_of[n] for n in adapter_names]
        for n in dict.fromkeys(n for n in adapter_names if n is not None and n != BASE):
            self._slot_of.move_to_end(n)
        if device is None:
            device = next(iter(self.layers.values())).lora_A.device
        return torch.tensor(idx, dtype=torch.int32, device=device)

    def set_batch(self, adapter_names: Optional[Sequence[Optional[str]]]) -> None:
        """Rows of the next forwards use these adapters (None: every layer is its base)."""
        idx = None if adapter_names is None else self.index(adapter_names)
        for layer in self.layers.values():
            layer.slot_index = idx

    def _pre_hook(self, module, args, kwargs):
        if "adapter_names" not in kwargs:
            return None
        names = kwargs.pop("adapter_names")
        self.set_batch(names)
        self._hook_set = True
        return args, kwargs

    def _post_hook(self, module, args, kwargs, output):
        if self._hook_set:
            self._hook_set = False
            self.set_batch(None)
        return None

    def remove(self) -> nn.Module:
        """Put the base layers back (the slots are dropped); returns the model."""
        for name, layer in self.layers.items():
            replace_module(self.model, name, layer.base_layer)
        self._hook.remove()
        self._post.remove()
        self.model.__dict__.pop(POOL_ATTR, None)
        self.layers = {}
        self._slot_of.clear()
        return self.model


def get_pool(model: nn.Module) -> AdapterPool:
    pool = getattr(model, POOL_ATTR, None)
    if pool is None:
        raise ValueError("this model has no AdapterPool: create one with AdapterPool(model, slots=..., max_rank=...)")
    return pool


@contextlib.contextmanager
def mixed_adapters(model: nn.Module, adapter_names: Sequence[Optional[str]]) -> Iterator[AdapterPool]:
    """Within the block, sequence i of every forward uses adapter ``adapter_names[i]`` (None / "__base__": none).

    The names are turned into one int32 slot-index tensor before the block, so a ``torch.compile``'d model
    called inside it sees a tensor of the same shape whatever the names are (no recompile)."""
    pool = get_pool(model)
    prev = [layer.slot_index for layer in pool.layers.values()]
    pool.set_batch(adapter_names)
    try:
        yield pool
    finally:
        for layer, p in zip(pool.layers.values(), prev):
            layer.slot_index = p


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, adapter_names: Sequence[Optional[str]], **kwargs):
    """``model.generate(input_ids, **kwargs)`` with sequence i decoded under ``adapter_names[i]``.

    One name per row of ``input_ids``; strategies that change the batch size (beam search,
    ``num_return_sequences > 1``) are refused by the layers with an error naming the sizes."""
    if len(adapter_names) != input_ids.shape[0]:
        raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {input_ids.shape[0]} sequences")
    with mixed_adapters(model, adapter_names):
        return model.generate(input_ids, **kwargs)
