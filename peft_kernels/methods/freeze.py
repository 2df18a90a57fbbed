"""Layer freezing: train a few transformer blocks, keep the rest frozen (and 4-bit), and LISA.

    cfg = FreezeConfig(last_k=2, train_head=True)       # or layers=[0, -1], or layer_patterns=["mlp"]
    report = apply(model, cfg)                          # frozen blocks' linears -> Linear4bit (NF4)
    print(report)                                       # trainable params, layers, bytes before/after

    lisa = LisaSchedule(model, n_active=2, every=20, seed=0)   # LISA over dense blocks
    opt = torch.optim.AdamW(lisa.parameters(), lr=1e-4)        # built once over every candidate
    for batch in data:
        model(**batch).loss.backward(); opt.step(); opt.zero_grad()
        lisa.step(opt)                                  # re-samples every 20 steps, drops stale state

    save_trained_layers(model, "out")                   # the trained parameters only
    load_trained_layers(model2, "out")                  # into a model prepared the same way

Selecting what trains (exactly one of the three selectors):

* ``layers``: block indices of the model's layer stack (``model.layers``, ``transformer.h``...,
  found by :func:`~peft_kernels.methods._common.find_layer_stack`). Negative indices count from the
  end, as in Python (-1 is the last block). An index outside ``[-n, n)`` or one block named twice
  (``1`` and ``-1`` of a 2-block model) is a ValueError.
* ``last_k``: the last k blocks (1 <= k <= n).
* ``layer_patterns``: module-name patterns matched against the full names of the modules *inside*
  the layer stack; every parameter under a matching module trains. A pattern containing one of
  ``\\ ^ $ * + ? { } [ ] | ( )`` is a regular expression that must ``re.fullmatch`` the full name
  (``r"model\\.layers\\.[0-3]\\.mlp"``); any other pattern is a dotted name whose components must
  equal a contiguous run of the name's components (``"mlp"``, ``"self_attn.q_proj"``,
  ``"layers.1"``; ``"proj"`` matches nothing) -- the rule ``quantize_model`` uses. A pattern that
  matches no module in the stack, or only modules without parameters, is a ValueError.

``train_embeddings`` (``get_input_embeddings()`` and every other ``nn.Embedding`` outside the stack:
position and token-type embeddings), ``train_head`` (``get_output_embeddings()``; with tied weights
this trains the input embedding too, it is the same tensor) and ``train_norms`` (the norm modules
next to the stack: ``model.norm``, ``transformer.ln_f``) add those modules.

With ``quantize_frozen`` the ``nn.Linear``/``Conv1D`` layers of the stack whose weight does not train
become :class:`~peft_kernels.nn.linear4bit.Linear4bit`; trained layers, embeddings, the head (frozen
or not), norms, tied weights and linears outside the stack stay dense. A trained block must be dense:
a chosen block that already holds ``Linear4bit`` layers is a ValueError.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .._checks import FLOAT_DTYPES
from ..io.method_files import (FINGERPRINT_KEY, AdapterLoadError, check_fingerprint, check_peft_type,
                               model_fingerprint, read_method_files, write_method_files)
from ..nn.linear4bit import Linear4bit
from ..quant.codes import QUANT_TYPES
from ..quant.model import QuantizationReport, is_quantizable_linear, name_matches, quantize_model, tensor_bytes
from ..quant.state import check_blocksize, dtype_name, parse_dtype
from ._common import find_layer_stack, freeze, layer_index, trainable_parameters

#: ``peft_type`` of the files :func:`save_trained_layers` writes.
PEFT_TYPE = "LAYER_FREEZE"
FORMAT_VERSION = 1
#: Attribute of the model recording what ``apply`` / ``LisaSchedule`` made trainable (read by the save).
RECORD_ATTR = "peft_kernels_layer_freeze"
#: Names accepted in ``LisaSchedule(always_trainable=...)``: the parts ``FreezeConfig``'s flags add.
ALWAYS_TRAINABLE_KEYS = ("embeddings", "head", "norms")
_REGEX_CHARS = frozenset("\\^$*+?{}[]|()")


# ====================================================================== config
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class FreezeConfig:
    """Which blocks of a transformer train; the rest is frozen (and 4-bit with ``quantize_frozen``).

    Exactly one of ``layers`` (indices, negative counted from the end), ``layer_patterns`` (module-name
    patterns inside the layer stack; see the module doc for the rule) and ``last_k`` must be given.
    ``quant_type`` ('nf4' | 'fp4'), ``blocksize``, ``double_quant`` and ``compute_dtype`` are the
    settings of the frozen linears' :class:`Linear4bit`.
    """

    layers: Optional[list[int]] = None
    layer_patterns: Optional[list[str]] = None
    last_k: Optional[int] = None
    train_embeddings: bool = False
    train_head: bool = False
    train_norms: bool = False
    quantize_frozen: bool = True
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        given = [n for n in ("layers", "layer_patterns", "last_k") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("FreezeConfig needs exactly one of layers, layer_patterns, last_k; got "
                             + (", ".join(given) if given else "none"))
        if self.layers is not None:
            if _is_int(self.layers):
                self.layers = [self.layers]
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Iterable):
                raise TypeError(f"layers must be a list of ints, got {self.layers!r}")
            self.layers = list(self.layers)
            if not self.layers:
                raise ValueError("layers is empty: name at least one block to train")
            bad = [v for v in self.layers if not _is_int(v)]
            if bad:
                raise TypeError(f"layers must hold ints (block indices), got {bad}")
        if self.layer_patterns is not None:
            if isinstance(self.layer_patterns, str):
                self.layer_patterns = [self.layer_patterns]
            if not isinstance(self.layer_patterns, Iterable):
                raise TypeError(f"layer_patterns must be a list of strings, got {self.layer_patterns!r}")
            self.layer_patterns = list(self.layer_patterns)
            if not self.layer_patterns:
                raise ValueError("layer_patterns is empty: give at least one module-name pattern")
            for p in self.layer_patterns:
                _check_pattern(p)
        if self.last_k is not None and (not _is_int(self.last_k) or self.last_k < 1):
            raise ValueError(f"last_k must be a positive int, got {self.last_k!r}")
        for f in ("train_embeddings", "train_head", "train_norms", "quantize_frozen", "double_quant"):
            if not isinstance(getattr(self, f), bool):
                raise TypeError(f"{f} must be a bool, got {getattr(self, f)!r}")
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        check_blocksize(self.blocksize)
        if isinstance(self.compute_dtype, str):
            self.compute_dtype = parse_dtype(self.compute_dtype)
        if self.compute_dtype is not None and self.compute_dtype not in FLOAT_DTYPES:
            raise ValueError(f"compute_dtype must be None or one of {FLOAT_DTYPES}, got {self.compute_dtype!r}")

    def to_dict(self) -> dict:
        """JSON-serialisable fields (``compute_dtype`` as its name, e.g. "bfloat16")."""
        return {"layers": self.layers, "layer_patterns": self.layer_patterns, "last_k": self.last_k,
                "train_embeddings": self.train_embeddings, "train_head": self.train_head,
                "train_norms": self.train_norms, "quantize_frozen": self.quantize_frozen,
                "quant_type": self.quant_type, "blocksize": self.blocksize, "double_quant": self.double_quant,
                "compute_dtype": None if self.compute_dtype is None else dtype_name(self.compute_dtype)}

    @classmethod
    def from_dict(cls, d: dict) -> "FreezeConfig":
        return cls(**d)


def _is_regex(pattern: str) -> bool:
    return any(c in _REGEX_CHARS for c in pattern)


def _check_pattern(p) -> None:
    if not isinstance(p, str) or not p:
        raise ValueError(f"layer_patterns must hold non-empty strings, got {p!r}")
    if _is_regex(p):
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"layer pattern {p!r} is not a valid regular expression: {e}") from None
    elif any(not c for c in p.split(".")):
        raise ValueError(f"layer pattern {p!r} has an empty name component (leading, trailing or double dot)")


def pattern_matches(name: str, pattern: str) -> bool:
    """True if module ``name`` matches ``pattern``: ``re.fullmatch`` for a regex, else whole components."""
    return re.fullmatch(pattern, name) is not None if _is_regex(pattern) else name_matches(name, pattern)


# ====================================================================== model parts
def _module_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for n, m in model.named_modules():
        names.setdefault(id(m), n)
    return names


def _inside(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "norm" in type(m).__name__.lower()


def _part_modules(model: nn.Module, stack_name: str, part: str) -> list[str]:
    """Full names of the modules ``part`` ("embeddings" | "head" | "norms") means for ``model``.

    Raises ValueError when the model has none (a flag that would silently train nothing).
    """
    names = _module_names(model)
    if part == "embeddings":
        found = []
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        if emb is not None and id(emb) in names:
            found.append(names[id(emb)])
        for n, m in model.named_modules():
            if isinstance(m, nn.Embedding) and not _inside(n, stack_name) and n not in found:
                found.append(n)
    elif part == "head":
        get = getattr(model, "get_output_embeddings", None)
        try:
            head = get() if callable(get) else None
        except (NotImplementedError, AttributeError):
            head = None
        found = [names[id(head)]] if head is not None and id(head) in names else []
    elif part == "norms":
        parent_name = stack_name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        prefix = parent_name + "." if parent_name else ""
        found = [prefix + n for n, m in parent.named_children() if _is_norm(m)]
    else:
        raise ValueError(f"unknown part {part!r}: expected one of {ALWAYS_TRAINABLE_KEYS}")
    if not found:
        what = {"embeddings": "no input embeddings (get_input_embeddings() and nn.Embedding modules)",
                "head": "no output head (get_output_embeddings() is None)",
                "norms": f"no norm module next to its layer stack {stack_name!r}"}[part]
        raise ValueError(f"{type(model).__name__} has {what}; cannot train its {part}")
    return found


def _resolve_indices(indices: Sequence[int], n: int, stack_name: str, what: str) -> list[int]:
    """Python-style indices into a stack of ``n`` blocks -> sorted non-negative indices."""
    out: dict[int, int] = {}
    bad = [i for i in indices if not -n <= i < n]
    if bad:
        raise ValueError(f"{what} {bad} do not exist: {stack_name} has {n} layers (valid indices "
                         f"0..{n - 1}, or -{n}..-1 from the end)")
    for i in indices:
        j = i % n
        if j in out:
            raise ValueError(f"{what} names layer {j} twice (as {out[j]} and {i})")
        out[j] = i
    return sorted(out)


def _quantized_modules(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{n}" if n else prefix for n, m in module.named_modules() if isinstance(m, Linear4bit)]


def _params_under(model: nn.Module, roots: Iterable[str]) -> dict[int, nn.Parameter]:
    out: dict[int, nn.Parameter] = {}
    for r in roots:
        for p in model.get_submodule(r).parameters():
            out[id(p)] = p
    return out


# ====================================================================== apply
@dataclass
class FreezeReport:
    """What :func:`apply` did. Parameter counts as PEFT's (a 4-bit weight counts its logical weights)."""

    stack_name: str
    num_layers: int
    trainable_layers: list[int]       # blocks holding at least one trainable parameter
    trainable_modules: list[str]      # the modules whose parameters train
    trainable_params: int
    total_params: int
    quantized: list[str]              # linears now Linear4bit
    bytes_before: int                 # parameters + buffers, shared tensors once
    bytes_after: int
    quantization: Optional[QuantizationReport] = None

    @property
    def frozen_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.trainable_layers]

    @property
    def bits_per_parameter_before(self) -> float:
        """Storage bits per (logical) model parameter before ``apply``."""
        return 8 * self.bytes_before / self.total_params

    @property
    def bits_per_parameter_after(self) -> float:
        return 8 * self.bytes_after / self.total_params

    def __str__(self) -> str:
        mib = 2 ** 20
        pct = 100 * self.trainable_params / self.total_params
        return "\n".join([
            f"trainable params: {self.trainable_params:,d} || all params: {self.total_params:,d} || "
            f"trainable%: {pct:.4f}",
            f"training layers {self.trainable_layers} of {self.num_layers} in {self.stack_name}; "
            f"{len(self.quantized)} frozen linears in 4-bit",
            f"model bytes {self.bytes_before:,} ({self.bytes_before / mib:.2f} MiB, "
            f"{self.bits_per_parameter_before:.2f} bits/param) -> {self.bytes_after:,} "
            f"({self.bytes_after / mib:.2f} MiB, {self.bits_per_parameter_after:.2f} bits/param)",
        ])


