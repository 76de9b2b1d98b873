"""LoRALinear: the PEFT-compatible LoRA baseline (docs/methods.md, LoRA)."""
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
    state dict maps 1:1. Only `lora_A` and `lora_B` require grad. On a bfloat16/float16 base
    A and B are float32 (`adapter_dtype`, as PEFT): the adapter path runs in float32 on x cast
    up, and its output is cast back to the base's dtype (PEFT's `_cast_input_dtype`).
    `merge()` remembers A and B, so `unmerge()` subtracts exactly what was added even if the
    adapter changed in between.
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
        factory = dict(device=self.weight.device, dtype=self.adapter_dtype)
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
        return [LowRankTap("lora_A.weight", "lora_B.weight", x, grad_y, self.lora_A.weight.detach().to(x.dtype),
                           self.lora_B.weight.detach().to(x.dtype), self.scaling)]

    def _delta_tensors(self) -> dict[str, torch.Tensor]:
        return {"A": self.lora_A.weight, "B": self.lora_B.weight}

    def _delta_from(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """ΔW = s B A, [out, in], in float32 or wider (for merging only)."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        return self.scaling * (tensors["B"].to(acc) @ tensors["A"].to(acc))

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] (checked by `AdapterLinear.forward`)."""
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        delta = self._unscaled_delta(x)
        if delta.dtype == y.dtype:
            # y + s delta into the GEMMs' fresh outputs (their backwards keep inputs, not
            # outputs): no [..., out] buffer allocated per call, and the same roundings as
            # PEFT's `result + lora_B(lora_A(x)) * scaling`.
            return y.add_(delta.mul_(self.scaling))
        return y + (delta * self.scaling).to(y.dtype)

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s (dropout(x) A^T) B^T, x [..., in] -> [..., out] in the adapter's dtype (LoRA is
        additive); x is cast to A's dtype first (float32 on a bf16/fp16 base, as PEFT)."""
        return self._unscaled_delta(x) * self.scaling

    def _unscaled_delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))

    def merge(self) -> None:
        """Fold ΔW into W (forward then runs the plain linear); undo with `unmerge`."""
        if self.merged:
            raise RuntimeError("fastcur.LoRALinear.merge: the adapter is already merged")
        self._merge_delta()

    def unmerge(self) -> None:
        """Subtract the ΔW that `merge` added (exact up to the rounding of W's dtype), even if A
        or B changed while merged."""
        if not self.merged:
            raise RuntimeError("fastcur.LoRALinear.unmerge: the adapter is not merged")
        self._unmerge_delta()

    def extra_repr(self) -> str:
        return (f"{self._base_repr()}, rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"
                + (", rslora=True" if self.use_rslora else "") + (", merged=True" if self.merged else ""))
