"""Tolerances and the comparison helper every kernel test uses.

Rule: ground truth is the reference evaluated in float64. A
backend passes when its error is at most 2x the error of the reference run at the backend's
own precision, plus a small floor per dtype (relative to the largest magnitude of the true
value, so that the floor means the same at any scale). NaN never passes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: Per-dtype floor, relative to max(1, max |true value|).
FLOORS: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def error_bound(ref_lowp: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest error a backend running in `dtype` may have against `truth`."""
    ref_err = (ref_lowp.double() - truth).abs().max().item() if truth.numel() else 0.0
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    return 2.0 * ref_err + FLOORS[dtype] * scale


def assert_close_to_reference(actual: torch.Tensor, ref_lowp: torch.Tensor, truth: torch.Tensor,
                              name: str = "output") -> None:
    """Assert `actual` (a backend's result in some dtype) obeys the rule above."""
    if actual.shape != truth.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(truth.shape)}")
    if actual.dtype != ref_lowp.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype} != expected {ref_lowp.dtype}")
    if torch.isnan(actual).any():
        raise AssertionError(f"{name}: contains NaN")
    err = (actual.double() - truth).abs().max().item() if truth.numel() else 0.0
    bound = error_bound(ref_lowp, truth, actual.dtype)
    if not err <= bound:
        raise AssertionError(f"{name}: max error {err:.3e} exceeds bound {bound:.3e} "
                             f"(2 x reference error at {actual.dtype} + floor)")


def _run(fn, inputs, dtype, grad_out_seed, device):
    leaves = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            leaf = t.detach().to(device=device, dtype=dtype).requires_grad_(t.requires_grad)
        elif isinstance(t, torch.Tensor):
            leaf = t.to(device)
        else:
            leaf = t
        leaves.append(leaf)
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    wants = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, wants, grad_out, allow_unused=True) if wants else ()
    return out, list(grads)


def check_against_reference(fn: Callable, reference: Callable, inputs: Sequence, dtype: torch.dtype,
                            device: str | torch.device = "cpu", grad_out_seed: int = 1234,
                            names: Sequence[str] | None = None) -> None:
    """Compare `fn(*inputs)` against `reference(*inputs)`: forward and every gradient.

    `inputs` are float64 master tensors (non-tensors pass through); those with
    `requires_grad=True` get their gradients compared. `fn` runs in `dtype` on `device`,
    `reference` runs in float64 (truth) and in `dtype` (to measure the dtype's own error).
    """
    truth, truth_grads = _run(reference, inputs, torch.float64, grad_out_seed, "cpu")
    ref, ref_grads = _run(reference, inputs, dtype, grad_out_seed, "cpu")
    out, grads = _run(fn, inputs, dtype, grad_out_seed, device)
    assert_close_to_reference(out.cpu(), ref, truth, "forward")
    grad_names = [n for n, t in zip(names or [f"input{i}" for i in range(len(inputs))], inputs)
                  if isinstance(t, torch.Tensor) and t.requires_grad]
    for name, g, rg, tg in zip(grad_names, grads, ref_grads, truth_grads):
        if g is None:
            raise AssertionError(f"grad of {name}: backend returned no gradient")
        assert_close_to_reference(g.cpu(), rg, tg, f"grad of {name}")


def check_as_given(fn: Callable, reference: Callable, inputs: Sequence, wrt: Sequence[torch.Tensor] = (),
                   grad_out_seed: int = 1234, names: Sequence[str] | None = None) -> None:
    """Compare `fn(*inputs)` against `reference(*inputs)` on the inputs exactly as given.

    For what `check_against_reference` cannot express because it copies its inputs: strided
    or expanded views, zero-size dimensions. The inputs are float64 (the truth); the forward
    and the gradients w.r.t. `wrt` (tensors that require grad, possibly non-leaf) must agree
    within the float64 floor of the rule above.
    """
    truth = reference(*inputs)
    out = fn(*inputs)
    assert_close_to_reference(out, truth.detach(), truth.detach(), "forward")
    if not wrt:
        return
    gen = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.randn(truth.shape, generator=gen, dtype=truth.dtype).to(truth.device)
    want = torch.autograd.grad(truth, list(wrt), grad_out, allow_unused=True)
    got = torch.autograd.grad(out, list(wrt), grad_out, allow_unused=True)
    for i, (g, w) in enumerate(zip(got, want)):
        name = names[i] if names else f"wrt[{i}]"
        w = torch.zeros_like(wrt[i]) if w is None else w
        if g is None:
            if w.abs().max().item() if w.numel() else 0.0:
                raise AssertionError(f"grad of {name}: backend returned no gradient")
            continue
        assert_close_to_reference(g, w.detach(), w.detach(), f"grad of {name}")


def check_double_backward_refused(fn: Callable, reference: Callable, inputs: Sequence,
                                  first: torch.Tensor, second: torch.Tensor, op_name: str) -> None:
    """For a fused backend without a second derivative: under `create_graph=True` the gradient
    of `sum(fn(*inputs)^2)` w.r.t. `first` matches the reference's, and differentiating that
    gradient w.r.t. `second` raises the op's clear error (never a silently wrong value)."""
    g, = torch.autograd.grad(fn(*inputs).square().sum(), first, create_graph=True)
    want, = torch.autograd.grad(reference(*inputs).square().sum(), first)
    assert_close_to_reference(g.detach(), want, want, "first-order gradient under create_graph=True")
    try:
        torch.autograd.grad(g.square().sum(), second)
    except RuntimeError as err:
        if f"fastcur.{op_name}: double backward" in str(err):
            return
        raise
    raise AssertionError(f"double backward through fastcur.{op_name} returned a value instead of raising")
