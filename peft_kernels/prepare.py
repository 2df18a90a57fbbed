"""``prepare(model, ...)``: make any transformers model ready to fine-tune in one call.

    model, report = prepare(model, LoraConfig(r=16, target_modules="all-linear"), quantize=True,
                            gradient_checkpointing=True, seq_len=2048, precision="bf16")
    print(report)        # trainable parameters, bits per parameter, estimated peak memory

Steps, in this order:

1. 4-bit quantization (``quantize=True`` or a dict of :func:`~peft_kernels.quant.quantize_model` settings)
   of every linear layer except the output head and what a method must keep dense (the modules a
   method trains in full: ``modules_to_save``). With a :class:`FreezeConfig` the freeze method
   quantizes its frozen blocks itself (with these settings) and nothing else is quantized.
2. The method(s), in the order given (prompt/prefix tuning wrap the model, so they must come last).
   Each method's ``apply`` freezes what it does not train; composed methods train the union of what
   each one trains.
3. Fused kernels (``fused_kernels=True`` or a dict of :func:`~peft_kernels.fused.apply_fused_kernels`
   switches): RMSNorm and SwiGLU MLP modules swapped for the fused ones, and the attention modules'
   ``apply_rotary_pos_emb`` kernelized with the fused RoPE (``kernels.kernelize`` with the kernel repository
   shipped in the package; off by default).
4. Gradient checkpointing of every decoder layer (``train/checkpointing.py``: transformers' non-reentrant
   checkpointing with the engine's checkpoint function, RNG state preserved), optionally with the checkpoints
   offloaded to pinned CPU memory (``offload_activations=True``, CUDA).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .methods import registry
from .methods._common import trainable_parameters
from .quant.model import tensor_bytes

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd")
#: keys a ``quantize`` dict may hold (the keyword arguments of quantize_model)
QUANTIZE_KEYS = ("quant_type", "blocksize", "double_quant", "compute_dtype", "skip_modules", "target_modules",
                 "quantize_embeddings", "quantize_head")
_WRAPPING = ("prompt_tuning", "prefix_tuning")


@dataclass
class PrepareReport:
    """What :func:`prepare` did. Parameter counts as PEFT's (a 4-bit weight counts its logical weights)."""

    trainable: int
    total: int
    bits_per_parameter: float               # storage bits per logical parameter (buffers included)
    methods: list[str]
    estimate: Any = None                    # MemoryEstimate, or None when the model is not one it models
    model_bytes: int = 0                    # parameters + buffers, shared tensors once
    quantized_layers: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False
    precision: str = "fp32"
    notes: list[str] = field(default_factory=list)
    offload_activations: bool = False
    checkpointing: Any = None               # train.checkpointing.CheckpointReport when checkpointing is on
    fused: Any = None                       # FusedReport when fused_kernels was on

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        mib = 2 ** 20
        lines = [
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
            f"trainable%: {self.trainable_percent:.4f}",
            f"methods: {', '.join(self.methods) or 'full fine-tuning'}; "
            f"{len(self.quantized_layers)} layers in 4-bit; gradient checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'}"
            f"{' with activation offload' if self.offload_activations else ''}; precision {self.precision}",
            f"model: {self.model_bytes / mib:,.2f} MiB, {self.bits_per_parameter:.2f} bits per parameter",
        ]
        if self.estimate is not None:
            lines.append(str(self.estimate))
        if self.checkpointing is not None:
            lines.append(str(self.checkpointing))
        lines += self.notes
        return "\n".join(lines)


# ================================================================== argument checks
def _as_configs(method) -> list:
    """``method`` as a list of config objects (None: []; a name or {"method": name, ...} dict allowed)."""
    if method is None:
        return []
    items = list(method) if isinstance(method, (list, tuple)) else [method]
    out = []
    for m in items:
        if isinstance(m, str):
            m = registry.config_from_dict(m, {})
        elif isinstance(m, dict):
            d = dict(m)
            name = d.pop("method", None)
            if name is None:
                raise ValueError(f"a method given as a dict needs a 'method' key naming it, got keys {sorted(m)}")
            m = registry.config_from_dict(name, d)
        registry.method_name(m)  # TypeError for anything else
        out.append(m)
    names = [registry.method_name(c) for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"method {dup} given more than once; give each method one config")
    wrapping = [n for n in names if n in _WRAPPING]
    if len(wrapping) > 1:
        raise ValueError(f"prompt_tuning and prefix_tuning both wrap the model; use one of them, got {wrapping}")
    if wrapping and names[-1] not in _WRAPPING:
        raise ValueError(f"{wrapping[0]} wraps the model and must be the last method, got order {names}")
    return out