def _select(model: nn.Module, cfg: FreezeConfig, stack_name: str, stack: nn.ModuleList) -> list[str]:
    """Module names (roots) whose parameters train; validates the selection against the model."""
    n = len(stack)
    if cfg.layers is not None:
        roots = [f"{stack_name}.{i}" for i in _resolve_indices(cfg.layers, n, stack_name, "layers")]
    elif cfg.last_k is not None:
        if cfg.last_k > n:
            raise ValueError(f"last_k={cfg.last_k} but {stack_name} has only {n} layers")
        roots = [f"{stack_name}.{i}" for i in range(n - cfg.last_k, n)]
    else:
        inside = [name for name, _ in model.named_modules() if layer_index(name, stack_name) is not None]
        matched: list[str] = []
        for p in cfg.layer_patterns:
            hits = [name for name in inside if pattern_matches(name, p)]
            if not hits:
                outside = [name for name, _ in model.named_modules() if name and pattern_matches(name, p)]
                hint = (f"; it matches {outside[:3]} outside the stack (use train_embeddings/train_head/"
                        f"train_norms for those)" if outside else "")
                raise ValueError(f"layer pattern {p!r} matches no module inside {stack_name} "
                                 f"(names look like {inside[:2] + inside[-1:]}){hint}")
            if not _params_under(model, hits):
                raise ValueError(f"layer pattern {p!r} matches only modules without parameters: {hits[:4]}")
            matched += hits
        # Keep the outermost matches: a module under another match adds nothing.
        roots = sorted({m for m in matched if not any(o != m and _inside(m, o) for o in matched)})
    for r in roots:
        q = _quantized_modules(model.get_submodule(r), r)
        if q:
            raise ValueError(f"{r} is chosen to train but holds 4-bit layers ({q[:3]}): a trained layer must "
                             f"be dense; start from the unquantized model")
    return roots


