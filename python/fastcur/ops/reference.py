"""Plain-PyTorch references of every fastcur op (docs/methods.md): the ground truth.

Written for reading, not speed: each line is a line of docs/methods.md. Tests evaluate these in
float64; the `reference` backend runs them as they are.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cur_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, C: torch.Tensor,
               U: torch.Tensor, R: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`x W^T + b + scale * ((x R^T) U^T) C^T` (docs/methods.md, CURLoRA); never forms C U R.

    x [..., k], weight [n, k], bias [n] or None, C [n, r], U [r, r], R [r, k] -> [..., n]
    """
    return F.linear(x, weight, bias) + scale * (((x @ R.mT) @ U.mT) @ C.mT)


# -- SECURA (docs/methods.md, SECURA) ---------------------------------------------------------------------------
def _signorm_scale(L: torch.Tensor, k: float, eps: float, norm: str, dim) -> torch.Tensor:
    """`S = 2 - σ(N)` from the ratios L (detached); max over `dim` (None = the whole tensor).

    norm="max": N = k (L / (max L + eps) - 1/2); norm="raw": N = k L (the released code).
    Where every L of the scope is 0 (Δ = 0, e.g. at init), S = 2 for both norms.
    """
    if dim is None:
        mx = L.amax() if L.numel() else L.new_zeros(())
    elif L.shape[dim] == 0:  # no entries to take a max over (n = 0 or k = 0)
        mx = L.new_zeros(L.shape[:-1] + (1,))
    else:
        mx = L.amax(dim=dim, keepdim=True)
    N = k * (L / (mx + eps) - 0.5) if norm == "max" else k * L
    S = 2.0 - torch.sigmoid(N)
    return torch.where(mx == 0, torch.full_like(S, 2.0), S)


def signorm(y0: torch.Tensor, delta: torch.Tensor, k: float = 6.0, eps: float = 1e-10,
            norm: str = "max", scope: str = "token") -> torch.Tensor:
    """SigNorm in output space (docs/methods.md, SECURA): `(y0 + (y0 + Δ)) / S`, S detached.

    y0 [..., n] the base output (bias included), delta [..., n] the adapter's output.
    `L = |Δ| / (|y0| + eps)`, computed in float32 or wider; max per row of the last dimension
    (scope="token") or over the whole tensor (scope="tensor"). Returns [..., n].
    The sum `y0 + (y0 + Δ)` is also formed in float32 or wider: in float16 it would overflow
    for |y0| above 32752 where the result (about y0) is representable.
    """
    S = signorm_scales(y0, delta, k, eps, norm, scope)
    acc = S.dtype
    y0a = y0.to(acc)
    return ((y0a + (y0a + delta.to(acc))) / S).to(y0.dtype)


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
    """`Δ(x) = s * (((x R^T) B_c) A_c) C^T + lora_bias` (docs/methods.md, SECURA).

    x [..., k], C [n, r], A_c [a, r], B_c [r, a], R [r, k], lora_bias [n] or None -> [..., n]
    """
    d = scale * ((((x @ R.mT) @ B_c) @ A_c) @ C.mT)
    return d if lora_bias is None else d + lora_bias


def secura_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, C: torch.Tensor,
                  A_c: torch.Tensor, B_c: torch.Tensor, R: torch.Tensor,
                  lora_bias: torch.Tensor | None = None, scale: float = 1.0, k: float = 6.0,
                  eps: float = 1e-10, norm: str = "max", scope: str = "token") -> torch.Tensor:
    """`signorm(x W^T + b, Δ(x))` (docs/methods.md, SECURA). x [..., k], weight [n, k] -> [..., n]."""
    y0 = F.linear(x, weight, bias)
    return signorm(y0, secura_delta(x, C, A_c, B_c, R, lora_bias, scale), k, eps, norm, scope)


