"""LaLoRA ops (docs/methods.md, LaLoRA): diagonal Fisher, the Laplace penalty, K-FAC.

    lora_fisher_diag(x, grad_out, A, B, scale) -> (F_A, F_B)
    laplace_diag_penalty(params, anchors, precisions, lam) -> value       (differentiable)
    laplace_diag_penalty_grad_(grads, params, anchors, precisions, lam) -> value   (in place)
    kfac_factor(x, diagonal=False) -> x^T x                                (float32 sums)
    kfac_penalty(delta, S, G) -> tr(G delta S delta^T)                     (differentiable)

Flow as in `cur_linear`: checks, backend choice, then the dispatcher op of that backend
(`torch.ops.fastcur.<op>`: C++ CPU/CUDA kernels, or `torch.ops.fastcur.<op>_triton`: Triton
launchers). Fake kernels and autograd are registered here once per op.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _extension
from ..backend import resolve
from . import reference
from ._autocast import autocast_off
from ._checks import ArgChecker, flat_rows
from ._registry import once_differentiable


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- fake kernels --------------------------------------------------------------------------------
def _fisher_fake(x, grad_out, A, B, scale):
    acc = _acc_dtype(A.dtype)
    return A.new_empty(A.shape, dtype=acc), B.new_empty(B.shape, dtype=acc)


def _penalty_fake(params, anchors, precisions, lam):
    return params[0].new_empty(())


def _penalty_grad_fake(grads, params, anchors, precisions, lam):
    return params[0].new_empty(())


def _factor_fake(x, diagonal):
    d = x.shape[1]
    return x.new_empty((d,) if diagonal else (d, d), dtype=_acc_dtype(x.dtype))


def _kfac_fake(delta, S, G):
    return delta.new_empty(())


def _kfac_bwd_fake(grad, delta, S, G):
    return delta.new_empty(delta.shape)


# -- autograd ------------------------------------------------------------------------------------
def _penalty_setup(ctx, inputs, output):
    params, anchors, precisions, lam = inputs
    ctx.save_for_backward(*params, *anchors, *precisions)
    ctx.count, ctx.lam = len(params), lam


def _make_penalty_backward(grad_op):
    def backward(ctx, grad):
        L, lam = ctx.count, ctx.lam
        saved = ctx.saved_tensors
        params, anchors, precisions = saved[:L], saved[L:2 * L], saved[2 * L:]
        need_p, need_a, need_q = ctx.needs_input_grad[:3]
        dp = da = dq = None
        if need_p or need_a:
            # lam * prec * (p - a) through the fused multi-tensor kernel, then times grad. The
            # buffers are contiguous whatever the params' layout (the kernels write them flat).
            base = [torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in params]
            grad_op(base, list(params), list(anchors), list(precisions), lam)
            base = [b * grad for b in base]
            dp = base if need_p else None
            da = [-b for b in base] if need_a else None
        if need_q:  # plain path: (lam / 2) (p - a)^2 * grad
            dq = [(0.5 * lam) * (p - a).square() * grad for p, a in zip(params, anchors)]
        return dp, da, dq, None

    return backward


def _kfac_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _make_kfac_backward(bwd_op):
    def backward(ctx, grad):
        delta, S, G = ctx.saved_tensors
        need_d, need_s, need_g = ctx.needs_input_grad
        dd = bwd_op(grad, delta, S, G) if need_d else None
        ds = dg = None
        acc = _acc_dtype(delta.dtype)
        D = delta.to(acc)
        if need_s:  # d tr(G D S D^T) / dS = D^T G^T D (diagonal S: its diagonal)
            Gt = G.to(acc) if G.dim() == 1 else G.to(acc).mT
            GD = D * Gt.unsqueeze(1) if G.dim() == 1 else Gt @ D
            ds = ((D * GD).sum(0) if S.dim() == 1 else D.mT @ GD).mul(grad.to(acc)).to(S.dtype)
        if need_g:  # D S^T D^T (diagonal G: its diagonal)
            St = S.to(acc) if S.dim() == 1 else S.to(acc).mT
            DS = D * St.unsqueeze(0) if S.dim() == 1 else D @ St
            dg = ((DS * D).sum(1) if G.dim() == 1 else DS @ D.mT).mul(grad.to(acc)).to(G.dtype)
        return dd, ds, dg

    return backward


def _register(suffix: str = "") -> None:
    ops = torch.ops.fastcur
    for name, fake in (("lora_fisher_diag", _fisher_fake), ("laplace_diag_penalty", _penalty_fake),
                       ("kfac_factor", _factor_fake), ("kfac_penalty", _kfac_fake),
                       ("kfac_penalty_bwd", _kfac_bwd_fake)):
        torch.library.register_fake(f"fastcur::{name}{suffix}")(fake)
    grad_name = "laplace_diag_penalty_grad_" if not suffix else "laplace_diag_penalty_grad_triton_"
    torch.library.register_fake(f"fastcur::{grad_name}")(_penalty_grad_fake)
    grad_op = getattr(ops, grad_name).default
    torch.library.register_autograd(f"fastcur::laplace_diag_penalty{suffix}",
                                    once_differentiable("laplace_diag_penalty", _make_penalty_backward(grad_op)),
                                    setup_context=_penalty_setup)
    bwd_op = getattr(ops, f"kfac_penalty_bwd{suffix}").default
    torch.library.register_autograd(f"fastcur::kfac_penalty{suffix}",
                                    once_differentiable("kfac_penalty", _make_kfac_backward(bwd_op)),
                                    setup_context=_kfac_setup)


if _extension.available() and hasattr(torch.ops.fastcur, "lora_fisher_diag"):
    _register()


@functools.lru_cache(maxsize=None)
def _triton_ops() -> dict:
    """Define (once, on first use) the custom ops around the Triton launchers."""
    from ..triton_kernels import lalora as kernels

    @torch.library.custom_op("fastcur::lora_fisher_diag_triton", mutates_args=())
    @autocast_off
    def lora_fisher_diag_triton(x: Tensor, grad_out: Tensor, A: Tensor, B: Tensor,
                                scale: float) -> tuple[Tensor, Tensor]:
        return kernels.lora_fisher_diag(x, grad_out, A, B, scale)

    @torch.library.custom_op("fastcur::laplace_diag_penalty_triton", mutates_args=())
    @autocast_off
    def laplace_diag_penalty_triton(params: list[Tensor], anchors: list[Tensor], precisions: list[Tensor],
                                    lam: float) -> Tensor:
        return kernels.laplace_diag_penalty(None, params, anchors, precisions, lam)

    @torch.library.custom_op("fastcur::laplace_diag_penalty_grad_triton_", mutates_args=("grads",))
    @autocast_off
    def laplace_diag_penalty_grad_triton_(grads: list[Tensor], params: list[Tensor], anchors: list[Tensor],
                                          precisions: list[Tensor], lam: float) -> Tensor:
        return kernels.laplace_diag_penalty(grads, params, anchors, precisions, lam)

    @torch.library.custom_op("fastcur::kfac_factor_triton", mutates_args=())
    @autocast_off
    def kfac_factor_triton(x: Tensor, diagonal: bool) -> Tensor:
        return kernels.kfac_factor(x, diagonal)

    @torch.library.custom_op("fastcur::kfac_penalty_triton", mutates_args=())
    @autocast_off
    def kfac_penalty_triton(delta: Tensor, S: Tensor, G: Tensor) -> Tensor:
        return kernels.kfac_penalty(delta, S, G)

    @torch.library.custom_op("fastcur::kfac_penalty_bwd_triton", mutates_args=())
    @autocast_off
    def kfac_penalty_bwd_triton(grad: Tensor, delta: Tensor, S: Tensor, G: Tensor) -> Tensor:
        return kernels.kfac_penalty_bwd(grad, delta, S, G)

    _register("_triton")
    ops = torch.ops.fastcur
    return {"lora_fisher_diag": ops.lora_fisher_diag_triton.default,
            "laplace_diag_penalty": ops.laplace_diag_penalty_triton.default,
            "laplace_diag_penalty_grad_": ops.laplace_diag_penalty_grad_triton_.default,
            "kfac_factor": ops.kfac_factor_triton.default,
            "kfac_penalty": ops.kfac_penalty_triton.default}


def _op(name: str, backend: str):
    if backend == "cpp":
        return getattr(torch.ops.fastcur, name).default
    return _triton_ops()[name]


# -- public functions ----------------------------------------------------------------------------
def lora_fisher_diag(x: Tensor, grad_out: Tensor, A: Tensor, B: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Diagonal empirical Fisher sums of one LoRA layer `y = ... + scale * (x A^T) B^T` (docs/methods.md, LaLoRA).

    Per example e, with inputs X_e [T, k] and output gradients G_e [T, n]:
    `g_B,e = scale * G_e^T (X_e A^T)` [n, r] and `g_A,e = scale * (G_e B)^T X_e` [r, k].
    Accumulated without holding all examples' gradients at once (groups of examples).

    Args:
        x: [E, T, k] layer inputs ([E, k] is read as T = 1).
        grad_out: [E, T, n] gradients of the loss w.r.t. the layer's output (per example:
            the gradient of example e's own loss, i.e. a summed, not averaged, batch loss).
        A: [r, k], B: [n, r] the LoRA factors at the anchor; scale: s.
    Returns:
        (F_A [r, k], F_B [n, r]) = (sum_e g_A,e^2, sum_e g_B,e^2), float32 (float64 for
        float64 inputs). Not differentiable (the inputs are read as constants).
    """
    c = ArgChecker("lora_fisher_diag")
    c.tensor("A", A, (None, None), dims="(r, k)", anchor=True)
    r, k = A.shape
    c.tensor("B", B, (None, r), dims="(n, r)")
    n = B.shape[0]
    c.tensor("x", x)
    if x.dim() == 2:
        x = x.unsqueeze(1)
    c.tensor("x", x, (None, None, k), dims="(E, T, k)")
    E, T = x.shape[:2]
    c.tensor("grad_out", grad_out)
    if grad_out.dim() == 2:
        grad_out = grad_out.unsqueeze(1)
    c.tensor("grad_out", grad_out, (E, T, n), dims="(E, T, n)")
    scale = c.number("scale", scale)
    x, grad_out, A, B = (t.detach() for t in (x, grad_out, A, B))
    backend = resolve("lora_fisher_diag", A.device)
    if backend == "reference":
        return reference.lora_fisher_diag(x, grad_out, A, B, scale)
    return _op("lora_fisher_diag", backend)(x, grad_out, A, B, scale)


