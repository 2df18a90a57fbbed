"""``QuantizedWeight``: the frozen 4-bit weight a module holds, shared by ``Linear4bit`` and ``Embedding4bit``.

One 2-D weight ``[rows, cols]`` (``Linear4bit``: [out_features, in_features]; ``Embedding4bit``:
[num_embeddings, embedding_dim]) flattened row-major and stored in the bitsandbytes layout
(ARCHITECTURE.md "The 4-bit format"):

* ``weight``: frozen uint8 Parameter ``[(rows*cols + 1) // 2, 1]`` (two codes per byte);
* buffers ``absmax`` (float32 [nblocks], or uint8 codes with double quantization), ``quant_map``
  (float32 [16]), ``nested_absmax`` / ``nested_quant_map`` (double quantization only), and the
  float ``nested_offset``; all non-persistent: ``state_dict()`` writes them under transformers'
  checkpoint keys instead (``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
  ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``).

A module mixes this in before ``nn.Module`` and implements ``_quant_shape()``. Because the layout is
one flat run of elements, an embedding table [V, H] and an output head [V, H] have the very same
bytes: a tied head shares the embedding's tensors (``share_quantized_weight``).
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import FLOAT_DTYPES
from ..ops.functional import dequantize
from ..quant.codes import NESTED_BLOCKSIZE, code4, dynamic_map
from ..quant.quantize import quantize_4bit
from ..quant.state import NestedStats, QuantState, check_blocksize

#: The buffers of the block statistics (their dtype is the format: never cast by ``Module.to(dtype)``).
STAT_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class QuantizedWeight:
    """Mixin: one frozen 4-bit weight of shape ``_quant_shape()`` and its block statistics (see module doc)."""

    weight: nn.Parameter
    quant_type: str
    blocksize: int
    double_quant: bool
    weight_dtype: torch.dtype
    nested_offset: float

    def _quant_shape(self) -> tuple[int, int]:  # pragma: no cover - every user overrides it
        raise NotImplementedError

    def _init_quantized_weight(self, quant_type: str, blocksize: int, double_quant: bool, device,
                               dtype: torch.dtype | None) -> None:
        """Allocate the (zero) packed weight and statistics for ``_quant_shape()`` on ``device``."""
        check_blocksize(blocksize)
        code4(quant_type)  # validates quant_type
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.weight_dtype = dtype or torch.get_default_dtype()
        rows, cols = self._quant_shape()
        numel = rows * cols
        nblocks = -(-numel // blocksize)
        self.weight = nn.Parameter(torch.zeros((numel + 1) // 2, 1, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.register_buffer("absmax", torch.zeros(nblocks, dtype=torch.uint8 if double_quant else torch.float32,
                                                   device=device), persistent=False)
        self.register_buffer("quant_map", code4(quant_type, device or "cpu").clone(), persistent=False)
        if double_quant:
            self.register_buffer("nested_absmax", torch.zeros(-(-nblocks // NESTED_BLOCKSIZE), device=device),
                                 persistent=False)
            self.register_buffer("nested_quant_map", dynamic_map(device or "cpu").clone(), persistent=False)
        else:
            self.register_buffer("nested_absmax", None, persistent=False)
            self.register_buffer("nested_quant_map", None, persistent=False)
        self.nested_offset = 0.0

    # ----------------------------------------------------------- quant state
    @property
    def quant_state(self) -> QuantState:
        """The QuantState over this module's buffers (no copies)."""
        nested = None
        if self.nested_absmax is not None:
            nested = NestedStats(absmax=self.nested_absmax, code=self.nested_quant_map, offset=self.nested_offset)
        return QuantState(quant_type=self.quant_type, blocksize=self.blocksize,
                          shape=torch.Size(self._quant_shape()), dtype=self.weight_dtype,
                          absmax=self.absmax, code=self.quant_map, nested=nested)

    def set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        """Adopt already-quantized bytes and their state (no requantization, no copy)."""
        if tuple(state.shape) != self._quant_shape():
            raise ValueError(f"quant state is for a {tuple(state.shape)} weight but this layer is "
                             f"[{', '.join(map(str, self._quant_shape()))}]")
        state.validate(packed)
        self.weight = nn.Parameter(packed.reshape(-1, 1), requires_grad=False)
        self.quant_type, self.blocksize, self.weight_dtype = state.quant_type, state.blocksize, state.dtype
        self.absmax, self.quant_map = state.absmax, state.code
        if state.nested is None:
            self.nested_absmax = self.nested_quant_map = None
            self.nested_offset, self.double_quant = 0.0, False
        else:
            self.nested_absmax, self.nested_quant_map = state.nested.absmax, state.nested.code
            self.nested_offset, self.double_quant = float(state.nested.offset), True

    def share_quantized_weight(self, other: "QuantizedWeight") -> None:
        """Hold ``other``'s very tensors (the same packed Parameter, absmax, code books): a tied weight stored
        once. Both must have the same ``_quant_shape()``."""
        self.set_quantized(other.weight, other.quant_state)
        self.weight = other.weight  # the same Parameter object, not a second one over the same bytes

    def quantize_(self, weight: torch.Tensor) -> None:
        """Quantize a dense ``weight`` of ``_quant_shape()`` into this module (in place)."""
        if tuple(weight.shape) != self._quant_shape():
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected "
                             f"[{', '.join(map(str, self._quant_shape()))}]")
        device = weight.device if self.weight.device.type == "meta" else self.weight.device
        packed, state = quantize_4bit(weight.detach().to(device), self.blocksize, self.quant_type,
                                      self.double_quant)
        self.set_quantized(packed, state)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype)/.half() must not cast the block statistics: absmax and
        # code books stay float32 (that is the format). Device moves still apply.
        stats = {name: getattr(self, name) for name in STAT_KEYS}
        probe = fn(torch.zeros((), dtype=self.weight_dtype, device=self.weight.device))
        super()._apply(fn, recurse)
        for name, before in stats.items():
            after = getattr(self, name)
            if before is not None and after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        if probe.dtype in FLOAT_DTYPES:
            self.weight_dtype = probe.dtype
        return self

    # ----------------------------------------------------------------- use
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight of ``_quant_shape()`` (default dtype: the one it was quantized from)."""
        return dequantize(self.weight, self.quant_state, dtype)

    @property
    def bits_per_parameter(self) -> float:
        """Storage bits per weight element: packed codes plus all block statistics (bias excluded)."""
        qs = self.quant_state
        return 8 * (self.weight.numel() + qs.storage_bytes()) / qs.numel

    def quantized_weight_tensors(self) -> list[torch.Tensor]:
        """The 4-bit weight's tensors: packed codes, block statistics, code books (not a bias)."""
        ts = (self.weight, self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map)
        return [t for t in ts if t is not None]

    # ----------------------------------------------------------- state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, t in self.quant_state.to_checkpoint(self.weight, prefix + "weight").items():
            if key != prefix + "weight":
                destination[key] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey = prefix + "weight"
        sub = {k: v for k, v in state_dict.items() if k == wkey or k.startswith(wkey + ".")}
        if wkey in sub:
            try:
                if len(sub) == 1 and sub[wkey].dtype in FLOAT_DTYPES:
                    self.quantize_(sub[wkey])  # a dense checkpoint: quantize on load
                else:
                    packed, state = QuantState.from_checkpoint(sub, wkey)
                    device = self.weight.device if self.weight.device.type != "meta" else packed.device
                    self.set_quantized(packed.to(device), state.to(device))
            except (ValueError, TypeError) as e:
                error_msgs.append(f"while loading {wkey}: {e}")
                return
            rest = {k: v for k, v in state_dict.items() if k not in sub}
            rest[wkey] = self.weight  # already adopted; lets the base class see the key as consumed
            state_dict = rest
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
