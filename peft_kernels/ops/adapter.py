"""The bottleneck adapter as a torch.library custom op with autograd.

    out = h + s·(act(h W_dᵀ + b_d) W_uᵀ + b_u)          h [..., d] -> out [..., d]

    peft_kernels::bottleneck_adapter(h, w_down, b_down, w_up, b_up, scale, activation) -> (out, z)
    peft_kernels::bottleneck_adapter_backward(dy, h, z, w_down, w_up, b_up, scale, activation,
                                              need_dh, need_weights, need_scale)
        -> (dh, dW_d, db_d, dW_u, db_u, ds)          (empty tensors where not needed)

w_down [r, d], b_down [r], w_up [d, r], b_up [d] and scale (one element) may have any float dtype
(float32 by default in ``nn.Adapter``); they are cast to h's dtype and the computation runs in h's
dtype with fp32 accumulation. Gradients come back in each parameter's own dtype.

Saved for backward: h and z = h W_dᵀ + b_d ([M, r], in h's dtype), plus the parameters themselves
(already resident: no new memory). Never a = act(z), never the up product, never any other [M, d]
tensor: the backward recomputes a from z (tests assert the bytes exactly).

Backends (``ops/backend.py``): CUDA tensors (or ``PEFT_KERNELS_BACKEND=triton`` with
``TRITON_INTERPRET=1``) run the Triton kernels of ``kernels/adapter.py``; CPU tensors, float64, and a
bottleneck above ``kernels.adapter.MAX_R`` run the plain-torch reference (``ops/reference_adapter.py``),
which computes the same closed-form backward.

Callers use :func:`bottleneck_adapter`: eagerly a ``torch.autograd.Function`` over the same op bodies
(no torch.library dispatch per call), the custom op itself under torch.compile.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from . import backend
from . import reference_adapter as ref

Tensor = torch.Tensor
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ------------------------------------------------------------------ validation
def check_inputs(h: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, scale: Tensor,
                 activation: str) -> str:
    """Raise a clear error for any malformed argument; returns the canonical activation name."""
    named = {"h": h, "w_down": w_down, "b_down": b_down, "w_up": w_up, "b_up": b_up, "scale": scale}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected a floating "
                            f"dtype (float32, float16, bfloat16 or float64)")
    act = ref.canonical_activation(activation)
    if h.dim() < 1 or h.shape[-1] == 0:
        raise ValueError(f"h must be [..., d] with d > 0, got shape {tuple(h.shape)}")
    d = h.shape[-1]
    if w_down.dim() != 2 or w_down.shape[1] != d or w_down.shape[0] == 0:
        raise ValueError(f"w_down must have shape [r, {d}] (h's last dim is {d}), got {tuple(w_down.shape)}")
    r = w_down.shape[0]
    expect = {"b_down": (r,), "w_up": (d, r), "b_up": (d,)}
    for name, shape in expect.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} (d={d}, r={r}), got {tuple(named[name].shape)}")
    if scale.numel() != 1:
        raise ValueError(f"scale must hold exactly one value, got shape {tuple(scale.shape)}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("adapter tensors must be on one device: "
                         + ", ".join(f"{n} on {dv}" for n, dv in devices.items()))
    return act


def _use_triton(h: Tensor, r: int) -> bool:
    from ..kernels.adapter import MAX_R
    return (backend.select(h.device) == "triton" and h.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and r <= MAX_R)


def _as(t: Tensor, dt: torch.dtype) -> Tensor:
    return (t if t.dtype == dt else t.to(dt)).contiguous()


def _kernel_param(t: Tensor, dt: torch.dtype) -> Tensor:
    """A parameter as the kernels take it: float32 or h's dtype as is (rounded on load), others cast."""
    return _as(t, t.dtype if t.dtype in (dt, torch.float32) else dt)


def _scale32(scale: Tensor) -> Tensor:
    return _as(scale.reshape(1), torch.float32)


