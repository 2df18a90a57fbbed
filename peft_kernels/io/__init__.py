"""Adapter files: Hugging Face PEFT format for LoRA (both ways), atomic directory writes."""
from .atomic import replace_directory


def __getattr__(name):
    # peft_format imports nn and methods, while quant.checkpoint imports io.atomic: load it lazily.
    if name in ("save_adapter", "load_adapter", "from_peft_model", "AdapterLoadError"):
        from . import peft_format
        return getattr(peft_format, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["save_adapter", "load_adapter", "from_peft_model", "AdapterLoadError", "replace_directory"]
