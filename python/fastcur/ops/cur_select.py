"""CUR selection (docs/methods.md, CURLoRA): which columns and rows of a frozen W form C and R,
and the per-layer generator that draws them."""
from __future__ import annotations

import hashlib

import torch

#: Added to the column/row probabilities before inverting them, as the released CURLoRA code
#: does (`1 / (p + 0.001)`): on real weights, where p is about 1/k, this is much flatter than
#: the paper's pure 1/p (eq. 4), which `inverse_eps=0` gives.
INVERSE_EPS = 1e-3

# Under `inverse_eps=0`, a zero-norm column gets 1/1e-12 (finite, very large) instead of inf/nan;
# every other column gets its exact 1/p.
_ZERO_GUARD = 1e-12


def inverted_probabilities(sq_norms: torch.Tensor, inverse_eps: float = INVERSE_EPS) -> torch.Tensor:
    """`p~ = (1/(p + e)) / sum(1/(p + e))` with `p = sq_norms / sum(sq_norms)`, in float64.

    sq_norms [m] (squared column or row norms); `e = inverse_eps` (0.001, the released code's;
    0 is the paper's pure 1/p, guarded against zero norms). An all-zero W gives uniform
    probabilities. Returns [m] float64 summing to 1.
    """
    sq = sq_norms.double()
    total = sq.sum()
    if total == 0:
        return torch.full_like(sq, 1.0 / sq.numel())
    p = sq / total + float(inverse_eps)
    inv = 1.0 / torch.where(p > 0, p, torch.full_like(p, _ZERO_GUARD))
    return inv / inv.sum()


def layer_seed(seed: int, module_name: str | None) -> int:
    """A 63-bit seed derived from `seed` and the layer's qualified name (e.g.
    "model.layers.3.self_attn.q_proj"): stable across runs, processes and save/load (SHA-256,
    never Python's salted `hash`), and different for every layer of a model, so same-shape
    layers draw independent columns. `module_name=None` (a layer built directly, outside
    `fastcur.inject`) derives the stream from the seed alone: two such layers with the same
    seed and shape draw the same indices (pass `module_name=` or distinct seeds)."""
    text = f"fastcur:{int(seed)}:{'' if module_name is None else module_name}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def layer_generator(seed: int, module_name: str | None) -> torch.Generator:
    """A CPU `torch.Generator` seeded with `layer_seed(seed, module_name)`."""
    return torch.Generator().manual_seed(layer_seed(seed, module_name))


def cur_select(weight: torch.Tensor, rank: int, method: str = "sample", *, replace: bool = False,
               generator: torch.Generator | None = None,
               inverse_eps: float = INVERSE_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Select `rank` rows and columns of `weight` ([n, k]) with inverted norm probabilities.

    method="sample": draw from p~ (`inverted_probabilities(..., inverse_eps)`; without
    replacement unless `replace=True`) using `generator` (a CPU generator; seed it, e.g. with
    `layer_generator`, for reproducible indices).
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
    if isinstance(inverse_eps, bool) or not isinstance(inverse_eps, (int, float)) or not inverse_eps >= 0:
        raise ValueError(f"fastcur.cur_select: inverse_eps must be a number >= 0, got {inverse_eps!r}")
    w = weight.detach().double()
    row_sq, col_sq = (w * w).sum(1).cpu(), (w * w).sum(0).cpu()
    if method == "lowest":
        rows = torch.sort(row_sq, stable=True).indices[:rank]
        cols = torch.sort(col_sq, stable=True).indices[:rank]
    else:
        cols = torch.multinomial(inverted_probabilities(col_sq, inverse_eps), rank, replacement=replace,
                                 generator=generator)
        rows = torch.multinomial(inverted_probabilities(row_sq, inverse_eps), rank, replacement=replace,
                                 generator=generator)
    return rows.to(weight.device), cols.to(weight.device)
