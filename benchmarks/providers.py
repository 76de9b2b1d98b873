"""Provider set-up shared by the benchmarks of adapted linear layers (bench_cur_linear, bench_secura,
bench_jumplora): the seeded tensors of a case, the frozen nn.Linear the adapters wrap (run alone,
it is the floor), the PEFT LoRA / DoRA baseline, and the leaves a fwd+bwd step resets (also
used by bench_imsm).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import nn

from .runner import Case, Prepared

FLOOR = "nn.Linear (frozen)"
REFERENCE = "reference (unfused)"
SEED_CODE = "seed-code-style"
PEFT_LORA = "PEFT LoRA"
PEFT_DORA = "PEFT DoRA"


class SeededLinear:
    """The tensors every provider of a case starts from: W [n, k], b [n], x [M, k] (shape fields
    M, n, k), then what `draw_extra(generator, case.shape)` draws next from the same generator.
    Float32 on the CPU, seeded by the case, drawn once per case (the last case is cached), so
    the providers of a case compute from the same numbers."""

    def __init__(self, draw_extra: Callable[[torch.Generator, dict], tuple] | None = None):
        self._draw_extra = draw_extra
        self._draw_cached = functools.lru_cache(maxsize=1)(self._draw)

    def host(self, case: Case) -> tuple:
        """(W, b, x, *extra) of the case, on the CPU in float32."""
        return self._draw_cached(tuple(case.shape.items()), case.seed)

    def _draw(self, shape_items: tuple, seed: int) -> tuple:
        shape = dict(shape_items)
        M, n, k = shape["M"], shape["n"], shape["k"]
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(n, k, generator=g) / math.sqrt(k)
        b = torch.randn(n, generator=g) * 0.1
        x = torch.randn(M, k, generator=g)
        return (W, b, x, *(self._draw_extra(g, shape) if self._draw_extra else ()))

    def linear(self, case: Case) -> tuple[nn.Linear, torch.Tensor]:
        """A frozen nn.Linear with the case's W, b and the input x [M, k] (requiring grad unless
        "infer"), in the case's device and dtype; each provider gets its own layer."""
        n, k = case.shape["n"], case.shape["k"]
        W, b, x = self.host(case)[:3]
        lin = nn.Linear(k, n, bias=True, device=case.device, dtype=case.dtype)
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(b)
        lin.requires_grad_(False)
        x = x.to(device=case.device, dtype=case.dtype).requires_grad_(case.requires_grad)
        return lin, x

    def floor(self, case: Case) -> Prepared:
        """The floor provider: the frozen nn.Linear alone (x W^T + b; dy W backward)."""
        lin, x = self.linear(case)
        return Prepared(lambda: lin(x), leaves=[x])


def linear_flops(case: Case) -> float:
    """The floor's useful work: x W^T (2 M n k), plus dy W (2 M n k) in fwd+bwd."""
    M, n, k = case.shape["M"], case.shape["n"], case.shape["k"]
    return 2.0 * M * n * k * (2 if case.mode == "fwd+bwd" else 1)


def train_leaves(case: Case, *tensors: torch.Tensor) -> list:
    """The leaves a fwd+bwd step resets (the input and the trained parameters); none in "infer"."""
    return list(tensors) if case.requires_grad else []


def trainable_parameters(*modules: nn.Module) -> list:
    """The parameters of `modules` that require grad, in their order."""
    return [p for m in modules for p in m.parameters() if p.requires_grad]


class _Holder(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def peft_adapter(case: Case, lin: nn.Linear, x: torch.Tensor, alpha: float, dora: bool = False) -> Prepared:
    """peft's LoRA (DoRA with `dora`) layer at rank r on `lin`: LoraConfig + get_peft_model on a
    module holding it, the peft.tuners.lora.Linear layer called directly, adapter weights in the
    base dtype (autocast_adapter_dtype=False), a nonzero B as after some training."""
    import peft
    from peft import LoraConfig, get_peft_model

    r = case.shape["r"]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"], bias="none",
                        use_dora=dora)
    model = get_peft_model(_Holder(lin), config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    g = torch.Generator().manual_seed(case.seed + 3)
    with torch.no_grad():
        B = layer.lora_B["default"].weight
        B.copy_((torch.randn(B.shape, generator=g) * 0.02).to(B.dtype))
    return Prepared(lambda: layer(x), leaves=train_leaves(case, x, *trainable_parameters(model)),
                    note=f"peft {peft.__version__}")
