"""peft-kernels-rotary: transformers' ``rotary_pos_emb`` (``apply_rotary_pos_emb``) on peft_kernels' fused RoPE.

A kernel repository in the Hugging Face kernel Hub layout, shipped inside the peft_kernels package and
loaded by ``kernels`` from its local path (``kernels.LocalLayerRepository``); nothing is downloaded.
"""
from . import layers

__all__ = ["layers"]
