"""Triton kernels: one kernel family per file, pure functions on tensors (no state, no autograd).

* ``dequantize_4bit``: blockwise 4-bit (NF4/FP4) -> flat fp32/fp16/bf16.
* ``matmul_4bit_nt``: ``y = x W^T + b`` (forward); ``matmul_4bit_nn``: ``dx = dy W`` (grad of the
  input), W the 4-bit weight [N, K]. M == 1: dot-free GEMV kernel; M <= ``matmul4bit.FUSED_MAX_M``:
  fused dequant-in-``tl.dot`` kernel; larger M: dequant into a reused workspace + cuBLAS.
* ``clear_workspace``: free that workspace.
* ``lora_matmul_4bit_nt``: ``y = x W^T + xa_s B^T + b``; ``lora_matmul_4bit_nn``: ``dx = dy W + dyb_s A``
  (LoRA's rank-r term in the same kernel / output as the 4-bit matmul, same split by M).
* ``dora_weight_norm_4bit`` / ``dora_weight_norm_dense``: DoRA's per-row ``||W + s B A||`` without
  materialising W or B A.
* ``bitfit_grad_4bit``: BitFit's backward, ``dx = dy W`` and ``db = sum_m dy`` from one pass over dy.
* ``sparse.sampled_grad`` / ``sparse.delta_matmul_nt`` / ``sparse.delta_matmul_nn``: a sparse delta's
  gradient at its entries (SDDMM), ``x Δᵀ`` and ``dy Δ`` (unstructured or 16/32 tiles).
* ``adapter_forward`` / ``adapter_backward``: the fused bottleneck-adapter block.

They run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton
was imported (tests). Each kernel module lists its compiled forms in ``AOT_VARIANTS`` so that
tests/test_triton_aot.py can build all of them for real GPU targets on a machine without a GPU.
Importing this package needs triton; ``peft_kernels.ops`` imports it only for the Triton backend.
"""
from . import sparse
from .adapter import adapter_backward, adapter_forward
from .bitfit import bitfit_grad_4bit
from .dequant4bit import dequantize_4bit
from .lora import dora_weight_norm_4bit, dora_weight_norm_dense, lora_matmul_4bit_nn, lora_matmul_4bit_nt
from .matmul4bit import clear_workspace, matmul_4bit_nn, matmul_4bit_nt

__all__ = ["sparse", "adapter_forward", "adapter_backward", "bitfit_grad_4bit", "dequantize_4bit", "matmul_4bit_nt", "matmul_4bit_nn", "clear_workspace",
           "lora_matmul_4bit_nt", "lora_matmul_4bit_nn", "dora_weight_norm_4bit", "dora_weight_norm_dense"]
