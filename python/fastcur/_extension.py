"""Guarded load of the compiled extension `fastcur._C`.

Importing fastcur never fails because the extension is missing: `available()` says whether it
loaded, `load_error()` why not, and `has_kernel()` which device kernels it registered.
"""
from __future__ import annotations

import torch

try:  # the .so registers its ops under torch.ops.fastcur as a side effect of loading
    from fastcur import _C  # type: ignore[attr-defined]

    _LOAD_ERROR: Exception | None = None
except ImportError as exc:  # not built (FASTCUR_BUILD_EXT=0), or built against another torch
    _C = None
    _LOAD_ERROR = exc


def available() -> bool:
    """True when `fastcur._C` loaded."""
    return _C is not None


def load_error() -> Exception | None:
    """The ImportError raised when loading `fastcur._C`, or None."""
    return _LOAD_ERROR


def build_info() -> dict:
    """What the extension was built with (`cuda`, `cuda_archs`, `openmp`, `compiler`)."""
    if _C is None:
        return {"cuda": False, "cuda_archs": "", "openmp": False, "compiler": None}
    return dict(_C.build_info())


def _kernel_table() -> dict[str, frozenset[str]]:
    """{op name: dispatch keys with a C++ kernel} for every op the extension registered (not the
    `_eager` ops: C++ autograd nodes around another op's kernels, with no kernel of their own)."""
    if _C is None:
        return {}
    table = {}
    for name in torch._C._dispatch_get_all_op_names():
        if name.startswith("fastcur::") and not name.endswith(("_triton", "_triton_bwd", "_eager")):
            table[name.split("::", 1)[1]] = frozenset(
                key for key in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(name, key))
    return table


# Built once at import: a plain dict lookup is what torch.compile can trace in `resolve`.
KERNELS: dict[str, frozenset[str]] = _kernel_table()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `fastcur::<op>` has a C++ kernel for `dispatch_key` ("CPU" or "CUDA")."""
    return dispatch_key in KERNELS.get(op, ())
