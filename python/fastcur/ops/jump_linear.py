"""jump_linear (docs/methods.md, JumpLoRA): weight-gated JumpLoRA, `x (W + ΔW)^T + b` with
`ΔW = scale (f J(B A) + (1 - f) B A)`, `J(Z) = Z 1[|Z| > θ]`, `θ = exp(log_theta)`.

Flow as cur_linear: checks, backend, then `torch.ops.fastcur.jump_linear` (C++ CPU/CUDA) or
`torch.ops.fastcur.jump_linear_triton`; one fake and one autograd formula for both, the
backward calls the `_bwd` op, which contracts `dy^T x` with A and B one tile of W's rows at a
time (no n x k gradient is ever held), with the straight-through θ gradient of docs/methods.md, JumpLoRA.

jump_linear_ella: the same layer with ELLA's penalty `‖D ⊙ W_past‖²` (docs/methods.md; D is
ELLA's delta, `reference.ella_penalty`) computed from the same Z tiles in the forward, and its gradient added into each tile's dL/dZ
before the one contraction with A and B in the backward (IncLoRA with `ella_lambda > 0`).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .. import _extension
from ..backend import resolve
from . import reference
from ._autocast import autocast_inputs
from ._checks import ArgChecker, flat_rows
from ._registry import register_with_backward

REDUCTIONS = ("mean", "sum")


def _fwd_fake(x, weight, bias, A, B, log_theta, scale, f, bandwidth, mean):
    return x.new_empty(x.shape[0], weight.shape[0])


def _bwd_fake(grad_y, x, weight, A, B, log_theta, scale, f, bandwidth, mean, need_dx, need_adapter):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, A.new_empty(A.shape), B.new_empty(B.shape), log_theta.new_empty(log_theta.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, log_theta, scale, f, bandwidth, mean = inputs
    ctx.save_for_backward(x, weight, A, B, log_theta)
    ctx.args = (scale, f, bandwidth, mean)


def _make_backward(bwd_op):
    def backward(ctx, grad_y):
        x, weight, A, B, log_theta = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb, need_th = ctx.needs_input_grad[:6]
        scale, f, bandwidth, mean = ctx.args
        dx = dA = dB = dth = None
        need_adapter = need_a or need_bb or need_th
        if need_x or need_adapter:
            dx, dA, dB, dth = bwd_op(grad_y, x, weight, A, B, log_theta, scale, f, bandwidth, mean,
                                     need_x, need_adapter)
        dW = grad_y.mT.mm(x) if need_w else None     # [n, k]: the gradient of W itself
        db = grad_y.sum(0) if need_b else None
        return ((dx if need_x else None), dW, db, (dA if need_a else None), (dB if need_bb else None),
                (dth if need_th else None), None, None, None, None)

    return backward


_register = functools.partial(register_with_backward, fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
                               make_backward=_make_backward, setup_context=_setup_context)


def _ella_fwd_fake(x, weight, bias, A, B, log_theta, scale, W_past, f, bandwidth, mean, fe):
    return x.new_empty(x.shape[0], weight.shape[0]), weight.new_empty(())


def _ella_bwd_fake(grad_y, grad_ella, x, weight, A, B, log_theta, scale, W_past, f, bandwidth, mean,
                   need_dx, need_adapter, fe):
    return _bwd_fake(grad_y, x, weight, A, B, log_theta, scale, f, bandwidth, mean, need_dx, need_adapter)


def _ella_setup_context(ctx, inputs, output):
    x, weight, bias, A, B, log_theta, scale, W_past, f, bandwidth, mean, fe = inputs
    ctx.save_for_backward(x, weight, A, B, log_theta, W_past)
    ctx.args = (scale, f, bandwidth, mean, fe)


def _make_ella_backward(bwd_op):
    def backward(ctx, grad_y, grad_ella):
        x, weight, A, B, log_theta, W_past = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb, need_th = ctx.needs_input_grad[:6]
        scale, f, bandwidth, mean, fe = ctx.args
        dx = dA = dB = dth = None
        need_adapter = need_a or need_bb or need_th
        if need_x or need_adapter:
            dx, dA, dB, dth = bwd_op(grad_y, grad_ella, x, weight, A, B, log_theta, scale, W_past, f,
                                     bandwidth, mean, need_x, need_adapter, fe)
        dW = grad_y.mT.mm(x) if need_w else None
        db = grad_y.sum(0) if need_b else None
        if ctx.needs_input_grad[7]:
            raise NotImplementedError("fastcur.ops.jump_linear_ella: no gradient for W_past (it is a "
                                      "record of past updates); detach it")
        return ((dx if need_x else None), dW, db, (dA if need_a else None), (dB if need_bb else None),
                (dth if need_th else None), None, None, None, None, None, None)

    return backward


_register_ella = functools.partial(register_with_backward, fwd_fake=_ella_fwd_fake,
                                   bwd_fake=_ella_bwd_fake, make_backward=_make_ella_backward,
                                   setup_context=_ella_setup_context)


if _extension.available():
    _register("fastcur::jump_linear", "fastcur::jump_linear_bwd")
    _register_ella("fastcur::jump_linear_ella", "fastcur::jump_linear_ella_bwd")


def _eager_cpp(*tensors) -> bool:
    """Run `torch.ops.fastcur.jump_linear_eager` (the same op with its autograd formula as a C++
    node, csrc/jump_linear_eager.cpp): eager (not traced, no torch.func transform: those keep the
    registered formula) and some input needs a grad. The Python-registered formula costs host
    time per call (about 150 us through torch.library's autograd kernel, 90 us through a Python
    autograd.Function) as large as the whole layer's adapter work at d = 256."""
    return (not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


@functools.lru_cache(maxsize=None)
def _triton_op():
    """Define (once, on first use) the custom ops around the Triton launchers."""
    from ..triton_kernels import jump_linear as kernels

    @torch.library.custom_op("fastcur::jump_linear_triton", mutates_args=())
    def jump_linear_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                           log_theta: Tensor, scale: float, f: float, bandwidth: float,
                           mean: bool) -> Tensor:
        return kernels.jump_linear_fwd(x, weight, bias, A, B, log_theta, scale, f)

    @torch.library.custom_op("fastcur::jump_linear_triton_bwd", mutates_args=())
    def jump_linear_triton_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor,
                               log_theta: Tensor, scale: float, f: float, bandwidth: float,
                               mean: bool, need_dx: bool,
                               need_adapter: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return kernels.jump_linear_bwd(grad_y, x, weight, A, B, log_theta, scale, f, bandwidth,
                                       mean, need_dx, need_adapter)

    _register("fastcur::jump_linear_triton", "fastcur::jump_linear_triton_bwd")
    return torch.ops.fastcur.jump_linear_triton.default


