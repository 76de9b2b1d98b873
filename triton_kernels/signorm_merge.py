"""signorm_merge (docs/methods.md, SECURA) in Triton: `(2 W + ΔW) / S_w` with ΔW = scale C U R recomputed
per tile by the shared row kernel of signorm.py (z = scale C U [n, r], E = R), so neither ΔW
nor the ratios ever exist as n x k tensors; scope "tensor" is two launches around a device max.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .cur_linear import _acc_dtype, _store_dtype
from .signorm import signorm_rows


def signorm_merge(weight: Tensor, C: Tensor, U: Tensor, R: Tensor, scale: float, k: float,
                  eps: float, scope: str) -> Tensor:
    """weight [n, k], C [n, r], U [r, r], R [r, k] -> W_new [n, k] in weight's dtype."""
    acc = _acc_dtype(weight.dtype)
    W = weight.contiguous()
    CU = (C.to(acc) @ U.to(acc)).mul_(scale).contiguous()  # [n, r], small
    out = torch.empty(W.shape, device=W.device, dtype=_store_dtype(W.dtype))
    signorm_rows(W, out, z=CU, E=R, k=k, eps=eps, raw=False, tensor_scope=scope == "tensor")
    return out.to(weight.dtype)