def apply(model: nn.Module, cfg: FreezeConfig) -> FreezeReport:
    """Freeze ``model`` except the blocks ``cfg`` chooses (in place); quantize the frozen blocks' linears.

    Everything is validated before the model changes. Sets ``requires_grad`` on every parameter
    (True exactly for the chosen blocks / modules and the optional embeddings, head and norms),
    clears the ``.grad`` of frozen ones, and records the trained parameter names on the model
    (``model.peft_kernels_layer_freeze``) for :func:`save_trained_layers`. Returns a :class:`FreezeReport`.
    """
    if not isinstance(cfg, FreezeConfig):
        raise TypeError(f"cfg must be a FreezeConfig, got {type(cfg).__name__}")
    stack_name, stack = find_layer_stack(model)
    roots = _select(model, cfg, stack_name, stack)
    for flag, part in (("train_embeddings", "embeddings"), ("train_head", "head"), ("train_norms", "norms")):
        if getattr(cfg, flag):
            roots += [r for r in _part_modules(model, stack_name, part) if r not in roots]
    trainable = _params_under(model, roots)
    bad = [n for n, p in model.named_parameters() if id(p) in trainable and not p.is_floating_point()]
    if bad:
        raise ValueError(f"parameters chosen to train are not floating point (quantized?): {bad[:3]}")
    # Frozen linears of the stack: those whose weight does not train (a tied weight is left to
    # quantize_model, which keeps it dense).
    targets = [name for name, m in model.named_modules()
               if layer_index(name, stack_name) is not None and is_quantizable_linear(m)
               and id(m.weight) not in trainable] if cfg.quantize_frozen else []

    total_before = trainable_parameters(model)[1]
    bytes_before = tensor_bytes(model)
    freeze(model)
    for p in model.parameters():
        if id(p) in trainable:
            p.requires_grad_(True)
        else:
            p.grad = None
    qreport = None
    if targets:
        qreport = quantize_model(model, quant_type=cfg.quant_type, blocksize=cfg.blocksize,
                                 double_quant=cfg.double_quant, compute_dtype=cfg.compute_dtype,
                                 target_modules=targets)
    trained_names = [n for n, p in model.named_parameters() if p.requires_grad]
    setattr(model, RECORD_ATTR, {"trained": trained_names, "freeze_config": cfg.to_dict(), "lisa": None})
    t, total = trainable_parameters(model)
    assert total == total_before, "quantization must keep the logical parameter count"
    layers = [i for i, block in enumerate(stack) if any(p.requires_grad for p in block.parameters())]
    return FreezeReport(stack_name=stack_name, num_layers=len(stack), trainable_layers=layers,
                        trainable_modules=sorted(roots), trainable_params=t, total_params=total,
                        quantized=list(qreport.replaced) if qreport else [], bytes_before=bytes_before,
                        bytes_after=tensor_bytes(model), quantization=qreport)


