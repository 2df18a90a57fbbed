"""Quantize the linear layers of a whole model to 4-bit, in place.

``quantize_model(model)`` walks the module tree and swaps every ``nn.Linear`` and
transformers ``Conv1D`` (GPT-2; weight stored [in, out]) for a
:class:`~peft_kernels.nn.Linear4bit`, one layer at a time: each dense weight is
released once its 4-bit copy is in place, so memory falls as the walk goes and
the peak is the dense model plus one layer's quantization temporaries. It records
in ``model.config.quantization_config`` the transformers ``BitsAndBytesConfig``
dict, so a saved checkpoint is recognisable as a bitsandbytes 4-bit one.

Module-name patterns (``skip_modules``, ``target_modules``) match whole name
components: a pattern's dotted components must equal a contiguous run of a
module name's components. So ``"lm_head"`` matches ``lm_head``; ``"q_proj"`` and
``"self_attn.q_proj"`` match ``model.layers.0.self_attn.q_proj``; ``"mlp"`` and
``"layers.1"`` match every layer under them; ``"proj"`` matches nothing (no
partial words). transformers' own matching of ``llm_int8_skip_modules`` differs
in details (prefix, regex or plain suffix), so the recorded config lists the
full name of every linear left dense, which both read the same way.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn.linear4bit import Linear4bit
from .state import dtype_name

#: Default of ``skip_modules``: the output head stays dense (as transformers does).
DEFAULT_SKIP = ("lm_head",)


class _Default(tuple):
    """A default pattern tuple: not "given explicitly", so it may match nothing."""


# ----------------------------------------------------------------- matching
def is_quantizable_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D`` (``weight`` [in, out], ``nf`` outputs)."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an ``nn.Linear`` or a ``Conv1D``, without touching its data."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    in_f, out_f = module.weight.shape  # Conv1D stores the transpose
    return out_f, in_f


def _as_patterns(patterns: str | Iterable[str] | None) -> tuple[str, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        return (patterns,)
    out = tuple(patterns)
    for p in out:
        if not isinstance(p, str) or not p or p.startswith(".") or p.endswith("."):
            raise ValueError(f"module-name patterns must be non-empty dotted names, got {p!r}")
    return out


def name_matches(name: str, pattern: str) -> bool:
    """``pattern``'s components equal a contiguous run of ``name``'s components (see the module doc)."""
    parts, want = name.split("."), pattern.split(".")
    return any(parts[i:i + len(want)] == want for i in range(len(parts) - len(want) + 1))


def _tied_weight_ids(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (tied weights, e.g. lm_head = embeddings)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


@dataclass
class LinearSelection:
    """Which quantizable linears of a model to replace, and why the others stay dense."""

    targets: list[str]
    skipped: dict[str, str]  # module name -> reason


def select_linears(model: nn.Module, skip_modules: str | Iterable[str] | None = _Default(DEFAULT_SKIP),
                   target_modules: str | Iterable[str] | None = None) -> LinearSelection:
    """Pick the linears to quantize: every ``nn.Linear``/``Conv1D`` matching ``target_modules``
    (all when None), not matching ``skip_modules``, and whose weight is not tied to another module.

    Raises ValueError if an explicitly given pattern matches no module of ``model``, or if
    nothing is left to quantize.
    """
    explicit_skip = not isinstance(skip_modules, _Default)
    skip, target = _as_patterns(skip_modules), _as_patterns(target_modules)
    names = [n for n, _ in model.named_modules() if n]
    for kind, pats, check in (("skip_modules", skip, explicit_skip), ("target_modules", target, True)):
        if not check:
            continue
        unmatched = [p for p in pats if not any(name_matches(n, p) for n in names)]
        if unmatched:
            raise ValueError(f"{kind} pattern(s) {unmatched} match no module of {type(model).__name__}; "
                             f"module names look like {names[:3] + names[-2:]}")
    tied = _tied_weight_ids(model)
    targets: list[str] = []
    skipped: dict[str, str] = {}
    n_linear = 0
    for name, module in model.named_modules():
        if not is_quantizable_linear(module):
            continue
        n_linear += 1
        if target and not any(name_matches(name, p) for p in target):
            skipped[name] = "not in target_modules"
        elif any(name_matches(name, p) for p in skip):
            skipped[name] = "in skip_modules"
        elif id(module.weight) in tied:
            # Quantizing one side of a tie (e.g. lm_head tied to the input embeddings)
            # would silently untie it: the embedding lookup needs the dense matrix.
            skipped[name] = "weight tied to another module"
        else:
            targets.append(name)
    if not targets:
        n_4bit = sum(isinstance(m, Linear4bit) for m in model.modules())
        why = ("it has no nn.Linear/Conv1D layers" if n_linear == 0
               else f"all {n_linear} linear layers are excluded: {skipped}")
        if n_4bit:
            why += f"; {n_4bit} layers are already Linear4bit"
        raise ValueError(f"nothing to quantize in {type(model).__name__}: {why}")
    return LinearSelection(targets, skipped)


# --------------------------------------------------------------- accounting
def tensor_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _weight_tensors(layer: Linear4bit) -> list[torch.Tensor]:
    """A Linear4bit's 4-bit weight: packed codes, block statistics, code books (not the bias)."""
    ts = (layer.weight, layer.absmax, layer.quant_map, layer.nested_absmax, layer.nested_quant_map)
    return [t for t in ts if t is not None]


