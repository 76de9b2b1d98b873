"""Argument checks shared by the public ops: every message names the function, the argument,
and the expected and actual shape, dtype or device."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

FLOATING = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class ArgChecker:
    """Checks the arguments of one call of `fn`; the first tensor checked with `like=None`
    and `anchor=True` sets the dtype and device the others must share."""

    def __init__(self, fn: str):
        self.fn = fn
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self.anchor_name: str | None = None

    def fail(self, msg: str, exc=ValueError):
        raise exc(f"fastcur.{self.fn}: {msg}")

    def tensor(self, name: str, t, shape: Sequence[int | None] | None = None, *,
               dims: str | None = None, min_dim: int | None = None, anchor: bool = False,
               optional: bool = False, floating: bool = True) -> None:
        """`shape` entries of None match any size; `dims` names them for the message."""
        if t is None:
            if optional:
                return
            self.fail(f"argument '{name}' is required, got None", TypeError)
        if not isinstance(t, torch.Tensor):
            self.fail(f"argument '{name}' must be a torch.Tensor, got {type(t).__name__}", TypeError)
        if floating and t.dtype not in FLOATING:
            self.fail(f"argument '{name}' must be float32, bfloat16, float16 or float64, got {t.dtype}", TypeError)
        if min_dim is not None and t.dim() < min_dim:
            self.fail(f"argument '{name}' must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")
        if shape is not None:
            ok = t.dim() == len(shape) and all(s is None or s == a for s, a in zip(shape, t.shape))
            if not ok:
                want = tuple("*" if s is None else s for s in shape)
                label = f" = {dims}" if dims else ""
                self.fail(f"argument '{name}' must have shape {want}{label}, got {tuple(t.shape)}")
        if not floating:
            return
        if anchor or self.dtype is None:
            if self.dtype is None:
                self.dtype, self.device, self.anchor_name = t.dtype, t.device, name
                return
        if t.dtype != self.dtype:
            self.fail(f"argument '{name}' must have the dtype of '{self.anchor_name}' ({self.dtype}), got {t.dtype}", TypeError)
        if t.device != self.device:
            self.fail(f"argument '{name}' must be on the device of '{self.anchor_name}' ({self.device}), got {t.device}")

    def number(self, name: str, value) -> float:
        """A scalar option (scale, lam, ...) as a finite float.

        Accepts a real number or a one-element tensor that does not require grad (read with
        one host sync). A tensor that requires grad is refused: the ops take these options as
        constants, so it would silently get no gradient."""
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                self.fail(f"argument '{name}' is a tensor that requires grad, but {name} is a "
                          "constant of this op and gets no gradient; pass a float or detach it",
                          TypeError)
            if value.numel() != 1 or value.is_complex():
                self.fail(f"argument '{name}' must be a real number, got a tensor of shape "
                          f"{tuple(value.shape)} and dtype {value.dtype}", TypeError)
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            self.fail(f"argument '{name}' must be a real number, got {type(value).__name__}", TypeError)
        if not math.isfinite(value):
            self.fail(f"argument '{name}' must be finite, got {value!r}")
        return float(value)

    def index(self, name: str, t, length: int) -> None:
        if t is None:
            return
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            self.fail(f"argument '{name}' must be an int64 tensor, got {got}", TypeError)
        if t.shape != (length,):
            self.fail(f"argument '{name}' must have shape ({length},), got {tuple(t.shape)}")
        if t.device != self.device:
            self.fail(f"argument '{name}' must be on the device of '{self.anchor_name}' ({self.device}), got {t.device}")


def flat_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [M, d], M the product of the leading sizes; works for d = 0 too (where
    `reshape(-1, d)` cannot infer M)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
