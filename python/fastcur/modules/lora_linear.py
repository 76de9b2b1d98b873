"""LoRALinear: the PEFT-compatible LoRA baseline of SPEC §1."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_linear import AdapterLinear, LowRankTap


class LoRALinear(AdapterLinear):
    """`y = x W^T + b + s * (dropout(x) A^T) B^T`, `s = alpha / r` (`alpha / sqrt(r)` with rsLoRA).

    Parameter names, initialization and defaults follow PEFT (`lora_A.weight` [r, in] kaiming
    uniform with a = sqrt(5), `lora_B.weight` [out, r] zeros, r = 8, alpha = 8), so a PEFT
    state dict maps 1:1. Only `lora_A` and `lora_B` require grad.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 *, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0, use_rslora: bool = False,
                 _base=None):
        super().__init__(in_features, out_features, bias, device, dtype, _base=_base)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"fastcur.LoRALinear: rank must be a positive int, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"fastcur.LoRALinear: dropout must be in [0, 1), got {dropout!r}")
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.scaling = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Linear(in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """PEFT's init: A kaiming-uniform (a = sqrt(5)), B zeros, so the adapter starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """{"lora_A.weight": A [r, in], "lora_B.weight": B [out, r]}."""
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def curvature_taps(self, x: torch.Tensor, grad_y: torch.Tensor) -> list:
        """One `LowRankTap`: y += s (x A^T) B^T (x [E, T, in], grad_y [E, T, out]); dropout is
        read as off (curvature is collected in eval mode)."""
        return [LowRankTap("lora_A.weight", "lora_B.weight", x, grad_y, self.lora_A.weight.detach(),
                           self.lora_B.weight.detach(), self.scaling)]

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s B A, [out, in], in float32 or wider (for merging only)."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        return self.scaling * (self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc))

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] (checked by `AdapterLinear.forward`)."""
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s (dropout(x) A^T) B^T, x [..., in] -> [..., out] (LoRA is additive)."""
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into W (forward then runs the plain linear); undo with `unmerge`."""
        if self.merged:
            raise RuntimeError("fastcur.LoRALinear.merge: the adapter is already merged")
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from W again (exact up to the rounding of W's dtype)."""
        if not self.merged:
            raise RuntimeError("fastcur.LoRALinear.unmerge: the adapter is not merged")
        self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"{self._base_repr()}, rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"
                + (", rslora=True" if self.use_rslora else "") + (", merged=True" if self.merged else ""))
