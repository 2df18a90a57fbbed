"""A thin training loop for PEFT models: accumulation with correct loss normalisation, mixed precision,
8-bit optimizers, schedules, evaluation, a progress bar, atomic checkpoints, exact resume and Ctrl-C.

    from peft_kernels.train.data import load_records, tokenize_records
    from peft_kernels.train.trainer import TrainConfig, Trainer

    examples = tokenize_records(load_records("data.jsonl"), tokenizer, seq_len=512)
    cfg = TrainConfig(output_dir="out", max_steps=200, batch_size=4, grad_accum=4, precision="bf16",
                      save_every=50, eval_every=50)
    result = Trainer(model, tokenizer, cfg, examples, eval_examples).train()   # resume_from="latest"

Loss: the mean over the label tokens of the whole *accumulated* batch — every micro-batch's summed token
loss is divided by the label-token count of all ``grad_accum`` micro-batches (of all ranks), so
accumulating k micro-batches gives the gradient of one k-times larger batch, whatever the padding.

Steps: one optimizer step consumes ``grad_accum × world_size`` batches of an endless stream of epochs,
each shuffled by (seed, epoch); the data position (epoch, batch index) is part of every checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import resource
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import checkpoint as ckpt
from .data import count_label_tokens, data_hash, epoch_batches
from .loss import FusedCausalLMLoss, causal_lm_loss_sum
from .optim import OPTIMIZERS, SCHEDULERS, StepInBackward, build_optimizer, build_scheduler

PRECISIONS = ("fp32", "bf16", "fp16")
DISTRIBUTED = (None, "ddp", "fsdp2")
#: TrainConfig fields a resumed run must share with the checkpoint's (they fix the data stream and steps).
CURVE_FIELDS = ("batch_size", "grad_accum", "seed", "packing", "seq_len")


# ============================================================================ config
@dataclasses.dataclass
class TrainConfig:
    """Training settings. ``from_dict`` refuses unknown keys; every value is checked on construction.

    keep_last: how many checkpoints to keep (None: all). eval_batch_size: None uses batch_size.
    distributed: "ddp" | "fsdp2" | None (None means "ddp" when torch.distributed runs with > 1 process).
    fused_cross_entropy: compute the loss from the last hidden states and the output head in chunks
    (:mod:`peft_kernels.train.loss`), never building the [B, T, V] logits; the same loss and gradients
    as the logits path to floating-point tolerance. Models it cannot serve (a head that is not a plain
    linear layer, unknown logit post-processing) fall back to the logits with a warning.
    optimizer_in_backward: update each parameter inside backward as soon as its gradient is complete and
    free that gradient (:class:`~peft_kernels.train.optim.StepInBackward`): the step never holds all
    gradients at once. Needs grad_accum = 1, max_grad_norm = None, precision bf16/fp32 and one process.
    """

    output_dir: str
    max_steps: int
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    precision: str = "fp32"
    seq_len: int = 512
    packing: bool = False
    eval_every: Optional[int] = None
    save_every: Optional[int] = None
    log_every: int = 1
    seed: int = 0
    max_grad_norm: Optional[float] = 1.0
    progress: bool = True
    keep_last: Optional[int] = 3
    eval_batch_size: Optional[int] = None
    distributed: Optional[str] = None
    fused_cross_entropy: bool = True
    optimizer_in_backward: bool = False

    def __post_init__(self):
        errors = []

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not isinstance(self.output_dir, (str, Path)) or not str(self.output_dir):
            errors.append(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        else:
            self.output_dir = str(self.output_dir)
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "log_every"):
            v = getattr(self, name)
            if not is_int(v) or v < (2 if name == "seq_len" else 1):
                errors.append(f"{name} must be an integer >= {2 if name == 'seq_len' else 1}, got {v!r}")
        for name in ("eval_every", "save_every", "keep_last", "eval_batch_size"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 1):
                errors.append(f"{name} must be None or an integer >= 1, got {v!r}")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            errors.append(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        elif is_int(self.max_steps) and self.warmup_steps > self.max_steps:
            errors.append(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        if not is_num(self.lr) or self.lr <= 0:
            errors.append(f"lr must be a finite number > 0, got {self.lr!r}")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            errors.append(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and (not is_num(self.max_grad_norm) or self.max_grad_norm <= 0):
            errors.append(f"max_grad_norm must be None or a finite number > 0, got {self.max_grad_norm!r}")
        if not is_int(self.seed) or self.seed < 0:
            errors.append(f"seed must be an integer >= 0, got {self.seed!r}")
        for name, allowed in (("scheduler", SCHEDULERS), ("optimizer", OPTIMIZERS), ("precision", PRECISIONS),
                              ("distributed", DISTRIBUTED)):
            if getattr(self, name) not in allowed:
                errors.append(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("packing", "progress", "fused_cross_entropy", "optimizer_in_backward"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.optimizer_in_backward is True:
            # each parameter is updated as soon as its own gradient exists: nothing may need all of them first
            for bad, why in ((self.grad_accum != 1, f"grad_accum={self.grad_accum} (must be 1)"),
                             (self.max_grad_norm is not None,
                              f"max_grad_norm={self.max_grad_norm} (clipping by the global norm; set None)"),
                             (self.precision == "fp16", "precision='fp16' (loss scaling; use bf16)")):
                if bad:
                    errors.append(f"optimizer_in_backward=True cannot be used with {why}")
        if errors:
            raise ValueError("invalid TrainConfig: " + "; ".join(errors))

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from plain values (a YAML/JSON section); unknown keys raise ValueError naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"a train config must be a mapping, got {type(d).__name__}")
        unknown = sorted(k for k in d if k not in cls.fields())
        if unknown:
            raise ValueError(f"unknown train config key(s) {unknown}; valid keys: {cls.fields()}")
        missing = [k for k in ("output_dir", "max_steps") if k not in d]
        if missing:
            raise ValueError(f"train config is missing required key(s) {missing}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns.

    losses: training loss of every optimizer step from step 1 (a resumed run includes the steps before
    the resume, read from the checkpoint). tokens_per_s: input tokens (pads excluded) per second of this
    call's steps (all ranks together). peak_bytes: peak device memory (CUDA: max allocated; CPU: the
    process's peak RSS).
    """

    losses: list[float]
    steps: int
    tokens_per_s: float
    peak_bytes: int
    eval_losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    checkpoint: Optional[str] = None


