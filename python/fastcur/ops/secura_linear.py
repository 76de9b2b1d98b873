"""secura_linear (docs/methods.md, SECURA): the SECURA layer, `signorm(x W^T + b, Δ(x))`, fused.

`Δ(x) = s * (((x R^T) B_c) A_c) C^T + lora_bias`. Flow as cur_linear: checks → backend →
`torch.ops.fastcur.secura_linear` (C++ CPU/CUDA) or `torch.ops.fastcur.secura_linear_triton`;
one fake and one autograd formula for both. The forward saves S (float32; float64 for
float64), one M x n tensor: the backward then needs neither y0 nor Δ (two M x n tensors)
nor a second base GEMM. See csrc/secura_linear.h for the schedule.
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
from ._registry import once_differentiable, register_with_backward
from ._signorm_args import check_options


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake(x, weight, bias, C, A_c, B_c, R, lora_bias, scale, k, eps, norm, scope, rows, cols):
    M, n, r = x.shape[0], weight.shape[0], C.shape[1]
    return (x.new_empty(M, n), x.new_empty(M, n, dtype=_acc(x.dtype)), x.new_empty(M, r))


def _bwd_fake(grad_y, S, x, weight, C, A_c, B_c, R, h, scale, cols, need_dx):
    M, n, r = x.shape[0], weight.shape[0], C.shape[1]
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return (dx, x.new_empty(M, n), x.new_empty(M, r), A_c.new_empty(A_c.shape),
            B_c.new_empty(B_c.shape), x.new_empty(M, r))


def _setup_context(ctx, inputs, output):
    x, weight, bias, C, A_c, B_c, R, lora_bias, scale, k, eps, norm, scope, rows, cols = inputs
    ctx.save_for_backward(x, weight, C, A_c, B_c, R, output[1], output[2], cols)
    ctx.scale = scale


def _make_backward(bwd_op):
    def backward(ctx, grad_y, _grad_S, _grad_h):
        # S is a constant (docs/methods.md, SECURA): dΔ = dy / S, dy0 = 2 dΔ. C, R are independent inputs (the
        # tied path only computes the same function), so dW is the plain 2 dΔ^T x.
        x, weight, C, A_c, B_c, R, S, h, cols = ctx.saved_tensors
        if x is None:   # not kept (`_EagerCpp`: neither W nor R trained); the kernel reads its shape
            x = weight.new_zeros(()).expand(h.shape[0], weight.shape[1])
        need = ctx.needs_input_grad[:8]
        need_x, need_w, need_b, need_c, need_a, need_bc, need_r, need_lb = need
        grads = [None] * 15
        if not any(need):
            return tuple(grads)
        s = ctx.scale
        dx, dD, z, dA, dB, dh = bwd_op(grad_y.contiguous(), S, x, weight, C, A_c, B_c, R, h, s,
                                       cols, need_x)
        grads[0] = dx if need_x else None
        grads[1] = dD.mT.mm(x).mul_(2.0) if need_w else None            # [n, k]
        if need_b or need_lb:
            col = dD.sum(0)
            grads[2] = col * 2.0 if need_b else None                      # [n]
            grads[7] = col if need_lb else None                           # [n]
        grads[3] = dD.mT.mm(z).mul_(s) if need_c else None                # [n, r]
        grads[4] = dA if need_a else None                                 # [a, r]
        grads[5] = dB if need_bc else None                                # [r, a]
        grads[6] = dh.mT.mm(x) if need_r else None                        # [r, k]
        return tuple(grads)

    return backward


_register = functools.partial(register_with_backward, fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
                               make_backward=_make_backward, setup_context=_setup_context)


if _extension.available():
    _register("fastcur::secura_linear", "fastcur::secura_linear_bwd")


class _EagerCpp(torch.autograd.Function):
    """The C++ op in eager mode: the same kernels and backward as the op's registered autograd
    formula (saving x only when W or R needs a gradient), without the Python layer of `torch.library`'s autograd
    wrapper (argument defaults rebuilt from the schema, a metadata object, pytree walks), which
    cost about as much per call as SigNorm's epilogue on a small layer (a 256 x 256 layer of
    256 rows: about 0.1 ms a forward). torch.compile and torch.func transforms go through the
    registered op instead."""

    @staticmethod
    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            out = torch.ops.fastcur.secura_linear.default(*inputs)
        x, weight, R = inputs[0], inputs[1], inputs[6]
        # x only for dW and dR: a frozen base (the training case) keeps no reference to the
        # layer's input, which is often nothing else's saved tensor (q/k/v, o, down of a decoder).
        ctx.save_for_backward(x if weight.requires_grad or R.requires_grad else None, weight,
                              *inputs[3:6], R, out[1], out[2], inputs[14])
        ctx.scale = inputs[8]
        ctx.mark_non_differentiable(out[1], out[2])
        return out

    @staticmethod
    def backward(ctx, *grads):
        return _eager_backward()(ctx, *grads)


@functools.lru_cache(maxsize=None)
def _eager_backward():
    bwd = torch.ops.fastcur.secura_linear_bwd.default

    def bwd_op(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return bwd(*args)

    return once_differentiable("secura_linear", _make_backward(bwd_op))


@functools.lru_cache(maxsize=None)
def _triton_op():
    """Define (once, on first use) the custom ops around the Triton launchers."""
    from ..triton_kernels import secura_linear as kernels

    @torch.library.custom_op("fastcur::secura_linear_triton", mutates_args=())
    @autocast_off
    def secura_linear_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], C: Tensor,
                             A_c: Tensor, B_c: Tensor, R: Tensor, lora_bias: Optional[Tensor],
                             scale: float, k: float, eps: float, norm: str, scope: str,
                             rows: Optional[Tensor],
                             cols: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return kernels.secura_linear_fwd(x, weight, bias, C, A_c, B_c, R, lora_bias, scale, k,
                                         eps, norm, scope, rows)

    @torch.library.custom_op("fastcur::secura_linear_triton_bwd", mutates_args=())
    @autocast_off
    def secura_linear_triton_bwd(grad_y: Tensor, S: Tensor, x: Tensor, weight: Tensor, C: Tensor,
                                 A_c: Tensor, B_c: Tensor, R: Tensor, h: Tensor, scale: float,
                                 cols: Optional[Tensor], need_dx: bool
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return kernels.secura_linear_bwd(grad_y, S, x, weight, C, A_c, B_c, R, h, scale, cols,
                                         need_dx)

    _register("fastcur::secura_linear_triton", "fastcur::secura_linear_triton_bwd")
    return torch.ops.fastcur.secura_linear_triton.default


def _check(x, weight, bias, C, A_c, B_c, R, lora_bias, k, eps, norm, scope, rows, cols) -> None:
    c = ArgChecker("secura_linear")
    c.tensor("weight", weight, (None, None), dims="(n, k)", anchor=True)
    n, kk = weight.shape
    c.tensor("x", x, min_dim=1)
    if x.shape[-1] != kk:
        c.fail(f"argument 'x' must have last dimension k = {kk} (weight is {tuple(weight.shape)}), "
               f"got shape {tuple(x.shape)}")
    c.tensor("C", C, (n, None), dims="(n, r)")
    r = C.shape[1]
    c.tensor("R", R, (r, kk), dims="(r, k)")
    c.tensor("B_c", B_c, (r, None), dims="(r, a)")
    a = B_c.shape[1]
    c.tensor("A_c", A_c, (a, r), dims="(a, r)")
    c.tensor("bias", bias, (n,), dims="(n,)", optional=True)
    c.tensor("lora_bias", lora_bias, (n,), dims="(n,)", optional=True)
    check_options(c, k, eps, norm=norm, scope=scope)
    c.index("rows", rows, r)
    c.index("cols", cols, r)


def secura_linear(x: Tensor, weight: Tensor, bias: Tensor | None, C: Tensor, A_c: Tensor,
                  B_c: Tensor, R: Tensor, lora_bias: Tensor | None = None, scale: float = 1.0,
                  k: float = 6.0, eps: float = 1e-10, norm: str = "max", scope: str = "token", *,
                  rows: Tensor | None = None, cols: Tensor | None = None) -> Tensor:
    """SECURA linear layer: `signorm(x W^T + b, s (((x R^T) B_c) A_c) C^T + lora_bias)`.

    Args:
        x: [..., k] activations. weight: [n, k] frozen W. bias: [n] or None.
        C: [n, r] columns of W; R: [r, k] rows of W (frozen).
        A_c: [a, r], B_c: [r, a] the trainable CABR factors (U = A_c^T B_c^T).
        lora_bias: [n] or None, the adapter's output bias.
        scale, k, eps, norm, scope: as `fastcur.ops.signorm` (scope over the flattened rows).
        rows, cols: optional [r] int64 indices promising `R == weight[rows]` and
            `C == weight[:, cols]` exactly (tied fast path: x R^T is gathered from x W^T and
            dΔ C from dΔ W). The C++ CPU kernel checks the promise itself (r (n + k)
            comparisons) and runs the explicit path where it does not hold; the CUDA and Triton
            kernels trust it (wrong indices give wrong results there; modules drop them once
            W changes).
    Returns:
        [..., n] in x's dtype. Differentiable in every floating input, with S constant.
    """
    x, weight, bias, C, A_c, B_c, R, lora_bias = autocast_inputs(x, weight, bias, C, A_c, B_c, R, lora_bias)
    _check(x, weight, bias, C, A_c, B_c, R, lora_bias, k, eps, norm, scope, rows, cols)
    scale = ArgChecker("secura_linear").number("scale", scale)
    backend = resolve("secura_linear", x.device)
    if backend == "reference":
        return reference.secura_linear(x, weight, bias, C, A_c, B_c, R, lora_bias, scale, k, eps,
                                       norm, scope)
    args = (flat_rows(x), weight, bias, C, A_c, B_c, R, lora_bias, scale, float(k), float(eps), norm,
            scope, rows, cols)
    if (backend == "cpp" and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()):
        y, _, _ = _EagerCpp.apply(*args)
    else:
        op = torch.ops.fastcur.secura_linear.default if backend == "cpp" else _triton_op()
        y, _, _ = op(*args)
    return y.reshape(*x.shape[:-1], weight.shape[0])
