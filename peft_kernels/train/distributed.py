"""Multi-process training over 4-bit bases: process-group setup from the launcher's environment, DDP and
FSDP2 (``torch.distributed.fsdp.fully_shard``) wrapping, and the cross-rank checks.

Launch one process per device with ``torchrun`` (or ``accelerate launch``, which starts the same way); each
process builds the same model (quantize + method), then::

    from peft_kernels.train import distributed as D
    D.init_from_env()                       # gloo on CPU, nccl on CUDA; False when not launched by torchrun
    model = D.wrap_model(model, "ddp")      # or "fsdp2"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])   # AFTER wrap_model
    ...                                     # each rank trains on its own shard of the data
    assert D.adapters_identical(model)

What happens to the 4-bit base (``Linear4bit``: a frozen uint8 ``weight`` Parameter
``[(N*K+1)//2, 1]`` plus float32/uint8 buffers ``absmax``, ``quant_map``, ``nested_*``):

* DDP: only parameters with ``requires_grad`` enter DDP's gradient buckets, so the packed bytes are never
  all-reduced. Parameters and buffers are broadcast from rank 0 once, when wrapping (so every rank starts from
  the same base and the same adapter initialisation); the per-forward buffer broadcast is off by default
  (``sync_buffers_every_forward=False``): the quantization statistics are constants.
* FSDP2: rank 0's parameters and buffers are broadcast first (as DDP does), then each transformer block and
  then the root are ``fully_shard``-ed. The frozen uint8 weights are sharded
  along dim 0 like every other parameter (that is the memory saving of FSDP over a 4-bit base): FSDP2 gathers
  a group whose parameters mix dtypes as raw bytes (uint8), and before a block's forward/backward it puts the
  full, unpadded ``[(N*K+1)//2, 1]`` tensor back on the module, so the 4-bit ops read exactly the bytes a
  single process reads. Gradients are reduce-scattered only for trainable parameters, which FSDP2 requires
  to share one dtype (checked here first, with a clear error). Buffers are never sharded (FSDP2 leaves them
  replicated). ``shard_frozen=False`` keeps every frozen parameter replicated instead (``ignored_params``).
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

#: Strategies ``wrap_model`` accepts.
STRATEGIES = ("ddp", "fsdp2")
#: Environment variables torchrun (and accelerate launch) set for every process.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ====================================================================== process group
def init_from_env(backend: Optional[str] = None, *, timeout_s: Optional[float] = None) -> bool:
    """Initialise the default process group from torchrun's environment.

    Args:
        backend: None picks ``"cpu:gloo,cuda:nccl"`` when CUDA is available (NCCL for the training
            collectives, gloo for CPU tensors) and ``"gloo"`` otherwise; any backend string
            ``torch.distributed.init_process_group`` accepts is passed through.
        timeout_s: collective timeout in seconds (None: torch's default).

    Returns True when a process group is initialised after the call (already initialised counts), False
    when the process was not started by a launcher (none of ``RANK``/``WORLD_SIZE``/... in the environment:
    plain single-process training). On CUDA the current device becomes ``cuda:LOCAL_RANK`` first.
    Raises RuntimeError when only some of the launcher's variables are set (a broken launch).
    """
    if dist.is_available() and dist.is_initialized():
        return True
    present = [k for k in LAUNCH_ENV if k in os.environ]
    if not present:
        return False
    if len(present) != len(LAUNCH_ENV):
        missing = [k for k in LAUNCH_ENV if k not in os.environ]
        raise RuntimeError(f"incomplete launcher environment: {', '.join(present)} set but {', '.join(missing)} "
                           f"missing; start the processes with torchrun or accelerate launch")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    dist.init_process_group(backend=backend, **kwargs)
    return True


def is_initialized() -> bool:
    """True when the default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK`` from the launcher; 0 when not set)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and saves."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_initialized():
        dist.barrier()


def device() -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def destroy() -> None:
    """Tear the default process group down (no-op when none exists)."""
    if is_initialized():
        dist.destroy_process_group()


# ====================================================================== collectives
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks, as a new tensor (``t`` is unchanged; a copy when not distributed)."""
    out = t.detach().clone()
    if is_initialized() and world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks, as a new floating tensor (integers become float64; ``t`` is unchanged).

    Summed then divided (gloo has no AVG reduction), so every rank gets the same bits.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"all_reduce_mean takes a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return all_reduce_sum(t) / world_size()


# ====================================================================== wrapping
def _check_model(model: nn.Module, strategy: str) -> list[tuple[str, nn.Parameter]]:
    """The trainable (name, parameter) pairs, after the checks every strategy needs."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown distributed strategy {strategy!r}: expected one of {STRATEGIES}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap_model takes an nn.Module, got {type(model).__name__}")
    if not is_initialized():
        raise RuntimeError(f"wrap_model({strategy!r}) needs an initialised process group: launch with torchrun "
                           f"and call peft_kernels.train.distributed.init_from_env() first")
    if _is_wrapped(model):
        raise ValueError(f"the model is already wrapped for distributed training ({type(model).__name__})")
    meta = [n for n, t in _named_tensors(model) if t.device.type == "meta"]
    if meta:
        raise ValueError(f"{len(meta)} parameters/buffers are still on the meta device (first: {meta[0]}); "
                         f"load the weights before wrapping")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: apply a method (or unfreeze something) "
                         "before wrapping it for distributed training")
    devices = {t.device for _, t in _named_tensors(model)}
    if len(devices) > 1:
        raise ValueError(f"the model spans several devices {sorted(map(str, devices))}: one device per rank is "
                         f"supported; move it to {device()} first")
    return trainable


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from ((n, b) for n, b in model.named_buffers() if b is not None)


