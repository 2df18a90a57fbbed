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

from ..nn._quant_weight import QuantizedWeight
from ..nn.embedding4bit import Embedding4bit
from ..nn.linear4bit import Linear4bit
from ..nn.trainable_tokens import Linear4bitHead
from .state import dtype_name

#: Default of ``skip_modules``: the output head stays dense (as transformers does).
DEFAULT_SKIP = ("lm_head",)
#: quantization_config key listing 4-bit embedding tables (not a BitsAndBytesConfig field: a record for our loader).
EMBEDDINGS_KEY = "peft_kernels_4bit_embeddings"


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
                   target_modules: str | Iterable[str] | None = None, *, handled: dict[str, str] | None = None
                   ) -> LinearSelection:
    """Pick the linears to quantize: every ``nn.Linear``/``Conv1D`` matching ``target_modules``
    (all when None), not matching ``skip_modules``, and whose weight is not tied to another module.

    ``handled``: module name -> reason, linears converted by other means (the 4-bit output head of
    ``quantize_head``); they are neither targets nor "left dense", and nothing else being left is fine.

    Raises ValueError if an explicitly given pattern matches no module of ``model``, or if
    nothing is left to quantize.
    """
    handled = handled or {}
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
        if not is_quantizable_linear(module) or name in handled:
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
    if not targets and not handled:
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
    embeddings: str | None = None    # the input embedding turned into Embedding4bit (quantize_embeddings)
    head: str | None = None          # the output head turned into Linear4bitHead (quantize_head)
    tied: bool = False               # head and embeddings share one 4-bit table

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
        if self.embeddings or self.head:
            tables = [f"{n} ({'Embedding4bit' if n == self.embeddings else 'Linear4bitHead'}, "
                      f"{self.layer_bits[n]:.3f} bits)" for n in (self.embeddings, self.head) if n]
            rows.append("  4-bit tables: " + ", ".join(tables) + ("; tied: one copy" if self.tied else ""))
        if self.skipped:
            rows.append("  dense: " + ", ".join(f"{n} ({why})" for n, why in list(self.skipped.items())[:6])
                        + (" ..." if len(self.skipped) > 6 else ""))
        return "\n".join(rows)


