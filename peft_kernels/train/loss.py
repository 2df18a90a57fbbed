"""Next-token (causal LM) losses for training loops: from the model's logits, or fused from its last hidden
states and output head without ever building the [B, T, V] logits.

    from peft_kernels.train.loss import causal_lm_loss
    loss = causal_lm_loss(model, batch)     # batch: input_ids, labels (-100: no loss), attention_mask, ...
    loss.backward()                         # mean over the label tokens; fused when the model allows it

How the fused path gets the hidden states WITHOUT patching the model: while the model's own forward runs,
a forward pre-hook on its output head (``get_output_embeddings()``) receives the head's input — the last
hidden states [B, T', H], after the final norm and anything else the model does before its head —,
computes the loss from them and the head's weight and bias (dense, tied, or a 4-bit ``Linear4bit``) by
:func:`peft_kernels.ops.fused_ce.fused_linear_cross_entropy`, and hands the head only the LAST
position. The model (and any wrapper around it: prompt/prefix tuning, DDP, FSDP2, whose gathered
parameters are only whole inside the forward) runs exactly as usual and its head computes [B, 1, V]
logits instead of [B, T', V]. This needs no ``logits_to_keep`` argument, and works for every model whose
forward calls its head module once.

What the model does AFTER its head is read from its config: Gemma-2's ``final_logit_softcapping``,
Cohere's ``logit_scale``, Granite's ``logits_scaling``. To catch anything else, the first fused call of
each :class:`FusedCausalLMLoss` compares the model's own logits at the last position with the fused
path's; a mismatch (or a head that is not a plain linear layer, a head called other than once...) turns
the fused path off for that model with a warning, and the loss is computed from the full logits.

Label alignment is the Trainer's: labels [B, T] are aligned with the inputs; position t predicts label
t + 1; prompt tuning's p virtual positions in front are dropped (the last T positions are kept).
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX

#: Relative error between the model's own last-position logits and the fused path's above which the fused
#: path is refused (16-bit / 32-bit compute). Real differences (a missed scaling) are O(0.1-1).
CHECK_TOL = {16: 3e-2, 32: 5e-3}
_UNCHECKED = "unchecked"  # the check could not run (non-finite logits): neither verified nor refused


# ====================================================================== plain loss
def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (float32) of next-token cross-entropies over the label tokens.

    logits [B, T', V] (T' >= T: prompt tuning prepends virtual tokens, whose logits are dropped),
    labels long [B, T] aligned with the inputs (-100: no loss)."""
    t = labels.shape[1]
    if logits.shape[1] != t:
        logits = logits[:, -t:]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] -> [B, T] where position t holds label t + 1 (the last position: -100)."""
    out = labels.new_full(labels.shape, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def fused_causal_lm_loss_sum(hidden: torch.Tensor, head, labels: torch.Tensor, *, softcap: Optional[float] = None,
                             logit_scale: float = 1.0, chunk_bytes: Optional[int] = None) -> torch.Tensor:
    """:func:`causal_lm_loss_sum` computed from the last hidden states [B, T', H] (T' >= T) and the head
    (``nn.Linear`` / ``Linear4bit`` / weight tensor): float32 sum, no [B, T, V] logits."""
    from ..ops.fused_ce import fused_linear_cross_entropy

    if hidden.dim() != 3 or labels.dim() != 2 or hidden.shape[0] != labels.shape[0] \
            or hidden.shape[1] < labels.shape[1]:
        raise ValueError(f"hidden must be [B, T', H] with B = {labels.shape[0] if labels.dim() else '?'} and "
                         f"T' >= T for labels [B, T]; got hidden {tuple(hidden.shape)}, labels {tuple(labels.shape)}")
    t = labels.shape[1]
    if hidden.shape[1] != t:
        hidden = hidden[:, -t:]
    return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head, shifted_labels(labels).reshape(-1),
                                      ignore_index=IGNORE_INDEX, softcap=softcap, logit_scale=logit_scale,
                                      reduction="sum", chunk_bytes=chunk_bytes)


# ====================================================================== the model's head
def base_model_of(model: nn.Module) -> nn.Module:
    """The model that owns the output head: inside DDP (``.module``) and prompt/prefix tuning wrappers."""
    from .distributed import unwrap_model

    model = unwrap_model(model)
    try:
        from ..methods.registry import inner_model
        model = inner_model(model)
    except ImportError:  # pragma: no cover - part of the package
        pass
    return model


def output_head(model: nn.Module) -> Optional[nn.Module]:
    """``get_output_embeddings()`` of the model owning the head (None when it has none)."""
    base = base_model_of(model)
    get = getattr(base, "get_output_embeddings", None)
    return get() if callable(get) else None


def logit_transform(model: nn.Module) -> tuple[Optional[float], float]:
    """(softcap, logit_scale) the model applies to its head's output, read from its (text) config."""
    cfg = getattr(base_model_of(model), "config", None)
    if cfg is not None and callable(getattr(cfg, "get_text_config", None)):
        cfg = cfg.get_text_config()
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = 1.0
    if isinstance(getattr(cfg, "logit_scale", None), (int, float)):  # Cohere: logits * logit_scale
        scale *= float(cfg.logit_scale)
    if isinstance(getattr(cfg, "logits_scaling", None), (int, float)) and cfg.logits_scaling:  # Granite: / s
        scale /= float(cfg.logits_scaling)
    return (float(softcap) if softcap else None), scale


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why the fused loss cannot serve ``model`` (None: it can, subject to the first-call check)."""
    from ..nn.linear4bit import Linear4bit

    head = output_head(model)
    if head is None:
        return f"{type(base_model_of(model)).__name__} has no output head (get_output_embeddings() is None)"
    if not isinstance(head, (nn.Linear, Linear4bit)):
        return (f"its output head is a {type(head).__name__}, not an nn.Linear or Linear4bit (e.g. an adapter on "
                f"lm_head): its logits are not a plain linear map of the hidden states")
    if isinstance(head, nn.Linear) and not head.weight.dtype.is_floating_point:
        return f"its output head holds a {head.weight.dtype} weight (a bitsandbytes layer? use Linear4bit.from_bnb)"
    return None


class _HeadHook:
    """While registered, the first call of the head computes the fused loss from its input (the last hidden
    states) and gets only the last position to multiply.

    The loss is computed INSIDE the model's forward, in the head's pre-hook: under FSDP2 that is where
    the head's parameters are gathered (after the forward they are shards again), and under DDP every
    parameter the loss uses is used inside the wrapped forward. Later calls of the head are left alone
    (and counted: the loss then does not apply).
    """

    def __init__(self, owner: "FusedCausalLMLoss", labels: torch.Tensor):
        self.owner, self.labels = owner, labels
        self.calls, self.loss, self.mine, self.reason = 0, None, None, None

    def __call__(self, module, args):
        self.calls += 1
        if self.calls > 1:
            return None
        x = args[0] if args else None
        lab = self.labels
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != lab.shape[0] or x.shape[1] < lab.shape[1]:
            self.reason = (f"its head saw {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__} "
                           f"instead of hidden states [B, T' >= T, H] for labels {tuple(lab.shape)}")
            return None
        o = self.owner
        self.loss = fused_causal_lm_loss_sum(x, module, lab, softcap=o.softcap, logit_scale=o.logit_scale,
                                             chunk_bytes=o.chunk_bytes)
        if not o.verified:
            from ..ops.fused_ce import head_logits

            self.mine = head_logits(x[:, -1], module, softcap=o.softcap, logit_scale=o.logit_scale)
            self.bits = 16 if _compute_bits(module, x) == 16 else 32
        return (x.narrow(1, x.shape[1] - 1, 1), *args[1:])


class _Tie(torch.autograd.Function):
    """``loss`` unchanged, made to depend on ``out`` (zero gradient): backward then passes through the forward's
    outputs, where wrappers hook their backward (FSDP2 registers its root pre-backward there)."""

    @staticmethod
    def forward(ctx, loss, out):
        ctx.out_meta = (out.shape, out.dtype, out.device)
        return loss.clone()

    @staticmethod
    def backward(ctx, g):
        shape, dtype, device = ctx.out_meta
        return g, torch.zeros(shape, dtype=dtype, device=device)


def _tie_to_outputs(loss: torch.Tensor, out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if isinstance(logits, torch.Tensor) and logits.requires_grad and loss.requires_grad:
        return _Tie.apply(loss, logits)
    return loss


def _compute_bits(head: nn.Module, x: torch.Tensor) -> int:
    from ..ops.fused_ce import resolve_head

    return 8 * resolve_head(head).compute_dtype(x).itemsize


class FusedCausalLMLoss:
    """The fused next-token loss of one model, with the one-time check against the model's own logits.

    ``loss_sum(forward, labels)`` runs ``forward()`` (the model's forward, under the caller's autocast) and
    returns the float32 summed token loss, or None when the fused path does not apply to this model —
    then it is off for good (``reason`` says why, a warning was issued) and the caller computes the loss
    from the logits by calling the model again.
    """

    def __init__(self, model: nn.Module, *, chunk_bytes: Optional[int] = None):
        self.model = model
        self.chunk_bytes = chunk_bytes
        self.reason: Optional[str] = unsupported_reason(model)
        self.head = output_head(model) if self.reason is None else None
        self.softcap, self.logit_scale = logit_transform(model)
        self.verified = False
        if self.reason is not None:
            self._warn()

    @property
    def active(self) -> bool:
        return self.reason is None

    def _warn(self) -> None:
        warnings.warn(f"fused cross-entropy is off for {type(base_model_of(self.model)).__name__}: {self.reason}; "
                      f"the loss is computed from the full logits", stacklevel=3)

    def _check(self, out, hook: _HeadHook) -> Optional[str]:
        """None when the model's own last-position logits equal the fused path's (to CHECK_TOL)."""
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            logits = out[0]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[1] != 1:
            return "its forward returned no [B, 1, V] logits to check the fused path against"
        mine = hook.mine
        theirs = logits[:, -1].detach().to(mine.dtype)
        if theirs.shape != mine.shape:
            return f"its logits have shape {tuple(theirs.shape)}, its head gives {tuple(mine.shape)}"
        if not bool(torch.isfinite(theirs).all()):
            return _UNCHECKED  # a diverged model: nothing to compare; check again on the next call
        err = float((mine - theirs).norm() / theirs.norm().clamp_min(1e-30))
        if not err <= CHECK_TOL[hook.bits]:
            return (f"its own logits differ from head(hidden states) by {err:.2g} (relative): its forward "
                    f"transforms the logits in a way the fused loss does not know")
        return None

    def loss_sum(self, forward: Callable[[], object], labels: torch.Tensor) -> Optional[torch.Tensor]:
        if self.reason is not None:
            return None
        hook = _HeadHook(self, labels)
        handle = self.head.register_forward_pre_hook(hook)
        try:
            out = forward()
        finally:
            handle.remove()
        reason = hook.reason
        if reason is None and (hook.calls != 1 or hook.loss is None):
            reason = f"its forward called the output head {hook.calls} time(s) (once, on [B, T, H], is needed)"
        if reason is None and not self.verified:
            reason = self._check(out, hook)
            if reason is None:
                self.verified = True
            elif reason is _UNCHECKED:
                reason = None
        if reason is not None:
            self.reason = reason
            self._warn()
            return None
        return _tie_to_outputs(hook.loss, out)


# ====================================================================== a helper for your own loop
#: Attribute of a model holding its :class:`FusedCausalLMLoss` for :func:`causal_lm_loss`. Kept ON the model,
#: not in a weak-keyed table: the loss object references the model, which would keep a table's key alive
#: (a leak of every model ever passed); as an attribute the two die together.
_FUSED_ATTR = "_peft_kernels_fused_loss"


def fused_loss_of(model: nn.Module) -> Optional[FusedCausalLMLoss]:
    """The :class:`FusedCausalLMLoss` :func:`causal_lm_loss` keeps for ``model`` (None before its first call)."""
    return model.__dict__.get(_FUSED_ATTR)


def model_inputs(batch: dict) -> dict:
    """The forward arguments of a batch (input_ids, attention_mask, position_ids; use_cache=False)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    inputs["use_cache"] = False
    return inputs


