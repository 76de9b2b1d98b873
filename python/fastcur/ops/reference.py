"""Plain-PyTorch references of every fastcur op (SPEC.md §7): the ground truth.

Written for reading, not speed: each line is a line of SPEC.md. Tests evaluate these in
float64; the `reference` backend runs them as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cur_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, C: torch.Tensor,
               U: torch.Tensor, R: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`x W^T + b + scale * ((x R^T) U^T) C^T` (SPEC §2); never forms C U R.

    x [..., k], weight [n, k], bias [n] or None, C [n, r], U [r, r], R [r, k] -> [..., n]
    """
    return F.linear(x, weight, bias) + scale * (((x @ R.mT) @ U.mT) @ C.mT)
