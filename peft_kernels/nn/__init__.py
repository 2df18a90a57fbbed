"""Drop-in torch.nn modules over dense or 4-bit bases."""
from .linear4bit import Linear4bit
from .lora import LoraLinear, LoraMagnitude, ModulesToSaveWrapper

__all__ = ["Linear4bit", "LoraLinear", "LoraMagnitude", "ModulesToSaveWrapper"]
