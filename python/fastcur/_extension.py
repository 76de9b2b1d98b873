"""Guarded load of the compiled extension `fastcur._C`.

Importing fastcur never fails because the extension is missing: `available()` says whether it
loaded, `load_error()` why not, and `has_kernel()` which device kernels it registered.
"""
from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `fastcur::<op>` has a C++ kernel for `dispatch_key` ("CPU" or "CUDA")."""
    if _C is None:
        return False
    name = f"fastcur::{op}"
    if not torch._C._dispatch_has_kernel(name):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)