# ====================================================================== LISA
class LisaSchedule:
    """LISA (Pan et al. 2024): train ``n_active`` blocks sampled uniformly every ``every`` steps.

    Args:
        model: a transformers model (its layer stack found by ``find_layer_stack``).
        n_active: blocks training at a time, 1 <= n_active <= len(candidates).
        every: optimizer steps between re-samples (>= 1).
        candidates: block indices that may be sampled (default all; negative from the end). Every
            candidate block must be dense: a candidate holding ``Linear4bit`` layers is a ValueError
            (freeze-and-quantize the others with ``apply`` and pass the dense ones here).
        always_trainable: parts that train throughout, from ``("embeddings", "head", "norms")``.
        seed: the k-th sample depends only on (seed, k), so a run is reproducible and resumable.

    The schedule owns the model's trainable set: on construction it freezes every parameter, then
    enables ``always_trainable`` and the first sample. Build the optimizer once over
    :meth:`parameters` (all candidates): torch optimizers skip parameters whose ``.grad`` is None,
    and a frozen block never gets a gradient, so its weights (and its weight decay) are untouched.
    Call :meth:`step` after every ``optimizer.step()``; pass the optimizer so that, on a re-sample,
    the state of blocks that stop training is deleted (memory freed) and blocks that start training
    begin from fresh state (Adam/AdamW treat missing state as step 0).
    """

    def __init__(self, model: nn.Module, n_active: int, every: int, *, candidates: Optional[Sequence[int]] = None,
                 always_trainable: Union[str, Sequence[str]] = ("embeddings", "head"), seed: int = 0):
        if not _is_int(n_active) or n_active < 1:
            raise ValueError(f"n_active must be a positive int, got {n_active!r}")
        if not _is_int(every) or every < 1:
            raise ValueError(f"every must be a positive int (steps between re-samples), got {every!r}")
        if not _is_int(seed):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.stack_name, stack = find_layer_stack(model)
        n = len(stack)
        if candidates is None:
            self.candidates = list(range(n))
        else:
            if not all(_is_int(i) for i in candidates):
                raise TypeError(f"candidates must be block indices (ints), got {list(candidates)!r}")
            if not candidates:
                raise ValueError("candidates is empty")
            self.candidates = _resolve_indices(list(candidates), n, self.stack_name, "candidates")
        if n_active > len(self.candidates):
            raise ValueError(f"n_active={n_active} but only {len(self.candidates)} blocks can be sampled "
                             f"({self.stack_name} has {n} layers; candidates {self.candidates})")
        quantized = {i: _quantized_modules(stack[i], f"{self.stack_name}.{i}") for i in self.candidates}
        quantized = {i: q for i, q in quantized.items() if q}
        if quantized:
            i, q = next(iter(quantized.items()))
            raise ValueError(f"LISA candidate blocks {sorted(quantized)} hold 4-bit layers (e.g. {q[0]}): a block "
                             f"that may be sampled to train must stay dense. Quantize only blocks LISA never "
                             f"samples (apply(..., quantize_frozen=True) then candidates=<the dense blocks>), "
                             f"or use quantize_frozen=False")
        if isinstance(always_trainable, str):
            always_trainable = (always_trainable,)
        always_trainable = tuple(always_trainable)
        unknown = [a for a in always_trainable if a not in ALWAYS_TRAINABLE_KEYS]
        if unknown:
            raise ValueError(f"always_trainable entries must be in {ALWAYS_TRAINABLE_KEYS}, got {unknown}")
        self.n_active, self.every, self.seed = n_active, every, seed
        self.always_trainable = always_trainable
        self._model = model
        always_roots = [r for a in always_trainable for r in _part_modules(model, self.stack_name, a)]
        self._always = _params_under(model, always_roots)
        self._blocks = {i: list(stack[i].parameters()) for i in self.candidates}
        self._names = {id(p): name for name, p in model.named_parameters()}
        bad = [self._names.get(id(p)) for ps in [list(self._always.values())] + list(self._blocks.values())
               for p in ps if not p.is_floating_point()]
        if bad:
            raise ValueError(f"LISA would train non-floating-point parameters: {bad[:3]}")
        self.step_count = 0
        self.active: tuple[int, ...] = ()
        freeze(model)
        for p in model.parameters():
            p.grad = None
        for p in self._always.values():
            p.requires_grad_(True)
        self._set_active(self._sample(0), None)
        trained = {id(p) for ps in self._blocks.values() for p in ps} | set(self._always)
        setattr(model, RECORD_ATTR, {
            "trained": [name for name, p in model.named_parameters() if id(p) in trained],
            "freeze_config": None,
            "lisa": {"n_active": n_active, "every": every, "candidates": self.candidates, "seed": seed,
                     "always_trainable": list(always_trainable)}})

    # ------------------------------------------------------------ sampling
    def _sample(self, k: int, seed: Optional[int] = None) -> tuple[int, ...]:
        """The k-th active set: uniform over candidates, a pure function of (seed, k)."""
        # A string seed goes through SHA-512 in random.Random: the same across runs and platforms,
        # independent of PYTHONHASHSEED.
        rng = random.Random(f"peft_kernels.lisa:{self.seed if seed is None else seed}:{k}")
        return tuple(sorted(rng.sample(self.candidates, self.n_active)))

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [self._names.get(id(p), "?") for p in self.parameters() if id(p) not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold {len(missing)} parameters this schedule may train "
                             f"(e.g. {missing[:2]}): build it once over schedule.parameters()")

    def _set_active(self, new: tuple[int, ...], optimizer: Optional[torch.optim.Optimizer]) -> None:
        if optimizer is not None:
            self._check_optimizer(optimizer)
        keep = set(self._always) | {id(p) for i in new for p in self._blocks[i]}
        for i in set(self.active) - set(new):
            for p in self._blocks[i]:
                if id(p) in keep:  # shared with a block or part that still trains
                    continue
                p.requires_grad_(False)
                p.grad = None
                if optimizer is not None:
                    optimizer.state.pop(p, None)  # frees exp_avg / exp_avg_sq now
        for i in set(new) - set(self.active):
            for p in self._blocks[i]:
                if p.requires_grad:
                    continue
                p.requires_grad_(True)
                p.grad = None
                if optimizer is not None:
                    optimizer.state.pop(p, None)  # fresh state: step 0
        self.active = tuple(new)

    def step(self, optimizer: Optional[torch.optim.Optimizer] = None) -> bool:
        """Advance one optimizer step; re-sample when ``every`` steps have passed. True if it re-sampled.

        Without ``optimizer`` the requires_grad flags and grads still change, but the optimizer's
        state for deactivated blocks is kept (stale moments if they return): pass it.
        """
        self.step_count += 1
        if self.step_count % self.every:
            return False
        self._set_active(self._sample(self.step_count // self.every), optimizer)
        return True

    # ------------------------------------------------------------ queries
    def parameters(self) -> list[nn.Parameter]:
        """Every parameter this schedule may train (always-trainable parts and all candidates), once each."""
        seen, out = set(), []
        cand = set(self._always) | {id(p) for ps in self._blocks.values() for p in ps}
        for p in self._model.parameters():
            if id(p) in cand and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def active_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """JSON-serialisable: seed (with the step count, the RNG state), step, active set and settings."""
        return {"seed": self.seed, "step": self.step_count, "active": list(self.active), "n_active": self.n_active,
                "every": self.every, "candidates": list(self.candidates)}

    def load_state_dict(self, state: dict, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Resume: adopt seed, step and active set (validated first; nothing changes on error)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = [k for k in ("seed", "step", "active", "n_active", "every", "candidates") if k not in state]
        if missing:
            raise ValueError(f"LISA state is missing {missing}")
        for k in ("n_active", "every"):
            if state[k] != getattr(self, k):
                raise ValueError(f"LISA state has {k}={state[k]!r} but this schedule has {getattr(self, k)!r}")
        if list(state["candidates"]) != list(self.candidates):
            raise ValueError(f"LISA state samples from blocks {state['candidates']} but this schedule from "
                             f"{self.candidates}")
        if not _is_int(state["step"]) or state["step"] < 0 or not _is_int(state["seed"]):
            raise ValueError(f"LISA state step/seed must be ints (step >= 0), got {state['step']!r}, {state['seed']!r}")
        expected = self._sample(state["step"] // self.every, seed=state["seed"])
        if tuple(state["active"]) != expected:
            raise ValueError(f"LISA state's active set {state['active']} is not the sample its seed {state['seed']} "
                             f"gives at step {state['step']} ({list(expected)}): inconsistent state")
        if optimizer is not None:
            self._check_optimizer(optimizer)  # before anything changes
        self.seed, self.step_count = state["seed"], state["step"]
        self._set_active(expected, optimizer)

    def __repr__(self) -> str:
        return (f"LisaSchedule(n_active={self.n_active}, every={self.every}, step={self.step_count}, "
                f"active={list(self.active)}, candidates={self.candidates}, "
                f"always_trainable={self.always_trainable}, seed={self.seed})")


# ====================================================================== files
def save_trained_layers(model: nn.Module, directory: Union[str, os.PathLike], *,
                        names: Optional[Sequence[str]] = None) -> Path:
    """Write the trained parameters of ``model`` to ``directory`` (``peft_type`` "LAYER_FREEZE").

    Which parameters: ``names`` if given; else those ``apply`` / ``LisaSchedule`` recorded (for LISA,
    every candidate block and always-trainable part, since any of them may have changed); else every
    parameter with ``requires_grad``. Keys are the model's own parameter names. The config records
    the base model's fingerprint, the layer stack, the trained block indices and the FreezeConfig /
    LISA settings. Atomic; returns the directory's path.
    """
    params = dict(model.named_parameters())
    if names is None:
        record = getattr(model, RECORD_ATTR, None)
        names = record["trained"] if record else [n for n, p in params.items() if p.requires_grad]
    names = list(names)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"{type(model).__name__} has no parameters {unknown[:3]}")
    if not names:
        raise ValueError("nothing to save: the model has no trained parameters (call apply or LisaSchedule first)")
    not_float = [n for n in names if not params[n].is_floating_point()]
    if not_float:
        raise ValueError(f"cannot save 4-bit/integer parameters as trained layers: {not_float[:3]}")
    stack_name, _ = find_layer_stack(model)
    record = getattr(model, RECORD_ATTR, None) or {}
    config = {
        "peft_type": PEFT_TYPE, "format_version": FORMAT_VERSION, FINGERPRINT_KEY: model_fingerprint(model),
        "layer_stack": stack_name,
        "trained_layers": sorted({i for n in names if (i := layer_index(n, stack_name)) is not None}),
        "freeze_config": record.get("freeze_config"), "lisa": record.get("lisa"),
        "num_parameters": sum(params[n].numel() for n in names),
    }
    return write_method_files(directory, config, {n: params[n].detach() for n in names})


def load_trained_layers(model: nn.Module, directory: Union[str, os.PathLike]) -> list[str]:
    """Copy the parameters saved by :func:`save_trained_layers` into ``model``; returns their names.

    Every key must name a dense floating-point parameter of ``model`` with the saved shape (values are
    cast to the parameter's dtype and device). Checks the peft_type, format version and model
    fingerprint and every tensor before changing anything, so a failed load leaves the model as it
    was; ``requires_grad`` flags are not changed. Raises :class:`AdapterLoadError` naming the problem.
    """
    config, tensors = read_method_files(directory)
    check_peft_type(config, PEFT_TYPE, directory)
    version = config.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise AdapterLoadError(f"{directory}: format_version {version!r}; this loader reads {FORMAT_VERSION}")
    check_fingerprint(config, model, directory)
    params = dict(model.named_parameters(remove_duplicate=False))
    problems, targets = [], {}
    for key, t in tensors.items():
        p = params.get(key)
        if p is None:
            problems.append(f"{key}: no such parameter in {type(model).__name__}")
        elif not p.is_floating_point():
            problems.append(f"{key}: is a 4-bit (packed {p.dtype}) weight in this model but the file holds a "
                            f"trained dense layer; prepare the model with the same FreezeConfig (trained layers "
                            f"stay dense)")
        elif not t.is_floating_point():
            problems.append(f"{key}: file tensor has dtype {t.dtype}, expected a floating-point tensor")
        elif tuple(t.shape) != tuple(p.shape):
            problems.append(f"{key}: shape {tuple(t.shape)} in the file, {tuple(p.shape)} in the model")
        elif id(p) in targets and not torch.equal(targets[id(p)][1], t):
            problems.append(f"{key}: tied to another saved key but holds different values")
        else:
            targets[id(p)] = (p, t)
    if problems:
        raise AdapterLoadError(f"{directory} does not fit {type(model).__name__}: " + "; ".join(problems[:5])
                               + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    backup = [(p, p.detach().clone()) for p, _ in targets.values()]
    try:
        with torch.no_grad():
            for p, t in targets.values():
                p.copy_(t.to(device=p.device, dtype=p.dtype))
    except BaseException:
        with torch.no_grad():
            for p, old in backup:
                p.copy_(old)
        raise
    return sorted(tensors)


__all__ = ["FreezeConfig", "FreezeReport", "apply", "LisaSchedule", "save_trained_layers", "load_trained_layers",
           "pattern_matches", "PEFT_TYPE", "ALWAYS_TRAINABLE_KEYS"]
