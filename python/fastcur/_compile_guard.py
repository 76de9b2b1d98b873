"""`torch.compiler.disable` for methods, applied when the class's first instance is built.

`@torch.compiler.disable(...)` on a method imports torch._dynamo (and Triton with it), about
0.55 s, when its module is imported, so `import fastcur` paid for it whether or not anything was
ever compiled. `@compile_disabled(reason)` only marks the method; `install(cls)`, called when an
instance of `cls` is created (before any `torch.compile` can trace it), swaps in
`torch.compiler.disable(method, reason=reason)` once per class.
"""
from __future__ import annotations

import torch

_MARK = "__fastcur_compile_disabled__"
_installed: set[type] = set()


def compile_disabled(reason: str):
    """Mark a method to run outside torch.compile (a graph break; `reason` is what
    `fullgraph=True` reports). Takes effect through `install`."""
    def mark(fn):
        setattr(fn, _MARK, reason)
        return fn
    return mark


def install(cls: type) -> None:
    """Replace every marked method of `cls` and its bases by its `torch.compiler.disable` form."""
    if cls in _installed:
        return
    for klass in cls.__mro__:
        for name, attr in list(vars(klass).items()):
            reason = getattr(attr, _MARK, None)
            if reason is not None and callable(attr):
                disabled = torch.compiler.disable(attr, reason=reason)
                setattr(klass, name, disabled)
    _installed.add(cls)
