"""Checks of the SigNorm options shared by signorm, secura_linear and signorm_merge."""
from __future__ import annotations

import math

from ._checks import ArgChecker


_UNUSED = object()  # an option the calling op does not have


def check_options(c: ArgChecker, k, eps, *, norm=_UNUSED, scope=_UNUSED, scopes=("token", "tensor")) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k):
        c.fail(f"argument 'k' must be a finite number, got {k!r}", TypeError)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
        c.fail(f"argument 'eps' must be a finite number >= 0, got {eps!r}")
    if norm is not _UNUSED and norm not in ("max", "raw"):
        c.fail(f"argument 'norm' must be 'max' or 'raw', got {norm!r}")
    if scope is not _UNUSED and scope not in scopes:
        c.fail(f"argument 'scope' must be {' or '.join(repr(s) for s in scopes)}, got {scope!r}")
