"""Inputs for the CUR op tests (cur_linear, secura_linear): a base layer W with r of its rows and
columns picked, and C, R that are W's own columns and rows (tied) or free. All float64, drawn from
the caller's generator, so each test's own draws keep their place in the sequence."""
from __future__ import annotations

import torch


def base_inputs(g: torch.Generator, lead, k: int, n: int, r: int, bias: bool):
    """W [n, k], rows [r] and cols [r] (distinct, random), x [*lead, k], b [n] (or None)."""
    W = torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5
    rows = torch.randperm(n, generator=g)[:r]
    cols = torch.randperm(k, generator=g)[:r]
    x = torch.randn(*lead, k, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    return W, rows, cols, x, b


def c_and_r(g: torch.Generator, W: torch.Tensor, rows, cols, *, tied: bool):
    """C [n, r], R [r, k]: W[:, cols] and W[rows] when tied, else random (not slices of W)."""
    n, k = W.shape
    C, R = W[:, cols].clone(), W[rows].clone()
    if not tied:
        C = torch.randn(n, len(cols), generator=g, dtype=torch.float64) / k ** 0.5
        R = torch.randn(len(rows), k, generator=g, dtype=torch.float64) / k ** 0.5
    return C, R
