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


# ---------------------------------------------------------------------------------------------
# JumpLoRA (SPEC §4)
# ---------------------------------------------------------------------------------------------

def _window(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel K(u) = 1[|u| < 1/2] of SPEC §4, in u's dtype."""
    return (u.abs() < 0.5).to(u.dtype)


class _SymmetricJumpReLU(torch.autograd.Function):
    """J(Z) = Z ⊙ 1[|Z| > θ] with the straight-through gradients of SPEC §4.

    dL/dZ = G ⊙ 1[|Z| > θ];  dL/dθ = (θ/ε) · reduce(G ⊙ (−K((Z−θ)/ε) + K((−Z−θ)/ε))),
    reduce = mean over all entries ("mean") or their sum ("sum").
    """

    @staticmethod
    def forward(ctx, Z, theta, bandwidth, reduction):
        ctx.save_for_backward(Z, theta)
        ctx.bandwidth, ctx.reduction = bandwidth, reduction
        return Z * (Z.abs() > theta).to(Z.dtype)

    @staticmethod
    def backward(ctx, G):
        Z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        dZ = G * (Z.abs() > theta).to(Z.dtype)
        term = G * (-_window((Z - theta) / eps) + _window((-Z - theta) / eps))
        red = term.mean() if ctx.reduction == "mean" else term.sum()
        return dZ, (theta / eps) * red, None, None


class _OneSidedJumpReLU(torch.autograd.Function):
    """g = h ⊙ 1[h > θ_j] (rank-gated, SPEC §4), h [M, r], θ [r].

    dh = dg ⊙ 1[h > θ];  dθ_j = −(θ_j/ε) Σ_tokens K((h_tj − θ_j)/ε) dg_tj.
    """

    @staticmethod
    def forward(ctx, h, theta, bandwidth):
        ctx.save_for_backward(h, theta)
        ctx.bandwidth = bandwidth
        return h * (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx, dg):
        h, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        dh = dg * (h > theta).to(h.dtype)
        dtheta = -(theta / eps) * (_window((h - theta) / eps) * dg).sum(0)
        return dh, dtheta, None


def jump_delta_weight(A: torch.Tensor, B: torch.Tensor, log_theta: torch.Tensor, scale: float,
                      f: float = 1.0, bandwidth: float = 1e-3,
                      reduction: str = "mean") -> torch.Tensor:
    """ΔW = scale · (f · J(B A) + (1 − f) · B A), [n, k] (SPEC §4), differentiable with the
    straight-through estimator. A [r, k], B [n, r], log_theta [] (θ = exp(log_theta))."""
    Z = B @ A
    J = _SymmetricJumpReLU.apply(Z, log_theta.exp().reshape(()), bandwidth, reduction)
    return scale * (f * J + (1.0 - f) * Z)


def jump_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, log_theta: torch.Tensor, scale: float, f: float = 1.0,
                bandwidth: float = 1e-3, reduction: str = "mean") -> torch.Tensor:
    """`x (W + ΔW)^T + b`, weight-gated JumpLoRA (SPEC §4).

    x [..., k], weight [n, k], bias [n] or None, A [r, k], B [n, r], log_theta [] -> [..., n]
    """
    dW = jump_delta_weight(A, B, log_theta, scale, f, bandwidth, reduction)
    return F.linear(x, weight + dW.reshape(weight.shape).to(weight.dtype), bias)


def jump_rank_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                     B: torch.Tensor, log_theta: torch.Tensor, scale: float,
                     bandwidth: float = 1e-3) -> torch.Tensor:
    """`x W^T + b + scale · g B^T`, `g = h ⊙ 1[h > θ_j]`, `h = x A^T` (rank-gated, SPEC §4).

    x [..., k], weight [n, k], bias [n] or None, A [r, k], B [n, r], log_theta [r] -> [..., n]
    """
    h = x @ A.mT
    g = _OneSidedJumpReLU.apply(h.reshape(-1, A.shape[0]), log_theta.exp(), bandwidth).reshape(h.shape)
    return F.linear(x, weight, bias) + scale * (g @ B.mT)


def ella_penalty(A: torch.Tensor, B: torch.Tensor, log_theta: torch.Tensor, W_past: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """`‖scale · J(B A) ⊙ W_past‖_F²` with the hard mask: no gradient reaches log_theta.

    A [r, k], B [n, r], log_theta [], W_past [n, k] -> [] (a scalar)
    """
    Z = B @ A
    mask = (Z.abs() > log_theta.detach().exp().reshape(())).to(Z.dtype)
    return (scale * Z * mask * W_past).square().sum()
