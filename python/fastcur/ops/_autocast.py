"""torch.autocast for the fused ops.

Autocast casts the inputs of the ops it knows (`F.linear`, `matmul`, ...) but not those of a
custom op, so each fused linear op casts its own floating inputs here, before its checks, the
way autocast casts nn.Linear's: to the autocast dtype of the input's device, differentiably
(gradients reach the float32 parameters in float32), float64 left alone. The op then runs
unchanged in that dtype and returns it, as `F.linear` does under autocast. The JumpLoRA ops
pass their log θ around this (it stays float32: their gate compares in float32).
"""
from __future__ import annotations

import functools
import inspect

import torch


def _cast(t, dtype: torch.dtype):
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (dtype, torch.float64):
        return t.to(dtype)
    return t


def autocast_inputs(x, *tensors):
    """(x, *tensors) cast to the autocast dtype when autocast is on for x's device, else unchanged.

    None and non-tensor entries pass through (the op's checks report them)."""
    device_type = x.device.type if isinstance(x, torch.Tensor) else None
    # (meta and other devices without autocast: asking about them raises)
    if (device_type is None or not torch.amp.is_autocast_available(device_type)
            or not torch.is_autocast_enabled(device_type)):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(_cast(t, dtype) for t in (x, *tensors))


def autocast_off(fn):
    """Decorator for the body of a Triton custom op: runs it with autocast off for the device of
    its first tensor argument. The launchers compute small products (e.g. `h @ U^T`) in float32
    on purpose; autocast would turn them into bfloat16/float16 ones, and the kernels then get
    operands of mixed dtypes. The op's inputs were already cast by `autocast_inputs`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)
        if (device_type is None or not torch.amp.is_autocast_available(device_type)
                or not torch.is_autocast_enabled(device_type)):
            return fn(*args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return fn(*args, **kwargs)

    # torch.library.custom_op reads the signature to infer the op's schema; evaluate the
    # annotations here, in fn's module (string annotations would be looked up in this one).
    wrapper.__signature__ = inspect.signature(fn, eval_str=True)
    return wrapper
