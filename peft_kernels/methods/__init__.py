"""PEFT methods: one file per method, each a config dataclass plus ``apply(model, cfg)``."""
from . import lora
from .lora import LoraConfig

__all__ = ["lora", "LoraConfig"]
