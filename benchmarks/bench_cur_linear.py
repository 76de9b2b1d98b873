"""Benchmark of cur_linear / CURLoRALinear (SPEC §2) against the floor and the baselines.

    fastcur bench cur_linear [--quick] [--dtype float32] [--shapes 2048,2048,2048,16] ...
    python benchmarks/bench_cur_linear.py [same arguments]

Providers (every one computes a layer `y = x W^T + b (+ adapter)` with a bias, W frozen):
  nn.Linear (frozen)    the floor: the base GEMMs alone; no adapter can be faster
  CURLoRALinear         fastcur's module, auto backend, tied fast path (C, R slices of W)
  reference (unfused)   fastcur.ops.reference.cur_linear with explicit C, R: F.linear plus
                        three small GEMMs and an add, each its own pass, plain autograd
  seed-code-style       the CURLoRA paper's code pattern: builds W + C U R (n x k) in every
                        forward, then one F.linear; U trainable, so the backward pays a full
                        dy^T x GEMM for dU
  PEFT LoRA             peft's LoRA layer at the same rank (LoraConfig + get_peft_model on a
                        module holding the nn.Linear; the lora.Linear layer is called directly),
                        adapter weights in the base dtype (autocast_adapter_dtype=False)
Shape fields: M tokens, n out features, k in features, r rank.
"""
from __future__ import annotations

import functools
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):          # run as a script: use the installed package's runner
    from fastcur.benchmarks.runner import Benchmark, Case, Prepared, main
else:
    from .runner import Benchmark, Case, Prepared, main

FLOOR = "nn.Linear (frozen)"
FOCUS = "CURLoRALinear"
REFERENCE = "reference (unfused)"
SEED_CODE = "seed-code-style"
PEFT_LORA = "PEFT LoRA"


@functools.lru_cache(maxsize=1)
def _host_data(M: int, n: int, k: int, seed: int):
    """W [n, k], b [n], x [M, k] in float32 on the CPU, the same for every provider of a case."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) / math.sqrt(k)
    b = torch.randn(n, generator=g) * 0.1
    x = torch.randn(M, k, generator=g)
    U = torch.randn(64, 64, generator=g) * 0.02       # a nonzero adapter core (sliced to r x r)
    return W, b, x, U


def _linear(case: Case) -> tuple[nn.Linear, torch.Tensor]:
    """A frozen nn.Linear with the case's weights and the input (requiring grad unless "infer");
    each provider gets its own copies, so no provider reads another's tensors."""
    M, n, k = case.shape["M"], case.shape["n"], case.shape["k"]
    W, b, x, _ = _host_data(M, n, k, case.seed)
    lin = nn.Linear(k, n, bias=True, device=case.device, dtype=case.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(b)
    lin.requires_grad_(False)
    x = x.to(device=case.device, dtype=case.dtype).requires_grad_(case.requires_grad)
    return lin, x


def _u_init(case: Case, r: int) -> torch.Tensor:
    _, _, _, U = _host_data(case.shape["M"], case.shape["n"], case.shape["k"], case.seed)
    if r <= U.shape[0]:
        core = U[:r, :r]
    else:
        core = torch.randn(r, r, generator=torch.Generator().manual_seed(case.seed + 7)) * 0.02
    return core.to(device=case.device, dtype=case.dtype)


def _cur_module(case: Case):
    import fastcur

    lin, x = _linear(case)
    r = case.shape["r"]
    module = fastcur.CURLoRALinear.from_linear(lin, rank=r, scale=1.0, select="sample", seed=0)
    with torch.no_grad():
        module.U.copy_(_u_init(case, r))
    return module, x


def nn_linear(case: Case) -> Prepared:
    lin, x = _linear(case)
    return Prepared(lambda: lin(x), leaves=[x])


def cur_lora_linear(case: Case) -> Prepared:
    from fastcur.backend import resolve

    module, x = _cur_module(case)
    leaves = [x, module.U] if case.requires_grad else []
    note = f"backend={resolve('cur_linear', case.device)}, {'tied' if module.tied else 'explicit C, R'}"
    return Prepared(lambda: module(x), leaves=leaves, note=note)


def reference_unfused(case: Case) -> Prepared:
    from fastcur.ops import reference

    module, x = _cur_module(case)
    W, b, C, R = module.weight, module.bias, module.C, module.R
    U = module.U
    leaves = [x, U] if case.requires_grad else []
    return Prepared(lambda: reference.cur_linear(x, W, b, C, U, R, 1.0), leaves=leaves)


def seed_code_style(case: Case) -> Prepared:
    module, x = _cur_module(case)
    W, b, C, R = module.weight, module.bias, module.C, module.R
    U = module.U

    def forward():
        # As the CURLoRA paper's code: the adapted weight is rebuilt (n x k) at every call.
        return F.linear(x, W + (C @ U) @ R, b)

    leaves = [x, U] if case.requires_grad else []
    return Prepared(forward, leaves=leaves, note="W + C U R per call, one F.linear")


class _Holder(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def peft_lora(case: Case) -> Prepared:
    import peft
    from peft import LoraConfig, get_peft_model

    lin, x = _linear(case)
    r = case.shape["r"]
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["proj"], bias="none")
    model = get_peft_model(_Holder(lin), config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj                # peft.tuners.lora.Linear
    g = torch.Generator().manual_seed(case.seed + 3)
    with torch.no_grad():                              # a nonzero B, as after some training
        B = layer.lora_B["default"].weight
        B.copy_((torch.randn(B.shape, generator=g) * 0.02).to(B.dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    leaves = [x, *params] if case.requires_grad else []
    return Prepared(lambda: layer(x), leaves=leaves, note=f"peft {peft.__version__}")


def flops(case: Case) -> float:
    """The floor's useful work: x W^T (2 M n k), plus dy W (2 M n k) in fwd+bwd."""
    M, n, k = case.shape["M"], case.shape["n"], case.shape["k"]
    return 2.0 * M * n * k * (2 if case.mode == "fwd+bwd" else 1)


FULL_SHAPES = [(M, nk, nk, r) for M in (512, 2048) for nk in (1024, 2048, 4096) for r in (8, 16, 64)]
QUICK_SHAPES = [(512, 1024, 1024, 16), (2048, 2048, 2048, 16)]

BENCHMARK = Benchmark(
    name="cur_linear",
    description="CUR-LoRA linear layer y = x W^T + b + s ((x R^T) U^T) C^T (SPEC §2), x [M, k], W [n, k], rank r",
    providers={
        FLOOR: nn_linear,
        FOCUS: cur_lora_linear,
        REFERENCE: reference_unfused,
        SEED_CODE: seed_code_style,
        PEFT_LORA: peft_lora,
    },
    floor=FLOOR,
    focus=FOCUS,
    baselines=(SEED_CODE, PEFT_LORA),
    shape_fields=("M", "n", "k", "r"),
    shapes=FULL_SHAPES,
    quick_shapes=QUICK_SHAPES,
    dtypes=("float32", "bfloat16"),
    quick_dtypes=("float32",),
    modes=("fwd", "fwd+bwd"),
    flops=flops,
    details={"bias": True, "scale": 1.0, "select": "sample", "peft_autocast_adapter_dtype": False},
)


if __name__ == "__main__":
    sys.exit(main(["cur_linear", *sys.argv[1:]]))
