"""Benchmark of JumpLoRA (docs/methods.md, JumpLoRA): jump_linear / jump_rank_linear through JumpLoRALinear,
against the floor and the baselines.

    fastcur bench jumplora [--quick] [--dtype float32] [--shapes 2048,2048,2048,8] ...
    python benchmarks/bench_jumplora.py [same arguments]

Providers (each a layer `y = x W^T + b (+ adapter)` with a bias, W frozen; in fwd+bwd the
adapter's A, B and log_theta are trained, x requires grad):
  nn.Linear (frozen)        the floor: x W^T and dy W, nothing else
  JumpLoRALinear (weight)   fastcur's module, gate="weight", f = 1, θ from the exact reset
                            (about numel(A) + numel(B) entries of Z survive), auto backend
  JumpLoRALinear (rank)     gate="rank" (the cheaper variant), auto backend
  reference (unfused)       fastcur.ops.reference.jump_linear: B A, the straight-through
                            JumpReLU, the interpolation and W + ΔW as separate n x k tensors,
                            one F.linear, plain autograd
  seed-code-style           the released JumpLoRA code's pattern: delta_W = B A, JumpReLU as
                            two autograd Functions (the positive and the negative side),
                            the interpolation f J + (1 - f) Z, and x @ delta_W^T as a second
                            full GEMM next to the base layer
  PEFT LoRA                 peft's LoRA layer at the same rank (no gating)
  + ELLA fused              JumpLoRALinear (weight) with a W_past: the training forward runs
                            fastcur.ops.jump_linear_ella (penalty from the layer's Z tiles, its
                            gradient inside the layer's backward contraction); returns y + p
  + ELLA separate           the same layer and penalty as two ops (jump_linear, then
                            ella_penalty: a second walk over Z tiles forward and backward)
Shape fields: M tokens, n out features, k in features, r rank.
"""
from __future__ import annotations

import math
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

FOCUS = "JumpLoRALinear (weight)"
RANK_GATE = "JumpLoRALinear (rank)"
ELLA_FUSED = "+ ELLA fused"
ELLA_SEPARATE = "+ ELLA separate"
ALPHA = 32.0
F_VALUE = 1.0
BANDWIDTH = 1e-3


def _draw_adapter(g: torch.Generator, shape: dict) -> tuple:
    """A [r, k], B [n, r]: a trained-looking adapter (nonzero B)."""
    n, k, r = shape["n"], shape["k"], shape["r"]
    A = torch.randn(r, k, generator=g) / math.sqrt(k)
    B = torch.randn(n, r, generator=g) * 0.02
    return A, B


_DATA = providers.SeededLinear(_draw_adapter)      # W, b, x, A, B


def _jump_module(case: Case, gate: str):
    import fastcur

    lin, x = _DATA.linear(case)
    r = case.shape["r"]
    _, _, _, A, B = _DATA.host(case)
    module = fastcur.JumpLoRALinear.from_linear(lin, rank=r, alpha=ALPHA, gate=gate, f=F_VALUE,
                                                bandwidth=BANDWIDTH)
    with torch.no_grad():
        module.lora_A.weight.copy_(A)
        module.lora_B.weight.copy_(B)
        if gate == "weight":
            fastcur.reset_thresholds([module])
        else:   # θ_j at the median of h_j: half of each rank channel passes
            h = x.detach()[:256] @ module.lora_A.weight.T
            module.threshold.log_theta.copy_(h.median(0).values.clamp_min(1e-6).log())
    return module, x


def _with_w_past(case: Case):
    module, x = _jump_module(case, "weight")
    g = torch.Generator().manual_seed(case.seed + 1)
    module.set_w_past(torch.randn(module.weight.shape, generator=g) * 0.01)
    return module, x


def ella_fused(case: Case) -> Prepared:
    module, x = _with_w_past(case)

    def forward():
        y = module(x)
        return y + module.ella_penalty()      # the value the forward computed with the layer

    return Prepared(forward, leaves=_trainable(module, x, case), note="jump_linear_ella")