@functools.lru_cache(maxsize=None)
def _triton_ella_op():
    from ..triton_kernels import jump_linear as kernels

    @torch.library.custom_op("fastcur::jump_linear_ella_triton", mutates_args=())
    def jump_linear_ella_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                                log_theta: Tensor, scale: float, W_past: Tensor, f: float,
                                bandwidth: float, mean: bool, fe: float) -> tuple[Tensor, Tensor]:
        return kernels.jump_linear_ella_fwd(x, weight, bias, A, B, log_theta, scale, W_past, f, fe)

    @torch.library.custom_op("fastcur::jump_linear_ella_triton_bwd", mutates_args=())
    def jump_linear_ella_triton_bwd(grad_y: Tensor, grad_ella: Tensor, x: Tensor, weight: Tensor,
                                    A: Tensor, B: Tensor, log_theta: Tensor, scale: float,
                                    W_past: Tensor, f: float, bandwidth: float, mean: bool,
                                    need_dx: bool, need_adapter: bool,
                                    fe: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return kernels.jump_linear_bwd(grad_y, x, weight, A, B, log_theta, scale, f, bandwidth, mean,
                                       need_dx, need_adapter, W_past, grad_ella, fe)

    _register_ella("fastcur::jump_linear_ella_triton", "fastcur::jump_linear_ella_triton_bwd")
    return torch.ops.fastcur.jump_linear_ella_triton.default


def theta_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype log_theta must have next to tensors of `dtype`: float32 (float64 for float64).
    The gate |Z| > θ compares in it: in bfloat16, log θ ≈ -4.7 has spacing 2^-5, a 3 % step in θ
    that flips gates (docs/methods.md, JumpLoRA, precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_theta(c: ArgChecker, log_theta, shape=None, dims=None) -> None:
    """log_theta: a floating tensor of `theta_dtype` of the anchor's dtype, on its device."""
    c.tensor("log_theta", log_theta, shape, dims=dims, floating=False)
    want = theta_dtype(c.dtype)
    if log_theta.dtype != want:
        c.fail(f"argument 'log_theta' must be {want} next to a {c.dtype} '{c.anchor_name}' (θ is "
               f"compared in {want}; do not round log θ to the base's dtype), got {log_theta.dtype}",
               TypeError)
    if log_theta.device != c.device:
        c.fail(f"argument 'log_theta' must be on the device of '{c.anchor_name}' ({c.device}), "
               f"got {log_theta.device}")


def check_scalar_theta(c: ArgChecker, log_theta) -> None:
    check_theta(c, log_theta)
    if log_theta.dim() > 1 or log_theta.numel() != 1:
        c.fail(f"argument 'log_theta' must be a scalar tensor (shape () or (1,)), got {tuple(log_theta.shape)}")


def check_factors(c: ArgChecker, A, B, n: int, k: int) -> int:
    c.tensor("A", A, (None, k), dims="(r, k)")
    r = A.shape[0]
    c.tensor("B", B, (n, r), dims="(n, r)")
    return r


_UNUSED = object()  # an option the calling op does not have (None is a bad value, not a default)


def check_options(fn: str, scale, f=_UNUSED, bandwidth=_UNUSED, reduction=_UNUSED, ella_delta=None) -> None:
    c = ArgChecker(fn)
    c.number("scale", scale)
    if f is not _UNUSED and (not isinstance(f, (int, float)) or isinstance(f, bool) or not 0.0 <= f <= 1.0):
        c.fail(f"argument 'f' must be a float in [0, 1], got {f!r}")
    if bandwidth is not _UNUSED and (not isinstance(bandwidth, (int, float)) or not bandwidth > 0):
        c.fail(f"argument 'bandwidth' must be a float > 0, got {bandwidth!r}")
    if reduction is not _UNUSED and reduction not in REDUCTIONS:
        c.fail(f"argument 'reduction' must be 'mean' or 'sum', got {reduction!r}")
    if ella_delta is not None and ella_delta not in reference.ELLA_DELTAS:
        c.fail(f"argument 'ella_delta' must be one of {', '.join(map(repr, reference.ELLA_DELTAS))}, "
               f"got {ella_delta!r}")


def _check(x, weight, bias, A, B, log_theta) -> None:
    c = ArgChecker("jump_linear")
    c.tensor("weight", weight, (None, None), dims="(n, k)", anchor=True)
    n, k = weight.shape
    c.tensor("x", x, min_dim=1)
    if x.shape[-1] != k:
        c.fail(f"argument 'x' must have last dimension k = {k} (weight is {tuple(weight.shape)}), "
               f"got shape {tuple(x.shape)}")
    check_factors(c, A, B, n, k)
    check_scalar_theta(c, log_theta)
    c.tensor("bias", bias, (n,), dims="(n,)", optional=True)


def jump_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                log_theta: Tensor, scale: float, f: float = 1.0, bandwidth: float = 1e-3,
                reduction: str = "mean") -> Tensor:
    """Weight-gated JumpLoRA linear layer (docs/methods.md, JumpLoRA): `x (W + ΔW)^T + b`.

    Args:
        x: [..., k] activations (any leading dimensions).
        weight: [n, k] frozen base weight W; bias: [n] or None.
        A: [r, k], B: [n, r] the LoRA factors, Z = B A (never stored whole by the kernels).
        log_theta: [] (or [1]) the threshold's log, θ = exp(log_theta): float32 for a
            float32/bfloat16/float16 weight, float64 for a float64 one (any other dtype is a
            TypeError; the gate |Z| > θ compares in that dtype, Z accumulated in float32 for
            half inputs, so θ is never rounded to a half dtype). Under torch.autocast it is
            not cast.
        scale: s; f: the schedule value in [0, 1] (0: plain LoRA, 1: exactly sparse),
            ΔW = s (f J(Z) + (1 - f) Z), J(Z) = Z 1[|Z| > θ].
        bandwidth: ε of the straight-through rectangle kernel K(u) = 1[|u| < 1/2].
        reduction: "mean" (the released code: the θ term averaged over the n k entries) or
            "sum" (the Jumping-Ahead convention).
    Returns:
        [..., n] in x's dtype. Differentiable in x, weight, bias, A, B and log_theta (its
        gradient in log_theta's dtype).
    """
    x, weight, bias, A, B = autocast_inputs(x, weight, bias, A, B)   # (log θ stays float32)
    _check(x, weight, bias, A, B, log_theta)
    check_options("jump_linear", scale, f, bandwidth, reduction)
    backend = resolve("jump_linear", x.device)
    if backend == "reference":
        return reference.jump_linear(x, weight, bias, A, B, log_theta, scale, f, bandwidth, reduction)
    if backend == "cpp" and _eager_cpp(x, weight, bias, A, B, log_theta):
        op = torch.ops.fastcur.jump_linear_eager.default
    else:
        op = torch.ops.fastcur.jump_linear.default if backend == "cpp" else _triton_op()
    y = op(flat_rows(x), weight, bias, A, B, log_theta, float(scale), float(f),
           float(bandwidth), reduction == "mean")
    return y.reshape(*x.shape[:-1], weight.shape[0])


def jump_linear_ella(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                     log_theta: Tensor, scale: float, W_past: Tensor, f: float = 1.0,
                     bandwidth: float = 1e-3, reduction: str = "mean",
                     ella_delta: str = "interpolated") -> tuple[Tensor, Tensor]:
    """`jump_linear` and ELLA's penalty of the same adapter in one pass (docs/methods.md).

    Args: as `jump_linear`, plus W_past [n, k] (the sum of past tasks' ΔW, no gradient) and
        ella_delta: "interpolated" (default, as released), "masked" or "sparse" (see
        `fastcur.ops.ella_penalty`).
    Returns:
        (y [..., n] = jump_linear(x, ...), p [] = ella_penalty(A, B, log_theta, W_past, scale, f,
        ella_delta), hard mask: no gradient reaches log_theta through p). Both differentiable; the backward adds p's
        gradient into each tile's dL/dZ before the one contraction with A and B, so ELLA costs
        one extra read of W_past per pass instead of a second walk over Z.
    """
    x, weight, bias, A, B, W_past = autocast_inputs(x, weight, bias, A, B, W_past)   # (not log θ)
    _check(x, weight, bias, A, B, log_theta)
    check_options("jump_linear_ella", scale, f, bandwidth, reduction, ella_delta)
    c = ArgChecker("jump_linear_ella")
    c.tensor("weight", weight, anchor=True)
    c.tensor("W_past", W_past, tuple(weight.shape), dims="(n, k)")
    backend = resolve("jump_linear", x.device)
    if backend == "reference":
        return reference.jump_linear_ella(x, weight, bias, A, B, log_theta, scale, W_past, f, bandwidth,
                                          reduction, ella_delta)
    op = torch.ops.fastcur.jump_linear_ella.default if backend == "cpp" else _triton_ella_op()
    y, p = op(flat_rows(x), weight, bias, A, B, log_theta, float(scale), W_past, float(f),
              float(bandwidth), reduction == "mean", reference.ella_interpolation(f, ella_delta))
    return y.reshape(*x.shape[:-1], weight.shape[0]), p
