"""cur_linear (docs/methods.md, CURLoRA): `x W^T + b + scale * ((x R^T) U^T) C^T`.

Flow: `cur_linear` checks its arguments, picks a backend, and calls the dispatcher op of that
backend: `torch.ops.fastcur.cur_linear` (C++ CPU/CUDA kernels) or
`torch.ops.fastcur.cur_linear_triton` (Triton launchers). Both share one fake kernel and one
autograd formula, registered here; the backward calls the op's `_bwd` op.
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


def _fwd_fake(x, weight, bias, C, U, R, scale, rows, cols):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], U.shape[0])


def _bwd_fake(grad_y, x, weight, C, U, R, h, scale, cols, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, U.new_empty(U.shape), x.new_empty(x.shape[0], U.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias, C, U, R, scale, rows, cols = inputs
    ctx.save_for_backward(x, weight, C, U, R, output[1], cols)
    ctx.scale = scale


def _make_backward(bwd_op):
    def backward(ctx, grad_y, _grad_h):
        # Gradients of docs/methods.md, CURLoRA; C and R are independent inputs (the tied fast path is only a
        # way to compute the same function), so dW is the plain `dy^T x`.
        x, weight, C, U, R, h, cols = ctx.saved_tensors
        need_x, need_w, need_b, need_c, need_u, need_r = ctx.needs_input_grad[:6]
        s = ctx.scale
        dx = dU = dR = None
        if need_x or need_u or need_r:
            dx, dU, g = bwd_op(grad_y, x, weight, C, U, R, h, s, cols, need_x)
            if need_r:
                dR = (g @ U).mT.mm(x).mul_(s)  # s * (dy C U)^T x   [r, k]
        dW = grad_y.mT.mm(x) if need_w else None                       # [n, k]
        db = grad_y.sum(0) if need_b else None                          # [n]
        dC = grad_y.mT.mm(h @ U.mT).mul_(s) if need_c else None         # [n, r]
        return (dx if need_x else None), dW, db, dC, (dU if need_u else None), dR, None, None, None

    return backward


_register = functools.partial(register_with_backward, fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
                               make_backward=_make_backward, setup_context=_setup_context)


if _extension.available():
    _register("fastcur::cur_linear", "fastcur::cur_linear_bwd")


@functools.lru_cache(maxsize=None)
def _triton_op():
    """Define (once, on first use) the custom ops around the Triton launchers."""
    from ..triton_kernels import cur_linear as kernels

    @torch.library.custom_op("fastcur::cur_linear_triton", mutates_args=())
    @autocast_off
    def cur_linear_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], C: Tensor, U: Tensor,
                          R: Tensor, scale: float, rows: Optional[Tensor],
                          cols: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return kernels.cur_linear_fwd(x, weight, bias, C, U, R, scale, rows, cols)

    @torch.library.custom_op("fastcur::cur_linear_triton_bwd", mutates_args=())
    @autocast_off
    def cur_linear_triton_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, C: Tensor, U: Tensor,
                              R: Tensor, h: Tensor, scale: float, cols: Optional[Tensor],
                              need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
        return kernels.cur_linear_bwd(grad_y, x, weight, C, U, R, h, scale, cols, need_dx)

    _register("fastcur::cur_linear_triton", "fastcur::cur_linear_triton_bwd")
    return torch.ops.fastcur.cur_linear_triton.default


def _check(x, weight, bias, C, U, R, rows, cols) -> None:
    c = ArgChecker("cur_linear")
    c.tensor("weight", weight, (None, None), dims="(n, k)", anchor=True)
    n, k = weight.shape
    c.tensor("x", x, min_dim=1)
    if x.shape[-1] != k:
        c.fail(f"argument 'x' must have last dimension k = {k} (weight is {tuple(weight.shape)}), "
               f"got shape {tuple(x.shape)}")
    c.tensor("U", U, (None, None), dims="(r, r)")
    r = U.shape[0]
    c.tensor("U", U, (r, r), dims="(r, r)")
    c.tensor("C", C, (n, r), dims="(n, r)")
    c.tensor("R", R, (r, k), dims="(r, k)")
    c.tensor("bias", bias, (n,), dims="(n,)", optional=True)
    c.index("rows", rows, r)
    c.index("cols", cols, r)


def cur_linear(x: Tensor, weight: Tensor, bias: Tensor | None, C: Tensor, U: Tensor, R: Tensor,
               scale: float = 1.0, *, rows: Tensor | None = None,
               cols: Tensor | None = None) -> Tensor:
    """CUR-LoRA linear layer: `x W^T + b + scale * ((x R^T) U^T) C^T`, never forming C U R.

    Args:
        x: [..., k] activations (any leading dimensions).
        weight: [n, k] frozen base weight W.
        bias: [n] or None.
        C: [n, r] columns of W; U: [r, r] the trainable core; R: [r, k] rows of W.
        scale: the scale s of ΔW = s C U R.
        rows, cols: optional [r] int64 indices promising `R == weight[rows]` and
            `C == weight[:, cols]` exactly (the tied fast path): the rank-r projections are
            then gathered from `x W^T` and `dy W`, which are computed anyway. Passing indices
            that do not match gives wrong results: modules drop them once W changes.
    Returns:
        [..., n] in x's dtype. Differentiable in every floating input.
    """
    x, weight, bias, C, U, R = autocast_inputs(x, weight, bias, C, U, R)
    _check(x, weight, bias, C, U, R, rows, cols)
    scale = ArgChecker("cur_linear").number("scale", scale)
    backend = resolve("cur_linear", x.device)
    if backend == "reference":
        return reference.cur_linear(x, weight, bias, C, U, R, scale)
    op = torch.ops.fastcur.cur_linear.default if backend == "cpp" else _triton_op()
    y, _ = op(flat_rows(x), weight, bias, C, U, R, scale, rows, cols)
    return y.reshape(*x.shape[:-1], weight.shape[0])
