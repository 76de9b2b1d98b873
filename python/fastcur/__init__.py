"""fastcur: fused kernels for continual fine-tuning adapters (CURLoRA, SECURA, JumpLoRA, LaLoRA, IMSM).

    import fastcur
    layer = fastcur.CURLoRALinear.from_linear(nn.Linear(1024, 1024), rank=16)

`fastcur.info()` / `fastcur info` tell what is built and which backend runs where.
"""
from . import ops
from .backend import get_backend, set_backend, use_backend
from .config import AdapterConfig, CURLoRAConfig, JumpLoRAConfig, LoRAConfig, SecuraConfig
from .distributed import replicate_thresholds
from .info import info
from .imsm import IMSM
from .inject import (adapter_modules, disable_adapters, inject, merge, merge_and_unload,
                     print_trainable_parameters, unload, unmerge)
from .inclora import IncLoRA, ella_penalty
from .lalora import LaplaceRegularizer
from .named_adapters import active_adapter, adapter_names, delete_adapter, set_adapter
from .peft_interop import export_peft_adapter, load_peft_adapter
from .persistence import load_adapter, read_adapter_config, save_adapter
from .modules import (AdapterLinear, CURLoRALinear, JumpLoRALinear, JumpThreshold, LoRALinear,
                      MergeSchedule, SecuraLinear, f_schedule, reset_thresholds)

__version__ = "0.1.0"

__all__ = ["__version__", "ops", "info", "get_backend", "set_backend", "use_backend",
           "AdapterLinear", "LoRALinear", "CURLoRALinear", "SecuraLinear", "MergeSchedule",
           "JumpLoRALinear", "JumpThreshold", "IncLoRA", "ella_penalty", "f_schedule",
           "reset_thresholds", "LaplaceRegularizer", "IMSM",
           "AdapterConfig", "LoRAConfig", "CURLoRAConfig", "SecuraConfig", "JumpLoRAConfig", "inject",
           "adapter_modules", "print_trainable_parameters", "disable_adapters", "merge", "unmerge",
           "merge_and_unload", "unload", "save_adapter", "load_adapter", "read_adapter_config",
           "load_peft_adapter", "export_peft_adapter", "replicate_thresholds",
           "set_adapter", "delete_adapter", "active_adapter", "adapter_names"]
