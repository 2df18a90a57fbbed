"""Code books of the 4-bit and 8-bit data types, bit-for-bit those of bitsandbytes.

Each code book maps a code (the index) to a float32 value in [-1, 1]; a
quantized value is ``code[q] * absmax_of_its_block``.
"""
from __future__ import annotations

import functools

import torch

#: NF4 (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) rescaled to [-1, 1]. Sorted.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2) in code order: codes
# 0-7 are the positive values, 8-15 the same magnitudes negated. Normalised by 12.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
            -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
FP4_VALUES = tuple(v / 12.0 for v in _FP4_RAW)

QUANT_TYPES = ("nf4", "fp4")
#: Blocksizes accepted for the 4-bit weight (bitsandbytes accepts the same set).
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Blocksize of the second-level (nested / double) quantization of absmax.
NESTED_BLOCKSIZE = 256


@functools.lru_cache(maxsize=None)
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        return torch.tensor(FP4_VALUES, dtype=torch.float32)
    raise ValueError(f"unsupported quant_type {quant_type!r}: expected one of {QUANT_TYPES}")


def code4(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [16] code book of ``quant_type`` ('nf4' or 'fp4') on ``device`` (a fresh tensor)."""
    # A copy, never the cached tensor: each layer owns its code book buffer, so an
    # in-place write to one layer cannot change every other layer in the process.
    return _code_cpu(quant_type).to(device, copy=True)


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    # The signed 8-bit "dynamic" map (Dettmers 2015, "8-bit approximations"):
    # for exponent e = 0..6 the magnitudes 10^(e-6) * midpoints of a linear grid
    # on [0.1, 1] with 2^e + 1 points, both signs; then one extra positive and
    # negative group for the last exponent, plus 0 and 1. Built in float32 with
    # the same operation order as bitsandbytes so that every value is identical.
    data: list[float] = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        n_items = 2 ** (i + non_sign - max_exp) + 1
        bounds = torch.linspace(0.1, 1, n_items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    # 2^(7-7) - 1 = 0 additional items for the signed 8-bit map.
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [256] signed dynamic map used to quantize absmax (double quantization); a fresh tensor."""
    return _dynamic_map_cpu().to(device, copy=True)
