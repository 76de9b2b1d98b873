"""The functional API of SPEC.md §7; `fastcur.ops.reference` holds the plain-PyTorch twins."""
from . import reference
from .cur_linear import cur_linear
from .cur_select import cur_select
from .lalora import (kfac_factor, kfac_penalty, laplace_diag_penalty, laplace_diag_penalty_grad_,
                     lora_fisher_diag)

__all__ = ["reference", "cur_linear", "cur_select", "lora_fisher_diag", "laplace_diag_penalty",
           "laplace_diag_penalty_grad_", "kfac_factor", "kfac_penalty"]
