"""Home of the compiled CPU C library, ``libpeft_kernels_cpu.so``.

Written here by ``setup.py`` (when a C compiler is available) or by
``peft_kernels.csrc_build.build_cpu()``; loaded by ``peft_kernels.ops.cpu_lib``.
Nothing here is imported as Python code.
"""
