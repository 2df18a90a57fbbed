"""Optimizers and learning-rate schedules for the Trainer.

* :func:`build_optimizer`: ``"adamw"`` (torch), ``"adamw8bit"`` / ``"paged_adamw8bit"`` (bitsandbytes'
  block-wise 8-bit AdamW; the paged one keeps its state in CUDA unified memory). With bitsandbytes 0.50.2
  both 8-bit optimizers also run on CPU tensors (the paged one then warns and behaves as the plain 8-bit
  one, since paging needs CUDA). Parameters with fewer than 4096 elements keep 32-bit state
  (bitsandbytes' ``min_8bit_size``), so tiny adapters see no 8-bit effect.
  Weight decay applies to matrices (ndim >= 2) only: decaying biases, norm weights or 1-D deltas toward
  0 is not what users of ``weight_decay`` expect (the transformers Trainer makes the same split).
* :class:`StepInBackward`: the optimizer step fused into backward, each parameter updated (and its
  gradient freed) as soon as its gradient is complete (``TrainConfig.optimizer_in_backward``).
* :func:`lr_lambda` / :func:`build_scheduler`: linear warmup over ``warmup_steps`` steps, then
  ``"cosine"`` (to 0 at ``max_steps``), ``"linear"`` (to 0 at ``max_steps``) or ``"constant"``. The
  multiplier is a pure function of the step, so a resumed run gets exactly the same learning rates.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Iterable

import torch
from torch import nn

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
SCHEDULERS = ("cosine", "linear", "constant")


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two groups: matrices (decayed) and vectors/scalars (not). Empty groups are left out."""
    decay, no_decay = [], []
    for _, p in named_params:
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], name: str = "adamw", *, lr: float = 2e-4,
                    weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``named_params`` (the trainable ones, in a fixed order).

    Raises ValueError for an unknown name or no parameters; ImportError (with the install hint) when
    bitsandbytes is missing for an 8-bit optimizer.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    if not named_params:
        raise ValueError("no trainable parameters: apply a PEFT method (or unfreeze something) before training")
    groups = param_groups(named_params, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
        raise ImportError(f"optimizer {name!r} needs bitsandbytes (pip install bitsandbytes): {e}") from e
    cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.PagedAdamW8bit
    if name == "paged_adamw8bit" and not any(p.is_cuda for _, p in named_params):
        import warnings

        warnings.warn("paged_adamw8bit pages optimizer state through CUDA unified memory; on CPU it behaves "
                      "as adamw8bit", stacklevel=2)
    return cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def lr_lambda(step: int, *, scheduler: str, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based: the first step uses 0).

    Warmup ramps linearly from 1/(warmup+1) to 1 over the first ``warmup_steps`` steps; then cosine or
    linear decay reach 0 after ``max_steps`` steps, constant stays at 1.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {SCHEDULERS}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if scheduler == "constant":
        return 1.0
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class _Schedule:
    """Picklable-free callable for LambdaLR (a closure would do, but this one has a readable repr)."""

    def __init__(self, scheduler: str, warmup_steps: int, max_steps: int):
        self.scheduler, self.warmup_steps, self.max_steps = scheduler, warmup_steps, max_steps

    def __call__(self, step: int) -> float:
        return lr_lambda(step, scheduler=self.scheduler, warmup_steps=self.warmup_steps, max_steps=self.max_steps)

    def __repr__(self) -> str:
        return f"_Schedule({self.scheduler!r}, warmup={self.warmup_steps}, max_steps={self.max_steps})"


def build_scheduler(optimizer: torch.optim.Optimizer, scheduler: str = "cosine", *, warmup_steps: int = 0,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying :func:`lr_lambda`; call ``.step()`` once after each optimizer step."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {SCHEDULERS}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(scheduler, warmup_steps, max_steps))


class StepInBackward:
    """Run ``optimizer``'s update of each parameter inside backward, as soon as its gradient is complete, and
    free that gradient at once: the step never holds every trainable parameter's gradient at the same time
    (for a 70B-shaped QLoRA at r = 16 that is 0.8 GB of float32 gradients).

    How: a ``register_post_accumulate_grad_hook`` per parameter calls ``optimizer.step()`` with its
    ``param_groups`` narrowed to that parameter's group holding that parameter alone (the group's current
    hyperparameters, so the LR schedule applies), then sets the gradient to None. The optimizer object, its
    state (keyed by parameter) and its state_dict stay those of the ordinary step, so checkpoints and
    schedules are unchanged. torch's AdamW and bitsandbytes' 8-bit AdamW update each parameter from its
    own gradient and state only, so the result is the ordinary step's.

    Only while :attr:`active` (the Trainer sets it around its backward): other backward passes (an eval,
    a user's own) leave gradients alone. Incompatible with anything that needs all gradients before any
    update — gradient accumulation, clipping by the global norm, fp16 loss scaling, DDP/FSDP reductions —
    the Trainer refuses those combinations. The hooks hold this object weakly: keep a reference to it for
    as long as it should act (the Trainer does); once it is gone the model and optimizer can be freed.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.active = False
        self.steps = 0  # parameter updates done (tests count them)
        self._group_of = {p: g for g in optimizer.param_groups for p in g["params"]}
        # The hooks live on the tensors (C++ side, which the garbage collector cannot traverse): a hook holding
        # this object strongly would make parameter -> hook -> self -> optimizer -> parameter an uncollectable
        # cycle, leaking the model. They hold it weakly and do nothing once it is gone.
        ref = weakref.ref(self)

        def hook(p: torch.Tensor) -> None:
            me = ref()
            if me is not None:
                me._step(p)

        self._handles = [p.register_post_accumulate_grad_hook(hook) for p in self._group_of]

    def _step(self, p: torch.Tensor) -> None:
        if not self.active or p.grad is None:
            return
        opt = self.optimizer
        full = opt.param_groups
        opt.param_groups = [{**self._group_of[p], "params": [p]}]
        try:
            opt.step()
        finally:
            opt.param_groups = full
        p.grad = None
        self.steps += 1

    def remove(self) -> None:
        """Unregister the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


__all__ = ["OPTIMIZERS", "SCHEDULERS", "param_groups", "build_optimizer", "lr_lambda", "build_scheduler",
           "StepInBackward"]