def signorm_merge(weight: torch.Tensor, C: torch.Tensor, U: torch.Tensor, R: torch.Tensor,
                  scale: float = 1.0, k: float = 6.0, eps: float = 1e-10,
                  scope: str = "row") -> torch.Tensor:
    """SigNorm-scaled merge in weight space (docs/methods.md, SECURA): `(W + (W + ΔW)) / S_w`, ΔW = s C U R.

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
# -- LaLoRA (docs/methods.md, LaLoRA) ---------------------------------------------------------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_fisher_diag(x: torch.Tensor, grad_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over examples of squared per-example gradients of A and B (docs/methods.md, LaLoRA).

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
    xf = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).to(_acc(x.dtype))
    return xf.square().sum(0) if diagonal else xf.mT @ xf


def kfac_penalty(delta: torch.Tensor, S: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """`tr(G delta S delta^T)`; S [b, b] or [b] (diagonal), G [a, a] or [a]."""
    S = torch.diag(S) if S.dim() == 1 else S
    G = torch.diag(G) if G.dim() == 1 else G
    return torch.trace(G @ delta @ S @ delta.mT)
# ---------------------------------------------------------------------------------------------
# JumpLoRA (docs/methods.md, JumpLoRA)
# ---------------------------------------------------------------------------------------------

def _window(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel K(u) = 1[|u| < 1/2] of docs/methods.md, JumpLoRA, in u's dtype."""
    return (u.abs() < 0.5).to(u.dtype)


def _z(A: torch.Tensor, B: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """Z = B A in log θ's dtype (float32 next to half A, B; the ops' contract), as the kernels
    accumulate it: the gate |Z| > θ then compares in float32 (Z rounded to bfloat16 would move
    by up to 0.4 % and flip gates next to θ)."""
    acc = torch.promote_types(A.dtype, log_theta.dtype)
    return B.to(acc) @ A.to(acc)


class _SymmetricJumpReLU(torch.autograd.Function):
    """J(Z) = Z ⊙ 1[|Z| > θ] with the straight-through gradients of docs/methods.md, JumpLoRA.

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
    """g = h ⊙ 1[h > θ_j] (rank-gated, docs/methods.md, JumpLoRA), h [M, r], θ [r].

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
    """ΔW = scale · (f · J(B A) + (1 − f) · B A), [n, k] (docs/methods.md, JumpLoRA), differentiable with the
    straight-through estimator. A [r, k], B [n, r], log_theta [] (θ = exp(log_theta); float32 next
    to half A, B). ΔW in log_theta's dtype (`_z`)."""
    Z = _z(A, B, log_theta)
    J = _SymmetricJumpReLU.apply(Z, log_theta.exp().reshape(()), bandwidth, reduction)
    return scale * (f * J + (1.0 - f) * Z)


def jump_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, log_theta: torch.Tensor, scale: float, f: float = 1.0,
                bandwidth: float = 1e-3, reduction: str = "mean") -> torch.Tensor:
    """`x (W + ΔW)^T + b`, weight-gated JumpLoRA (docs/methods.md, JumpLoRA).

    x [..., k], weight [n, k], bias [n] or None, A [r, k], B [n, r], log_theta [] -> [..., n]
    """
    dW = jump_delta_weight(A, B, log_theta, scale, f, bandwidth, reduction)
    return F.linear(x, (weight + dW.reshape(weight.shape)).to(weight.dtype), bias)


def jump_linear_ella(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                     B: torch.Tensor, log_theta: torch.Tensor, scale: float, W_past: torch.Tensor,
                     f: float = 1.0, bandwidth: float = 1e-3, reduction: str = "mean",
                     ella_delta: str = "interpolated") -> tuple[torch.Tensor, torch.Tensor]:
    """`(jump_linear(...), ella_penalty(A, B, log_theta, W_past, scale, f, ella_delta))`.

    x [..., k], weight [n, k], W_past [n, k] -> ([..., n], [])
    """
    return (jump_linear(x, weight, bias, A, B, log_theta, scale, f, bandwidth, reduction),
            ella_penalty(A, B, log_theta, W_past, scale, f, ella_delta))


