"""Home of the compiled CUDA C library, ``libpeft_kernels_cuda.so``.

Written here by ``setup.py`` (when nvcc is available) or by
``peft_kernels.csrc_build.build()``; loaded by ``peft_kernels.ops.cuda_lib``.
Nothing here is imported as Python code.
"""
