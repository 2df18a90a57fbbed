"""PEFT methods: one file per method, each a config dataclass plus ``apply(model, cfg)``."""
from . import adapter, bitfit, freeze, ia3, lora, prefix_tuning, prompt_tuning, sparse
from .adapter import BottleneckConfig
from .bitfit import BitFitConfig
from .freeze import FreezeConfig, LisaSchedule
from .ia3 import IA3Config
from .lora import LoraConfig
from .prefix_tuning import PrefixTuningConfig, PrefixTuningModel
from .prompt_tuning import PromptTuningConfig, PromptTuningModel
from .sparse import DropAndGrow, SparseConfig

__all__ = ["adapter", "bitfit", "freeze", "ia3", "lora", "prefix_tuning", "prompt_tuning", "sparse",
           "BottleneckConfig", "BitFitConfig", "FreezeConfig", "LisaSchedule", "IA3Config", "LoraConfig",
           "PrefixTuningConfig", "PrefixTuningModel", "PromptTuningConfig", "PromptTuningModel", "DropAndGrow",
           "SparseConfig"]