def wrap_model(model: nn.Module, strategy: str, *, shard_frozen: bool = True, reshard_after_forward: bool = True,
               mp_policy=None, sync_buffers_every_forward: bool = False,
               find_unused_parameters: bool = False) -> nn.Module:
    """Wrap ``model`` (already on this rank's :func:`device`, method applied) for data-parallel training.

    Args:
        strategy: ``"ddp"`` (every rank holds the whole model; gradients of trainable parameters are
            all-reduced, averaged) or ``"fsdp2"`` (parameters sharded over ranks with ``fully_shard``,
            per transformer block and at the root; gradients reduce-scattered, averaged).
        shard_frozen: FSDP2 only; False keeps every frozen parameter (the 4-bit bases included) replicated
            and unmanaged (``ignored_params``): less communication, no memory saving on the base.
        reshard_after_forward: FSDP2 only; free the gathered block after its forward (re-gathered for backward).
        mp_policy: FSDP2 only; a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (non-float parameters such
            as the packed 4-bit weight are never cast by it).
        sync_buffers_every_forward: DDP only; re-broadcast rank 0's buffers before every forward (DDP's
            default; off here because a 4-bit model's buffers are constants). They are synced once when wrapping.
        find_unused_parameters: DDP only; passed to ``DistributedDataParallel`` (set it when some trainable
            parameters get no gradient in a step).

    Returns the module to train: a ``DistributedDataParallel`` around ``model`` for DDP (the model is
    ``.module``; :func:`unwrap_model`), ``model`` itself (its class swapped to an ``FSDPModule`` subclass,
    parameters now ``DTensor`` shards) for FSDP2. Create the optimizer from the returned module's parameters
    afterwards: FSDP2 replaces the parameter objects.

    Raises ValueError for an unknown strategy, a model without trainable parameters, trainable parameters of
    mixed dtypes under FSDP2, tensors on the meta device or on several devices, or a model wrapped already;
    RuntimeError when no process group is initialised.
    """
    trainable = _check_model(model, strategy)
    if strategy == "ddp":
        return _wrap_ddp(model, sync_buffers_every_forward=sync_buffers_every_forward,
                         find_unused_parameters=find_unused_parameters)
    dtypes = sorted({str(p.dtype) for _, p in trainable})
    if len(dtypes) > 1:
        by = {d: next(n for n, p in trainable if str(p.dtype) == d) for d in dtypes}
        raise ValueError(f"FSDP2 needs all trainable parameters in one dtype, got {', '.join(dtypes)} "
                         f"(e.g. {', '.join(f'{n}: {d}' for d, n in by.items())}); cast the adapters to one "
                         f"dtype or use mp_policy for mixed precision")
    return _wrap_fsdp2(model, shard_frozen=shard_frozen, reshard_after_forward=reshard_after_forward,
                       mp_policy=mp_policy)


def _wrap_ddp(model: nn.Module, *, sync_buffers_every_forward: bool, find_unused_parameters: bool) -> nn.Module:
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    device_ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    # DDP builds its gradient buckets from requires_grad parameters only: the frozen uint8 bases are
    # broadcast once here (rank 0's bytes win) and never reduced. Buffers (the quantization statistics)
    # are constants: synced once, at wrapping, not before every forward.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs = {"forward_sync_buffers": sync_buffers_every_forward}  # torch >= 2.13: always synced at init
    else:
        kwargs = {"broadcast_buffers": sync_buffers_every_forward}
        if not sync_buffers_every_forward:  # older DDP then skips them at init too
            _broadcast_from_rank0(model, params=False)
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters,
                                   **kwargs)


