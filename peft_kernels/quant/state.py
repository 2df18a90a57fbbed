"""QuantState: everything needed besides the packed bytes to read a 4-bit weight.

Layout (bitsandbytes-compatible, see ARCHITECTURE.md "NF4 bytes"):

* packed weight: uint8 ``[(numel + 1) // 2, 1]``, element 2i in the high nibble;
* ``absmax``: float32 ``[nblocks]`` (``nblocks = ceil(numel / blocksize)``), or with
  double quantization uint8 codes ``[nblocks]`` into ``nested.code`` with
  ``absmax[i] = nested.code[q[i]] * nested.absmax[i // 256] + nested.offset``.

``to_checkpoint`` / ``from_checkpoint`` read and write the keys transformers uses
for a bitsandbytes 4-bit weight: ``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map`` and
``weight.quant_state.bitsandbytes__<type>`` (JSON in a uint8 tensor).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from .codes import NESTED_BLOCKSIZE, QUANT_TYPES, VALID_BLOCKSIZES, code4, dynamic_map

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """'float16' for torch.float16: the spelling transformers/bitsandbytes write to JSON."""
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r} in quant state; expected one of {sorted(_DTYPE_NAMES)}") from None


def check_blocksize(blocksize: int) -> None:
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"unsupported blocksize {blocksize}: expected one of {VALID_BLOCKSIZES}")


@dataclass
class NestedStats:
    """Second-level quantization of absmax: uint8 codes into ``code`` (float32 [256])."""

    absmax: torch.Tensor  # float32 [ceil(nblocks / blocksize)]
    code: torch.Tensor  # float32 [256]
    offset: float  # mean of the first-level absmax (a float32 value)
    blocksize: int = NESTED_BLOCKSIZE
    dtype: torch.dtype = torch.float32


@dataclass
class QuantState:
    """Metadata and statistics of one blockwise 4-bit tensor of ``shape``.

    ``absmax`` is float32 [nblocks], or uint8 [nblocks] when ``nested`` is set.
    ``code`` is the float32 [16] code book. ``dtype`` is the dtype the tensor had
    before quantization (and dequantizes to by default).
    """

    quant_type: str
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    absmax: torch.Tensor
    code: torch.Tensor
    nested: NestedStats | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def packed_numel(self) -> int:
        return (self.numel + 1) // 2

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def absmax_float(self) -> torch.Tensor:
        """float32 [nblocks] per-block scales, decoding the nested statistics if any."""
        if self.nested is None:
            return self.absmax
        n = self.nested
        nb = self.absmax.numel()
        scale = n.absmax.repeat_interleave(n.blocksize)[:nb]
        out = n.code[self.absmax.long()] * scale
        return out + torch.tensor(n.offset, dtype=torch.float32, device=out.device)

    def storage_bytes(self) -> int:
        """Bytes of the statistics (absmax, nested absmax and code books)."""
        total = self.absmax.numel() * self.absmax.element_size() + self.code.numel() * 4
        if self.nested is not None:
            total += self.nested.absmax.numel() * 4 + self.nested.code.numel() * 4 + 4
        return total

    def to(self, device) -> "QuantState":
        nested = None
        if self.nested is not None:
            nested = replace(self.nested, absmax=self.nested.absmax.to(device), code=self.nested.code.to(device))
        return replace(self, absmax=self.absmax.to(device), code=self.code.to(device), nested=nested)

    # ------------------------------------------------------------------ checks
    def validate(self, packed: torch.Tensor | None = None) -> None:
        """Raise ValueError/TypeError if the state is inconsistent, or does not match ``packed``."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"unsupported quant_type {self.quant_type!r}: expected one of {QUANT_TYPES}")
        check_blocksize(self.blocksize)
        if self.code.dtype != torch.float32 or self.code.numel() != 16:
            raise ValueError(f"quant_map must be float32 [16], got {self.code.dtype} {tuple(self.code.shape)}")
        if self.absmax.numel() != self.nblocks:
            raise ValueError(
                f"absmax has {self.absmax.numel()} entries but a {tuple(self.shape)} tensor in blocks of "
                f"{self.blocksize} has {self.nblocks}: the quant state does not belong to this weight")
        if self.nested is None:
            if self.absmax.dtype != torch.float32:
                raise TypeError(f"absmax must be float32 without double quantization, got {self.absmax.dtype}")
        else:
            if self.absmax.dtype != torch.uint8:
                raise TypeError(f"absmax must be uint8 codes with double quantization, got {self.absmax.dtype}")
            want = -(-self.nblocks // self.nested.blocksize)
            if self.nested.absmax.numel() != want or self.nested.absmax.dtype != torch.float32:
                raise ValueError(f"nested_absmax must be float32 [{want}], got "
                                 f"{self.nested.absmax.dtype} {tuple(self.nested.absmax.shape)}")
            if self.nested.code.numel() != 256:
                raise ValueError(f"nested_quant_map must have 256 entries, got {self.nested.code.numel()}")
        if packed is not None:
            if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
                raise TypeError(f"packed 4-bit weight must be a uint8 tensor, got "
                                f"{getattr(packed, 'dtype', type(packed).__name__)}")
            if packed.numel() != self.packed_numel:
                raise ValueError(
                    f"packed weight has {packed.numel()} bytes but shape {tuple(self.shape)} needs "
                    f"{self.packed_numel}: the quant state does not match its bytes")
            if packed.device != self.absmax.device:
                raise ValueError(f"packed weight is on {packed.device} but its absmax is on {self.absmax.device}")

    # ------------------------------------------------------ checkpoint format
    def to_checkpoint(self, packed: torch.Tensor, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """Tensors under transformers' bitsandbytes keys (``prefix``, ``prefix.absmax``, ...)."""
        self.validate(packed)
        meta = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        out = {prefix: packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
        if self.nested is not None:
            out[f"{prefix}.nested_absmax"] = self.nested.absmax
            out[f"{prefix}.nested_quant_map"] = self.nested.code
            meta.update(nested_blocksize=self.nested.blocksize, nested_dtype=dtype_name(self.nested.dtype),
                        nested_offset=self.nested.offset)
        blob = json.dumps(meta).encode("utf-8")
        out[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], prefix: str = "weight"
                        ) -> tuple[torch.Tensor, "QuantState"]:
        """Inverse of :meth:`to_checkpoint`: returns ``(packed, state)``; raises on missing/corrupt keys."""
        qs_keys = [k for k in tensors if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        if len(qs_keys) != 1:
            raise ValueError(f"expected exactly one '{prefix}.quant_state.bitsandbytes__<type>' entry, found {qs_keys}")
        try:
            meta = json.loads(bytes(tensors[qs_keys[0]].to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"corrupt quant state JSON in {qs_keys[0]}: {e}") from None
        for key in ("quant_type", "blocksize", "dtype", "shape"):
            if key not in meta:
                raise ValueError(f"quant state {qs_keys[0]} lacks {key!r}")
        for key in (prefix, f"{prefix}.absmax"):
            if key not in tensors:
                raise ValueError(f"4-bit checkpoint lacks tensor {key!r}")
        quant_type = meta["quant_type"]
        code = tensors.get(f"{prefix}.quant_map")
        if code is None:
            code = code4(quant_type)
        nested = None
        if f"{prefix}.nested_absmax" in tensors:
            if "nested_offset" not in meta:
                raise ValueError(f"quant state {qs_keys[0]} has nested_absmax but no nested_offset")
            nested = NestedStats(
                absmax=tensors[f"{prefix}.nested_absmax"],
                code=tensors.get(f"{prefix}.nested_quant_map", dynamic_map()),
                offset=float(meta["nested_offset"]),
                blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
                dtype=parse_dtype(meta.get("nested_dtype", "float32")),
            )
        state = cls(quant_type=quant_type, blocksize=int(meta["blocksize"]), shape=torch.Size(meta["shape"]),
                    dtype=parse_dtype(meta["dtype"]), absmax=tensors[f"{prefix}.absmax"],
                    code=code.to(torch.float32), nested=nested)
        packed = tensors[prefix]
        state.validate(packed)
        return packed, state
