"""Triton kernels: one kernel family per file, pure functions on tensors (no state, no autograd).

* ``dequantize_4bit``: blockwise 4-bit (NF4/FP4) -> flat fp32/fp16/bf16.
* ``matmul_4bit_nt``: ``y = x W^T + b`` (forward); ``matmul_4bit_nn``: ``dx = dy W`` (grad of the
  input), W the 4-bit weight [N, K]. M == 1: dot-free GEMV kernel; M <= ``matmul4bit.FUSED_MAX_M``:
  fused dequant-in-``tl.dot`` kernel; larger M: dequant into a reused workspace + cuBLAS.
* ``clear_workspace``: free that workspace.

They run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton
was imported (tests). Each kernel module lists its compiled forms in ``AOT_VARIANTS`` so that
tests/test_triton_aot.py can build all of them for real GPU targets on a machine without a GPU.
Importing this package needs triton; ``peft_kernels.ops`` imports it only for the Triton backend.
"""
from .dequant4bit import dequantize_4bit
from .matmul4bit import clear_workspace, matmul_4bit_nn, matmul_4bit_nt

__all__ = ["dequantize_4bit", "matmul_4bit_nt", "matmul_4bit_nn", "clear_workspace"]
