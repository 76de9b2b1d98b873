"""The functional API of SPEC.md §7; `fastcur.ops.reference` holds the plain-PyTorch twins."""
from . import reference
from .cur_linear import cur_linear
from .cur_select import cur_select

__all__ = ["reference", "cur_linear", "cur_select"]
