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


# -- SECURA (SPEC §3) ---------------------------------------------------------------------------
def _signorm_scale(L: torch.Tensor, k: float, eps: float, norm: str, dim) -> torch.Tensor:
    """`S = 2 - σ(N)` from the ratios L (detached); max over `dim` (None = the whole tensor).

    norm="max": N = k (L / (max L + eps) - 1/2); norm="raw": N = k L (the released code).
    Where every L of the scope is 0 (Δ = 0, e.g. at init), S = 2 for both norms.
    """
    if dim is None:
        mx = L.amax() if L.numel() else L.new_zeros(())
    else:
        mx = L.amax(dim=dim, keepdim=True)
    N = k * (L / (mx + eps) - 0.5) if norm == "max" else k * L
    S = 2.0 - torch.sigmoid(N)
    return torch.where(mx == 0, torch.full_like(S, 2.0), S)


def signorm(y0: torch.Tensor, delta: torch.Tensor, k: float = 6.0, eps: float = 1e-10,
            norm: str = "max", scope: str = "token") -> torch.Tensor:
    """SigNorm in output space (SPEC §3): `(y0 + (y0 + Δ)) / S`, S detached.

    y0 [..., n] the base output (bias included), delta [..., n] the adapter's output.
    `L = |Δ| / (|y0| + eps)`, computed in float32 or wider; max per row of the last dimension
    (scope="token") or over the whole tensor (scope="tensor"). Returns [..., n].
    """
    S = signorm_scales(y0, delta, k, eps, norm, scope)
    return ((y0 + (y0 + delta)) / S).to(y0.dtype)


@torch.no_grad()
def signorm_scales(y0: torch.Tensor, delta: torch.Tensor, k: float = 6.0, eps: float = 1e-10,
                   norm: str = "max", scope: str = "token") -> torch.Tensor:
    """The detached scales S of `signorm` ([..., n], float32 or float64)."""
    acc = torch.promote_types(y0.dtype, torch.float32)
    L = delta.to(acc).abs() / (y0.to(acc).abs() + eps)
    return _signorm_scale(L, k, eps, norm, -1 if scope == "token" else None)


def secura_delta(x: torch.Tensor, C: torch.Tensor, A_c: torch.Tensor, B_c: torch.Tensor,
                 R: torch.Tensor, lora_bias: torch.Tensor | None = None,
                 scale: float = 1.0) -> torch.Tensor:
    """`Δ(x) = s * (((x R^T) B_c) A_c) C^T + lora_bias` (SPEC §3).

    x [..., k], C [n, r], A_c [a, r], B_c [r, a], R [r, k], lora_bias [n] or None -> [..., n]
    """
    d = scale * ((((x @ R.mT) @ B_c) @ A_c) @ C.mT)
    return d if lora_bias is None else d + lora_bias


def secura_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, C: torch.Tensor,
                  A_c: torch.Tensor, B_c: torch.Tensor, R: torch.Tensor,
                  lora_bias: torch.Tensor | None = None, scale: float = 1.0, k: float = 6.0,
                  eps: float = 1e-10, norm: str = "max", scope: str = "token") -> torch.Tensor:
    """`signorm(x W^T + b, Δ(x))` (SPEC §3, §7). x [..., k], weight [n, k] -> [..., n]."""
    y0 = F.linear(x, weight, bias)
    return signorm(y0, secura_delta(x, C, A_c, B_c, R, lora_bias, scale), k, eps, norm, scope)


def signorm_merge(weight: torch.Tensor, C: torch.Tensor, U: torch.Tensor, R: torch.Tensor,
                  scale: float = 1.0, k: float = 6.0, eps: float = 1e-10,
                  scope: str = "row") -> torch.Tensor:
    """SigNorm-scaled merge in weight space (SPEC §3): `(W + (W + ΔW)) / S_w`, ΔW = s C U R.

    weight [n, k], C [n, r], U [r, r], R [r, k] -> [n, k] in weight's dtype; the ratios are
    computed in float32 or wider, max per output row (scope="row") or over the matrix
    ("tensor"). Where every ratio of the scope is 0, S_w = 2 (W is returned unchanged).
    """
    acc = torch.promote_types(weight.dtype, torch.float32)
    W = weight.to(acc)
    dW = scale * (C.to(acc) @ U.to(acc) @ R.to(acc))
    L = dW.abs() / (W.abs() + eps)
    S = _signorm_scale(L, k, eps, "max", -1 if scope == "row" else None)
    return ((W + (W + dW)) / S).to(weight.dtype)
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