def jump_rank_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                     B: torch.Tensor, log_theta: torch.Tensor, scale: float,
                     bandwidth: float = 1e-3) -> torch.Tensor:
    """`x W^T + b + scale · g B^T`, `g = h ⊙ 1[h > θ_j]`, `h = x A^T` (rank-gated, docs/methods.md, JumpLoRA).

    x [..., k], weight [n, k], bias [n] or None, A [r, k], B [n, r], log_theta [r] -> [..., n]
    """
    h = x @ A.mT
    g = _OneSidedJumpReLU.apply(h.reshape(math.prod(h.shape[:-1]), A.shape[0]), log_theta.exp(),
                                bandwidth).reshape(h.shape)
    return F.linear(x, weight, bias) + scale * (g @ B.mT)


ELLA_DELTAS = ("interpolated", "masked", "sparse")


def ella_interpolation(f: float, ella_delta: str) -> float:
    """The weight f_e of J(Z) in ELLA's delta `scale (f_e J(Z) + (1 − f_e) Z)`:
    "interpolated" (the released default: the layer's own blend) f_e = f; "masked" (the hard-masked
    s J(Z)) f_e = 1; "sparse" (the released legacy mode) f_e = 1 if f > 0 else 0."""
    if ella_delta == "interpolated":
        return float(f)
    if ella_delta == "masked":
        return 1.0
    if ella_delta == "sparse":
        return 1.0 if f > 0 else 0.0
    raise ValueError(f"fastcur: ella_delta must be one of {', '.join(map(repr, ELLA_DELTAS))}, got {ella_delta!r}")


def ella_penalty(A: torch.Tensor, B: torch.Tensor, log_theta: torch.Tensor, W_past: torch.Tensor,
                 scale: float, f: float = 1.0, ella_delta: str = "interpolated") -> torch.Tensor:
    """`‖D ⊙ W_past‖_F²`, ELLA's delta `D = scale (f_e J(Z) + (1 − f_e) Z)`, `Z = B A`, with
    f_e = `ella_interpolation(f, ella_delta)` and the hard mask: no gradient reaches log_theta.

    A [r, k], B [n, r], log_theta [], W_past [n, k] -> [] (a scalar in W_past's dtype)
    """
    fe = ella_interpolation(f, ella_delta)
    Z = _z(A, B, log_theta)
    mask = (Z.abs() > log_theta.detach().exp().reshape(())).to(Z.dtype)
    return (scale * Z * (fe * mask + (1.0 - fe)) * W_past).square().sum().to(W_past.dtype)


# -- IMSM (docs/methods.md, IMSM) -----------------------------------------------------------------------------
def imsm_gate(h: torch.Tensor, h_tuned: torch.Tensor, q: torch.Tensor, q_tuned: torch.Tensor,
              W_A: torch.Tensor, W_B: torch.Tensor, hidden_mask: torch.Tensor | None = None,
              gate_mask: torch.Tensor | None = None) -> torch.Tensor:
    """IMSM's memory gate (docs/methods.md, IMSM), written as the paper writes it: the concatenation is formed.

    `g = σ(([q ⊕ h_t ⊕ h'_t ⊕ q'] W_A ⊙ hidden_mask) W_B)`, output `g ⊙ h + (1 - g) ⊙ h'`.
    h, h_tuned [B, T, d]; q, q_tuned [B, d]; W_A [4d, r_g]; W_B [r_g, d];
    hidden_mask [B, T, r_g] or None (the gate dropout on the r_g-wide hidden, already scaled
    by 1 / (1 - p)); gate_mask [B, T, d] or None (the dropout on the pre-sigmoid `z W_B`, the
    released gate's second one) -> [B, T, d]
    """
    B, T, d = h.shape
    x = torch.cat([q[:, None, :].expand(B, T, d), h, h_tuned, q_tuned[:, None, :].expand(B, T, d)], dim=-1)
    z = x @ W_A
    if hidden_mask is not None:
        z = z * hidden_mask
    u = z @ W_B
    if gate_mask is not None:
        u = u * gate_mask
    g = torch.sigmoid(u)
    return g * h + (1 - g) * h_tuned
