"""The restrain rule of SECURA's released code (docs/methods.md, SECURA; `restrain=True`, off by
default), in two forms (`rule`):

- "fastcur" (default): if the share of elements with `S <= mn` is above `ratio`, the adapter
  part of the output on `channels` is multiplied by `decay`: `y = (2 y0 + Δ ⊙ c) / S`, with
  `c_j = decay` on `channels` and 1 elsewhere, and the share taken over every element of y.
- "released": as the released code computes it: the decay multiplies the whole second summand
  `y0 + Δ` on `channels` (`y = (y0 + (y0 + Δ) ⊙ c) / S`), and the share is the count of
  `S <= mn` divided by the product of y's last two dimensions (`T n` for a [B, T, n] output,
  so a batch of B > 1 counts B times over).

S is computed from the unrestrained Δ in both. The decision is taken on the device
(`torch.where`), never with a host sync. This path runs the plain-PyTorch composite (the fused
kernels do not implement restrain). Channels are drawn by the caller (`SecuraLinear`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference

RULES = ("fastcur", "released")


def secura_linear_restrained(x: Tensor, weight: Tensor, bias: Tensor | None, C: Tensor, A_c: Tensor,
                             B_c: Tensor, R: Tensor, lora_bias: Tensor | None, scale: float,
                             k: float, eps: float, norm: str, scope: str, channels: Tensor,
                             mn: float = 1.2, ratio: float = 0.9, decay: float = 0.99,
                             rule: str = "fastcur") -> tuple[Tensor, Tensor]:
    """secura_linear with the restrain rule.

    x [..., k], weight [n, k], ... as `fastcur.ops.secura_linear`; channels: int64 [c] output
    channels (drawn by the caller); rule: "fastcur" or "released" (module doc). Returns
    (y [..., n] in x's dtype, fired: bool scalar tensor).
    """
    if rule not in RULES:
        raise ValueError(f"fastcur.secura_linear_restrained: rule must be one of {RULES}, got {rule!r}")
    y0 = torch.nn.functional.linear(x, weight, bias)
    delta = reference.secura_delta(x, C, A_c, B_c, R, lora_bias, scale)
    S = reference.signorm_scales(y0, delta, k, eps, norm, scope)
    hits = (S <= mn).to(S.dtype)
    if not S.numel():
        fired = torch.zeros((), dtype=torch.bool, device=S.device)
    elif rule == "released":
        per = S.shape[-1] * (S.shape[-2] if S.dim() >= 2 else 1)
        fired = hits.sum() / per > ratio
    else:
        fired = hits.mean() > ratio
    c = torch.ones(weight.shape[0], dtype=S.dtype, device=S.device)
    c[channels] = decay
    c = torch.where(fired, c, torch.ones_like(c))
    if rule == "released":
        y = (y0 + (y0 + delta) * c.to(delta.dtype)) / S
    else:
        y = (y0 + (y0 + delta * c.to(delta.dtype))) / S
    return y.to(x.dtype), fired
