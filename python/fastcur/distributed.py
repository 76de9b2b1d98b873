"""Data-parallel training of adapted models: what DDP and FSDP2 need from fastcur.

Every fused call reads only tensors its own module owns (W, bias, C, R, the adapter factors),
so each adapter layer can be its own FSDP unit. The one exception is JumpLoRA's threshold:
a `JumpThreshold` module shared by many layers (the paper's global scope).

- DDP: nothing to do. DDP registers the shared `log_theta` once and averages its gradient,
  summed over all the layers that read it, like any other parameter.
- FSDP2 (`torch.distributed.fsdp.fully_shard`): the threshold cannot be sharded. fully_shard
  refuses 0-dim parameters (the weight gate's θ is a scalar), and a parameter read by layers
  of several FSDP units would belong to the first unit that claims it and be read, still
  sharded, by the others. So it stays replicated on every rank, outside FSDP:

      ignored = fastcur.replicate_thresholds(model)        # also syncs their gradients
      for block in model.model.layers:
          fully_shard(block, ignored_params=ignored)
      fully_shard(model, ignored_params=ignored)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .modules.jump_lora_linear import JumpThreshold

_HOOKED = "_fastcur_grad_average_group"


def replicate_thresholds(model: nn.Module, group: dist.ProcessGroup | None = None) -> set[nn.Parameter]:
    """Keep every `JumpThreshold` of `model` replicated under FSDP2.

    Returns the thresholds' `log_theta` parameters, to pass as `ignored_params=` to every
    `fully_shard` call, and registers on each trainable one a hook that averages its gradient
    over the ranks of `group` (default: the world) once backward has accumulated it, as FSDP
    does for the parameters it owns. Averaging is linear, so gradient accumulation over
    micro-batches stays exact. Calling it again does not register a second hook.
    Every rank must run the same backward (the hook is a collective); a weight-gated
    threshold always takes part in its layers' backward.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fastcur.replicate_thresholds: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first")
    params = {m.log_theta for m in model.modules() if isinstance(m, JumpThreshold)}
    for p in params:
        if p.requires_grad and not hasattr(p, _HOOKED):
            p.register_post_accumulate_grad_hook(_average_grad_hook(group))
            setattr(p, _HOOKED, group)
    return params


def _average_grad_hook(group):
    def hook(param: torch.Tensor) -> None:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)
            param.grad.div_(dist.get_world_size(group))
    return hook