def _block_modules(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (one FSDP2 unit each), or [] when the model has no layer stack."""
    from ..methods._common import find_layer_stack

    try:
        _, stack = find_layer_stack(model)
    except ValueError:
        return []
    return list(stack)


def _wrap_fsdp2(model: nn.Module, *, shard_frozen: bool, reshard_after_forward: bool, mp_policy) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    _broadcast_from_rank0(model)
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if not shard_frozen:
        frozen = {p for p in model.parameters() if not p.requires_grad}
        if frozen:
            kwargs["ignored_params"] = frozen
    # Blocks first, then the root (embeddings, final norm, head, anything outside a block): FSDP2's
    # post-order rule, so each block is its own all-gather / reduce-scatter unit.
    for block in _block_modules(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


@torch.no_grad()
def _broadcast_from_rank0(model: nn.Module, params: bool = True) -> None:
    """Copy rank 0's parameters and buffers to every rank, in place (what DDP does when it wraps).

    Without it each rank would shard its own copy under FSDP2, and a rank whose adapters were initialised
    from another seed would silently contribute its shard of a different model.
    """
    seen: set[int] = set()
    tensors = _named_tensors(model) if params else ((n, b) for n, b in model.named_buffers() if b is not None)
    for _, t in tensors:
        if id(t) in seen:  # tied weights once
            continue
        seen.add(id(t))
        if t.is_contiguous():
            dist.broadcast(t.data, src=0)
        else:  # collectives need dense memory
            buf = t.detach().contiguous()
            dist.broadcast(buf, src=0)
            t.data.copy_(buf)


def _is_wrapped(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, (DistributedDataParallel, FSDPModule))


def strategy_of(model: nn.Module) -> Optional[str]:
    """``"ddp"``, ``"fsdp2"`` or None (a plain module) for a module returned by :func:`wrap_model`."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return "ddp"
    if isinstance(model, FSDPModule):
        return "fsdp2"
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (``.module``); an FSDP2 or plain model is returned as is."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def no_sync(model: nn.Module, enabled: bool = True):
    """Skip the gradient all-reduce / reduce-scatter inside the block (gradient accumulation micro-steps).

    Gradients accumulate locally; the first backward outside the block synchronises the sum. DDP uses its
    ``no_sync()``; FSDP2 ``set_requires_gradient_sync(False)`` (it keeps unsharded gradients meanwhile);
    a plain module (single process) is unaffected. ``enabled=False`` makes it a no-op, so a loop can write
    ``with no_sync(model, not last_micro_step):``.
    """
    kind = strategy_of(model) if enabled else None
    if kind == "ddp":
        with model.no_sync():
            yield
    elif kind == "fsdp2":
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_params(model: nn.Module):
    """Inside the block an FSDP2 model's parameters are the full, plain tensors (every FSDP unit gathered), so
    code that reads the module directly (``registry.save_adapters``, ``state_dict()``, ``generate``) sees the
    unsharded model; they are re-sharded on exit. A collective: every rank must enter it. Writes to the
    gathered tensors are not written back. DDP and plain models: a no-op (their parameters are whole).
    """
    units = _fsdp_modules(unwrap_model(model))
    for unit in units:
        unit.unshard()
    try:
        yield unwrap_model(model)
    finally:
        for unit in units:
            unit.reshard()


def _full(t: torch.Tensor) -> torch.Tensor:
    """A local, whole copy of ``t`` (gathering a DTensor: a collective)."""
    from torch.distributed.tensor import DTensor

    t = t.detach()
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: full tensor}`` of the trainable parameters (names without DDP's ``module.`` prefix), gathered
    from the shards under FSDP2 (a collective: every rank must call it) and copied to CPU."""
    return {n: _full(p).cpu().clone() for n, p in unwrap_model(model).named_parameters() if p.requires_grad}


def adapters_identical(model: nn.Module) -> bool:
    """True when every trainable tensor is bit-for-bit the same on every rank (True in a single process).

    A collective: every rank must call it, and every rank gets the same answer. The ranks first compare the
    names, shapes and dtypes of their trainable tensors (a different set is a mismatch, not a hang); then
    rank 0's values are broadcast, one flat buffer per dtype, and compared with ``torch.equal``. Under FSDP2
    a parameter is compared as its gathered full tensor, which each rank builds from the same shards; its
    trainable state that is not sharded (``ignored_params``, ``Replicate`` placements) is compared as is.
    """
    state = trainable_state(model)
    if world_size() == 1:
        return True
    meta = [(n, tuple(t.shape), str(t.dtype)) for n, t in state.items()]
    metas: list = [None] * world_size()
    dist.all_gather_object(metas, meta)
    if any(m != metas[0] for m in metas):
        return False
    same = True
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in state.values():
        by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    comm_device = _comm_device()
    for dtype in sorted(by_dtype, key=str):
        mine = torch.cat(by_dtype[dtype]).to(comm_device)
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        same &= bool(torch.equal(ref, mine))
    flag = torch.tensor([0 if same else 1], dtype=torch.int32, device=comm_device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) == 0


def _comm_device() -> torch.device:
    """Where small comparison collectives run: CPU when the group has a CPU backend (gloo), else this rank's
    CUDA device (an NCCL-only group)."""
    backend = str(dist.get_backend())
    return torch.device("cpu") if "gloo" in backend else device()