def _as_lists(*seqs):
    """Each argument as a list (a non-sequence is passed on for _check_lists to name)."""
    return [list(x) if isinstance(x, (list, tuple)) else x for x in seqs]


def _penalty_backend(fn: str, params, *others) -> str:
    """The backend for params' device; lists too malformed to name a device fail worded here."""
    if not (isinstance(params, list) and params and isinstance(params[0], torch.Tensor)):
        _check_lists(fn, params, *others)
    return resolve(fn, params[0].device)


def _checked_call(fn: str, backend: str, lists: tuple, run):
    """`run()` with the lists checked. The C++ kernels check them before they touch anything,
    so on that backend the per-tensor Python checks (about 1 ms for 200 tensors, as long as
    the kernel itself) run only to word the error when the kernel refuses the lists."""
    if backend != "cpp":
        _check_lists(fn, *lists)
        return run()
    try:
        return run()
    except (RuntimeError, TypeError):
        _check_lists(fn, *lists)
        raise


def _lam(fn: str, lam) -> float:
    return ArgChecker(fn).number("lam", lam)


def _check_lists(fn: str, params, anchors, precisions, grads=None) -> None:
    c = ArgChecker(fn)
    lists = {"params": params, "anchors": anchors, "precisions": precisions}
    if grads is not None:
        lists["grads"] = grads
    for name, lst in lists.items():
        if not isinstance(lst, (list, tuple)):
            c.fail(f"argument '{name}' must be a list of tensors, got {type(lst).__name__}", TypeError)
    if len(params) == 0:
        c.fail("argument 'params' must be a non-empty list of tensors, got an empty list")
    for name, lst in lists.items():
        if len(lst) != len(params):
            c.fail(f"argument '{name}' must have {len(params)} tensors (one per param), got {len(lst)}")
    for i, p in enumerate(params):
        c.tensor(f"params[{i}]", p)
        for name, lst in lists.items():
            if name != "params":
                c.tensor(f"{name}[{i}]", lst[i], tuple(p.shape))