@dataclass
class QuantizationReport:
    """What :func:`quantize_model` did. Byte counts are exact sums over the model's tensors."""

    replaced: list[str]
    skipped: dict[str, str]
    bytes_before: int
    bytes_after: int
    quantized_params: int  # weight elements now stored in 4-bit
    # Their storage: packed codes + block statistics + each layer's code books (a tensor
    # shared by several layers would be counted once, like in bytes_after).
    quantized_weight_bytes: int
    quant_type: str
    blocksize: int
    double_quant: bool
    layer_bits: dict[str, float] = field(default_factory=dict)  # per layer, its own code books included

    @property
    def num_replaced(self) -> int:
        return len(self.replaced)

    @property
    def bits_per_parameter(self) -> float:
        """Storage bits per quantized weight element, statistics included (about 4.13 for large NF4 layers)."""
        return 8 * self.quantized_weight_bytes / self.quantized_params

    @property
    def compression(self) -> float:
        return self.bytes_before / self.bytes_after

    def __str__(self) -> str:
        mib = 2 ** 20
        dq = "+dq" if self.double_quant else ""
        rows = [
            f"quantized {self.num_replaced} layers to {self.quant_type}{dq} (blocksize {self.blocksize}), "
            f"{len(self.skipped)} left dense",
            f"  {'':<22}{'bytes':>14}{'MiB':>10}",
            f"  {'model before':<22}{self.bytes_before:>14,}{self.bytes_before / mib:>10.2f}",
            f"  {'model after':<22}{self.bytes_after:>14,}{self.bytes_after / mib:>10.2f}",
            f"  {'4-bit weights':<22}{self.quantized_weight_bytes:>14,}{self.quantized_weight_bytes / mib:>10.2f}",
            f"  compression x{self.compression:.2f}; {self.bits_per_parameter:.3f} bits per quantized parameter "
            f"({self.quantized_params:,} parameters)",
        ]
        if self.skipped:
            rows.append("  dense: " + ", ".join(f"{n} ({why})" for n, why in list(self.skipped.items())[:6])
                        + (" ..." if len(self.skipped) > 6 else ""))
        return "\n".join(rows)


