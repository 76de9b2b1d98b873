"""signorm_merge (docs/methods.md, SECURA): the SigNorm-scaled merge in weight space,
`(W + (W + ΔW)) / S_w` with `ΔW = scale C U R`.

A weight update, not a layer: it has no gradient (docs/methods.md defines none). Calling it on inputs
that require grad with grad mode on raises, instead of silently dropping a gradient.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import _extension
from ..backend import resolve
from . import reference
from ._autocast import autocast_off
from ._checks import ArgChecker
from ._signorm_args import check_options


def _fake(weight, C, U, R, scale, k, eps, scope):
    return weight.new_empty(weight.shape)


if _extension.available():
    torch.library.register_fake("fastcur::signorm_merge")(_fake)


@functools.lru_cache(maxsize=None)
def _triton_op():
    from ..triton_kernels import signorm_merge as kernels

    @torch.library.custom_op("fastcur::signorm_merge_triton", mutates_args=())
    @autocast_off
    def signorm_merge_triton(weight: Tensor, C: Tensor, U: Tensor, R: Tensor, scale: float,
                             k: float, eps: float, scope: str) -> Tensor:
        return kernels.signorm_merge(weight, C, U, R, scale, k, eps, scope)

    torch.library.register_fake("fastcur::signorm_merge_triton")(_fake)
    return torch.ops.fastcur.signorm_merge_triton.default


def _check(weight, C, U, R, k, eps, scope) -> None:
    c = ArgChecker("signorm_merge")
    c.tensor("weight", weight, (None, None), dims="(n, k)", anchor=True)
    n, kk = weight.shape
    c.tensor("U", U, (None, None), dims="(r, r)")
    r = U.shape[0]
    c.tensor("U", U, (r, r), dims="(r, r)")
    c.tensor("C", C, (n, r), dims="(n, r)")
    c.tensor("R", R, (r, kk), dims="(r, k)")
    check_options(c, k, eps, scope=scope, scopes=("row", "tensor"))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (weight, C, U, R)):
        c.fail("has no gradient (docs/methods.md, SECURA defines none); call it under torch.no_grad() or on "
               "detached tensors", RuntimeError)


def signorm_merge(weight: Tensor, C: Tensor, U: Tensor, R: Tensor, scale: float = 1.0,
                  k: float = 6.0, eps: float = 1e-10, scope: str = "row") -> Tensor:
    """SigNorm-scaled merge: `(2 W + ΔW) / S_w`, `ΔW = scale C U R`, never materialized.

    Args:
        weight: [n, k] W. C: [n, r], U: [r, r], R: [r, k].
        `L_w = |ΔW| / (|W| + eps)`, `N_w = k (L_w / (max L_w + eps) - 1/2)`, `S_w = 2 - σ(N_w)`;
        max per output row (scope="row") or over the matrix ("tensor"); S_w = 2 where every
        ratio of the scope is 0. Ratios in float32 (float64 for float64).
    Returns:
        [n, k] new weight in W's dtype (a new tensor; W is not modified). Peak extra memory:
        this output plus per-block buffers.
    """
    _check(weight, C, U, R, k, eps, scope)
    scale = ArgChecker("signorm_merge").number("scale", scale)
    backend = resolve("signorm_merge", weight.device)
    if backend == "reference":
        return reference.signorm_merge(weight, C, U, R, scale, k, eps, scope)
    op = torch.ops.fastcur.signorm_merge.default if backend == "cpp" else _triton_op()
    return op(weight, C, U, R, scale, float(k), float(eps), scope)
