"""``LoraLinear``: LoRA / DoRA adapters over a frozen ``nn.Linear``, transformers ``Conv1D`` or 4-bit ``Linear4bit``.

Module structure and state-dict keys are those of Hugging Face PEFT's ``LoraLayer`` (so adapter files
move both ways): ``base_layer.*``, ``lora_A.<name>.weight`` [r, K], ``lora_B.<name>.weight`` [N, r]
(``.bias`` [N] with ``lora_bias``), ``lora_magnitude_vector.<name>.weight`` [N] (DoRA).

Forward (every active adapter i, in one fused op, see ``peft_kernels/ops/lora.py``)::

    y = base(x) + Σ_i s_i (drop_i(x) A_iᵀ B_iᵀ + b_i)          s_i = alpha/r, or alpha/sqrt(r) with rsLoRA

and DoRA exactly as PEFT 0.21.2: ``y = base(x) + (g-1)·(drop(x) Wᵀ) + g·s·(drop(x) Aᵀ Bᵀ + b_B)`` with
``g = m / ||W + s B A||_row`` (the norm detached; computed by a kernel without forming ``B A``).

Mixed precision: the adapters' parameters are float32 by default (like PEFT's
``autocast_adapter_dtype``); the layer computes in the input's dtype (the autocast dtype under
``torch.autocast``, or a ``Linear4bit``'s ``compute_dtype``) and casts A, B inside the op, so gradients
reach the float32 parameters without a cast node per step.
"""
from __future__ import annotations

import copy
import math
import re
from typing import Iterable, Optional, Union

import torch
from torch import nn

from ..ops.lora import (absent, dora_weight_norm_4bit_op, dora_weight_norm_dense_op, lora_linear_4bit,
                        lora_linear_dense)
from ._base import INPUT_DTYPES, WrapsBase, base_kind, base_shape, check_input, quant_args, storage_dtype

MERGE_MODES = ("exact", "requantize", "dequantize")
_PISSA_NITER = re.compile(r"^pissa_niter_(\d+)$")


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Bool keep-mask shaped like ``x`` (True with probability 1-p).

    Drawn with ``bernoulli_(1 - p)`` like ``torch.nn.functional.dropout`` on CPU, so with the same RNG
    state both draw the same mask (PEFT parity in training mode).
    """
    return torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)


class LoraMagnitude(nn.Module):
    """DoRA's trainable magnitude vector m (``.weight`` [out_features]); PEFT names it the same way."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


