"""Adapter layers: thin modules that own their tensors and call the fused ops."""
from .adapter_linear import AdapterLinear, LinearTap, LowRankTap
from .cur_lora_linear import CURLoRALinear
from .jump_lora_linear import JumpLoRALinear, JumpThreshold, f_schedule, reset_thresholds
from .lora_linear import LoRALinear
from .secura_linear import MergeSchedule, SecuraLinear

__all__ = ["AdapterLinear", "LinearTap", "LowRankTap", "LoRALinear", "CURLoRALinear", "SecuraLinear",
           "MergeSchedule", "JumpLoRALinear", "JumpThreshold", "f_schedule", "reset_thresholds"]
