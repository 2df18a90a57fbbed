"""Gradient checkpointing of decoder layers that composes with the engine's layers, with optional offload of
each checkpoint to pinned CPU memory, copied on a side CUDA stream and prefetched back before it is needed.

    report = enable_checkpointing(model, offload=True, prefetch=1)
    print(report)                  # per layer: the modules that re-run in backward, what each checkpoint keeps
    ...                            # train as usual
    model.peft_kernels_checkpointing.stats   # bytes kept / offloaded per layer, fetch order, waits

How it is installed (no model source is edited): transformers' own switch is turned on first
(``activation_checkpointing_enable`` / ``gradient_checkpointing_enable`` with ``use_reentrant=False``, as
before), which sets ``gradient_checkpointing`` and ``_gradient_checkpointing_func`` on the decoder layers
(``GradientCheckpointingLayer``: it checkpoints ``forward``, so module hooks on the layer itself stay
outside); then ``_gradient_checkpointing_func`` — the supported hook — is replaced by :class:`LayerCheckpoint`,
which calls ``torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)``
inside ``saved_tensors_hooks`` of its own. Those hooks see exactly the tensors the checkpoint keeps: its
tensor arguments (the layer's input hidden states [B, T, H]); everything saved inside the layer goes to the
checkpoint's inner hooks and is recomputed.

What is recomputed: the whole decoder layer forward, once per backward, just before that layer's backward —
every submodule of the layer (the report lists them; module hooks registered on submodules, e.g. bottleneck
adapters, re-run with them). Why the engine's layers stay correct:

* LoRA dropout (and any ``nn.Dropout`` / attention dropout): the CPU and CUDA RNG states are saved at the
  checkpoint's forward and restored for the recomputation, so the masks are drawn again identically;
* ``Linear4bit`` / LoRA / BitFit / IA3 / bottleneck adapters are pure functions of their inputs and
  parameters: the recomputed forward gives the same tensors (the 4-bit weight is dequantized again);
* sparse growth scores are added by the sparse op's *backward*; with non-reentrant checkpointing only the
  original graph's backward nodes run (the recomputation only refills their saved tensors), so each backward
  adds its score once.

Offload (``offload=True``, CUDA tensors): the pack hook starts a device-to-host copy of each checkpoint into
pinned memory on a side stream (after an event on the compute stream) and drops the device tensor (the
caching allocator is told the side stream still reads it); when the backward recomputes layer i, the unpack
hook waits for layer i's host-to-device copy (issued earlier) and issues those of the next ``prefetch``
checkpoints below it, so their copies run while layer i recomputes and back-propagates. The last layer's
checkpoint stays on the device (``keep_last``): its backward comes first, nothing could hide its copies.
On CPU tensors offload is a no-op (the activations already live in host memory): the report says so.

Memory at the peak of the backward, per micro-batch of T tokens (B·T), hidden size H, L checkpointed layers,
checkpoint dtype of e bytes: without offload ``L · T·H·e`` of checkpoints plus one layer's recomputed
activations; with offload ``(1 + min(prefetch, L-1) + 1) · T·H·e`` at most (the kept last checkpoint, the
prefetch window, and the one being used) plus one layer's activations. Keyword tensors of the layer
(rotary cos/sin, attention masks) are shared by all layers and are neither counted nor offloaded.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


# ====================================================================== transfers
class CudaTransfer:
    """Device <-> pinned host copies on one side stream per device (the overlap the module doc describes)."""

    def __init__(self):
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _stream(self, device: torch.device) -> "torch.cuda.Stream":
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def to_host(self, stash: "_Stash", t: torch.Tensor) -> None:
        side = self._stream(t.device)
        side.wait_stream(torch.cuda.current_stream(t.device))  # t is written by work queued before this point
        with torch.cuda.stream(side):
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            stash.d2h = torch.cuda.Event()
            stash.d2h.record(side)
        t.record_stream(side)  # the allocator must not hand t's memory out before the copy has read it
        stash.host = host

    def fetch(self, stash: "_Stash") -> None:
        side = self._stream(stash.device)
        with torch.cuda.stream(side):  # after the D2H copy: same stream
            dev = torch.empty(stash.shape, dtype=stash.dtype, device=stash.device)
            dev.copy_(stash.host, non_blocking=True)
            stash.h2d = torch.cuda.Event()
            stash.h2d.record(side)
        stash.dev = dev

    def ready(self, stash: "_Stash") -> tuple[torch.Tensor, bool]:
        """(the device tensor, whether its copy had already finished when it was needed)."""
        done = stash.h2d.query()
        cur = torch.cuda.current_stream(stash.device)
        cur.wait_event(stash.h2d)
        stash.dev.record_stream(cur)  # allocated on the side stream, used on the compute stream
        return stash.dev, done


class CopyTransfer:
    """A stand-in for CPU tensors (tests of the offload logic): "host" and "device" copies are clones, so the
    stash, the order of fetches and the prefetch window run exactly as with CUDA, minus the streams."""

    def to_host(self, stash: "_Stash", t: torch.Tensor) -> None:
        stash.host = t.detach().clone()

    def fetch(self, stash: "_Stash") -> None:
        stash.dev = stash.host.clone()

    def ready(self, stash: "_Stash") -> tuple[torch.Tensor, bool]:
        return stash.dev, True


# ====================================================================== offload
class _Stash:
    """One offloaded checkpoint tensor: its host copy, its device copy once fetched, the one packed before it."""

    __slots__ = ("host", "dev", "d2h", "h2d", "prev", "index", "shape", "dtype", "device", "nbytes", "__weakref__")

    def __init__(self, t: torch.Tensor, prev, index: int):
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
        self.nbytes = t.numel() * t.element_size()
        self.host = self.dev = self.d2h = self.h2d = None
        self.prev, self.index = prev, index


@dataclass
class OffloadStats:
    """Counters of one :class:`ActivationOffloader` (cumulative; ``reset()`` clears them)."""

    offloaded: int = 0                 # tensors copied to host
    offloaded_bytes: int = 0
    fetch_order: list[int] = field(default_factory=list)   # pack index of each checkpoint as it was used
    prefetched: int = 0                # used after an earlier prefetch
    fetched_on_demand: int = 0         # used with no prefetch before (its copy is on the critical path)
    waited: int = 0                    # prefetched but still copying when needed (CUDA only)

    def reset(self) -> None:
        self.__init__()


class ActivationOffloader:
    """``pack`` / ``unpack`` hooks that move checkpoint tensors to host memory and back (module doc).

    transfer: :class:`CudaTransfer` (default; CUDA tensors only, others are kept as they are) or
    :class:`CopyTransfer` (any device; for tests). prefetch: how many checkpoints below the one being used
    are fetched ahead (>= 0).
    """

    def __init__(self, prefetch: int = 1, transfer=None):
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
        self.prefetch = prefetch
        self.transfer = transfer
        self.stats = OffloadStats()
        self._last = None  # weakref to the stash packed last
        self._count = 0

    def _transfer_for(self, t: torch.Tensor):
        if self.transfer is not None:
            return self.transfer
        if t.device.type != "cuda":
            return None
        self.transfer = CudaTransfer()
        return self.transfer

    def offloads(self, t: torch.Tensor) -> bool:
        """Whether ``pack`` moves ``t`` (floating point, and a device the transfer handles)."""
        if not t.is_floating_point() or t.numel() == 0:
            return False
        return self.transfer is not None or t.device.type == "cuda"

    def pack(self, t: torch.Tensor):
        if not self.offloads(t):
            return t
        stash = _Stash(t, self._last, self._count)
        self._transfer_for(t).to_host(stash, t)
        self._last, self._count = weakref.ref(stash), self._count + 1
        self.stats.offloaded += 1
        self.stats.offloaded_bytes += stash.nbytes
        return stash

    def unpack(self, stash):
        if not isinstance(stash, _Stash):
            return stash
        transfer = self.transfer
        if stash.dev is None:
            transfer.fetch(stash)
            self.stats.fetched_on_demand += 1
        else:
            self.stats.prefetched += 1
        t, done = transfer.ready(stash)
        if not done:
            self.stats.waited += 1
        stash.dev = None  # handed to autograd; the host copy stays for a second backward (retain_graph)
        self.stats.fetch_order.append(stash.index)
        prev, k = stash.prev, 0
        while prev is not None and k < self.prefetch:
            older = prev()
            if older is None:
                break
            if older.dev is None:
                transfer.fetch(older)
            prev, k = older.prev, k + 1
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


# ====================================================================== the checkpoint function
@dataclass
class CheckpointStats:
    """What the checkpoints of the last forward kept, per layer (bytes of the tensors each checkpoint saved)."""

    kept_on_device: dict[str, int] = field(default_factory=dict)   # layer -> bytes still on the device
    offloaded: dict[str, int] = field(default_factory=dict)        # layer -> bytes moved to host memory
    calls: int = 0                                                 # checkpointed layer forwards so far


def _layer_of(function) -> Optional[nn.Module]:
    """The layer a transformers checkpoint call runs: ``partial(forward, layer, ...)`` or ``layer.__call__``."""
    if isinstance(function, functools.partial) and function.args and isinstance(function.args[0], nn.Module):
        return function.args[0]
    owner = getattr(function, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


class LayerCheckpoint:
    """The ``_gradient_checkpointing_func`` installed on the model: non-reentrant checkpointing of one layer call,
    counting (and, with an offloader, offloading) the tensors the checkpoint keeps."""

    def __init__(self, names: dict[int, str], offloader: Optional[ActivationOffloader], keep: set[int],
                 preserve_rng_state: bool = True):
        self.names, self.offloader, self.keep = names, offloader, keep
        self.preserve_rng_state = preserve_rng_state
        self.stats = CheckpointStats()
        self._warned = False

    def __call__(self, function, *args, **kwargs):
        layer = _layer_of(function)
        name = self.names.get(id(layer), type(layer).__name__ if layer is not None else "?")
        kept = off = 0
        offloader = self.offloader if (self.offloader is not None and id(layer) not in self.keep) else None

        def pack(t):
            nonlocal kept, off
            n = t.numel() * t.element_size()
            if offloader is not None and offloader.offloads(t):
                off += n
                return offloader.pack(t)
            kept += n
            return t

        unpack = offloader.unpack if offloader is not None else (lambda t: t)
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = checkpoint(function, *args, use_reentrant=False, preserve_rng_state=self.preserve_rng_state,
                             **kwargs)
        if torch.is_grad_enabled():
            self.stats.kept_on_device[name], self.stats.offloaded[name] = kept, off
            self.stats.calls += 1
            if offloader is not None and kept + off == 0 and any(
                    isinstance(a, torch.Tensor) and offloader.offloads(a) for a in args) and not self._warned:
                self._warned = True  # a torch whose checkpoint keeps its inputs outside autograd's saved tensors
                warnings.warn("torch.utils.checkpoint did not save its inputs through saved_tensors_hooks in this "
                              "torch version: nothing is offloaded", RuntimeWarning, stacklevel=2)
        return out


# ====================================================================== report
#: How each of the engine's layers behaves when its decoder layer is recomputed (see the module doc).
ENGINE_NOTES = {
    "LoraLinear": "re-run; dropout masks redrawn from the restored RNG state (identical); x, xa, masks saved "
                  "only during this layer's backward",
    "Linear4bit": "re-run: the 4-bit weight is dequantized again in the recomputed GEMM; nothing cached",
    "BitFitLinear": "re-run (its op saves nothing of x)",
    "SparseLinear": "re-run; growth scores are added by the original backward node only (once per backward)",
    "IA3Linear": "re-run",
    "Adapter": "re-run by its forward hook inside the recomputed sub-block",
    "Dropout": "RNG state restored: the same mask",
}


@dataclass
class LayerPlan:
    """One checkpointed layer: what re-runs in backward and what its checkpoint keeps."""

    name: str
    modules: list[str]                  # every submodule (relative name) that runs again in backward
    engine: dict[str, str]              # relative name -> how that engine layer behaves under recomputation
    offloaded: bool                     # its checkpoint goes to host memory


@dataclass
class CheckpointReport:
    """What :func:`enable_checkpointing` installed; ``stats`` fills in as the model runs."""

    layers: list[LayerPlan]
    offload: bool                       # requested
    offload_active: bool                # copies will happen (CUDA parameters, or a test transfer)
    prefetch: int
    keep_last: bool
    not_recomputed: list[str]           # top-level modules outside the checkpointed layers (run once)
    notes: list[str] = field(default_factory=list)
    checkpoint: Optional[LayerCheckpoint] = field(default=None, repr=False)
    offloader: Optional[ActivationOffloader] = field(default=None, repr=False)

    @property
    def stats(self) -> CheckpointStats:
        return self.checkpoint.stats

    def checkpoint_bytes(self, tokens: int, hidden: int, element_size: int) -> dict[str, int]:
        """Bytes each layer's checkpoint holds on the device for ``tokens`` (B·T) tokens: T·H·e, or 0 when
        offloaded (it is then in pinned host memory until its backward)."""
        per = tokens * hidden * element_size
        return {lp.name: 0 if lp.offloaded else per for lp in self.layers}

    def __str__(self) -> str:
        off = ("off" if not self.offload else
               f"on (pinned host memory, side-stream copies, prefetch {self.prefetch}"
               f"{', last layer kept' if self.keep_last else ''})" if self.offload_active else "requested, inactive")
        lines = [f"gradient checkpointing: {len(self.layers)} layers recomputed in backward (non-reentrant, RNG state "
                 f"preserved); offload {off}"]
        if self.layers:
            lp = self.layers[0]
            lines.append(f"  per layer, e.g. {lp.name}: {len(lp.modules)} modules re-run; checkpoint = the layer input "
                         f"[B, T, H]")
            for n, why in list(lp.engine.items())[:8]:
                lines.append(f"    {n}: {why}")
        if self.not_recomputed:
            lines.append(f"  run once (not checkpointed): {', '.join(self.not_recomputed)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _engine_note(module: nn.Module) -> Optional[str]:
    for cls in type(module).__mro__:
        if cls.__name__ in ENGINE_NOTES:
            return ENGINE_NOTES[cls.__name__]
    return None


def _checkpointed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules transformers checkpoints: GradientCheckpointingLayer instances with the flag on, else (models whose
    layer loop calls the function itself) the layer stack."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers
        GradientCheckpointingLayer = ()
    found = [(n, m) for n, m in model.named_modules()
             if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)
             and getattr(m, "gradient_checkpointing", False)]
    if found:
        return found
    from ..methods._common import find_layer_stack
    name, stack = find_layer_stack(model)
    return [(f"{name}.{i}", m) for i, m in enumerate(stack)]


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def enable_checkpointing(model: nn.Module, *, offload: bool = False, prefetch: int = 1, keep_last: bool = True,
                         offloader: Optional[ActivationOffloader] = None,
                         preserve_rng_state: bool = True) -> CheckpointReport:
    """Checkpoint every decoder layer of a transformers model (module doc); returns the report, also kept as
    ``model.peft_kernels_checkpointing``.

    offload: move each checkpoint to pinned host memory (CUDA only; a no-op with a note on CPU). prefetch:
    checkpoints fetched back ahead of use (>= 0). keep_last: leave the last layer's checkpoint on the device.
    offloader: a ready :class:`ActivationOffloader` (e.g. with :class:`CopyTransfer`, to run the offload logic on
    CPU in tests); implies offload. preserve_rng_state=False is for demonstrating why it is on (dropout masks then
    differ in the recomputation); leave it on.

    Raises ValueError for a model without transformers' checkpointing support or bad arguments.
    """
    for name, v in (("offload", offload), ("keep_last", keep_last), ("preserve_rng_state", preserve_rng_state)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be True or False, got {v!r}")
    if offloader is not None and not isinstance(offloader, ActivationOffloader):
        raise TypeError(f"offloader must be an ActivationOffloader, got {type(offloader).__name__}")
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support transformers' gradient checkpointing "
                         f"(supports_gradient_checkpointing is not set)")
    offload = offload or offloader is not None
    if offload and offloader is None:
        offloader = ActivationOffloader(prefetch)  # validates prefetch
    elif isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old name warns on transformers >= 5.2x
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation

    layers = _checkpointed_layers(model)
    names = {id(m): n for n, m in layers}
    notes: list[str] = []
    active = offload and (offloader.transfer is not None or _model_device(model).type == "cuda")
    if offload and not active:
        notes.append("offload requested, but the model is on CPU: its activations already live in host memory, "
                     "so nothing is copied (offload is a no-op here)")
        offloader = None
    keep = {id(layers[-1][1])} if (layers and keep_last and active) else set()
    fn = LayerCheckpoint(names, offloader if active else None, keep, preserve_rng_state)
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
            m._gradient_checkpointing_func = fn
    plans = []
    for n, m in layers:
        subs = [s for s, _ in m.named_modules() if s]
        engine = {s: why for s, sm in m.named_modules() if s and (why := _engine_note(sm)) is not None}
        plans.append(LayerPlan(n, subs, engine, offloaded=active and id(m) not in keep))
    inside = tuple(n + "." for n, _ in layers)
    outside = [n for n, c in model.named_modules()
               if n and n not in names.values() and not n.startswith(inside) and not list(c.children())]
    if torch.is_autocast_enabled() and active:
        notes.append("checkpoints are offloaded in the dtype they have (the autocast dtype of the layer input)")
    report = CheckpointReport(layers=plans, offload=offload, offload_active=active, prefetch=prefetch,
                              keep_last=keep_last, not_recomputed=outside, notes=notes, checkpoint=fn,
                              offloader=offloader if active else None)
    model.peft_kernels_checkpointing = report
    return report


def disable_checkpointing(model: nn.Module) -> None:
    """Turn transformers' checkpointing off again (the engine's function goes with it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
    with contextlib.suppress(AttributeError):
        del model.peft_kernels_checkpointing


__all__ = ["enable_checkpointing", "disable_checkpointing", "CheckpointReport", "LayerPlan", "CheckpointStats",
           "ActivationOffloader", "OffloadStats", "CudaTransfer", "CopyTransfer", "LayerCheckpoint", "ENGINE_NOTES"]