class LoraLinear(WrapsBase, nn.Module):
    """A frozen linear base plus named LoRA/DoRA adapters (PEFT's ``LoraLayer`` layout).

    Args:
        base_layer: ``nn.Linear`` (weight [N, K]), transformers ``Conv1D`` (weight [K, N], PEFT's
            ``fan_in_fan_out``) or ``peft_kernels.nn.Linear4bit``. Its parameters are frozen here.
        adapter_name, r, lora_alpha, **adapter_kwargs: when ``adapter_name`` is not None, the first
            adapter (see :meth:`add_adapter`); it becomes the active one.

    Input x [..., K] float32/float16/bfloat16; output [..., N]: in x's dtype over a 4-bit base (like
    ``Linear4bit``), in the compute dtype over a dense one (like ``nn.Linear`` under autocast).

    Attributes (as in PEFT): dicts ``r``, ``lora_alpha``, ``scaling``, ``use_dora``, ``lora_bias``;
    ``active_adapters`` (list); ``disabled`` (bool: forward is the base alone); ``merged_adapters``.

    Merging: a dense base merges exactly in place (``W += s B A``; DoRA ``W <- g ⊙ (W + s B A)``) and
    unmerges exactly. A 4-bit base offers ``mode="requantize"`` (quantize ``dequant(W4) + s B A`` back into
    the 4-bit layer: the result carries a fresh NF4 rounding error) and ``mode="dequantize"`` (replace the
    base by an ``nn.Linear`` holding ``dequant(W4) + s B A`` in 16-bit: exactly what was trained, up to
    the 16-bit rounding).

    Why not merge into the original 16-bit weights: a QLoRA adapter was trained against ``dequant(W4)``,
    not against the 16-bit W it was quantized from; the adapter partly learns to compensate the
    quantization error ``W - dequant(W4)``. Adding ``s B A`` to W16 gives ``W16 + sBA``, which differs from
    the trained ``dequant(W4) + sBA`` by that whole error (about 10% of W's norm for NF4), so the merged
    model is not the model that was trained and loses quality. ``mode="dequantize"`` keeps exactly the
    trained function; ``requantize`` keeps 4-bit memory at the cost of one more rounding.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: Optional[str] = "default", r: int = 8,
                 lora_alpha: float = 8, **adapter_kwargs):
        super().__init__()
        self._kind = base_kind(base_layer, "LoraLinear")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.out_features, self.in_features = base_shape(base_layer)
        self.fan_in_fan_out = self._kind == "conv1d"
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.disabled = False
        self.merged_adapters: list[str] = []
        self._merge_info: Optional[dict] = None
        if adapter_name is not None:
            self.add_adapter(adapter_name, r, lora_alpha, **adapter_kwargs)
            self.set_adapter(adapter_name)

    # ------------------------------------------------------------------ base access
    # weight, bias, _dense_weight() and _compute_dtype() come from _base.WrapsBase.
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _base_weight_f(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] in ``dtype`` (dequantized for a 4-bit base)."""
        if self._kind == "4bit":
            return self.base_layer.dequantize(torch.float32).to(dtype)
        return self._dense_weight().detach().to(dtype)

    def _device(self) -> torch.device:
        return self.base_layer.weight.device

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False,
                    init_lora_weights: Union[bool, str] = True, lora_bias: bool = False,
                    dtype: torch.dtype = torch.float32) -> None:
        """Add adapter ``adapter_name`` (not made active; see :meth:`set_adapter`).

        ``init_lora_weights``: True (PEFT's default: A Kaiming-uniform a=sqrt(5), B zero), "gaussian"
        (A ~ N(0, 1/r), B zero), "pissa" / "pissa_niter_<n>" (A, B from the top-r singular triplets of the
        (dequantized) base, and the base replaced by the residual — requantized for a 4-bit base), or
        False (nn.Linear's random init for both: the adapter is not a no-op; for tests).
        """
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter name must be a non-empty string without '.', got {adapter_name!r}")
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer; delete it first")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
        if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        pissa = isinstance(init_lora_weights, str) and (init_lora_weights == "pissa"
                                                        or _PISSA_NITER.match(init_lora_weights))
        if not (init_lora_weights is True or init_lora_weights is False or pissa
                or (isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian")):
            raise ValueError(f"init_lora_weights must be True, False, 'gaussian', 'pissa' or 'pissa_niter_<n>', "
                             f"got {init_lora_weights!r}")
        if dtype not in INPUT_DTYPES:
            raise TypeError(f"adapter dtype must be a float dtype, got {dtype}")
        if self.merged_adapters and pissa:
            raise ValueError("cannot add a PiSSA adapter while adapters are merged (it rewrites the base weight)")
        dev = self._device()
        a = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=dtype)
        b = nn.Linear(r, self.out_features, bias=lora_bias, device=dev, dtype=dtype)
        self.lora_A[adapter_name] = a
        self.lora_B[adapter_name] = b
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.use_dora[adapter_name] = bool(use_dora)
        self.lora_bias[adapter_name] = bool(lora_bias)
        with torch.no_grad():
            if pissa:
                self._pissa_init(adapter_name, init_lora_weights)
            elif init_lora_weights is not False:
                if init_lora_weights is True:
                    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
                else:
                    nn.init.normal_(a.weight, std=1 / r)
                nn.init.zeros_(b.weight)
                if lora_bias:
                    nn.init.zeros_(b.bias)
            if use_dora:
                norm = self._weight_norm(adapter_name).to(dtype)
                self.lora_magnitude_vector[adapter_name] = LoraMagnitude(norm.clone())
        # A new adapter trains only once it is made active (PEFT's semantics).
        self._set_trainable(adapter_name, adapter_name in self.active_adapters)

    def _pissa_init(self, name: str, how: str) -> None:
        """PEFT's PiSSA: W = U S Vᵀ; B = U_r sqrt(S_r/s), A = sqrt(S_r/s) V_rᵀ; base <- W - s B A."""
        r, s = self.r[name], self.scaling[name]
        w = self._base_weight_f(torch.float32)
        m = _PISSA_NITER.match(how)
        if m is None:
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            ur, sr, vhr = u[:, :r], sv[:r] / s, vh[:r]
        else:
            ur, sr, vr = torch.svd_lowrank(w, q=r, niter=int(m.group(1)))
            sr, vhr = sr / s, vr.t()
        a = torch.diag(torch.sqrt(sr)) @ vhr
        b = ur @ torch.diag(torch.sqrt(sr))
        self.lora_A[name].weight.copy_(a)
        self.lora_B[name].weight.copy_(b)
        if self.lora_bias[name]:
            self.lora_B[name].bias.zero_()
        self._set_base_weight(w - s * (b @ a))

    def _set_base_weight(self, w: torch.Tensor) -> None:
        """Write a dense [N, K] weight into the base (requantized for a 4-bit base)."""
        if self._kind == "4bit":
            self.base_layer.quantize_(w.to(self.base_layer.weight_dtype))
            self.base_layer.weight.requires_grad_(False)
        else:
            dw = self._dense_weight()
            dw.copy_(w.to(dw.dtype))

    def _weight_norm(self, name: str, a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None
                     ) -> torch.Tensor:
        """DoRA's ||W + s B A|| per output row (float32 [N], detached), by the kernel op."""
        a = (self.lora_A[name].weight if a is None else a).detach()
        b = (self.lora_B[name].weight if b is None else b).detach()
        s = float(self.scaling[name])
        if self._kind == "4bit":
            return dora_weight_norm_4bit_op(*quant_args(self.base_layer), self.out_features, self.in_features,
                                            a, b, s)
        return dora_weight_norm_dense_op(self._dense_weight().detach(), a, b, s)

    def _check_names(self, names: Iterable[str]) -> list[str]:
        out = list(names)
        for n in out:
            if n not in self.lora_A:
                raise KeyError(f"unknown adapter {n!r}; this layer has {sorted(self.lora_A)}")
        return out

    def _set_trainable(self, name: str, flag: bool) -> None:
        for mod in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if name in mod:
                mod[name].requires_grad_(flag)

    def set_adapter(self, adapter_names: Union[str, list[str]]) -> None:
        """Make these adapters the active ones (trainable); the others are frozen."""
        names = self._check_names([adapter_names] if isinstance(adapter_names, str) else adapter_names)
        self.active_adapters = names
        for n in self.lora_A:
            self._set_trainable(n, n in names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (it must not be merged)."""
        self._check_names([adapter_name])
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base; unmerge before deleting it")
        for mod in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if adapter_name in mod:
                del mod[adapter_name]
        for d in (self.r, self.lora_alpha, self.scaling, self.use_dora, self.lora_bias):
            d.pop(adapter_name, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s B A as [N, K] (float32 or the adapters' dtype, detached)."""
        self._check_names([adapter_name])
        a = self.lora_A[adapter_name].weight.detach()
        b = self.lora_B[adapter_name].weight.detach()
        return (b @ a) * self.scaling[adapter_name]

    @torch.no_grad()
    def swap_adapter_(self, adapter_name: str, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      magnitude: Optional[torch.Tensor] = None, lora_bias: Optional[torch.Tensor] = None) -> None:
        """Copy new adapter values into the existing tensors in place (same storage: optimizers, compiled
        graphs and CUDA graphs holding them stay valid). Everything is checked before anything is written."""
        self._check_names([adapter_name])
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before swapping its weights")
        a_p, b_p = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        r = self.r[adapter_name]
        new = {"lora_A": (lora_A, a_p), "lora_B": (lora_B, b_p)}
        if self.use_dora[adapter_name]:
            if magnitude is None:
                raise ValueError(f"adapter {adapter_name!r} is a DoRA adapter: pass its magnitude vector too")
            new["magnitude"] = (magnitude, self.lora_magnitude_vector[adapter_name].weight)
        elif magnitude is not None:
            raise ValueError(f"adapter {adapter_name!r} is not a DoRA adapter; it has no magnitude vector")
        if self.lora_bias[adapter_name]:
            if lora_bias is None:
                raise ValueError(f"adapter {adapter_name!r} has a lora_B bias: pass lora_bias too")
            new["lora_bias"] = (lora_bias, self.lora_B[adapter_name].bias)
        elif lora_bias is not None:
            raise ValueError(f"adapter {adapter_name!r} has no lora_B bias")
        for what, (t, p) in new.items():
            if not isinstance(t, torch.Tensor) or not (t.is_floating_point()):
                raise TypeError(f"{what} must be a float tensor, got {getattr(t, 'dtype', type(t).__name__)}")
            if t.shape != p.shape:
                hint = ""
                if what in ("lora_A", "lora_B") and t.dim() == 2:
                    got_r = t.shape[0] if what == "lora_A" else t.shape[1]
                    if got_r != r:
                        hint = f" (rank {got_r} != this adapter's r={r})"
                raise ValueError(f"{what} has shape {tuple(t.shape)}, expected {tuple(p.shape)}{hint}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{what} contains NaN or Inf values; refusing to swap them in")
        for t, p in new.values():
            p.copy_(t)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()  # PEFT's behaviour: disabling a merged layer unmerges it
            return self.base_layer(x)
        active = [a for a in self.active_adapters if a in self.lora_A and a not in self.merged_adapters]
        if not active:
            return self.base_layer(x)
        check_input(x, "LoraLinear", self.out_features, self.in_features)
        if x.numel() == 0:
            return self.base_layer(x)
        in_dtype = x.dtype
        cdt = self._compute_dtype(x)
        xc = x if x.dtype == cdt else x.to(cdt)
        wide = torch.float64 if cdt == torch.float64 else torch.float32  # DoRA's g is formed in fp32 (or fp64)
        lora_a, lora_b, lora_bias, scales, masks, ps, gs = [], [], [], [], [], [], []
        for name in active:
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            lora_a.append(a)
            lora_b.append(b)
            lb = self.lora_B[name].bias
            lora_bias.append(absent(xc) if lb is None else lb)
            scales.append(float(self.scaling[name]))
            drop = self.lora_dropout[name]
            p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
            if self.training and p > 0:
                masks.append(dropout_mask(xc, p))
                ps.append(p)
            else:
                masks.append(absent(xc, torch.bool))
                ps.append(0.0)
            if self.use_dora[name]:
                # The norm is detached (DoRA paper section 4.3, as PEFT): only m gets a gradient through g.
                norm = self._weight_norm(name)
                gs.append(self.lora_magnitude_vector[name].weight.to(wide) / norm.to(wide))
            else:
                gs.append(absent(xc, wide))
        base = self.base_layer
        bias = base.bias
        if self._kind == "4bit":
            y, _ = lora_linear_4bit(xc, *quant_args(base), self.out_features, bias, lora_a, lora_b, lora_bias,
                                    scales, masks, ps, gs)
            return y if y.dtype == in_dtype else y.to(in_dtype)
        y, _ = lora_linear_dense(xc, self._dense_weight(), bias, lora_a, lora_b, lora_bias, scales, masks, ps, gs)
        return y

    # ------------------------------------------------------------------ merge
    def _merge_terms(self, names: list[str], w: torch.Tensor):
        """(row factor G [N] or None, per-adapter row factor h [N] or None) for merging ``names`` into
        the unmerged base ``w`` [N, K] (work precision): W' = G ⊙ W + Σ h_i s_i B_i A_i."""
        g_tot, hs = None, {}
        for n in names:
            if not self.use_dora[n]:
                hs[n] = None
                continue
            delta = self.get_delta_weight(n).to(w.dtype)
            norm = torch.linalg.vector_norm(w + delta, dim=1)
            g = self.lora_magnitude_vector[n].weight.detach().to(w.dtype) / norm
            hs[n] = g
            g_tot = g if g_tot is None else g_tot + (g - 1)
        return g_tot, hs

    def _apply_terms(self, w: torch.Tensor, bias: Optional[torch.Tensor], names, g_tot, hs, sign: int):
        """Forward (sign=+1) or inverse (sign=-1) of the merge map on (w, bias) in work precision."""
        out_b = bias
        add = torch.zeros_like(w)
        add_b = None
        for n in names:
            h = hs[n]
            d = self.get_delta_weight(n).to(w.dtype)
            add += d if h is None else h[:, None] * d
            if self.lora_bias[n]:
                lb = self.lora_B[n].bias.detach().to(w.dtype) * self.scaling[n]
                lb = lb if h is None else h * lb
                add_b = lb if add_b is None else add_b + lb
        if sign > 0:
            w_new = (w if g_tot is None else g_tot[:, None] * w) + add
            if add_b is not None:
                out_b = add_b if bias is None else bias + add_b
        else:
            w_new = w - add
            if g_tot is not None:
                if (g_tot == 0).any():
                    raise ValueError("cannot unmerge: a DoRA row factor is zero (the merged rows lost W)")
                w_new = w_new / g_tot[:, None]
            if add_b is not None:
                out_b = bias - add_b
        return w_new, out_b

    def _write_bias(self, b: Optional[torch.Tensor]) -> None:
        """Write the merged bias into the base (creating a frozen one when the base had none)."""
        base = self.base_layer
        if b is None:
            return
        if base.bias is None:
            base.bias = nn.Parameter(b.to(storage_dtype(base)), requires_grad=False)
        else:
            base.bias.data.copy_(b.to(base.bias.dtype))

    @torch.no_grad()
    def merge(self, adapter_names: Optional[list[str]] = None, mode: str = "exact",
              dtype: Optional[torch.dtype] = None) -> None:
        """Merge adapters (default: the active, unmerged ones) into the base weight.

        Dense base: exact, in place (``mode`` is irrelevant). 4-bit base: ``mode="requantize"`` writes
        ``quantize(dequant(W4) + ΔW)`` into the 4-bit layer (not undoable); ``mode="dequantize"`` replaces
        the base by an ``nn.Linear`` in ``dtype`` (default: the dtype the 4-bit weight came from) holding
        ``dequant(W4) + ΔW``, which :meth:`unmerge` can undo. With DoRA, ΔW gives ``g ⊙ (W + s B A)``.
        """
        if mode not in MERGE_MODES:
            raise ValueError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")
        names = self._check_names(adapter_names if adapter_names is not None else
                                  [a for a in self.active_adapters if a not in self.merged_adapters])
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return
        if self._kind == "4bit":
            if mode == "exact":
                raise ValueError("a 4-bit base cannot be merged exactly: use mode='dequantize' (a 16-bit base "
                                 "holding exactly what was trained) or mode='requantize' (stays 4-bit, adds "
                                 "one rounding)")
            base = self.base_layer
            w = base.dequantize(torch.float32)
            g_tot, hs = self._merge_terms(names, w)
            w_new, b_new = self._apply_terms(w, None if base.bias is None else base.bias.detach().float(), names,
                                             g_tot, hs, +1)
            if mode == "requantize":
                self._set_base_weight(w_new)
                self._write_bias(b_new)
                self.merged_adapters = self.merged_adapters + names
                self._merge_info = None  # not undoable
                return
            dt = dtype or base.weight_dtype
            dense = nn.Linear(self.in_features, self.out_features, bias=b_new is not None, device=w.device, dtype=dt)
            dense.weight.copy_(w_new.to(dt))
            if b_new is not None:
                dense.bias.copy_(b_new.to(dt))
            dense.requires_grad_(False)
            if base.bias is not None and base.bias.requires_grad:
                dense.bias.requires_grad_(True)
            self.base_layer, self._kind = dense, "linear"
            # unmerge() then gives back dequant(W4) as a dense layer (the 4-bit bytes are gone); adapters
            # requantized into it earlier stay merged ("keep").
            keep = list(self.merged_adapters)
            self.merged_adapters = keep + names
            self._merge_info = {"names": names, "keep": keep, "g": g_tot, "h": hs,
                                "created_bias": base.bias is None and b_new is not None}
            return
        # Dense: re-merge everything from the unmerged weight so DoRA norms always see the original W.
        if self._merge_info is not None:
            prev = list(self._merge_info["names"])
            self.unmerge()
            names = prev + [n for n in names if n not in prev]
        wv = self._dense_weight()
        work = torch.float64 if wv.dtype == torch.float64 else torch.float32
        w = wv.detach().to(work)
        bias = self.base_layer.bias
        g_tot, hs = self._merge_terms(names, w)
        w_new, b_new = self._apply_terms(w, None if bias is None else bias.detach().to(work), names, g_tot, hs, +1)
        wv.copy_(w_new.to(wv.dtype))
        created = bias is None and b_new is not None
        self._write_bias(b_new)
        keep = list(self.merged_adapters)  # requantized earlier into a since-dequantized base: not undoable
        self.merged_adapters = keep + names
        self._merge_info = {"names": names, "keep": keep, "g": g_tot, "h": hs, "created_bias": created}

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` on a dense base (exact up to rounding). A requantized 4-bit base cannot be
        unmerged (the 4-bit rounding of the merged weight is not invertible)."""
        if not self.merged_adapters:
            return
        if self._merge_info is None:
            raise ValueError("this layer's adapters were merged into its 4-bit base with mode='requantize'; "
                             "that cannot be undone (reload the base, or merge with mode='dequantize')")
        info = self._merge_info
        wv = self._dense_weight()
        work = torch.float64 if wv.dtype == torch.float64 else torch.float32
        bias = self.base_layer.bias
        w_old, b_old = self._apply_terms(wv.detach().to(work), None if bias is None else bias.detach().to(work),
                                         info["names"], info["g"], info["h"], -1)
        wv.copy_(w_old.to(wv.dtype))
        if info["created_bias"]:
            self.base_layer.bias = None
        elif b_old is not None:
            bias.data.copy_(b_old.to(bias.dtype))
        self.merged_adapters = list(info["keep"])
        self._merge_info = None

    def extra_repr(self) -> str:
        ad = ", ".join(f"{n}(r={self.r[n]}, alpha={self.lora_alpha[n]}{', dora' if self.use_dora[n] else ''})"
                       for n in self.lora_A)
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{ad}], "
                f"active={self.active_adapters}, merged={self.merged_adapters}, disabled={self.disabled}")


class ModulesToSaveWrapper(nn.Module):
    """A fully trainable copy of a module per adapter, next to the frozen original (PEFT's layout).

    State-dict keys: ``original_module.*`` and ``modules_to_save.<adapter>.*``. Forward runs the active
    adapter's copy, or the original when no adapter of this wrapper is active or adapters are disabled.
    Attribute reads that the wrapper does not have (``weight``, ``in_features``...) go to the module in use.
    """

    def __init__(self, module_to_save: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disabled = False
        module_to_save.requires_grad_(False)
        self.add_adapter(adapter_name)

    def add_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            raise ValueError(f"modules_to_save already has a copy for adapter {adapter_name!r}")
        copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(False)
        self.modules_to_save[adapter_name] = copy_

    def set_adapter(self, adapter_name: Optional[str]) -> None:
        if adapter_name is not None and adapter_name not in self.modules_to_save:
            raise KeyError(f"unknown adapter {adapter_name!r}; this wrapper has {sorted(self.modules_to_save)}")
        self.active_adapter = adapter_name
        for n, m in self.modules_to_save.items():
            m.requires_grad_(n == adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    @property
    def module_in_use(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.module_in_use(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.module_in_use, name)
