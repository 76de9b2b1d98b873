"""The restrain rule of SECURA's released code (SPEC §3, `restrain=True`, off by default).

After S is computed, if the share of elements with `S <= mn` is above `ratio`, the adapter part
of the output on the given output channels is multiplied by `decay`:
`y = (2 y0 + Δ ⊙ c) / S` with `c_j = decay` on `channels` and 1 elsewhere, S computed from
the unrestrained Δ. The decision is taken on the device (`torch.where`), never with a host
sync. This path runs the plain-PyTorch composite (the fused kernels do not implement restrain).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference


def secura_linear_restrained(x: Tensor, weight: Tensor, bias: Tensor | None, C: Tensor, A_c: Tensor,
                             B_c: Tensor, R: Tensor, lora_bias: Tensor | None, scale: float,
                             k: float, eps: float, norm: str, scope: str, channels: Tensor,
                             mn: float = 1.2, ratio: float = 0.9,
                             decay: float = 0.99) -> tuple[Tensor, Tensor]:
    """secura_linear with the restrain rule.

    x [..., k], weight [n, k], ... as `fastcur.ops.secura_linear`; channels: int64 [c] output
    channels (drawn by the caller). Returns (y [..., n], fired: bool scalar tensor).
    """
    y0 = torch.nn.functional.linear(x, weight, bias)
    delta = reference.secura_delta(x, C, A_c, B_c, R, lora_bias, scale)
    S = reference.signorm_scales(y0, delta, k, eps, norm, scope)
    fired = (S <= mn).to(S.dtype).mean() > ratio if S.numel() else torch.zeros((), dtype=torch.bool)
    c = torch.ones(weight.shape[0], dtype=S.dtype, device=S.device)
    c[channels] = decay
    c = torch.where(fired, c, torch.ones_like(c))
    y = (y0 + (y0 + delta * c.to(delta.dtype))) / S
    return y.to(x.dtype), fired
