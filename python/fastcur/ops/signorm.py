"""signorm (docs/methods.md, SECURA): SigNorm in output space, `(y0 + (y0 + Δ)) / S` with S detached.

Flow as cur_linear: checks → backend → `torch.ops.fastcur.signorm` (C++ CPU/CUDA) or
`torch.ops.fastcur.signorm_triton`; one fake and one autograd formula for both.
The forward returns the row maxima of L besides y; the backward recomputes S from y0, Δ and
those maxima (y0 and Δ are this op's inputs, so keeping them costs no memory, where saving S
would cost an M x n tensor).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import _extension
from ..backend import resolve
from . import reference
from ._autocast import autocast_off
from ._checks import ArgChecker, flat_rows
from ._registry import register_with_backward
from ._signorm_args import check_options


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake(y0, delta, k, eps, norm, scope):
    return y0.new_empty(y0.shape), y0.new_empty(y0.shape[0], dtype=_acc(y0.dtype))


def _bwd_fake(grad_y, y0, delta, rowmax, k, eps, norm, scope):
    return y0.new_empty(y0.shape), y0.new_empty(y0.shape)


def _setup_context(ctx, inputs, output):
    y0, delta, k, eps, norm, scope = inputs
    ctx.save_for_backward(y0, delta, output[1])
    ctx.opts = (k, eps, norm, scope)


def _make_backward(bwd_op):
    def backward(ctx, grad_y, _grad_rowmax):
        y0, delta, rowmax = ctx.saved_tensors
        need_y0, need_d = ctx.needs_input_grad[:2]
        if not (need_y0 or need_d):
            return None, None, None, None, None, None
        dy0, dd = bwd_op(grad_y.contiguous(), y0, delta, rowmax, *ctx.opts)
        return (dy0 if need_y0 else None), (dd if need_d else None), None, None, None, None

    return backward


_register = functools.partial(register_with_backward, fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
                               make_backward=_make_backward, setup_context=_setup_context)


if _extension.available():
    _register("fastcur::signorm", "fastcur::signorm_bwd")


@functools.lru_cache(maxsize=None)
def _triton_op():
    """Define (once, on first use) the custom ops around the Triton launchers."""
    from ..triton_kernels import signorm as kernels

    @torch.library.custom_op("fastcur::signorm_triton", mutates_args=())
    @autocast_off
    def signorm_triton(y0: Tensor, delta: Tensor, k: float, eps: float, norm: str,
                       scope: str) -> tuple[Tensor, Tensor]:
        return kernels.signorm_fwd(y0, delta, k, eps, norm, scope)

    @torch.library.custom_op("fastcur::signorm_triton_bwd", mutates_args=())
    @autocast_off
    def signorm_triton_bwd(grad_y: Tensor, y0: Tensor, delta: Tensor, rowmax: Tensor, k: float,
                           eps: float, norm: str, scope: str) -> tuple[Tensor, Tensor]:
        return kernels.signorm_bwd(grad_y, y0, delta, rowmax, k, eps, norm, scope)

    _register("fastcur::signorm_triton", "fastcur::signorm_triton_bwd")
    return torch.ops.fastcur.signorm_triton.default


def _check(y0, delta, k, eps, norm, scope) -> None:
    c = ArgChecker("signorm")
    c.tensor("y0", y0, min_dim=1, anchor=True)
    c.tensor("delta", delta, tuple(y0.shape), dims="y0's shape")
    check_options(c, k, eps, norm=norm, scope=scope)


def signorm(y0: Tensor, delta: Tensor, k: float = 6.0, eps: float = 1e-10, norm: str = "max",
            scope: str = "token") -> Tensor:
    """SigNorm (docs/methods.md, SECURA): `(y0 + (y0 + delta)) / S`, `S = 2 - σ(N)` detached.

    Args:
        y0: [..., n] the base layer's output (bias included).
        delta: [..., n] the adapter's output Δ.
        k: the sigmoid's gain (6). eps: added to |y0| and to the max (1e-10).
        norm: "max": `N = k (L / (max L + eps) - 1/2)`; "raw": `N = k L` (the released code).
        scope: "token": max over each row's n outputs; "tensor": over the whole tensor.
        `L = |delta| / (|y0| + eps)` in float32 (float64 for float64); where every L of the
        scope is 0, S = 2 (so y = y0 exactly at init).
    Returns:
        [..., n] in y0's dtype. Gradients: `dy0 = 2 dy / S`, `ddelta = dy / S`.
    """
    _check(y0, delta, k, eps, norm, scope)
    backend = resolve("signorm", y0.device)
    if backend == "reference":
        return reference.signorm(y0, delta, k, eps, norm, scope)
    op = torch.ops.fastcur.signorm.default if backend == "cpp" else _triton_op()
    y, _ = op(flat_rows(y0), flat_rows(delta), float(k), float(eps), norm, scope)
    return y.reshape(y0.shape)
