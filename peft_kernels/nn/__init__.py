"""Drop-in torch.nn modules over dense or 4-bit bases."""
from .adapter import Adapter
from .bitfit import BitFitLinear
from .embedding4bit import Embedding4bit
from .ia3 import IA3Linear
from .linear4bit import Linear4bit
from .lora import LoraLinear, LoraMagnitude, ModulesToSaveWrapper
from .prompt import PrefixEncoder, PromptEmbedding
from .sparse import SparseLinear
from .trainable_tokens import Linear4bitHead

__all__ = ["Adapter", "BitFitLinear", "Embedding4bit", "IA3Linear", "Linear4bit", "Linear4bitHead", "LoraLinear", "LoraMagnitude", "ModulesToSaveWrapper",
           "PrefixEncoder", "PromptEmbedding", "SparseLinear"]
