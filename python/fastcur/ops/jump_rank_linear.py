"""jump_rank_linear (docs/methods.md, JumpLoRA, rank-gated): `x W^T + b + scale g B^T`, `g = h 1[h > θ_j]`,
`h = x A^T`: the JumpReLU sits in the epilogue of the skinny projection, and the up
projection is accumulated into the base output in one pass.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .. import _extension
from ..backend import resolve
from . import reference
from ._autocast import autocast_inputs, autocast_off
from ._checks import ArgChecker, flat_rows
from ._registry import register_with_backward
from .jump_linear import check_factors, check_options, check_theta


def _fwd_fake(x, weight, bias, A, B, log_theta, scale, bandwidth):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], A.shape[0])


def _bwd_fake(grad_y, x, weight, A, B, log_theta, h, scale, bandwidth, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, A.new_empty(A.shape), B.new_empty(B.shape), log_theta.new_empty(log_theta.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, log_theta, scale, bandwidth = inputs
    ctx.save_for_backward(x, weight, A, B, log_theta, output[1])
    ctx.args = (scale, bandwidth)


def _make_backward(bwd_op):
    def backward(ctx, grad_y, _grad_h):
        x, weight, A, B, log_theta, h = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb, need_th = ctx.needs_input_grad[:6]
        scale, bandwidth = ctx.args
        dx = dA = dB = dth = None
        if need_x or need_a or need_bb or need_th:
            dx, dA, dB, dth = bwd_op(grad_y, x, weight, A, B, log_theta, h, scale, bandwidth, need_x)
        dW = grad_y.mT.mm(x) if need_w else None
        db = grad_y.sum(0) if need_b else None
        return ((dx if need_x else None), dW, db, (dA if need_a else None), (dB if need_bb else None),
                (dth if need_th else None), None, None)

    return backward


_register = functools.partial(register_with_backward, fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
                               make_backward=_make_backward, setup_context=_setup_context)


if _extension.available():
    _register("fastcur::jump_rank_linear", "fastcur::jump_rank_linear_bwd")


@functools.lru_cache(maxsize=None)
def _triton_op():
    """Define (once, on first use) the custom ops around the Triton launchers."""
    from ..triton_kernels import jump_rank_linear as kernels

    @torch.library.custom_op("fastcur::jump_rank_linear_triton", mutates_args=())
    @autocast_off
    def jump_rank_linear_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                                log_theta: Tensor, scale: float,
                                bandwidth: float) -> tuple[Tensor, Tensor]:
        return kernels.jump_rank_linear_fwd(x, weight, bias, A, B, log_theta, scale)

    @torch.library.custom_op("fastcur::jump_rank_linear_triton_bwd", mutates_args=())
    @autocast_off
    def jump_rank_linear_triton_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor,
                                    log_theta: Tensor, h: Tensor, scale: float, bandwidth: float,
                                    need_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return kernels.jump_rank_linear_bwd(grad_y, x, weight, A, B, log_theta, h, scale, bandwidth,
                                            need_dx)

    _register("fastcur::jump_rank_linear_triton", "fastcur::jump_rank_linear_triton_bwd")
    return torch.ops.fastcur.jump_rank_linear_triton.default


def _check(x, weight, bias, A, B, log_theta) -> None:
    c = ArgChecker("jump_rank_linear")
    c.tensor("weight", weight, (None, None), dims="(n, k)", anchor=True)
    n, k = weight.shape
    c.tensor("x", x, min_dim=1)
    if x.shape[-1] != k:
        c.fail(f"argument 'x' must have last dimension k = {k} (weight is {tuple(weight.shape)}), "
               f"got shape {tuple(x.shape)}")
    r = check_factors(c, A, B, n, k)
    check_theta(c, log_theta, (r,), dims="(r,)")
    c.tensor("bias", bias, (n,), dims="(n,)", optional=True)


def jump_rank_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                     log_theta: Tensor, scale: float, bandwidth: float = 1e-3) -> Tensor:
    """Rank-gated JumpLoRA linear layer (docs/methods.md, JumpLoRA): `x W^T + b + scale g B^T`.

    Args:
        x: [..., k]; weight: [n, k]; bias: [n] or None; A: [r, k]; B: [n, r].
        log_theta: [r], one threshold per rank channel, θ_j = exp(log_theta_j); float32
            (float64 for a float64 weight) whatever the base's dtype, not cast by autocast
            (see `fastcur.ops.jump_linear`).
        scale: s; bandwidth: ε of the one-sided straight-through kernel (summed over tokens).
    Returns:
        [..., n] in x's dtype. Differentiable in x, weight, bias, A, B and log_theta (its
        gradient in log_theta's dtype).
    """
    x, weight, bias, A, B = autocast_inputs(x, weight, bias, A, B)   # (log θ stays float32)
    _check(x, weight, bias, A, B, log_theta)
    check_options("jump_rank_linear", scale, bandwidth=bandwidth)
    backend = resolve("jump_rank_linear", x.device)
    if backend == "reference":
        return reference.jump_rank_linear(x, weight, bias, A, B, log_theta, scale, bandwidth)
    op = torch.ops.fastcur.jump_rank_linear.default if backend == "cpp" else _triton_op()
    y, _ = op(flat_rows(x), weight, bias, A, B, log_theta, float(scale), float(bandwidth))
    return y.reshape(*x.shape[:-1], weight.shape[0])
