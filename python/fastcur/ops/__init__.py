"""The functional API of docs/methods.md; `fastcur.ops.reference` holds the plain-PyTorch twins."""
from . import reference
from .cur_linear import cur_linear
from .cur_select import cur_select
from .ella_penalty import ella_penalty
from .imsm_gate import imsm_gate
from .jump_linear import jump_linear, jump_linear_ella
from .jump_rank_linear import jump_rank_linear
from .lalora import (kfac_factor, kfac_penalty, laplace_diag_penalty, laplace_diag_penalty_grad_,
                     lora_fisher_diag)
from .secura_linear import secura_linear
from .signorm import signorm
from .signorm_merge import signorm_merge

__all__ = ["reference", "cur_linear", "cur_select", "signorm", "secura_linear", "signorm_merge",
           "jump_linear", "jump_linear_ella", "jump_rank_linear", "ella_penalty", "lora_fisher_diag",
           "laplace_diag_penalty", "laplace_diag_penalty_grad_", "kfac_factor", "kfac_penalty",
           "imsm_gate"]