def _check_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


def _quant_settings(quantize, precision: str) -> Optional[dict]:
    if quantize is False or quantize is None:
        return None
    if quantize is True:
        settings = {}
    elif isinstance(quantize, dict):
        unknown = sorted(k for k in quantize if k not in QUANTIZE_KEYS)
        if unknown:
            raise ValueError(f"unknown quantize setting(s) {unknown}; valid: {list(QUANTIZE_KEYS)}")
        settings = dict(quantize)
    else:
        raise ValueError(f"quantize must be True, False or a dict of {list(QUANTIZE_KEYS)}, got {quantize!r}")
    if isinstance(settings.get("compute_dtype"), str):
        from .quant.state import parse_dtype
        try:
            settings["compute_dtype"] = parse_dtype(settings["compute_dtype"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"quantize compute_dtype: {e}") from None
    # compute_dtype left None: the 4-bit layers compute in the dtype the model was loaded in (under autocast the
    # LoRA term runs in the autocast dtype anyway), which is what the memory estimate models.
    return settings


def _fused_settings(fused_kernels) -> Optional[dict]:
    if fused_kernels is False or fused_kernels is None:
        return None
    if fused_kernels is True:
        return {}
    if isinstance(fused_kernels, dict):
        unknown = sorted(k for k in fused_kernels if k not in ("rmsnorm", "swiglu", "rope"))
        if unknown:
            raise ValueError(f"unknown fused_kernels setting(s) {unknown}; valid: ['rmsnorm', 'rope', 'swiglu']")
        bad = {k: v for k, v in fused_kernels.items() if not isinstance(v, bool)}
        if bad:  # checked here, before quantization and the methods change the model
            raise ValueError(f"fused_kernels switches must be True or False, got {bad}")
        return dict(fused_kernels)
    raise ValueError(f"fused_kernels must be True, False or a dict of rmsnorm/swiglu/rope switches, "
                     f"got {fused_kernels!r}")


def _keep_dense(cfgs: Sequence) -> list[str]:
    """Module-name patterns a method trains in full, which must stay dense."""
    out = []
    for c in cfgs:
        for n in getattr(c, "modules_to_save", None) or []:
            if n not in out:
                out.append(n)
    return out


def _added_linears(model: nn.Module, original: set[str]) -> list[str]:
    """Linear layers a method added (adapter projections, lora_A/lora_B, a wrapped layer's moved base)."""
    from .nn.linear4bit import Linear4bit

    def is_linear(m: nn.Module) -> bool:
        return isinstance(m, (nn.Linear, Linear4bit)) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))

    return sorted(n for n, m in model.named_modules() if n not in original and is_linear(m))


def _excluding(cfg, names: list[str]):
    """``cfg`` with ``names`` added to its ``exclude_modules``, so that a later method's "all-linear" or regex
    targets do not reach inside an earlier method's layers (sparse deltas on a bottleneck adapter...)."""
    if not hasattr(cfg, "exclude_modules"):
        return cfg
    old = cfg.exclude_modules
    if old is None:
        new = list(names)
    elif isinstance(old, str):  # a regex that must fullmatch a module name: extend the alternation
        new = "(?:" + old + ")|" + "|".join(re.escape(n) for n in names)
    else:
        new = sorted(set(old) | set(names))
    return dataclasses.replace(cfg, exclude_modules=new)


