"""Registration shared by every fused op with a backward op: the dispatcher op's fake (meta)
and autograd formulas, registered once for the C++ and the Triton op."""
from __future__ import annotations

from typing import Callable

import torch


def register_with_backward(fwd: str, bwd: str, *, fwd_fake: Callable, bwd_fake: Callable,
                           make_backward: Callable, setup_context: Callable) -> None:
    """Register, once per op, the fake (meta) kernels of the op `fwd` and its backward op `bwd`
    ("fastcur::<name>", C++ or Triton custom op) and `fwd`'s autograd formula:
    `make_backward(bwd_op)` returns the backward function, which calls `bwd_op`."""
    torch.library.register_fake(fwd)(fwd_fake)
    torch.library.register_fake(bwd)(bwd_fake)
    ns, name = bwd.split("::")
    bwd_op = getattr(getattr(torch.ops, ns), name).default
    torch.library.register_autograd(fwd, make_backward(bwd_op), setup_context=setup_context)