def laplace_diag_penalty(params: Sequence[Tensor], anchors: Sequence[Tensor], precisions: Sequence[Tensor],
                         lam: float) -> Tensor:
    """`(lam/2) * sum_i sum(precisions[i] * (params[i] - anchors[i])^2)` (docs/methods.md, LaLoRA), fused.

    Args:
        params, anchors, precisions: lists of L tensors; the i-th three share a shape (any),
            and every tensor shares params[0]'s dtype and device.
        lam: the strength λ.
    Returns:
        0-dim tensor in params' dtype (accumulated in float32, float64 for float64).
        Differentiable in every input (params' gradient is `lam * prec * (p - a)`).
    """
    params, anchors, precisions = _as_lists(params, anchors, precisions)
    backend = _penalty_backend("laplace_diag_penalty", params, anchors, precisions)
    lam = _lam("laplace_diag_penalty", lam)
    fn = reference.laplace_diag_penalty if backend == "reference" else _op("laplace_diag_penalty", backend)
    return _checked_call("laplace_diag_penalty", backend, (params, anchors, precisions),
                         lambda: fn(params, anchors, precisions, lam))


def laplace_diag_penalty_grad_(grads: Sequence[Tensor], params: Sequence[Tensor], anchors: Sequence[Tensor],
                               precisions: Sequence[Tensor], lam: float) -> Tensor:
    """In place: `grads[i] += lam * precisions[i] * (params[i] - anchors[i])` for every i in
    ONE launch (multi-tensor), returning the penalty value of `laplace_diag_penalty`.

    Args as `laplace_diag_penalty`, plus `grads`: L contiguous tensors shaped like params
    (e.g. each parameter's `.grad`). No autograd: use it after `loss.backward()`.
    Returns:
        0-dim tensor in params' dtype, the penalty value (detached).
    """
    grads, params, anchors, precisions = _as_lists(grads, params, anchors, precisions)
    backend = _penalty_backend("laplace_diag_penalty_grad_", params, anchors, precisions, grads)
    lam = _lam("laplace_diag_penalty_grad_", lam)
    if not isinstance(grads, list):
        ArgChecker("laplace_diag_penalty_grad_").fail(
            f"argument 'grads' must be a list of tensors, got {type(grads).__name__}", TypeError)
    fn = (reference.laplace_diag_penalty_grad_ if backend == "reference"
          else _op("laplace_diag_penalty_grad_", backend))
    with torch.no_grad():
        # The kernels write each gradient flat: a non-contiguous one (the .grad of a transposed
        # parameter) gets a contiguous zero buffer, added into it afterwards.
        staged = {i: g for i, g in enumerate(grads)
                  if isinstance(g, torch.Tensor) and not g.is_contiguous()}
        flat = [torch.zeros(g.shape, dtype=g.dtype, device=g.device) if i in staged else g
                for i, g in enumerate(grads)]
        value = _checked_call("laplace_diag_penalty_grad_", backend, (params, anchors, precisions, flat),
                              lambda: fn(flat, params, anchors, precisions, lam))
        for i, g in staged.items():
            g.add_(flat[i])
        return value


