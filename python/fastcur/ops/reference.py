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


# -- LaLoRA (SPEC §5) ---------------------------------------------------------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_fisher_diag(x: torch.Tensor, grad_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over examples of squared per-example gradients of A and B (SPEC §5).

    x [E, T, k], grad_out [E, T, n], A [r, k], B [n, r] -> (F_A [r, k], F_B [n, r]) in float32
    (float64 for float64 inputs). The per-example gradients are formed in the inputs' dtype,
    all at once (this is the readable version, not the memory-bounded one).
    """
    g_B = scale * torch.einsum("etn,etr->enr", grad_out, x @ A.mT)   # s G_e^T (X_e A^T)
    g_A = scale * torch.einsum("etr,etk->erk", grad_out @ B, x)      # s (G_e B)^T X_e
    acc = _acc(A.dtype)
    return g_A.to(acc).square().sum(0), g_B.to(acc).square().sum(0)


def laplace_diag_penalty(params, anchors, precisions, lam: float) -> torch.Tensor:
    """`(lam/2) * sum_i sum(precisions[i] * (params[i] - anchors[i])^2)` -> 0-dim tensor."""
    total = sum((q * (p - a).square()).sum() for p, a, q in zip(params, anchors, precisions))
    return (0.5 * lam) * total


def laplace_diag_penalty_grad_(grads, params, anchors, precisions, lam: float) -> torch.Tensor:
    """`grads[i] += lam * precisions[i] * (params[i] - anchors[i])`, returns the penalty value."""
    with torch.no_grad():
        for g, p, a, q in zip(grads, params, anchors, precisions):
            g.add_(lam * q * (p - a))
        return laplace_diag_penalty(params, anchors, precisions, lam)


def kfac_factor(x: torch.Tensor, diagonal: bool = False) -> torch.Tensor:
    """x [M, d] -> x^T x [d, d] (or its diagonal [d]), in float32 (float64 for float64)."""
    xf = x.reshape(-1, x.shape[-1]).to(_acc(x.dtype))
    return xf.square().sum(0) if diagonal else xf.mT @ xf


def kfac_penalty(delta: torch.Tensor, S: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """`tr(G delta S delta^T)`; S [b, b] or [b] (diagonal), G [a, a] or [a]."""
    S = torch.diag(S) if S.dim() == 1 else S
    G = torch.diag(G) if G.dim() == 1 else G
    return torch.trace(G @ delta @ S @ delta.mT)