def _weight_dtype(model: nn.Module) -> Optional[str]:
    """The precision name of the model's dense weights (its input embedding's dtype), if it is one of ours."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    names = {v: k for k, v in PRECISIONS.items()}
    # A 4-bit table (Embedding4bit) holds packed bytes: the dtype it was quantized from is the model's.
    return names.get(getattr(emb, "weight_dtype", None) or getattr(w, "dtype", None))


def _device_type(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return "cuda" if p is not None and p.device.type == "cuda" else "cpu" if p is not None else "cuda"


def _check_targets(model: nn.Module, cfgs: Sequence) -> None:
    """Resolve each method's targets on the still-dense model, so that a config naming modules the model
    lacks fails before quantization changes anything (the methods check again when applied)."""
    from .methods import adapter, bitfit, ia3, lora, sparse

    resolvers = {"lora": lora.resolve_targets, "bitfit": bitfit.resolve_targets, "ia3": ia3.resolve_targets,
                 "sparse": sparse.resolve_targets, "adapter": adapter.resolve_hook_points}
    for cfg in cfgs:
        resolve = resolvers.get(registry.method_name(cfg))
        if resolve is not None:
            resolve(model, cfg)


# ================================================================== prepare
def prepare(model: nn.Module, method=None, *, quantize: Union[bool, dict] = False, gradient_checkpointing: bool = False,
            offload_activations: bool = False, seq_len: int = 512, batch_size: int = 1, precision: str = "fp32",
            optimizer: str = "adamw", fused_kernels: Union[bool, dict] = False,
            fused_cross_entropy: bool = True) -> tuple[nn.Module, PrepareReport]:
    """Quantize, apply the method(s), enable gradient checkpointing; returns ``(model_to_train, report)``.

    Args:
        model: a transformers model (or any ``nn.Module``; the memory estimate needs a Llama-like config).
        method: None (full fine-tuning: every parameter trains), a method config (``LoraConfig``...), a
            method name (``"lora"``, defaults), a dict ``{"method": "lora", "r": 16, ...}``, or a list of
            those applied in order.
        quantize: True (NF4, blocksize 64, double quantization) or a dict of ``quantize_model`` settings
            (``quantize_embeddings`` / ``quantize_head`` put the input table and the LM head in 4-bit too).
        gradient_checkpointing: recompute each decoder layer in backward (non-reentrant, ``train/checkpointing``).
        offload_activations: with gradient checkpointing, keep each layer's checkpoint (its input hidden states)
            in pinned CPU memory, copied on a side stream and prefetched back (CUDA; a no-op with a note on CPU).
        seq_len, batch_size, precision ("fp32" | "bf16" | "fp16": the compute dtype; a 16-bit precision over
            an fp32 model is autocast mixed precision, as the Trainer runs it), optimizer: for the memory
            estimate, which also reads the model's weight dtype and device.
        fused_kernels: True, or a dict ``{"rmsnorm": bool, "swiglu": bool, "rope": bool}`` (a missing key is on):
            swap the model's RMSNorm / SwiGLU MLP modules for the fused ones and kernelize its attention modules'
            RoPE (``peft_kernels.fused.apply_fused_kernels``; its report in ``.fused``). For the memory estimate
            a kind (RMSNorm, SwiGLU) counts as fused when any module of it was swapped; RoPE changes no term.
        fused_cross_entropy: for the memory estimate only: the loss will be the fused linear cross-entropy
            (``TrainConfig.fused_cross_entropy``, on by default); False: transformers' loss over full logits.

    The model changes in place; the returned model is the same object except with prompt/prefix tuning
    (their wrapper). Bad arguments — and, when quantizing, method targets the model does not have — raise
    ValueError/TypeError before the model changes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
    _check_int("seq_len", seq_len)
    _check_int("batch_size", batch_size)
    if not isinstance(gradient_checkpointing, bool):
        raise ValueError(f"gradient_checkpointing must be True or False, got {gradient_checkpointing!r}")
    if not isinstance(offload_activations, bool):
        raise ValueError(f"offload_activations must be True or False, got {offload_activations!r}")
    if not isinstance(fused_cross_entropy, bool):
        raise ValueError(f"fused_cross_entropy must be True or False, got {fused_cross_entropy!r}")
    if offload_activations and not gradient_checkpointing:
        raise ValueError("offload_activations=True offloads the checkpoints of gradient checkpointing; "
                         "set gradient_checkpointing=True too")
    cfgs = _as_configs(method)
    names = [registry.method_name(c) for c in cfgs]
    qset = _quant_settings(quantize, precision)
    if qset is not None and not cfgs:
        raise ValueError("quantize=True needs a method: 4-bit weights are frozen, so full fine-tuning of a "
                         "quantized model would train almost nothing (pass method=LoraConfig(...))")
    if gradient_checkpointing and "prefix_tuning" in names:
        raise ValueError("prefix tuning does not work with gradient checkpointing (the prefix lives in a KV cache "
                         "that a recomputed layer would extend twice); set gradient_checkpointing=False")
    if gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support transformers' gradient checkpointing "
                         f"(supports_gradient_checkpointing is not set)")
    fused_args = _fused_settings(fused_kernels)
    notes: list[str] = []
    if qset is not None:
        _check_targets(model, cfgs)

    # 1. quantization
    quantized: list[str] = []
    if qset is not None:
        if "freeze" in names:
            i = names.index("freeze")
            fsettings = {k: v for k, v in qset.items() if k in ("quant_type", "blocksize", "double_quant",
                                                                    "compute_dtype")}
            cfgs[i] = dataclasses.replace(cfgs[i], quantize_frozen=True, **fsettings)
            notes.append("quantization: the freeze method quantizes its frozen blocks (trained blocks stay dense)")
        else:
            from .quant.model import DEFAULT_SKIP, quantize_model
            qargs = dict(qset)
            # quantize_head converts the head itself: the default skip of "lm_head" must not name it then
            default_skip = () if qargs.get("quantize_head") else DEFAULT_SKIP
            skip = list(qargs.pop("skip_modules", None) or default_skip) + _keep_dense(cfgs)
            qreport = quantize_model(model, skip_modules=skip, **qargs)
            quantized = list(qreport.replaced)

    # 2. methods; the trainable set is the union of what each method trains
    trainable_ids: set[int] = set()
    original = {n for n, _ in registry.inner_model(model).named_modules()}
    added: list[str] = []
    for cfg in cfgs:
        if added:
            cfg = _excluding(cfg, added)
        model = registry.apply_method(model, cfg)
        added = _added_linears(registry.inner_model(model), original)
        if registry.method_name(cfg) == "freeze":
            report = getattr(registry.inner_model(model), "peft_kernels_freeze_report", None)
            if report is not None:
                quantized += list(report.quantized)
        trainable_ids |= {id(p) for p in model.parameters() if p.requires_grad}
    if cfgs:
        for p in model.parameters():
            if id(p) in trainable_ids and p.is_floating_point():
                p.requires_grad_(True)
        registry.inner_model(model).peft_kernels_methods = names
    else:
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)

    # 3. fused kernels (after the methods: the fused MLP keeps whatever projection modules they put there)
    base = registry.inner_model(model)
    fused = None
    if fused_args is not None:
        from .fused import apply_fused_kernels
        fused = apply_fused_kernels(base, **fused_args)
        notes.append(str(fused).splitlines()[0])

    # 4. gradient checkpointing
    ckpt_report = None
    if gradient_checkpointing:
        from .train.checkpointing import enable_checkpointing
        ckpt_report = enable_checkpointing(base, offload=offload_activations)

    trainable, total = trainable_parameters(model)
    nbytes = tensor_bytes(model)
    estimate = None
    cfg = getattr(base, "config", None)
    if cfg is not None:
        from .train.estimate import estimate_memory
        try:
            estimate = estimate_memory(cfg, method=cfgs or "full", seq_len=seq_len, batch_size=batch_size,
                                       quantize=qset is not None or bool(quantized), precision=precision,
                                       weight_dtype=_weight_dtype(base), gradient_checkpointing=gradient_checkpointing,
                                       optimizer=optimizer, device=_device_type(base),
                                       fused_cross_entropy=fused_cross_entropy,
                                       quantize_embeddings=bool(qset and qset.get("quantize_embeddings")),
                                       quantize_head=bool(qset and qset.get("quantize_head")),
                                       offload_activations=offload_activations,
                                       fused_kernels={"rmsnorm": bool(fused and fused.rmsnorm),
                                                      "swiglu": bool(fused and fused.swiglu),
                                                      "rope": bool(fused and fused.rope)})
        except (ValueError, NotImplementedError) as e:
            notes.append(f"no memory estimate: {e}")
    return model, PrepareReport(trainable=trainable, total=total, bits_per_parameter=8 * nbytes / max(total, 1),
                                methods=names, estimate=estimate, model_bytes=nbytes, quantized_layers=quantized,
                                gradient_checkpointing=gradient_checkpointing, precision=precision, notes=notes,
                                offload_activations=offload_activations, checkpointing=ckpt_report,
                                fused=fused)


__all__ = ["prepare", "PrepareReport", "PRECISIONS", "OPTIMIZERS", "QUANTIZE_KEYS"]
