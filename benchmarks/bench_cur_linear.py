"""Benchmark of cur_linear / CURLoRALinear (docs/methods.md, CURLoRA) against the floor and the baselines.

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

import sys

import torch
import torch.nn.functional as F

if __package__ in (None, ""):          # run as a script: use the installed package's runner
    from fastcur.benchmarks import providers
    from fastcur.benchmarks.providers import FLOOR, PEFT_LORA, REFERENCE, SEED_CODE
    from fastcur.benchmarks.runner import Benchmark, Case, Prepared, run_script
else:
    from . import providers
    from .providers import FLOOR, PEFT_LORA, REFERENCE, SEED_CODE
    from .runner import Benchmark, Case, Prepared, run_script

FOCUS = "CURLoRALinear"


def _draw_core(g: torch.Generator, shape: dict) -> tuple:
    return (torch.randn(64, 64, generator=g) * 0.02,)     # a nonzero adapter core (sliced to r x r)


_DATA = providers.SeededLinear(_draw_core)       # W, b, x, U


def _u_init(case: Case, r: int) -> torch.Tensor:
    _, _, _, U = _DATA.host(case)
    if r <= U.shape[0]:
        core = U[:r, :r]
    else:
        core = torch.randn(r, r, generator=torch.Generator().manual_seed(case.seed + 7)) * 0.02
    return core.to(device=case.device, dtype=case.dtype)


def _cur_module(case: Case):
    import fastcur

    lin, x = _DATA.linear(case)
    r = case.shape["r"]
    module = fastcur.CURLoRALinear.from_linear(lin, rank=r, scale=1.0, select="sample", seed=0)
    with torch.no_grad():
        module.U.copy_(_u_init(case, r))
    return module, x


def cur_lora_linear(case: Case) -> Prepared:
    from fastcur.backend import resolve

    module, x = _cur_module(case)
    note = f"backend={resolve('cur_linear', case.device)}, {'tied' if module.tied else 'explicit C, R'}"
    return Prepared(lambda: module(x), leaves=providers.train_leaves(case, x, module.U), note=note)


def reference_unfused(case: Case) -> Prepared:
    from fastcur.ops import reference

    module, x = _cur_module(case)
    W, b, C, R = module.weight, module.bias, module.C, module.R
    U = module.U
    return Prepared(lambda: reference.cur_linear(x, W, b, C, U, R, 1.0), leaves=providers.train_leaves(case, x, U))


def seed_code_style(case: Case) -> Prepared:
    module, x = _cur_module(case)
    W, b, C, R = module.weight, module.bias, module.C, module.R
    U = module.U

    def forward():
        # As the CURLoRA paper's code: the adapted weight is rebuilt (n x k) at every call.
        return F.linear(x, W + (C @ U) @ R, b)

    return Prepared(forward, leaves=providers.train_leaves(case, x, U), note="W + C U R per call, one F.linear")


def peft_lora(case: Case) -> Prepared:
    return providers.peft_adapter(case, *_DATA.linear(case), alpha=case.shape["r"])


FULL_SHAPES = [(M, nk, nk, r) for M in (512, 2048) for nk in (1024, 2048, 4096) for r in (8, 16, 64)]
QUICK_SHAPES = [(512, 1024, 1024, 16), (2048, 2048, 2048, 16)]

BENCHMARK = Benchmark(
    name="cur_linear",
    description="CUR-LoRA linear layer y = x W^T + b + s ((x R^T) U^T) C^T (docs/methods.md, CURLoRA), x [M, k], W [n, k], rank r",
    providers={
        FLOOR: _DATA.floor,
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
    flops=providers.linear_flops,
    details={"bias": True, "scale": 1.0, "select": "sample", "peft_autocast_adapter_dtype": False},
)


if __name__ == "__main__":
    sys.exit(run_script("cur_linear"))
