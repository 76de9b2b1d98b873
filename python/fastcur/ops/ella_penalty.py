"""ella_penalty (docs/methods.md, JumpLoRA): `‖D ⊙ W_past‖_F²`, the ELLA term of one layer, with
ELLA's delta `D = scale (f_e J(Z) + (1 − f_e) Z)`, `Z = B A`: f_e = f for the released default
`ella_delta="interpolated"`, 1 for "masked" (`scale J(Z)`), see `reference.ella_interpolation`.

The mask 1[|Z| > θ] is hard: no gradient reaches log_theta. The kernels recompute Z = B A
one block of rows at a time and contract the gradient tile with A and B right away, so no
n x k intermediate exists beyond one tile (W_past itself is the only n x k input).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import _extension
from ..backend import resolve
from . import reference
from ._checks import ArgChecker
from ._registry import register_with_backward
from .jump_linear import check_factors, check_options, check_scalar_theta


def _fwd_fake(A, B, log_theta, W_past, scale, fe):
    return W_past.new_empty(())


def _bwd_fake(grad, A, B, log_theta, W_past, scale, fe):
    return A.new_empty(A.shape), B.new_empty(B.shape)


def _setup_context(ctx, inputs, output):
    A, B, log_theta, W_past, scale, fe = inputs
    ctx.save_for_backward(A, B, log_theta, W_past)
    ctx.scale, ctx.fe = scale, fe


def _make_backward(bwd_op):
    def backward(ctx, grad):
        A, B, log_theta, W_past = ctx.saved_tensors
        need_a, need_b, _need_th, need_w = ctx.needs_input_grad[:4]
        s, fe = ctx.scale, ctx.fe
        dA = dB = dW = None
        if need_a or need_b:
            dA, dB = bwd_op(grad, A, B, log_theta, W_past, s, fe)
        if need_w:  # the gradient of W_past is n x k by nature; plain path
            acc = torch.promote_types(W_past.dtype, torch.float32)
            Z = B.to(acc) @ A.to(acc)
            mask = (Z.abs() > log_theta.to(acc).exp().reshape(())).to(acc)
            D = s * Z * (fe * mask + (1.0 - fe))
            dW = (2 * grad.to(acc) * D.square() * W_past.to(acc)).to(W_past.dtype)
        # log_theta: the mask is hard, no gradient (docs/methods.md, JumpLoRA).
        return (dA if need_a else None), (dB if need_b else None), None, dW, None, None

    return backward


_register = functools.partial(register_with_backward, fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
                               make_backward=_make_backward, setup_context=_setup_context)


if _extension.available():
    _register("fastcur::ella_penalty", "fastcur::ella_penalty_bwd")


@functools.lru_cache(maxsize=None)
def _triton_op():
    from ..triton_kernels import jump_linear as kernels

    @torch.library.custom_op("fastcur::ella_penalty_triton", mutates_args=())
    def ella_penalty_triton(A: Tensor, B: Tensor, log_theta: Tensor, W_past: Tensor, scale: float,
                            fe: float) -> Tensor:
        return kernels.ella_penalty_fwd(A, B, log_theta, W_past, scale, fe)

    @torch.library.custom_op("fastcur::ella_penalty_triton_bwd", mutates_args=())
    def ella_penalty_triton_bwd(grad: Tensor, A: Tensor, B: Tensor, log_theta: Tensor, W_past: Tensor,
                                scale: float, fe: float) -> tuple[Tensor, Tensor]:
        return kernels.ella_penalty_bwd(grad, A, B, log_theta, W_past, scale, fe)

    _register("fastcur::ella_penalty_triton", "fastcur::ella_penalty_triton_bwd")
    return torch.ops.fastcur.ella_penalty_triton.default


def ella_penalty(A: Tensor, B: Tensor, log_theta: Tensor, W_past: Tensor, scale: float, f: float = 1.0,
                 ella_delta: str = "interpolated") -> Tensor:
    """ELLA penalty of one layer (docs/methods.md, JumpLoRA): `‖D ⊙ W_past‖_F²`.

    Args:
        A: [r, k], B: [n, r] the current task's factors; log_theta: [] (or [1]), float32
            (float64 for a float64 W_past), as for `fastcur.ops.jump_linear`.
        W_past: [n, k] the sum of the earlier tasks' merged updates.
        scale: s; f: the layer's schedule value in [0, 1].
        ella_delta: "interpolated" (default, as released: D = s (f J(Z) + (1 − f) Z), the
            update the layer applies), "masked" (D = s J(Z)) or "sparse" (the released legacy
            mode: s J(Z) once f > 0, s Z before).
    Returns:
        [] in W_past's dtype. Differentiable in A, B (and W_past); not in log_theta.
    """
    c = ArgChecker("ella_penalty")
    c.tensor("W_past", W_past, (None, None), dims="(n, k)", anchor=True)
    n, k = W_past.shape
    check_factors(c, A, B, n, k)
    check_scalar_theta(c, log_theta)
    check_options("ella_penalty", scale, f, ella_delta=ella_delta)
    backend = resolve("ella_penalty", W_past.device)
    if backend == "reference":
        return reference.ella_penalty(A, B, log_theta, W_past, scale, f, ella_delta)
    op = torch.ops.fastcur.ella_penalty.default if backend == "cpp" else _triton_op()
    return op(A, B, log_theta, W_past, float(scale), reference.ella_interpolation(f, ella_delta))