def ella_separate(case: Case) -> Prepared:
    import fastcur

    module, x = _with_w_past(case)
    W, b, A, B, lt = (module.weight, module.bias, module.lora_A.weight, module.lora_B.weight,
                      module.threshold.log_theta)
    s, Wp = module.scaling, module.W_past

    def forward():
        y = fastcur.ops.jump_linear(x, W, b, A, B, lt, s, F_VALUE, BANDWIDTH)
        return y + fastcur.ops.ella_penalty(A, B, lt, Wp, s)

    return Prepared(forward, leaves=_trainable(module, x, case), note="jump_linear + ella_penalty")


def _trainable(module, x, case):
    return providers.train_leaves(case, x, module.lora_A.weight, module.lora_B.weight, module.threshold.log_theta)


def _jump(case: Case, gate: str) -> Prepared:
    from fastcur.backend import resolve

    module, x = _jump_module(case, gate)
    op = "jump_linear" if gate == "weight" else "jump_rank_linear"
    return Prepared(lambda: module(x), leaves=_trainable(module, x, case),
                    note=f"backend={resolve(op, case.device)}")


def jump_weight(case: Case) -> Prepared:
    return _jump(case, "weight")


def jump_rank(case: Case) -> Prepared:
    return _jump(case, "rank")


def reference_unfused(case: Case) -> Prepared:
    from fastcur.ops import reference

    module, x = _jump_module(case, "weight")
    W, b, A, B, lt = (module.weight, module.bias, module.lora_A.weight, module.lora_B.weight,
                      module.threshold.log_theta)
    s = module.scaling
    return Prepared(lambda: reference.jump_linear(x, W, b, A, B, lt, s, F_VALUE, BANDWIDTH),
                    leaves=_trainable(module, x, case))


def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLUFunction(torch.autograd.Function):
    """The released code's JumpReLU: z 1[z > θ], straight-through θ gradient (mean)."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        z_grad = (z > threshold).to(z.dtype) * grad
        t_grad = (-(threshold / bw) * _rect((z - threshold) / bw) * grad).mean()
        return z_grad, t_grad, None


class _NegJumpReLUFunction(torch.autograd.Function):
    """The negative side: z 1[z < −θ], straight-through θ gradient (mean)."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z < -threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        z_grad = (z < -threshold).to(z.dtype) * grad
        t_grad = ((threshold / bw) * _rect((-z - threshold) / bw) * grad).mean()
        return z_grad, t_grad, None


def seed_code_style(case: Case) -> Prepared:
    module, x = _jump_module(case, "weight")
    W, b, A, B, lt = (module.weight, module.bias, module.lora_A.weight, module.lora_B.weight,
                      module.threshold.log_theta)
    s = module.scaling

    def forward():
        delta_W = B @ A
        theta = lt.exp()
        jumped = (_JumpReLUFunction.apply(delta_W, theta, BANDWIDTH)
                  + _NegJumpReLUFunction.apply(delta_W, theta, BANDWIDTH))
        delta_W = F_VALUE * jumped + (1 - F_VALUE) * delta_W
        return F.linear(x, W, b) + x @ (s * delta_W).T

    return Prepared(forward, leaves=_trainable(module, x, case),
                    note="delta_W = B A, two JumpReLU Functions, second full GEMM")


def peft_lora(case: Case) -> Prepared:
    return providers.peft_adapter(case, *_DATA.linear(case), alpha=ALPHA)


FULL_SHAPES = [(M, nk, nk, r) for M in (512, 2048) for nk in (1024, 2048, 4096) for r in (8, 16)]
QUICK_SHAPES = [(512, 1024, 1024, 8), (2048, 2048, 2048, 8)]

BENCHMARK = Benchmark(
    name="jumplora",
    description="JumpLoRA linear layer y = x (W + ΔW)^T + b, ΔW = s (f J(B A) + (1-f) B A) "
                "(docs/methods.md, JumpLoRA), x [M, k], W [n, k], rank r; rank-gated variant alongside",
    providers={
        FLOOR: _DATA.floor,
        FOCUS: jump_weight,
        RANK_GATE: jump_rank,
        REFERENCE: reference_unfused,
        SEED_CODE: seed_code_style,
        PEFT_LORA: peft_lora,
        ELLA_FUSED: ella_fused,
        ELLA_SEPARATE: ella_separate,
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
    details={"bias": True, "alpha": ALPHA, "f": F_VALUE, "bandwidth": BANDWIDTH,
             "theta": "exact reset (weight gate); per-channel median of h (rank gate)"},
)


if __name__ == "__main__":
    sys.exit(run_script("jumplora"))
