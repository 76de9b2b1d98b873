"""torch.autocast for the fused ops.

Autocast casts the inputs of the ops it knows (`F.linear`, `matmul`, ...) but not those of a
custom op, so each fused linear op casts its own floating inputs here, before its checks, the
way autocast casts nn.Linear's: to the autocast dtype of the input's device, differentiably
(gradients reach the float32 parameters in float32), float64 left alone. The op then runs
unchanged in that dtype and returns it, as `F.linear` does under autocast.
"""
from __future__ import annotations

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
