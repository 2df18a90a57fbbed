"""peft_kernels: kernel-accelerated parameter-efficient fine-tuning over 4-bit bases."""
__version__ = "0.1.0"


def __getattr__(name):
    # Serving helpers at the top level (``peft_kernels.mixed_adapters(model, names)``), imported lazily so that
    # ``import peft_kernels`` stays light.
    if name in ("AdapterPool", "mixed_adapters", "generate"):
        from . import serving
        return getattr(serving, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
