"""imsm_gate (docs/methods.md, "IMSM"): IMSM's memory gate, `g ⊙ h + (1 − g) ⊙ h'`.

`g = σ([q ⊕ h_t ⊕ h'_t ⊕ q'] W_A W_B)` is computed without forming the concatenation: W_A
splits into four `d x r_g` blocks (A1..A4 for q, h, h', q'); the query terms `q A1 + q' A4`
are per-sequence constants computed once; per token only `h_t A2 + h'_t A3`, `W_B`, σ and the
mix remain, in one pass over the row. The forward returns the r_g-wide hidden z besides the
output; the backward recomputes g from it (an M x r_g tensor saved instead of an M x d gate).

Gate dropout (0.1 in training) is applied through masks drawn by the caller (zeros and
1 / (1 − p)), so the op itself is deterministic: `hidden_mask` on the r_g-wide hidden
z = [...] W_A (fused), `gate_mask` on the d-wide pre-sigmoid gate z W_B (the released gate puts
dropout after both projections; no fused kernel covers the second mask).

Flow as cur_linear: checks → backend → `torch.ops.fastcur.imsm_gate` (C++ CPU/CUDA) or
`torch.ops.fastcur.imsm_gate_triton`; one fake and one autograd formula for both.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .. import _extension
from ..backend import resolve
from . import reference
from ._checks import ArgChecker
from ._registry import register_with_backward


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake(h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask):
    B, T, _ = h.shape
    return h.new_empty(h.shape), h.new_empty(B, T, W_A.shape[1], dtype=_acc(h.dtype))


def _bwd_fake(grad, h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask, z, need_h, need_h_tuned):
    return (h.new_empty(h.shape) if need_h else h.new_empty(0),
            h.new_empty(h.shape) if need_h_tuned else h.new_empty(0),
            q.new_empty(q.shape), q.new_empty(q.shape), W_A.new_empty(W_A.shape), W_B.new_empty(W_B.shape))


def _setup_context(ctx, inputs, output):
    h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask = inputs
    ctx.save_for_backward(h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask, output[1])


def _make_backward(bwd_op):
    def backward(ctx, grad, _grad_z):
        h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask, z = ctx.saved_tensors
        need = ctx.needs_input_grad[:6]
        if not any(need):
            return None, None, None, None, None, None, None
        grads = bwd_op(grad.contiguous(), h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask, z,
                       need[0], need[1])
        return tuple(g if n else None for g, n in zip(grads, need)) + (None,)

    return backward


_register = functools.partial(register_with_backward, fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
                               make_backward=_make_backward, setup_context=_setup_context)


if _extension.available() and _extension.has_kernel("imsm_gate", "CPU"):
    _register("fastcur::imsm_gate", "fastcur::imsm_gate_bwd")


@functools.lru_cache(maxsize=None)
def _triton_op():
    """Define (once, on first use) the custom ops around the Triton launchers."""
    from ..triton_kernels import imsm_gate as kernels

    @torch.library.custom_op("fastcur::imsm_gate_triton", mutates_args=())
    def imsm_gate_triton(h: Tensor, h_tuned: Tensor, q: Tensor, q_tuned: Tensor, W_A: Tensor,
                         W_B: Tensor, hidden_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return kernels.imsm_gate_fwd(h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask)

    @torch.library.custom_op("fastcur::imsm_gate_triton_bwd", mutates_args=())
    def imsm_gate_triton_bwd(grad: Tensor, h: Tensor, h_tuned: Tensor, q: Tensor, q_tuned: Tensor,
                             W_A: Tensor, W_B: Tensor, hidden_mask: Optional[Tensor], z: Tensor,
                             need_h: bool, need_h_tuned: bool
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return kernels.imsm_gate_bwd(grad, h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask, z,
                                     need_h, need_h_tuned)

    _register("fastcur::imsm_gate_triton", "fastcur::imsm_gate_triton_bwd")
    return torch.ops.fastcur.imsm_gate_triton.default


def _check(h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask, gate_mask) -> None:
    """The memories (h, h_tuned, q, q_tuned) share one dtype, the gate (W_A, W_B and the
    masks) another (float32 on a half model), all one device."""
    c = ArgChecker("imsm_gate")
    c.tensor("h", h, anchor=True)
    if h.dim() != 3:
        c.fail(f"argument 'h' must be 3-D (B, T, d), got shape {tuple(h.shape)}")
    B, T, d = h.shape
    c.tensor("h_tuned", h_tuned, (B, T, d), dims="h's shape (B, T, d)")
    c.tensor("q", q, (B, d), dims="(B, d)")
    c.tensor("q_tuned", q_tuned, (B, d), dims="(B, d)")
    gate = ArgChecker("imsm_gate")
    gate.tensor("W_A", W_A, (4 * d, None), dims="(4d, r_g)", anchor=True)
    if W_A.device != h.device:
        c.fail(f"argument 'W_A' must be on the device of 'h' ({h.device}), got {W_A.device}")
    r = W_A.shape[1]
    gate.tensor("W_B", W_B, (r, d), dims="(r_g, d)")
    gate.tensor("hidden_mask", hidden_mask, (B, T, r), dims="(B, T, r_g)", optional=True)
    gate.tensor("gate_mask", gate_mask, (B, T, d), dims="(B, T, d)", optional=True)
    for name, mask in (("hidden_mask", hidden_mask), ("gate_mask", gate_mask)):
        if mask is not None and mask.requires_grad:
            c.fail(f"argument '{name}' is a dropout mask and takes no gradient; pass it detached")


def imsm_gate(h: Tensor, h_tuned: Tensor, q: Tensor, q_tuned: Tensor, W_A: Tensor, W_B: Tensor,
              hidden_mask: Tensor | None = None, gate_mask: Tensor | None = None) -> Tensor:
    """IMSM's memory gate (docs/methods.md, "IMSM"): `g ⊙ h + (1 − g) ⊙ h_tuned`,
    `g = σ((([q ⊕ h ⊕ h_tuned ⊕ q_tuned] W_A ⊙ hidden_mask) W_B) ⊙ gate_mask)`, element-wise over d.

    Mixed precision as the released code: the gate (W_A, W_B, the masks) may be wider than the
    memories (float32 gate on bfloat16/float16 hidden states); the memories are then cast to the
    wider dtype at the op's edge, the gate and the mix run in it (gradients reach h, h_tuned in
    their own dtype), and the result comes back in h's dtype.

    Args:
        h: [B, T, d] the frozen model's final hidden states (after the final norm).
        h_tuned: [B, T, d] the adapted model's.
        q, q_tuned: [B, d] their means over each sequence's prompt tokens.
        W_A: [4d, r_g] (rows in the order q, h, h', q'); W_B: [r_g, d].
        hidden_mask: [B, T, r_g] or None: gate dropout on the r_g-wide hidden, values 0 or
            1 / (1 − p) (no gradient), in W_A's dtype.
        gate_mask: [B, T, d] or None: gate dropout on the d-wide pre-sigmoid gate (the
            released gate's second dropout), as hidden_mask. No fused kernel covers it: with
            it the gate runs as `fastcur.ops.reference.imsm_gate` composes it.
    Returns:
        [B, T, d] in h's dtype. Differentiable in h, h_tuned, q, q_tuned, W_A and W_B.
    """
    _check(h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask, gate_mask)
    out_dtype, dtype = h.dtype, torch.promote_types(h.dtype, W_A.dtype)
    h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask, gate_mask = (
        t if t is None or t.dtype == dtype else t.to(dtype)
        for t in (h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask, gate_mask))
    args = (h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask, gate_mask)
    device_type = h.device.type
    # The gate's dtype under autocast too: autocast would otherwise recast the GEMMs inside
    # the composite and the C++ kernel (which then fails on the dtypes it was given).
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return _dispatch(*args).to(out_dtype)
    return _dispatch(*args).to(out_dtype)


def _dispatch(h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask, gate_mask) -> Tensor:
    """The backend's gate on inputs of one dtype; with gate_mask, the composite."""
    backend = resolve("imsm_gate", h.device)
    if backend == "reference" or gate_mask is not None:
        return reference.imsm_gate(h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask, gate_mask)
    op = torch.ops.fastcur.imsm_gate.default if backend == "cpp" else _triton_op()
    return op(h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask)[0]
