"""``MultiLoraLinear``: a frozen linear base plus N preallocated, rank-padded LoRA adapter slots (serving).

Buffers (allocated once; adapters are copied into them in place, so their storage, shapes and a compiled
graph that reads them never change):

    lora_A    [S, R, K]   slot s: A_s [r_s, K] in rows [0, r_s), zeros beyond
    lora_B    [S, N, R]   slot s: B_s [N, r_s] in columns [0, r_s), zeros beyond
    scaling   float32 [S] s_s = alpha/r (alpha/sqrt(r) with rsLoRA); 0 for an empty slot
    ranks     int32 [S]   r_s; 0 for an empty slot (or an adapter that does not cover this layer)

``slot_index`` (an attribute, not a buffer: set per batch by ``serving.AdapterPool``): int32 [B] (one slot
per sequence of x [B, ..., K]) or [M] (one per row of x flattened to [M, K]); -1 = the base alone. None:
the layer is its base. Forward is inference only (``peft_kernels::multi_lora_*`` has no autograd):
y = base(x) + s_slot · x A_slotᵀ B_slotᵀ per row (see ``ops/multi_lora.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.multi_lora import check_slots, multi_lora_4bit_op, multi_lora_dense_op
from ._base import INPUT_DTYPES, WrapsBase, base_kind, base_shape, check_input, quant_args, storage_dtype


class MultiLoraLinear(WrapsBase, nn.Module):
    """A frozen ``nn.Linear`` / transformers ``Conv1D`` / ``Linear4bit`` with ``slots`` adapter slots of rank
    ``max_rank`` in ``dtype`` (default: the base's compute dtype, else the dtype its weight is stored in or
    was quantized from — the dtype the model runs in). Input x [..., K] in
    fp32/fp16/bf16/fp64; output [..., N] in x's dtype (the compute dtype over a dense base, like LoraLinear)."""

    def __init__(self, base_layer: nn.Module, slots: int, max_rank: int, dtype: Optional[torch.dtype] = None):
        super().__init__()
        for what, v in (("slots", slots), ("max_rank", max_rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{what} must be a positive integer, got {v!r}")
        self._kind = base_kind(base_layer, "MultiLoraLinear")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.out_features, self.in_features = base_shape(base_layer)
        if dtype is None:  # the dtype the model runs in: the kernels take the slots in the compute dtype
            dtype = getattr(base_layer, "compute_dtype", None) or storage_dtype(base_layer)
        if dtype not in INPUT_DTYPES:
            raise TypeError(f"slot dtype must be a float dtype, got {dtype}")
        dev = base_layer.weight.device
        n, k = self.out_features, self.in_features
        self.register_buffer("lora_A", torch.zeros(slots, max_rank, k, dtype=dtype, device=dev), persistent=False)
        self.register_buffer("lora_B", torch.zeros(slots, n, max_rank, dtype=dtype, device=dev), persistent=False)
        self.register_buffer("scaling", torch.zeros(slots, dtype=torch.float32, device=dev), persistent=False)
        self.register_buffer("ranks", torch.zeros(slots, dtype=torch.int32, device=dev), persistent=False)
        self.slot_index: Optional[torch.Tensor] = None

    @property
    def num_slots(self) -> int:
        return self.lora_A.shape[0]

    @property
    def max_rank(self) -> int:
        return self.lora_A.shape[1]

    # ------------------------------------------------------------------ slots (called by the pool)
    @torch.no_grad()
    def write_slot(self, slot: int, lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor],
                   scale: float) -> None:
        """Copy A [r, K] and B [N, r] into ``slot`` in place (zero padding beyond r); None: clear the slot
        for this layer. Shapes are checked by the caller (the pool checks a whole adapter before writing)."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if lora_A is None:
            self.scaling[slot] = 0.0
            self.ranks[slot] = 0
            return
        r = lora_A.shape[0]
        self.lora_A[slot, :r].copy_(lora_A)
        self.lora_B[slot, :, :r].copy_(lora_B)
        self.scaling[slot] = float(scale)
        self.ranks[slot] = r

    # ------------------------------------------------------------------ forward
    def _segments(self, x: torch.Tensor, m: int) -> tuple[torch.Tensor, int]:
        """(slot index, rows per slot): one slot per row, or per sequence (its tokens are consecutive rows)."""
        idx = self.slot_index
        if idx.dim() != 1:
            raise ValueError(f"slot_index must be 1-D (one slot per sequence or per row), got {tuple(idx.shape)}")
        if idx.shape[0] == m:
            return idx, 1
        if x.dim() >= 2 and idx.shape[0] == x.shape[0]:
            return idx, m // x.shape[0]
        raise ValueError(f"the batch names {idx.shape[0]} adapters but x has shape {tuple(x.shape)}: pass one "
                         f"adapter name per sequence (x.shape[0]) or per row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slot_index is None:
            return self.base_layer(x)
        check_input(x, "MultiLoraLinear", self.out_features, self.in_features)
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("MultiLoraLinear is inference only (serving mixed-adapter batches): run it under "
                               "torch.no_grad() / torch.inference_mode(), or train with LoraLinear")
        in_dtype = x.dtype
        cdt = self._compute_dtype(x)
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != cdt:
            x2 = x2.to(cdt)
        x2 = x2.contiguous()
        m = x2.shape[0]
        idx, seg_rows = self._segments(x, m)
        check_slots(self.lora_A, self.lora_B, self.scaling, self.ranks, idx, m, self.out_features,
                    self.in_features, seg_rows)
        bias = self.base_layer.bias
        if self._kind == "4bit":
            y = multi_lora_4bit_op(x2, *quant_args(self.base_layer), self.out_features, bias, self.lora_A,
                                   self.lora_B, self.scaling, self.ranks, idx, seg_rows)
            y = y if y.dtype == in_dtype else y.to(in_dtype)
        else:
            y = multi_lora_dense_op(x2, self._dense_weight(), bias, self.lora_A, self.lora_B, self.scaling,
                                    self.ranks, idx, seg_rows)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, slots={self.num_slots}, "
                f"max_rank={self.max_rank}, dtype={self.lora_A.dtype}")