def causal_lm_loss(model: nn.Module, batch: dict, *, fused: bool = True, reduction: str = "mean",
                   chunk_bytes: Optional[int] = None) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` on ``batch`` (``input_ids`` [B, T], ``labels`` [B, T] aligned
    with the inputs, -100 = no loss; ``attention_mask`` / ``position_ids`` optional), float32.

    reduction: "mean" over the label tokens (0 with a warning when there are none) or "sum".
    fused: compute it from the hidden states and the head (see the module docstring); falls back to the
    logits, with a warning once per model, when the model does not allow it. Run it under your autocast
    as you would run the model.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    labels = batch["labels"]
    inputs = model_inputs(batch)
    total = None
    if fused:
        loss_fn = fused_loss_of(model)
        if loss_fn is None or loss_fn.chunk_bytes != chunk_bytes:
            loss_fn = FusedCausalLMLoss(model, chunk_bytes=chunk_bytes)
            model.__dict__[_FUSED_ATTR] = loss_fn  # plain attribute: not a submodule, not in the state dict
        total = loss_fn.loss_sum(lambda: model(**inputs), labels)
    if total is None:
        out = model(**inputs)
        total = causal_lm_loss_sum(out.logits if hasattr(out, "logits") else out[0], labels)
    if reduction == "sum":
        return total
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    if n == 0:
        warnings.warn("causal_lm_loss: the batch has no label tokens; the mean loss is 0", stacklevel=2)
        return total * 0.0
    return total / n


__all__ = ["causal_lm_loss", "causal_lm_loss_sum", "fused_causal_lm_loss_sum", "FusedCausalLMLoss",
           "output_head", "fused_loss_of", "logit_transform", "unsupported_reason", "shifted_labels", "model_inputs", "CHECK_TOL"]