# ============================================================================ helpers
def _forward_accepts(model: nn.Module, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.requires_grad:
            return p.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _dist():
    """(world_size, rank) of an initialised torch.distributed group, else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@contextmanager
def _defer_sigint():
    """Hold back Ctrl-C while the optimizer updates parameters (a half-applied update cannot be saved)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    try:
        old = signal.signal(signal.SIGINT, lambda s, f: got.append(s))
    except (ValueError, TypeError):  # pragma: no cover - not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            raise KeyboardInterrupt


def run_fingerprint(model: nn.Module, examples: Sequence[dict], cfg: TrainConfig) -> dict:
    """What identifies a run for resume: the base model, the methods and their trainable tensors, the data
    and the settings that fix the data stream (:data:`CURVE_FIELDS`)."""
    from ..io.method_files import model_fingerprint

    try:
        from ..methods.registry import applied_methods, inner_model
        methods = applied_methods(model)
        base = inner_model(model)
    except ImportError:  # pragma: no cover - registry is part of the package
        methods, base = [], model
    trainable = [[n, list(p.shape), str(p.dtype)] for n, p in model.named_parameters() if p.requires_grad]
    method_hash = hashlib.sha256(json.dumps([methods, trainable]).encode()).hexdigest()
    return {"model": model_fingerprint(base), "methods": methods, "method_hash": method_hash,
            "data_hash": data_hash(examples), "curve": {k: getattr(cfg, k) for k in CURVE_FIELDS}}


# ============================================================================ trainer
class Trainer:
    """Train ``model``'s trainable parameters on tokenized ``train_examples`` (see :mod:`.data`).

    ``tokenizer`` gives the pad id (pad, else eos, else 0). ``callbacks``: callables
    ``cb(trainer, logs: dict)`` run after every optimizer step on every rank (logs: step, loss, lr,
    tokens_per_s, memory_bytes, and eval_loss on eval steps); raising KeyboardInterrupt there behaves
    like Ctrl-C.
    """

    def __init__(self, model: nn.Module, tokenizer, cfg: TrainConfig, train_examples: Sequence[dict],
                 eval_examples: Optional[Sequence[dict]] = None, *, callbacks: Sequence[Callable] = ()):
        if isinstance(cfg, dict):
            cfg = TrainConfig.from_dict(cfg)
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig (or a dict), got {type(cfg).__name__}")
        if not train_examples:
            raise ValueError("no training examples")
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.train_examples = list(train_examples)
        self.eval_examples = list(eval_examples) if eval_examples else []
        self.callbacks = list(callbacks)
        self.pad_token_id = self._pad_id(tokenizer)
        self.device = _device_of(model)
        self.world_size, self.rank = _dist()
        self._check_packing()
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameters: apply a PEFT method before training")
        self.train_model = self._wrap(model)
        # after wrapping: FSDP2 replaces the parameters by sharded DTensor ones
        self.named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.named_trainable, cfg.optimizer, lr=cfg.lr,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, warmup_steps=cfg.warmup_steps,
                                         max_steps=cfg.max_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.regrow = self._drop_and_grow()
        self.step_in_backward = self._step_in_backward()
        self.step = 0
        self.position = {"epoch": 0, "index": 0}
        self.losses: list[float] = []
        self.eval_losses: list[tuple[int, float]] = []
        self._batches: tuple[int, list[dict]] | None = None
        self._fingerprint: dict | None = None
        self._pass_positions = _forward_accepts(model, "position_ids")
        self._fused_ce = FusedCausalLMLoss(model) if cfg.fused_cross_entropy else None
        # (data position, RNG state, owner buffers) at the start of the running step: what an interrupt
        # inside the step rewinds to (None between steps)
        self._step_start: tuple[dict, tuple, dict] | None = None
        self._tokens = 0

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _pad_id(tokenizer) -> int:
        for attr in ("pad_token_id", "eos_token_id"):
            v = getattr(tokenizer, attr, None) if tokenizer is not None else None
            if isinstance(v, int):
                return v
        return 0

    def _check_packing(self) -> None:
        if not self.cfg.packing:
            return
        try:
            from ..methods.registry import applied_methods
            wrappers = [m for m in applied_methods(self.model) if m in ("prompt_tuning", "prefix_tuning")]
        except ImportError:  # pragma: no cover
            wrappers = []
        if wrappers:
            raise ValueError(f"packing=True cannot be used with {wrappers[0]}: the virtual tokens sit before the "
                             f"first packed example only; use packing=False")
        if not _forward_accepts(self.model, "position_ids"):
            raise ValueError(f"packing=True needs a model whose forward takes position_ids "
                             f"({type(self.model).__name__} does not)")

    def _drop_and_grow(self):
        """Sparse fine-tuning with ``regrow_every`` set: its drop-and-grow schedule, stepped after each
        optimizer step (its counter and generator are checkpointed; the candidate buffers are saved with
        the trainable tensors)."""
        try:
            from ..methods import sparse
            scfg = sparse.get_config(self.model)
        except (ImportError, AttributeError):  # pragma: no cover
            return None
        if scfg is None or scfg.regrow_every is None:
            return None
        return sparse.DropAndGrow(self.model, self.optimizer, scfg)

    def _step_in_backward(self):
        """:class:`StepInBackward` when ``optimizer_in_backward`` is on (refused where it cannot be exact)."""
        if not self.cfg.optimizer_in_backward:
            return None
        if self.world_size > 1:
            raise ValueError("optimizer_in_backward=True needs one process: DDP/FSDP reduce gradients after "
                             "backward, and each rank would update before the reduction")
        if self.regrow is not None:
            raise ValueError("optimizer_in_backward=True cannot be used with sparse drop-and-grow (regrow_every), "
                             "which reads the optimizer state between steps")
        return StepInBackward(self.optimizer)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size <= 1:
            return model
        from . import distributed  # the distributed helper's module (DDP / FSDP2 over 4-bit bases)

        return distributed.wrap_model(model, self.cfg.distributed or "ddp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ data stream
    def _epoch(self, epoch: int) -> list[dict]:
        if self._batches is None or self._batches[0] != epoch:
            self._batches = (epoch, epoch_batches(self.train_examples, self.cfg.batch_size, packing=self.cfg.packing,
                                                  pad_token_id=self.pad_token_id, seed=self.cfg.seed, epoch=epoch,
                                                  seq_len=self.cfg.seq_len))
        return self._batches[1]

    def _next_step_batches(self) -> list[dict]:
        """The ``grad_accum × world`` batches of the next optimizer step (all ranks see the same list)."""
        out = []
        while len(out) < self.cfg.grad_accum * self.world_size:
            batches = self._epoch(self.position["epoch"])
            if self.position["index"] >= len(batches):
                self.position = {"epoch": self.position["epoch"] + 1, "index": 0}
                continue
            out.append(batches[self.position["index"]])
            self.position = {"epoch": self.position["epoch"], "index": self.position["index"] + 1}
        return out

    # ------------------------------------------------------------------ forward / backward
    def _autocast(self):
        if self.cfg.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _inputs(self, batch: dict) -> dict:
        inputs = {"input_ids": batch["input_ids"].to(self.device)}
        if "attention_mask" in batch:
            inputs["attention_mask"] = batch["attention_mask"].to(self.device)
        if self._pass_positions and "position_ids" in batch:
            inputs["position_ids"] = batch["position_ids"].to(self.device)
        inputs["use_cache"] = False
        return inputs

    @property
    def fused_cross_entropy_active(self) -> bool:
        """True while the loss is computed by the fused path (``TrainConfig.fused_cross_entropy`` on and the
        model supported; it turns False for good if the first step's check against the logits fails)."""
        return self._fused_ce is not None and self._fused_ce.active

    def loss_sum(self, batch: dict, model: Optional[nn.Module] = None) -> torch.Tensor:
        """Summed token loss (float32 scalar) of one batch through ``model`` (default: the training model)."""
        model = model or self.train_model
        labels = batch["labels"].to(self.device)
        if self.fused_cross_entropy_active:
            # the model's own forward (through DDP/FSDP and prompt wrappers); its head sees one position only
            with self._autocast():
                loss = self._fused_ce.loss_sum(lambda: model(**self._inputs(batch)), labels)
            if loss is not None:
                return loss
        with self._autocast():
            out = model(**self._inputs(batch))
        logits = out.logits if hasattr(out, "logits") else out[0]
        return causal_lm_loss_sum(logits, labels)

    def accumulate_gradients(self, micro_batches: Sequence[dict], n_tokens: Optional[int] = None) -> tuple[float, int]:
        """Backward every micro-batch with its loss sum divided by ``n_tokens`` (default: the label tokens of
        all ``micro_batches``); adds into ``.grad``. Returns (summed token loss, n_tokens).

        Under DDP/FSDP each rank passes its own micro-batches and the global ``n_tokens``; gradients are
        scaled by the world size because the wrappers average them across ranks."""
        if n_tokens is None:
            n_tokens = sum(count_label_tokens(b) for b in micro_batches)
        if n_tokens == 0:
            raise ValueError("the accumulated batch has no label tokens")
        total = 0.0
        for i, b in enumerate(micro_batches):
            # gradients sync across ranks once, on the last micro-batch
            with self._no_sync(i < len(micro_batches) - 1):
                loss = self.loss_sum(b)
                total += float(loss.detach())
                self.scaler.scale(loss * (self.world_size / n_tokens)).backward()
        return total, n_tokens

    def _no_sync(self, skip: bool):
        if self.world_size <= 1 or not skip:
            return nullcontext()
        from .distributed import no_sync

        return no_sync(self.train_model)

    def _all_reduce_sum(self, x: float) -> float:
        if self.world_size <= 1:
            return x
        import torch.distributed as dist

        t = torch.tensor([x], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item())

    def train_step(self) -> float:
        """One optimizer step on the next accumulated batch; returns its loss (mean over label tokens)."""
        batches = self._next_step_batches()
        n_tokens = sum(count_label_tokens(b) for b in batches)
        mine = batches[self.rank::self.world_size]
        self.train_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.step_in_backward is not None:
            return self._train_step_in_backward(mine[0], n_tokens, batches)
        loss_sum, _ = self.accumulate_gradients(mine, n_tokens)
        loss_sum = self._all_reduce_sum(loss_sum)
        if not math.isfinite(loss_sum) and not self.scaler.is_enabled():
            # (fp16: an overflow is the GradScaler's business: it skips the step and lowers the scale)
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"the training loss is {loss_sum / n_tokens} at step {self.step + 1}; the "
                                     f"parameters were not updated (lower lr, or use fp32/bf16 precision)")
        with _defer_sigint():
            if self.cfg.max_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_([p for _, p in self.named_trainable], self.cfg.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.regrow is not None:
                self.regrow.step()
            self.step += 1
            loss = loss_sum / n_tokens
            self.losses.append(loss)
            self._step_start = None  # the step is complete: a checkpoint now is of this step's end
        self._tokens += sum(int(b["num_tokens"]) for b in batches)  # all ranks' tokens: global throughput
        return loss

    def _train_step_in_backward(self, batch: dict, n_tokens: int, batches: list[dict]) -> float:
        """train_step with the update inside backward (one micro-batch, one process: see TrainConfig)."""
        if n_tokens == 0:
            raise ValueError("the accumulated batch has no label tokens")
        loss = self.loss_sum(batch)
        loss_sum = float(loss.detach())
        if not math.isfinite(loss_sum):  # checked before backward: the updates happen inside it
            raise FloatingPointError(f"the training loss is {loss_sum / n_tokens} at step {self.step + 1}; the "
                                     f"parameters were not updated (lower lr, or use fp32/bf16 precision)")
        with _defer_sigint():  # a Ctrl-C inside backward would leave some parameters updated, others not
            self.step_in_backward.active = True
            try:
                (loss / n_tokens).backward()
            finally:
                self.step_in_backward.active = False
            self.scheduler.step()
            self.step += 1
            self.losses.append(loss_sum / n_tokens)
            self._step_start = None
        self._tokens += sum(int(b["num_tokens"]) for b in batches)
        return loss_sum / n_tokens

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over all eval examples (padded batches of eval_batch_size, fixed order)."""
        if not self.eval_examples:
            raise ValueError("no eval examples were given to the Trainer")
        bs = self.cfg.eval_batch_size or self.cfg.batch_size
        batches = epoch_batches(self.eval_examples, bs, packing=False, pad_token_id=self.pad_token_id,
                                seed=self.cfg.seed, epoch=-1)
        was_training = self.train_model.training
        self.train_model.eval()
        total, count = 0.0, 0
        try:
            # every rank runs the same number of forwards (FSDP2 gathers collectively); a rank without a
            # batch of its own in the last round recomputes batch 0 and ignores it
            for i in range(math.ceil(len(batches) / self.world_size)):
                j = i * self.world_size + self.rank
                loss = float(self.loss_sum(batches[j if j < len(batches) else 0]))
                if j < len(batches):
                    total += loss
                    count += count_label_tokens(batches[j])
        finally:
            self.train_model.train(was_training)
        total, count = self._all_reduce_sum(total), self._all_reduce_sum(count)
        return total / max(count, 1)

    # ------------------------------------------------------------------ checkpoints
    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = run_fingerprint(self.model, self.train_examples, self.cfg)
        return self._fingerprint

    def _trainable_tensors(self) -> dict[str, torch.Tensor]:
        """Trainable parameters (as the module holds them now: whole tensors inside FSDP2's
        ``gathered_params``), plus the buffers of the modules owning them (sparse indices, drop-and-grow
        candidates)."""
        names = [n for n, _ in self.named_trainable]
        out = {}
        for n in names:
            owner, _, attr = n.rpartition(".")
            out[n] = getattr(self.model.get_submodule(owner) if owner else self.model, attr)
        for owner in {n.rpartition(".")[0] for n in names}:
            mod = self.model.get_submodule(owner) if owner else self.model
            for bn, buf in mod.named_buffers(recurse=False):
                if buf is not None:
                    out[f"{owner}.{bn}" if owner else bn] = buf
        return out

    def _owner_buffers(self) -> dict[str, torch.Tensor]:
        """Copies of the buffers of the modules owning trainable parameters. Backward can write into them
        (sparse drop-and-grow accumulates candidate scores): an interrupted step must not leave its part."""
        names = {n for n, _ in self.named_trainable}
        return {k: v.detach().clone() for k, v in self._trainable_tensors().items()
                if k not in names and not hasattr(v, "device_mesh")}

    def _gathered(self):
        if self.world_size <= 1:
            return nullcontext()
        from .distributed import gathered_params

        return gathered_params(self.train_model)

    def _rng_all_ranks(self, rng: tuple | None) -> tuple[dict, dict]:
        """This rank's RNG state (or ``rng``); with several ranks every rank's, keys suffixed ``@<rank>``."""
        tensors, meta = rng or ckpt.capture_rng()
        if self.world_size <= 1:
            return tensors, meta
        import torch.distributed as dist

        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, ({k: v.cpu() for k, v in tensors.items()}, meta))
        out_t, out_m = {}, {}
        for r, (t, m) in enumerate(gathered):
            out_t.update({f"{k}@{r}": v for k, v in t.items()})
            out_m[str(r)] = m
        return out_t, {"per_rank": out_m}

    def save_checkpoint(self, *, _rng: tuple | None = None, _position: dict | None = None) -> Path:
        """Write ``output_dir/checkpoint-<step>`` atomically and prune to ``keep_last``; returns its path.

        Every rank must call it when several run (FSDP2 shards are gathered, RNG states collected); rank 0
        writes. An OSError while writing (a full disk) leaves no partial checkpoint and the earlier ones
        intact; it is re-raised naming the checkpoint."""
        rng_t, rng_meta = self._rng_all_ranks(_rng)
        opt_t, opt_meta = ckpt.optimizer_state_split(self.optimizer.state_dict())
        if any(hasattr(t, "full_tensor") for t in opt_t.values()):
            opt_t = {k: ckpt.whole_cpu_tensor(v) for k, v in opt_t.items()}  # collective: every rank
        extra_t, extra = {}, {}
        if self.regrow is not None:
            extra_t["regrow.gen"] = self.regrow.gen.get_state()
            extra["regrow"] = {"steps": self.regrow.steps}
        path = Path(self.cfg.output_dir) / ckpt.checkpoint_name(self.step)
        with self._gathered():
            trainable = self._trainable_tensors()
            if self.is_main:
                state = {
                    "step": self.step,
                    "position": dict(_position or self.position),
                    "losses": self.losses,
                    "eval_losses": [list(e) for e in self.eval_losses],
                    "config": self.cfg.to_dict(),
                    "fingerprint": self.fingerprint(),
                    "trainable_names": [n for n, _ in self.named_trainable],
                    "optimizer": opt_meta,
                    "scheduler": {k: self.scheduler.state_dict()[k] for k in ("last_epoch", "_step_count")},
                    "scaler": self.scaler.state_dict(),
                    "rng": rng_meta,
                    "world_size": self.world_size,
                    **extra,
                }
                try:
                    ckpt.write_checkpoint(path, trainable=trainable, state_tensors={**opt_t, **rng_t, **extra_t},
                                          state=state, save_adapter=self._save_adapter)
                except OSError as e:
                    raise OSError(e.errno, f"could not write checkpoint {path} ({e.strerror or e}); nothing was "
                                           f"written there and earlier checkpoints are intact") from e
                ckpt.prune_checkpoints(self.cfg.output_dir, self.cfg.keep_last)
        self._barrier()
        return path

    def _save_adapter(self, directory: Path) -> None:
        from ..methods.registry import save_adapters

        save_adapters(self.model, directory)

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything a checkpoint holds; refuses one made by another run (CheckpointError)."""
        data = ckpt.read_checkpoint(path)
        st = data.state
        mine, theirs = self.fingerprint(), st["fingerprint"]
        diffs = [k for k in ("model", "method_hash", "data_hash", "curve") if mine.get(k) != theirs.get(k)]
        if diffs:
            detail = {"model": "the base model differs", "method_hash": "the PEFT methods / trainable tensors differ",
                      "data_hash": "the training data differs",
                      "curve": f"batch settings differ ({theirs.get('curve')} vs {mine.get('curve')})"}
            raise ckpt.CheckpointError(f"{data.path} was written by another run: "
                                       + "; ".join(detail[k] for k in diffs))
        names = [n for n, _ in self.named_trainable]
        if st.get("trainable_names") != names:
            raise ckpt.CheckpointError(f"{data.path}: trainable parameter names differ from this model's")
        if data.step > self.cfg.max_steps:
            raise ckpt.CheckpointError(f"{data.path} is at step {data.step}, beyond max_steps={self.cfg.max_steps}")
        old = {k: v for k, v in st["config"].items() if k in ("lr", "scheduler", "warmup_steps", "optimizer",
                                                                 "weight_decay", "precision", "max_steps")}
        changed = {k: (v, getattr(self.cfg, k)) for k, v in old.items() if getattr(self.cfg, k) != v}
        if st.get("world_size", 1) != self.world_size:
            changed["world_size"] = (st.get("world_size", 1), self.world_size)  # batches per step change
        if changed:
            warnings.warn(f"resuming {data.path} with changed settings {changed}: the loss curve will differ from "
                          f"the uninterrupted run", stacklevel=2)
        # check tensors before changing anything
        target = self._trainable_tensors()
        missing = sorted(set(target) - set(data.trainable))
        bad = [k for k in target if k in data.trainable and data.trainable[k].shape != target[k].shape]
        if missing or bad:
            raise ckpt.CheckpointError(f"{data.path}: trainable tensors missing {missing[:5]} or with other shapes "
                                       f"{bad[:5]}")
        saved_groups = [len(g.get("params", [])) for g in st["optimizer"].get("param_groups", [])]
        mine_groups = [len(g["params"]) for g in self.optimizer.param_groups]
        if saved_groups != mine_groups:
            raise ckpt.CheckpointError(f"{data.path}: optimizer parameter groups {saved_groups} do not match this "
                                       f"run's {mine_groups} (another optimizer or weight-decay split)")
        with torch.no_grad():
            for k, t in target.items():
                src = data.trainable[k]
                if hasattr(t, "device_mesh"):  # FSDP2 DTensor: re-shard the full tensor
                    from torch.distributed.tensor import distribute_tensor
                    src = distribute_tensor(src.to(t.dtype), t.device_mesh, t.placements)
                    t.copy_(src)
                else:
                    t.copy_(src.to(device=t.device, dtype=t.dtype))
        opt_t = {k: v for k, v in data.state_tensors.items() if k.startswith(("optim.", "group."))}
        sd = ckpt.optimizer_state_join(opt_t, st["optimizer"])
        self._shard_optimizer_state(sd)
        self.optimizer.load_state_dict(sd)
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), **st["scheduler"]})
        # learning rates from this run's settings (the same as the checkpoint's unless they were changed)
        lam = self.scheduler.lr_lambdas[0]
        for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            g["initial_lr"] = base
            g["lr"] = base * lam(self.scheduler.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        rng_t = {k: v for k, v in data.state_tensors.items() if k.startswith("rng.")}
        rng_meta = st["rng"]
        if "per_rank" in rng_meta:  # written by several ranks: this rank's own streams (rank 0's if fewer)
            r = self.rank if str(self.rank) in rng_meta["per_rank"] else 0
            rng_t = {k.rsplit("@", 1)[0]: v for k, v in rng_t.items() if k.endswith(f"@{r}")}
            rng_meta = rng_meta["per_rank"][str(r)]
        ckpt.restore_rng(rng_t, rng_meta)
        if self.regrow is not None and "regrow" in st:
            self.regrow.steps = int(st["regrow"]["steps"])
            self.regrow.gen.set_state(data.state_tensors["regrow.gen"])
        self.step = data.step
        self.position = dict(st["position"])
        self.losses = list(st.get("losses", []))
        self.eval_losses = [tuple(e) for e in st.get("eval_losses", [])]
        self._batches = None

    def _shard_optimizer_state(self, sd: dict) -> None:
        """Under FSDP2 the parameters are DTensor shards: shard the saved full state tensors alike."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if not any(hasattr(p, "device_mesh") for p in params):
            return
        from torch.distributed.tensor import distribute_tensor

        for idx, st in sd["state"].items():
            p = params[int(idx)]
            if not hasattr(p, "device_mesh"):
                continue
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape):
                    st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)

    # ------------------------------------------------------------------ loop
    def train(self, resume_from: str | Path | None = None) -> TrainResult:
        """Train until ``max_steps``. ``resume_from``: a checkpoint directory, or "latest" (the newest in
        output_dir, if any). Ctrl-C (KeyboardInterrupt) saves a checkpoint of the last completed step,
        then re-raises."""
        if resume_from is not None:
            path = ckpt.latest_checkpoint(self.cfg.output_dir) if resume_from == "latest" else Path(resume_from)
            if path is not None:
                self.load_checkpoint(path)
        self._tokens = 0
        t0 = time.perf_counter()
        start_step = self.step
        bar = self._progress_bar(start_step)
        last_ckpt: Optional[Path] = None
        try:
            while self.step < self.cfg.max_steps:
                self._step_start = (dict(self.position), ckpt.capture_rng(), self._owner_buffers())
                loss = self.train_step()
                logs = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0]}
                elapsed = time.perf_counter() - t0
                logs["tokens_per_s"] = self._tokens / elapsed if elapsed > 0 else 0.0
                logs["memory_bytes"] = _memory_bytes(self.device)
                if self.cfg.eval_every and self.eval_examples and self.step % self.cfg.eval_every == 0:
                    logs["eval_loss"] = self.evaluate()
                    self.eval_losses.append((self.step, logs["eval_loss"]))
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    last_ckpt = self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
                    if self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps:
                        post = {"loss": f"{loss:.4f}", "tok/s": f"{logs['tokens_per_s']:.0f}",
                                "mem": _fmt_bytes(logs["memory_bytes"])}
                        if "eval_loss" in logs:
                            post["eval"] = f"{logs['eval_loss']:.4f}"
                        bar.set_postfix(post, refresh=False)
                for cb in self.callbacks:
                    cb(self, logs)
        except KeyboardInterrupt:
            self._on_interrupt(bar)
            raise
        finally:
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - t0
        if self.cfg.save_every and (last_ckpt is None or self.step % self.cfg.save_every):
            last_ckpt = self.save_checkpoint()  # the final state is always kept when checkpointing is on
        return TrainResult(losses=list(self.losses), steps=self.step,
                           tokens_per_s=self._tokens / elapsed if elapsed > 0 else 0.0,
                           peak_bytes=_memory_bytes(self.device), eval_losses=list(self.eval_losses),
                           checkpoint=str(last_ckpt) if last_ckpt else None)

    def _on_interrupt(self, bar) -> None:
        """Save the state at the end of the last completed step (a partial step's gradients are dropped)."""
        self.optimizer.zero_grad(set_to_none=True)
        rng = position = None
        if self._step_start is not None:  # interrupted inside a step: rewind its data, RNG and buffers
            position, rng, buffers = self._step_start
            self.position = dict(position)
            with torch.no_grad():
                for name, value in buffers.items():
                    owner, _, attr = name.rpartition(".")
                    mod = self.model.get_submodule(owner) if owner else self.model
                    if getattr(mod, attr, None) is not None:
                        getattr(mod, attr).copy_(value)
        if self.step == 0:
            return
        if bar is not None:
            bar.write(f"interrupted: saving a checkpoint of step {self.step} to {self.cfg.output_dir}")
        self.save_checkpoint(_rng=rng, _position=position)

    def _progress_bar(self, start: int):
        if not (self.cfg.progress and self.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


__all__ = ["TrainConfig", "TrainResult", "Trainer", "causal_lm_loss_sum", "run_fingerprint", "PRECISIONS",
           "CURVE_FIELDS"]
