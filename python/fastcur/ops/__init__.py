"""The functional API of SPEC.md §7; `fastcur.ops.reference` holds the plain-PyTorch twins."""
from . import reference
from .cur_linear import cur_linear
from .cur_select import cur_select
from .ella_penalty import ella_penalty
from .jump_linear import jump_linear
from .jump_rank_linear import jump_rank_linear

__all__ = ["reference", "cur_linear", "cur_select", "jump_linear", "jump_rank_linear", "ella_penalty"]
