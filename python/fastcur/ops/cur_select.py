"""CUR selection of SPEC §2: which columns and rows of a frozen W form C and R."""
from __future__ import annotations

import torch

# Added to the column/row probabilities before inverting them: a zero-norm column gets a
# finite (very large) weight instead of inf/nan. Probabilities are in [0, 1] and computed in
# float64, so 1e-12 only matters for columns that are (numerically) zero.
_EPS = 1e-12


def inverted_probabilities(sq_norms: torch.Tensor) -> torch.Tensor:
    """`p~ = (1/p) / sum(1/p)` with `p = sq_norms / sum(sq_norms)`, in float64.

    An all-zero W gives uniform probabilities.
    """
    sq = sq_norms.double()
    total = sq.sum()
    if total == 0:
        return torch.full_like(sq, 1.0 / sq.numel())
    inv = 1.0 / (sq / total + _EPS)
    return inv / inv.sum()


def cur_select(weight: torch.Tensor, rank: int, method: str = "sample", *, replace: bool = False,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Select `rank` rows and columns of `weight` ([n, k]) with inverted norm probabilities.

    method="sample": draw from p~ (without replacement unless `replace=True`) using
    `generator` (a CPU generator; seed it for reproducible indices).
    method="lowest": the `rank` lowest-norm rows/columns (ties to the lower index).
    Returns (rows [rank], cols [rank]) as int64 tensors on weight's device.
    Runs once per selection and synchronizes with the device (it is not a hot path).
    """
    if weight.dim() != 2:
        raise ValueError(f"fastcur.cur_select: weight must be 2-D, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or rank > min(n, k):
        raise ValueError(f"fastcur.cur_select: rank must be an int in [1, min(n, k) = {min(n, k)}] "
                         f"for weight of shape {(n, k)}, got {rank!r}")
    if method not in ("sample", "lowest"):
        raise ValueError(f"fastcur.cur_select: method must be 'sample' or 'lowest', got {method!r}")
    w = weight.detach().double()
    row_sq, col_sq = (w * w).sum(1).cpu(), (w * w).sum(0).cpu()
    if method == "lowest":
        rows = torch.sort(row_sq, stable=True).indices[:rank]
        cols = torch.sort(col_sq, stable=True).indices[:rank]
    else:
        cols = torch.multinomial(inverted_probabilities(col_sq), rank, replacement=replace, generator=generator)
        rows = torch.multinomial(inverted_probabilities(row_sq), rank, replacement=replace, generator=generator)
    return rows.to(weight.device), cols.to(weight.device)
