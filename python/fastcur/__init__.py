"""fastcur: fused kernels for continual fine-tuning adapters (CURLoRA, SECURA, JumpLoRA, LaLoRA, IMSM).

    import fastcur
    layer = fastcur.CURLoRALinear.from_linear(nn.Linear(1024, 1024), rank=16)

`fastcur.info()` / `fastcur info` tell what is built and which backend runs where.
"""
from . import ops
from .backend import get_backend, set_backend, use_backend
from .distributed import replicate_thresholds
from .info import info
from .inclora import IncLoRA, ella_penalty
from .lalora import LaplaceRegularizer
from .modules import (AdapterLinear, CURLoRALinear, JumpLoRALinear, JumpThreshold, LoRALinear,
                      MergeSchedule, SecuraLinear, f_schedule, reset_thresholds)

__version__ = "0.1.0"

__all__ = ["__version__", "ops", "info", "get_backend", "set_backend", "use_backend",
           "AdapterLinear", "LoRALinear", "CURLoRALinear", "SecuraLinear", "MergeSchedule",
           "JumpLoRALinear", "JumpThreshold", "IncLoRA", "ella_penalty", "f_schedule",
           "reset_thresholds", "LaplaceRegularizer", "replicate_thresholds"]
