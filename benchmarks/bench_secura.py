"""Benchmarks of SECURA (docs/methods.md, SECURA): the SecuraLinear layer, and the signorm / signorm_merge ops alone.

    fastcur bench secura [--quick] [--dtype float32] [--shapes 2048,2048,2048,16,64] ...
    fastcur bench secura:signorm [--shapes 2048,4096]
    fastcur bench secura:signorm_merge [--shapes 4096,4096,16]
    python benchmarks/bench_secura.py [same arguments]

`secura` providers (a layer `y = signorm(x W^T + b, Δ(x))` with a bias, W frozen, rank r,
inner rank a, a nonzero B_c as after some training):
  nn.Linear (frozen)    the floor: the base GEMMs alone
  SecuraLinear          fastcur's module, auto backend, tied fast path, scope "token"
  reference (unfused)   fastcur.ops.reference.secura_linear: F.linear, four small GEMMs, and
                        SigNorm as separate eager passes, plain autograd
  seed-code-style       the released SECURA code's forward: builds ΔW = C (A_c^T B_c^T) R
                        (n x k) in every forward, two full GEMMs (x W^T + b and x ΔW^T), then
                        SigNorm over the whole tensor with eager ops (norm "raw" as the code)
  PEFT DoRA             peft LoraConfig(use_dora=True) at rank r (the paper's main competitor)
  PEFT LoRA             peft LoRA at rank r
`secura:signorm` (shape M, n): fastcur.ops.signorm vs the eager composite, fwd+bwd in y0, Δ.
`secura:signorm_merge` (shape n, k, r): fastcur.ops.signorm_merge vs the eager composite
(ΔW = s C U R materialized, the ratio matrix and S_w as n x k temporaries).
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

if __package__ in (None, ""):          # run as a script: use the installed package's runner
    from fastcur.benchmarks import providers
    from fastcur.benchmarks.providers import FLOOR, PEFT_DORA, PEFT_LORA, REFERENCE, SEED_CODE
    from fastcur.benchmarks.runner import Benchmark, Case, Prepared, run_script
else:
    from . import providers
    from .providers import FLOOR, PEFT_DORA, PEFT_LORA, REFERENCE, SEED_CODE
    from .runner import Benchmark, Case, Prepared, run_script

FOCUS = "SecuraLinear"
_DATA = providers.SeededLinear()        # W, b, x


def _secura_module(case: Case, **options):
    import fastcur

    lin, x = _DATA.linear(case)
    module = fastcur.SecuraLinear.from_linear(lin, rank=case.shape["r"], inner_rank=case.shape["a"], **options)
    g = torch.Generator().manual_seed(case.seed + 5)
    with torch.no_grad():  # a nonzero adapter, as after some training
        module.B_c.copy_((torch.randn(module.B_c.shape, generator=g) * 0.02).to(module.B_c.dtype))
    return module, x


def secura_linear(case: Case) -> Prepared:
    from fastcur.backend import resolve

    module, x = _secura_module(case)
    note = f"backend={resolve('secura_linear', case.device)}, {'tied' if module.tied else 'explicit C, R'}"
    return Prepared(lambda: module(x), leaves=providers.train_leaves(case, x, module.A_c, module.B_c), note=note)


def reference_unfused(case: Case) -> Prepared:
    from fastcur.ops import reference

    m, x = _secura_module(case)
    return Prepared(lambda: reference.secura_linear(x, m.weight, m.bias, m.C, m.A_c, m.B_c, m.R, None, 1.0),
                    leaves=providers.train_leaves(case, x, m.A_c, m.B_c))


def seed_code_style(case: Case) -> Prepared:
    m, x = _secura_module(case)
    W, b, C, R, A, B = m.weight, m.bias, m.C, m.R, m.A_c, m.B_c

    def forward():
        # The released code's pattern: ΔW rebuilt (n x k) per call, two full GEMMs, SigNorm
        # over the whole tensor in eager ops, S detached, norm "raw".
        delta_w = C @ (A.T @ B.T) @ R
        y0 = F.linear(x, W, b)
        d = F.linear(x, delta_w)
        with torch.no_grad():
            L = d.abs() / (y0.abs() + 1e-10)
            S = 2 - torch.sigmoid(6.0 * L)
            S = torch.where(L.max() == 0, torch.full_like(S, 2.0), S)
        return (y0 + (y0 + d)) / S

    return Prepared(forward, leaves=providers.train_leaves(case, x, A, B),
                    note="ΔW = C A^T B^T R per call, 2 full GEMMs, eager SigNorm")


def peft_dora(case: Case) -> Prepared:
    return providers.peft_adapter(case, *_DATA.linear(case), alpha=case.shape["r"], dora=True)


def peft_lora(case: Case) -> Prepared:
    return providers.peft_adapter(case, *_DATA.linear(case), alpha=case.shape["r"])


BENCHMARK = Benchmark(
    name="secura",
    description="SECURA layer y = signorm(x W^T + b, s (((x R^T) B_c) A_c) C^T) (docs/methods.md, SECURA), x [M, k], W [n, k], "
                "rank r, inner rank a",
    providers={FLOOR: _DATA.floor, FOCUS: secura_linear, REFERENCE: reference_unfused, SEED_CODE: seed_code_style,
               PEFT_DORA: peft_dora, PEFT_LORA: peft_lora},
    floor=FLOOR,
    focus=FOCUS,
    baselines=(SEED_CODE, PEFT_DORA, PEFT_LORA),
    shape_fields=("M", "n", "k", "r", "a"),
    shapes=[(M, nk, nk, r, 4 * r) for M in (512, 2048) for nk in (1024, 2048, 4096) for r in (8, 16)],
    quick_shapes=[(512, 1024, 1024, 16, 64), (2048, 2048, 2048, 16, 64)],
    dtypes=("float32", "bfloat16"),
    quick_dtypes=("float32",),
    modes=("fwd", "fwd+bwd"),
    flops=providers.linear_flops,
    details={"bias": True, "scale": 1.0, "norm": "max", "scope": "token", "peft_autocast_adapter_dtype": False},
)


# -- signorm alone ------------------------------------------------------------------------------
EAGER = "eager composite"
FASTCUR_SIGNORM = "fastcur.ops.signorm"


def _signorm_inputs(case: Case):
    M, n = case.shape["M"], case.shape["n"]
    g = torch.Generator().manual_seed(case.seed)
    y0 = torch.randn(M, n, generator=g).to(device=case.device, dtype=case.dtype)
    d = (torch.randn(M, n, generator=g) * 0.05).to(device=case.device, dtype=case.dtype)
    return y0.requires_grad_(case.requires_grad), d.requires_grad_(case.requires_grad)


def signorm_eager(case: Case) -> Prepared:
    y0, d = _signorm_inputs(case)

    def forward():
        with torch.no_grad():
            L = d.float().abs() / (y0.float().abs() + 1e-10)
            mx = L.amax(dim=-1, keepdim=True)
            S = 2 - torch.sigmoid(6.0 * (L / (mx + 1e-10) - 0.5))
            S = torch.where(mx == 0, torch.full_like(S, 2.0), S)
        return ((y0 + (y0 + d)) / S).to(y0.dtype)

    return Prepared(forward, leaves=providers.train_leaves(case, y0, d))


def signorm_fastcur(case: Case) -> Prepared:
    import fastcur
    from fastcur.backend import resolve

    y0, d = _signorm_inputs(case)
    return Prepared(lambda: fastcur.ops.signorm(y0, d), leaves=providers.train_leaves(case, y0, d),
                    note=f"backend={resolve('signorm', case.device)}")


SIGNORM = Benchmark(
    name="secura_signorm",
    description="signorm(y0, delta) alone, scope token (docs/methods.md, SECURA), y0, delta [M, n]",
    providers={EAGER: signorm_eager, FASTCUR_SIGNORM: signorm_fastcur},
    floor=EAGER, focus=FASTCUR_SIGNORM, shape_fields=("M", "n"),
    shapes=[(512, 4096), (2048, 4096), (4096, 4096)], quick_shapes=[(2048, 4096)],
    dtypes=("float32", "bfloat16"), quick_dtypes=("float32",), modes=("fwd", "fwd+bwd"),
)


# -- signorm_merge alone ------------------------------------------------------------------------
FASTCUR_MERGE = "fastcur.ops.signorm_merge"


def _merge_inputs(case: Case):
    n, k, r = case.shape["n"], case.shape["k"], case.shape["r"]
    g = torch.Generator().manual_seed(case.seed)
    t = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(device=case.device, dtype=case.dtype)  # noqa: E731
    return t(n, k, sc=1 / math.sqrt(k)), t(n, r, sc=1 / math.sqrt(k)), t(r, r, sc=0.1), t(r, k, sc=1 / math.sqrt(k))


def merge_eager(case: Case) -> Prepared:
    W, C, U, R = _merge_inputs(case)

    def forward():
        with torch.no_grad():
            dW = C.float() @ U.float() @ R.float()
            Wf = W.float()
            L = dW.abs() / (Wf.abs() + 1e-10)
            mx = L.amax(dim=1, keepdim=True)
            S = 2 - torch.sigmoid(6.0 * (L / (mx + 1e-10) - 0.5))
            S = torch.where(mx == 0, torch.full_like(S, 2.0), S)
            return ((Wf + (Wf + dW)) / S).to(W.dtype)

    return Prepared(forward)


def merge_fastcur(case: Case) -> Prepared:
    import fastcur
    from fastcur.backend import resolve

    W, C, U, R = _merge_inputs(case)

    def forward():
        with torch.no_grad():
            return fastcur.ops.signorm_merge(W, C, U, R)

    return Prepared(forward, note=f"backend={resolve('signorm_merge', case.device)}")


SIGNORM_MERGE = Benchmark(
    name="secura_signorm_merge",
    description="signorm_merge(W, C, U, R) alone, scope row (docs/methods.md, SECURA), W [n, k], rank r",
    providers={EAGER: merge_eager, FASTCUR_MERGE: merge_fastcur},
    floor=EAGER, focus=FASTCUR_MERGE, shape_fields=("n", "k", "r"),
    shapes=[(2048, 2048, 16), (4096, 4096, 16), (4096, 4096, 64)], quick_shapes=[(4096, 4096, 16)],
    dtypes=("float32", "bfloat16"), quick_dtypes=("float32",), modes=("infer",),
)

BENCHMARKS = {"signorm": SIGNORM, "signorm_merge": SIGNORM_MERGE}


if __name__ == "__main__":
    sys.exit(run_script("secura", BENCHMARKS))