# ------------------------------------------------------------ config record
def bnb_config_dict(*, quant_type: str, blocksize: int, double_quant: bool, compute_dtype: torch.dtype | None,
                    skip_modules: Sequence[str] | None, embeddings: Sequence[str] | None = None) -> dict:
    """transformers ``BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()`` for these settings.

    ``bnb_4bit_blocksize`` is not a BitsAndBytesConfig field (bitsandbytes always quantizes with 64
    there); it is written only when it differs, for the record. Loaders read the block size of each
    weight from its own quant state, so checkpoints with any block size load either way.
    ``embeddings``: names of 4-bit embedding tables (``Embedding4bit``), recorded under
    :data:`EMBEDDINGS_KEY`; transformers has no 4-bit embedding, so only ``load_quantized`` reads those.
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
    if embeddings:
        cfg[EMBEDDINGS_KEY] = list(embeddings)
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
    first = first or next((m for m in model.modules() if isinstance(m, QuantizedWeight)), None)
    if first is None:
        return None
    return bnb_config_dict(quant_type=first.quant_type, blocksize=first.blocksize, double_quant=first.double_quant,
                           compute_dtype=first.compute_dtype, skip_modules=_dense_linear_names(model),
                           embeddings=_embedding_names(model))


def _dense_linear_names(model: nn.Module) -> list[str] | None:
    # Full names: a loader must keep exactly these dense, whatever its pattern syntax.
    return [n for n, m in model.named_modules() if is_quantizable_linear(m)] or None


def _embedding_names(model: nn.Module) -> list[str] | None:
    return [n for n, m in model.named_modules() if isinstance(m, Embedding4bit)] or None


# -------------------------------------------------------------- the swap
def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _table_and_head(model: nn.Module, quantize_embeddings: bool, quantize_head: bool
                    ) -> tuple[str | None, str | None, bool]:
    """(input-embedding module name, output-head module name, tied) of the tables to convert, checked."""
    names = {id(m): n for n, m in model.named_modules()}
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    tied = (emb is not None and head is not None and getattr(head, "weight", None) is getattr(emb, "weight", 0))
    if tied and quantize_embeddings != quantize_head:
        raise ValueError(f"{type(model).__name__} ties its output head to the input embeddings "
                         f"(tie_word_embeddings=True): one 4-bit table serves both, so quantize_embeddings and "
                         f"quantize_head must both be True or both False (got {quantize_embeddings}, {quantize_head})")
    emb_name = head_name = None
    if quantize_embeddings:
        if emb is None:
            raise ValueError(f"quantize_embeddings=True but {type(model).__name__} has no get_input_embeddings()")
        if isinstance(emb, Embedding4bit):
            raise ValueError("quantize_embeddings=True but the input embeddings are already Embedding4bit")
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"quantize_embeddings=True needs an nn.Embedding input table, the model has a "
                            f"{type(emb).__name__}")
        emb_name = names[id(emb)]
    if quantize_head:
        if head is None:
            raise ValueError(f"quantize_head=True but {type(model).__name__} has no output head "
                             f"(get_output_embeddings() is None)")
        if isinstance(head, Linear4bit):
            raise ValueError("quantize_head=True but the output head is already a Linear4bit")
        if not isinstance(head, nn.Linear):
            raise TypeError(f"quantize_head=True needs an nn.Linear output head, the model has a "
                            f"{type(head).__name__}")
        head_name = names[id(head)]
    return emb_name, head_name, tied


def quantize_model(model: nn.Module, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None,
                   skip_modules: str | Iterable[str] | None = _Default(DEFAULT_SKIP),
                   target_modules: str | Iterable[str] | None = None, quantize_embeddings: bool = False,
                   quantize_head: bool = False) -> QuantizationReport:
    """Replace the model's ``nn.Linear``/``Conv1D`` layers by :class:`Linear4bit`, in place.

    Layers are quantized on the device their weight lives on, one at a time; the dense
    weight of each is released as soon as its 4-bit copy is in place (unless something
    else still references it). Tied weights are left dense and intact.

    Args:
        quant_type, blocksize, double_quant, compute_dtype: as :class:`Linear4bit`.
        skip_modules: name patterns to keep dense (default ``("lm_head",)``; see the module doc).
        target_modules: if given, only layers matching one of these patterns are quantized.
        quantize_embeddings: also turn ``model.get_input_embeddings()`` into an
            :class:`~peft_kernels.nn.Embedding4bit` (same format; ``compute_dtype`` is its output dtype).
        quantize_head: also turn ``model.get_output_embeddings()`` (the LM head) into a
            :class:`~peft_kernels.nn.Linear4bitHead` (a ``Linear4bit``), whatever ``skip_modules`` says by
            default. A head tied to the input embeddings (``tie_word_embeddings=True``) needs both flags; it
            then holds the embedding's very tensors (one 4-bit copy: the row-major [V, H] bytes of a table and
            of a head are the same).

    Returns a :class:`QuantizationReport`. Raises ValueError when an explicitly given pattern
    matches no module, when no linear layer is left to quantize, when ``quantize_head`` meets an explicit
    ``skip_modules`` pattern naming the head, or when a tied pair gets only one of the two flags.
    """
    for name, v in (("quantize_embeddings", quantize_embeddings), ("quantize_head", quantize_head)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be True or False, got {v!r}")
    emb_name, head_name, tied = _table_and_head(model, quantize_embeddings, quantize_head)
    handled = {}
    if head_name is not None:
        if not isinstance(skip_modules, _Default) and any(name_matches(head_name, p)
                                                          for p in _as_patterns(skip_modules)):
            raise ValueError(f"quantize_head=True but skip_modules {list(_as_patterns(skip_modules))} names the "
                             f"head {head_name!r}; drop one of the two")
        handled[head_name] = "quantize_head"
    selection = select_linears(model, skip_modules, target_modules, handled=handled)
    bytes_before = tensor_bytes(model)
    layer_bits: dict[str, float] = {}
    q_params = q_bytes = 0
    counted: set[int] = set()
    quant = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype)

    def account(name: str, new: QuantizedWeight) -> None:
        nonlocal q_params, q_bytes
        rows, cols = new._quant_shape()
        tensors = new.quantized_weight_tensors()
        layer_bits[name] = 8 * sum(t.numel() * t.element_size() for t in tensors) / (rows * cols)
        if id(new.weight) not in counted:  # a tied head's table is the embedding's: counted once
            q_params += rows * cols
        q_bytes += sum(t.numel() * t.element_size() for t in tensors if id(t) not in counted)
        counted.update(id(t) for t in tensors)

    replaced = list(selection.targets)
    for name in selection.targets:
        new = Linear4bit.from_linear(model.get_submodule(name), **quant)
        new.train(model.training)
        _set_submodule(model, name, new)  # the old layer (and its dense weight) has no owner left
        account(name, new)
    table = None
    if emb_name is not None:
        table = Embedding4bit.from_embedding(model.get_submodule(emb_name), **quant)
        _set_submodule(model, emb_name, table)
        account(emb_name, table)
        replaced.append(emb_name)
    if head_name is not None:
        old = model.get_submodule(head_name)
        if tied:
            head = Linear4bitHead(old.in_features, old.out_features, bias=old.bias is not None, **quant,
                                  device="meta", dtype=old.weight.dtype)
            head.share_quantized_weight(table)
            if old.bias is not None:
                head.bias = old.bias
        else:
            head = Linear4bitHead.from_linear(old, **quant)
        head.train(model.training)
        _set_submodule(model, head_name, head)
        account(head_name, head)
        replaced.append(head_name)
    record_quantization_config(model, bnb_config_dict(
        quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype,
        skip_modules=_dense_linear_names(model), embeddings=_embedding_names(model)))
    return QuantizationReport(replaced=replaced, skipped=selection.skipped,
                              bytes_before=bytes_before, bytes_after=tensor_bytes(model), quantized_params=q_params,
                              quantized_weight_bytes=q_bytes, quant_type=quant_type, blocksize=blocksize,
                              double_quant=double_quant, layer_bits=layer_bits, embeddings=emb_name, head=head_name,
                              tied=bool(tied and emb_name is not None))
