"""Drop-in torch.nn modules over dense or 4-bit bases."""
from .adapter import Adapter
from .bitfit import BitFitLinear
from .ia3 import IA3Linear
from .linear4bit import Linear4bit
from .lora import LoraLinear, LoraMagnitude, ModulesToSaveWrapper
from .prompt import PrefixEncoder, PromptEmbedding
from .sparse import SparseLinear

__all__ = ["Adapter", "BitFitLinear", "IA3Linear", "Linear4bit", "LoraLinear", "LoraMagnitude", "ModulesToSaveWrapper",
           "PrefixEncoder", "PromptEmbedding", "SparseLinear"]