def _no_autocast(device: torch.device):
    """Autocast off inside the op (it computes in h's dtype by contract); a no-op context when it is off
    already (entering torch.autocast costs microseconds per call)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# ------------------------------------------------------------------ op bodies
def _forward_impl(h: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, scale: Tensor,
                  activation: str) -> tuple[Tensor, Tensor]:
    d, r = h.shape[-1], w_down.shape[0]
    h2 = h.reshape(-1, d)
    with _no_autocast(h.device):
        if _use_triton(h, r):
            from ..kernels import adapter as kern
            dt = h.dtype
            params = (_kernel_param(t, dt) for t in (w_down, b_down, w_up, b_up))
            out, z = kern.adapter_forward(h2.contiguous(), *params, _scale32(scale), activation)
        else:
            out, z = ref.adapter_forward(h2, w_down, b_down, w_up, b_up, scale, activation)
    return out.reshape(h.shape), z


def _backward_impl(dy: Tensor, h: Tensor, z: Tensor, w_down: Tensor, w_up: Tensor, b_up: Tensor, scale: Tensor,
                   activation: str, need_dh: bool, need_weights: bool, need_scale: bool):
    """(dh, dW_d, db_d, dW_u, db_u, ds) in the dtypes/shapes of (h, w_down, [r], w_up, b_up, scale); None
    where not needed."""
    d, r = h.shape[-1], w_down.shape[0]
    dt = h.dtype
    dy2 = dy.reshape(-1, d)
    dy2 = dy2 if dy2.dtype == dt else dy2.to(dt)
    h2 = h.reshape(-1, d)
    with _no_autocast(dy.device):
        if _use_triton(h, r):
            from ..kernels import adapter as kern
            same = w_down.dtype == w_up.dtype == b_up.dtype  # then the launcher casts the gradients once
            params = (_kernel_param(t, dt) for t in (w_down, w_up, b_up))
            dh, dwd, dbd, dwu, dbu, ds = kern.adapter_backward(
                dy2.contiguous(), h2.contiguous(), z.contiguous(), *params, _scale32(scale), activation,
                need_dh=need_dh, need_weights=need_weights, need_scale=need_scale,
                grad_dtype=w_down.dtype if same else None)
        else:
            dh, dwd, dbd, dwu, dbu, ds = ref.adapter_backward(dy2, h2, z, w_down, w_up, b_up, scale, activation,
                                                              need_scale=need_scale)
            dh = dh if need_dh else None
            if not need_weights:
                dwd = dbd = dwu = dbu = None
    if dh is not None:
        dh = dh.reshape(h.shape)
    if need_weights:
        # Both paths return fresh tensors here (no views of each other or of inputs), so a cast that is
        # a no-op may return them as they are.
        dwd, dwu, dbd, dbu = dwd.to(w_down.dtype), dwu.to(w_up.dtype), dbd.to(w_down.dtype), dbu.to(b_up.dtype)
    if ds is not None:
        ds = ds.to(scale.dtype).reshape(scale.shape)
    return dh, dwd, dbd, dwu, dbu, ds


# ------------------------------------------------------------------ custom ops
@torch.library.custom_op("peft_kernels::bottleneck_adapter", mutates_args=())
def bottleneck_adapter_op(h: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, scale: Tensor,
                          activation: str) -> tuple[Tensor, Tensor]:
    """(out [..., d] in h.dtype, z [M, r] in h.dtype): the adapter and its pre-activation."""
    return _forward_impl(h, w_down, b_down, w_up, b_up, scale, activation)


@bottleneck_adapter_op.register_fake
def _(h, w_down, b_down, w_up, b_up, scale, activation):
    m = h.numel() // h.shape[-1]
    return h.new_empty(h.shape), h.new_empty((m, w_down.shape[0]))


_Grads = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty((0,)) if t is None else t


@torch.library.custom_op("peft_kernels::bottleneck_adapter_backward", mutates_args=())
def bottleneck_adapter_backward_op(dy: Tensor, h: Tensor, z: Tensor, w_down: Tensor, w_up: Tensor, b_up: Tensor,
                                   scale: Tensor, activation: str, need_dh: bool, need_weights: bool,
                                   need_scale: bool) -> _Grads:
    """(dh, dW_d, db_d, dW_u, db_u, ds) of :func:`bottleneck_adapter_op`; empty tensors where not needed."""
    g = _backward_impl(dy, h, z, w_down, w_up, b_up, scale, activation, need_dh, need_weights, need_scale)
    likes = (h, w_down, w_down, w_up, b_up, scale)
    return tuple(_empty_if_none(t, like) for t, like in zip(g, likes))


@bottleneck_adapter_backward_op.register_fake
def _(dy, h, z, w_down, w_up, b_up, scale, activation, need_dh, need_weights, need_scale):
    r = w_down.shape[0]
    shapes = ((h, h.shape, need_dh), (w_down, w_down.shape, need_weights), (w_down, (r,), need_weights),
              (w_up, w_up.shape, need_weights), (b_up, b_up.shape, need_weights), (scale, scale.shape, need_scale))
    return tuple(t.new_empty(s if need else (0,)) for t, s, need in shapes)


def _needs(ctx) -> tuple[bool, bool, bool]:
    """(need_dh, need_weights, need_scale) from ``needs_input_grad`` (h, w_d, b_d, w_u, b_u, scale)."""
    n = ctx.needs_input_grad
    return bool(n[0]), any(n[1:5]), bool(n[5])


def _grads_out(ctx, grads) -> tuple:
    """Per-input gradients, None for inputs that need none (order: h, w_d, b_d, w_u, b_u, scale)."""
    n = ctx.needs_input_grad
    return tuple(g if need else None for g, need in zip(grads, n))


def _setup(ctx, inputs, output):
    h, w_down, b_down, w_up, b_up, scale, activation = inputs
    ctx.activation = activation
    # h and z: the only activations kept (z is [M, r]); the rest are parameters, resident anyway.
    ctx.save_for_backward(h, output[1], w_down, w_up, b_up, scale)


def _op_backward(ctx, grad_out, grad_z):
    h, z, w_down, w_up, b_up, scale = ctx.saved_tensors
    need_dh, need_w, need_s = _needs(ctx)
    g = bottleneck_adapter_backward_op(grad_out, h, z, w_down, w_up, b_up, scale, ctx.activation, need_dh, need_w,
                                       need_s)
    dh, dwd, dbd, dwu, dbu, ds = (t if t.numel() else None for t in g)
    return (*_grads_out(ctx, (dh, dwd, dbd, dwu, dbu, ds)), None)


bottleneck_adapter_op.register_autograd(_op_backward, setup_context=_setup)


# ------------------------------------------------------------------ eager fast path
class _AdapterFn(torch.autograd.Function):
    """Same bodies and the same saved tensors as the op, without torch.library's per-call dispatch."""

    @staticmethod
    def forward(ctx, h, w_down, b_down, w_up, b_up, scale, activation):
        out, z = _forward_impl(h, w_down, b_down, w_up, b_up, scale, activation)
        ctx.activation = activation
        ctx.save_for_backward(h, z, w_down, w_up, b_up, scale)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        h, z, w_down, w_up, b_up, scale = ctx.saved_tensors
        need_dh, need_w, need_s = _needs(ctx)
        g = _backward_impl(grad_out, h, z, w_down, w_up, b_up, scale, ctx.activation, need_dh, need_w, need_s)
        return (*_grads_out(ctx, g), None)


def bottleneck_adapter(h: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, scale: Tensor,
                       activation: str = "relu") -> Tensor:
    """``h + s·(act(h W_dᵀ + b_d) W_uᵀ + b_u)`` -> [..., d] in h.dtype, differentiable in every tensor.

    h [..., d] any float dtype; w_down [r, d]; b_down [r]; w_up [d, r]; b_up [d]; scale: one-element
    tensor (``requires_grad`` for a learned scale); activation: relu, gelu, gelu_tanh, silu (or an alias,
    see ``reference_adapter.canonical_activation``). Raises TypeError/ValueError on malformed input
    before anything runs.
    """
    act = check_inputs(h, w_down, b_down, w_up, b_up, scale, activation)
    if torch.compiler.is_compiling():
        return bottleneck_adapter_op(h, w_down, b_down, w_up, b_up, scale, act)[0]
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (h, w_down, b_down, w_up, b_up, scale)):
        return _forward_impl(h, w_down, b_down, w_up, b_up, scale, act)[0]  # inference: no graph, nothing saved
    return _AdapterFn.apply(h, w_down, b_down, w_up, b_up, scale, act)