# ------------------------------------------------------------ config record
def bnb_config_dict(*, quant_type: str, blocksize: int, double_quant: bool, compute_dtype: torch.dtype | None,
                    skip_modules: Sequence[str] | None) -> dict:
    """transformers ``BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()`` for these settings.

    ``bnb_4bit_blocksize`` is not a BitsAndBytesConfig field (bitsandbytes always quantizes with 64
    there); it is written only when it differs, for the record. Loaders read the block size of each
    weight from its own quant state, so checkpoints with any block size load either way.
    """
    cfg = {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(double_quant),
        # None (compute in the input's dtype) is accepted by BitsAndBytesConfig, which reads it as float32.
        "bnb_4bit_compute_dtype": None if compute_dtype is None else dtype_name(compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": list(skip_modules) if skip_modules else None,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }
    if blocksize != 64:
        cfg["bnb_4bit_blocksize"] = blocksize
    return cfg


def record_quantization_config(model: nn.Module, cfg: dict) -> None:
    """Set ``model.config.quantization_config`` (models without a config are left alone)."""
    config = getattr(model, "config", None)
    if config is not None:
        config.quantization_config = cfg


def describe_quantization(model: nn.Module) -> dict | None:
    """The BitsAndBytesConfig dict of a model's Linear4bit layers (settings of the first one; every
    linear still dense listed in ``llm_int8_skip_modules``), or None when it has none."""
    first = next((m for m in model.modules() if isinstance(m, Linear4bit)), None)
    if first is None:
        return None
    return bnb_config_dict(quant_type=first.quant_type, blocksize=first.blocksize, double_quant=first.double_quant,
                           compute_dtype=first.compute_dtype, skip_modules=_dense_linear_names(model))


def _dense_linear_names(model: nn.Module) -> list[str] | None:
    # Full names: a loader must keep exactly these dense, whatever its pattern syntax.
    return [n for n, m in model.named_modules() if is_quantizable_linear(m)] or None


# -------------------------------------------------------------- the swap
def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def quantize_model(model: nn.Module, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None,
                   skip_modules: str | Iterable[str] | None = _Default(DEFAULT_SKIP),
                   target_modules: str | Iterable[str] | None = None) -> QuantizationReport:
    """Replace the model's ``nn.Linear``/``Conv1D`` layers by :class:`Linear4bit`, in place.

    Layers are quantized on the device their weight lives on, one at a time; the dense
    weight of each is released as soon as its 4-bit copy is in place (unless something
    else still references it). Tied weights are left dense and intact.

    Args:
        quant_type, blocksize, double_quant, compute_dtype: as :class:`Linear4bit`.
        skip_modules: name patterns to keep dense (default ``("lm_head",)``; see the module doc).
        target_modules: if given, only layers matching one of these patterns are quantized.

    Returns a :class:`QuantizationReport`. Raises ValueError when an explicitly given pattern
    matches no module, or when no linear layer is left to quantize.
    """
    selection = select_linears(model, skip_modules, target_modules)
    bytes_before = tensor_bytes(model)
    layer_bits: dict[str, float] = {}
    q_params = q_bytes = 0
    counted: set[int] = set()
    for name in selection.targets:
        new = Linear4bit.from_linear(model.get_submodule(name), quant_type=quant_type, blocksize=blocksize,
                                     double_quant=double_quant, compute_dtype=compute_dtype)
        new.train(model.training)
        _set_submodule(model, name, new)  # the old layer (and its dense weight) has no owner left
        numel = new.in_features * new.out_features
        tensors = _weight_tensors(new)
        layer_bits[name] = 8 * sum(t.numel() * t.element_size() for t in tensors) / numel
        q_params += numel
        q_bytes += sum(t.numel() * t.element_size() for t in tensors if id(t) not in counted)
        counted.update(id(t) for t in tensors)
    record_quantization_config(model, bnb_config_dict(
        quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype,
        skip_modules=_dense_linear_names(model)))
    return QuantizationReport(replaced=list(selection.targets), skipped=selection.skipped,
                              bytes_before=bytes_before, bytes_after=tensor_bytes(model), quantized_params=q_params,
                              quantized_weight_bytes=q_bytes, quant_type=quant_type, blocksize=blocksize,
                              double_quant=double_quant, layer_bits=layer_bits)
