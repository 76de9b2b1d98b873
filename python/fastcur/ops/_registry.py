"""Registration shared by every fused op with a backward op: the dispatcher op's fake (meta)
and autograd formulas, registered once for the C++ and the Triton op."""
from __future__ import annotations

import functools
from typing import Callable

import torch


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the gradients `grads[:n]`, linked to `anchors` (the tensors they depend on);
    differentiating its outputs raises `message`."""

    @staticmethod
    def forward(ctx, message, n, *tensors):
        ctx.message = message
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def once_differentiable(fn_name: str, backward: Callable) -> Callable:
    """`backward` with a clear error on double backward.

    The `_bwd` ops are kernels without a derivative of their own: under `create_graph=True`
    autograd would treat their outputs as constants and return a silently wrong second
    derivative (or a generic error). Here the gradients are computed as usual (first-order use
    with create_graph=True keeps working) and, when grad mode is on, passed through a node that
    raises if they are differentiated again, naming the op and the way out (the reference
    backend, plain PyTorch, differentiates twice). The node hangs off every incoming gradient
    and saved input that requires grad (dx depends on A and B even when dy is a constant), so
    autograd reaches it from any of them."""
    message = (f"fastcur.{fn_name}: double backward (create_graph=True, then a gradient of these "
               "gradients) is not implemented by the fused kernels; run it under "
               "fastcur.use_backend('reference')")

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            out = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return out
        anchors = [t for t in (*grads, *ctx.saved_tensors)
                   if isinstance(t, torch.Tensor) and t.requires_grad]
        # Gradients are tensors, None, or lists of tensors (for list inputs).
        res = [list(g) if isinstance(g, (list, tuple)) else g
               for g in (out if isinstance(out, tuple) else (out,))]
        where = [(i, None) for i, g in enumerate(res) if isinstance(g, torch.Tensor)]
        where += [(i, j) for i, g in enumerate(res) if isinstance(g, list)
                  for j, t in enumerate(g) if isinstance(t, torch.Tensor)]
        if not anchors or not where:
            return out
        marked = _NoDoubleBackward.apply(
            message, len(where), *[res[i] if j is None else res[i][j] for i, j in where], *anchors)
        for (i, j), g in zip(where, marked):
            if j is None:
                res[i] = g
            else:
                res[i][j] = g
        return tuple(res) if isinstance(out, tuple) else res[0]

    return wrapper


def register_with_backward(fwd: str, bwd: str, *, fwd_fake: Callable, bwd_fake: Callable,
                           make_backward: Callable, setup_context: Callable) -> None:
    """Register, once per op, the fake (meta) kernels of the op `fwd` and its backward op `bwd`
    ("fastcur::<name>", C++ or Triton custom op) and `fwd`'s autograd formula:
    `make_backward(bwd_op)` returns the backward function, which calls `bwd_op`. Double
    backward through it raises a clear error (`once_differentiable`)."""
    torch.library.register_fake(fwd)(fwd_fake)
    torch.library.register_fake(bwd)(bwd_fake)
    ns, name = bwd.split("::")
    bwd_op = getattr(getattr(torch.ops, ns), name).default
    public = fwd.split("::")[1].removesuffix("_triton")
    torch.library.register_autograd(fwd, once_differentiable(public, make_backward(bwd_op)),
                                    setup_context=setup_context)