def kfac_factor(x: Tensor, diagonal: bool = False) -> Tensor:
    """K-FAC factor sums: `x^T x` ([d, d]) or its diagonal `sum_m x_m^2` ([d]).

    Args:
        x: [..., d] (leading dimensions are flattened into M rows).
        diagonal: keep only the diagonal (for a factor above `kfac_max_dim`).
    Returns:
        float32 sums (float64 for float64 x), accumulated from x's dtype without copying x
        whole; divide by the row count for an expectation. Not differentiable.
    """
    c = ArgChecker("kfac_factor")
    c.tensor("x", x, min_dim=1, anchor=True)
    x = flat_rows(x.detach())
    backend = resolve("kfac_factor", x.device)
    if backend == "reference":
        return reference.kfac_factor(x, diagonal)
    return _op("kfac_factor", backend)(x, bool(diagonal))


def _check_kfac(fn: str, delta, S, G) -> ArgChecker:
    c = ArgChecker(fn)
    c.tensor("delta", delta, (None, None), dims="(a, b)", anchor=True)
    a, b = delta.shape
    for name, t, size in (("S", S, b), ("G", G, a)):
        c.tensor(name, t, floating=True, min_dim=1)
        want = (size,) if t.dim() == 1 else (size, size)
        c.tensor(name, t, want, dims=f"({'b' if name == 'S' else 'a'}, ...) of delta {tuple(delta.shape)}")
    return c


def kfac_penalty(delta: Tensor, S: Tensor, G: Tensor) -> Tensor:
    """`tr(G delta S delta^T)` without forming the Kronecker product G ⊗ S (docs/methods.md, LaLoRA).

    Args:
        delta: [a, b] (θ - θ0 of one factor, e.g. ΔA [r, k]).
        S: [b, b] input-side factor, or [b] its diagonal.
        G: [a, a] output-side factor, or [a] its diagonal.
    Returns:
        0-dim tensor in delta's dtype (accumulated in float32 / float64). Differentiable in
        delta, S and G.
    """
    _check_kfac("kfac_penalty", delta, S, G)
    backend = resolve("kfac_penalty", delta.device)
    if backend == "reference":
        return reference.kfac_penalty(delta, S, G)
    return _op("kfac_penalty", backend)(delta, S, G)


def kfac_penalty_grad(grad: Tensor, delta: Tensor, S: Tensor, G: Tensor) -> Tensor:
    """`grad * (G delta S + G^T delta S^T)` [a, b]: d/d delta of `grad * kfac_penalty(delta, S, G)`
    without autograd (grad a 0-dim tensor; shapes as `kfac_penalty`)."""
    c = _check_kfac("kfac_penalty_grad", delta, S, G)
    c.tensor("grad", grad, (), dims="a 0-dim tensor", floating=False)
    backend = resolve("kfac_penalty", delta.device)
    with torch.no_grad():
        if backend == "reference":
            d = delta.detach().requires_grad_(True)
            with torch.enable_grad():
                v = reference.kfac_penalty(d, S, G)
            return torch.autograd.grad(v, d, grad.to(v.dtype))[0]
        op = torch.ops.fastcur.kfac_penalty_bwd.default if backend == "cpp" else (
            _triton_ops() and torch.ops.fastcur.kfac_penalty_bwd_triton.default)
        return op(grad, delta, S, G)
