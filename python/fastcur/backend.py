"""Backend choice: which implementation runs each fastcur op.

Backends:
  reference  plain PyTorch (fastcur.ops.reference), always there, the ground truth
  cpp        the C++ extension: CPU kernels, and CUDA kernels when built with CUDA
  triton     Triton kernels: CUDA tensors; CPU tensors only under TRITON_INTERPRET=1 (tests)
  auto       the fastest available for the tensors' device (default)

Choose with `set_backend(name)`, temporarily with `with use_backend(name): ...`, or for a
whole process with the environment variable FASTCUR_BACKEND.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings

import torch

from . import _extension

BACKENDS = ("auto", "reference", "cpp", "triton")

_default = os.environ.get("FASTCUR_BACKEND", "auto").strip().lower() or "auto"
# A plain global, not a ContextVar: torch.compile traces global reads but not ContextVar.get.
_override: str | None = None


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"fastcur: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name.strip().lower()


if _default not in BACKENDS:
    raise ValueError(f"fastcur: FASTCUR_BACKEND={_default!r} is not one of {', '.join(BACKENDS)}")


def set_backend(name: str) -> None:
    """Set the process-wide backend ("auto", "reference", "cpp" or "triton")."""
    global _default
    _default = _validate(name)


def get_backend() -> str:
    """The backend asked for right now (may be "auto"; see `resolve` for the concrete one)."""
    return _override if _override is not None else _default


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the ops inside the block on backend `name` (process-wide, like
    `set_backend`, restored on exit)."""
    global _override
    previous, _override = _override, _validate(name)
    try:
        yield
    finally:
        _override = previous


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Triton is importable (it still needs CUDA tensors unless interpreting)."""
    return importlib.util.find_spec("triton") is not None


def _triton_usable(device: torch.device) -> bool:
    return triton_available() and (device.type == "cuda" or (device.type == "cpu" and triton_interpreting()))


def _cpp_usable(op: str, device: torch.device) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and _extension.has_kernel(op, key)


def resolve(op: str, device: torch.device) -> str:
    """The concrete backend ("reference", "cpp" or "triton") that runs `op` on `device`.

    `auto` prefers the C++ extension (CPU: ATen GEMMs + fused epilogues; CUDA: cuBLAS + fused
    epilogue kernels), then Triton on CUDA, then the reference. An explicit choice that cannot
    run raises instead of silently falling back.
    """
    name = get_backend()
    if name == "auto":
        if _cpp_usable(op, device):
            return "cpp"
        if device.type == "cuda" and _triton_usable(device):
            return "triton"
        _warn_fallback_once()
        return "reference"
    if name == "cpp" and not _cpp_usable(op, device):
        why = ("the C++ extension is not loaded: " + str(_extension.load_error())
               if not _extension.available()
               else f"the extension has no {device.type.upper()} kernel for fastcur::{op}")
        raise RuntimeError(f"fastcur: backend 'cpp' cannot run {op} on {device}: {why}")
    if name == "triton" and not _triton_usable(device):
        why = ("Triton is not installed" if not triton_available()
               else "Triton needs CUDA tensors (CPU tensors only with TRITON_INTERPRET=1 set before import)")
        raise RuntimeError(f"fastcur: backend 'triton' cannot run {op} on {device}: {why}")
    return name


_warned = False


def _warn_fallback_once() -> None:
    global _warned
    if not _warned and not _extension.available():
        _warned = True
        warnings.warn(
            "fastcur: the C++ extension is not available "
            f"({_extension.load_error()}); using the reference PyTorch backend. "
            "Run `fastcur info` for details.",
            RuntimeWarning,
            stacklevel=3,
        )
