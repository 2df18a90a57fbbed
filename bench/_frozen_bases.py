"""The frozen layers every CPU benchmark compares: one dense weight, ours and bitsandbytes in 4-bit.

Not a test module (leading underscore): imported by bench/test_bench_*.py.
"""
from __future__ import annotations

import torch

from peft_kernels.nn import Linear4bit
from peft_kernels.ops import reference


def frozen_bases(k: int, n: int, seed: int):
    """(dense nn.Linear [n, k] fp32 frozen, our Linear4bit, bitsandbytes Linear4bit, W float64 [n, k]).

    Both 4-bit layers hold identical bytes (asserted); W float64 is their exact dequantization.
    """
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    dense = torch.nn.Linear(k, n, bias=False)
    dense.weight.requires_grad_(False)  # frozen base: only the input gradient is computed
    ours = Linear4bit.from_linear(dense)
    # bitsandbytes' supported CPU route: load the dense weight, then .to(device) quantizes it
    # (Params4bit._quantize). It stays in train mode: after an eval-mode no-grad CPU forward
    # bitsandbytes repacks the weight into a CPU-only layout.
    theirs = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                               quant_type="nf4")
    theirs.load_state_dict(dense.state_dict())
    theirs = theirs.to("cpu")
    theirs.train()
    assert theirs.weight.bnb_quantized
    assert torch.equal(theirs.weight.data.view(-1), ours.weight.view(-1)), "bnb and ours quantized differently"
    qs = ours.quant_state
    w_q = reference.dequantize_4bit(ours.weight, qs.absmax_float(), qs.code, qs.blocksize, qs.numel,
                                    torch.float64).view(n, k)
    return dense, ours, theirs, w_q


class _Holder(torch.nn.Module):
    """The smallest model PEFT can inject into: one linear layer named ``proj``."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def peft_qlora(bnb_base: torch.nn.Module, r: int, alpha: float):
    """(PEFT model, its LoRA layer) from ``get_peft_model`` over the bitsandbytes 4-bit layer.

    The layer is PEFT's own QLoRA layer (``peft.tuners.lora.bnb.Linear4bit``, asserted), with PEFT's
    default initialisation; callers copy their A and B in.
    """
    import warnings

    import peft

    holder = _Holder(bnb_base)
    holder.is_loaded_in_4bit = True  # what PEFT reads to pick its bitsandbytes 4-bit LoRA layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"]))
    layer = pm.base_model.model.proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb", f"PEFT chose {type(layer)}, not its bnb 4-bit layer"
    return pm, layer
