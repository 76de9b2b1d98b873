"""Adapter layers: thin modules that own their tensors and call the fused ops."""
from .adapter_linear import AdapterLinear
from .cur_lora_linear import CURLoRALinear
from .jump_lora_linear import JumpLoRALinear, JumpThreshold, f_schedule, reset_thresholds
from .lora_linear import LoRALinear

__all__ = ["AdapterLinear", "CURLoRALinear", "LoRALinear", "JumpLoRALinear", "JumpThreshold",
           "f_schedule", "reset_thresholds"]
