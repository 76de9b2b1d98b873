"""Benchmark of the LaLoRA ops and regularizer (docs/methods.md, LaLoRA) against the ways people write them today.

    fastcur bench lalora [--quick] [--dtype float32] [--wait-idle 60] ...
    python benchmarks/bench_lalora.py [same arguments]

One benchmark, four workloads, picked by the shape field `part` (the other fields are that
workload's sizes; unused ones are 0). Every row's "vs floor" is fastcur's time over the
baseline's (below 1 = fastcur faster); the mode is always "fwd" (one call of the workload).

  part 1  Fisher accumulation: E examples of T tokens, layer n x k, rank r.
          baseline   torch.func: vmap over grad of each example's loss term
                     <G_e, s (X_e A^T) B^T>, then squares summed over examples (holds every
                     example's gradients and the vmapped [E, T, n] forward at once)
          fastcur    fastcur.ops.lora_fisher_diag (on the CPU, one example at a time per
                     thread on the row kernels, each gradient squared where it is formed; on
                     CUDA, grouped batched GEMMs + one-pass square-accumulate; memory
                     independent of E)
  part 2  Fused penalty + gradient over L tensors of n x r (here n = 1024, r = 16).
          baseline   eager Python loop: per tensor d = p - a; g += lam q d; total += (q d d).sum()
          fastcur    fastcur.ops.laplace_diag_penalty_grad_ (one multi-tensor pass)
  part 3  One training step (forward, backward, SGD step) of a 4-layer stack of LoRALinear
          n x k rank r on E*T tokens.
          baseline   plain LoRA step
          fastcur    the same step plus LaplaceRegularizer(kind="diag").add_penalty_grad_()
          fastcur (autograd penalty)   the same step with loss + reg.penalty()
  part 4  K-FAC factor accumulation x^T x for x [E*T, k] (float32 sums).
          baseline   x.float().T @ x.float() (the whole input upcast at once)
          fastcur    fastcur.ops.kfac_factor (row chunks, ATen GEMM with beta = 1)
"""
from __future__ import annotations

import sys

import torch
from torch import nn

if __package__ in (None, ""):          # run as a script: use the installed package's runner
    from fastcur.benchmarks.runner import Benchmark, Case, Prepared, Skip, run_script
else:
    from .runner import Benchmark, Case, Prepared, Skip, run_script

FLOOR = "baseline"
FOCUS = "fastcur"
AUTOGRAD = "fastcur (autograd penalty)"


def _gen(case: Case, offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(case.seed + offset)


def _t(case: Case, *shape, scale=1.0, offset=0):
    return (torch.randn(*shape, generator=_gen(case, offset)) * scale).to(device=case.device, dtype=case.dtype)


def _fisher_inputs(case: Case):
    s = case.shape
    E, T, n, k, r = s["E"], s["T"], s["n"], s["k"], s["r"]
    return (_t(case, E, T, k, offset=1), _t(case, E, T, n, offset=2), _t(case, r, k, scale=k ** -0.5, offset=3),
            _t(case, n, r, scale=0.02, offset=4))


def _penalty_inputs(case: Case):
    s = case.shape
    L, n, r = s["L"], s["n"], s["r"]
    params = [_t(case, n, r, offset=10 + i) for i in range(L)]
    anchors = [p + 0.01 * _t(case, n, r, offset=1000 + i) for i, p in enumerate(params)]
    precisions = [_t(case, n, r, offset=2000 + i).abs() for i in range(L)]
    grads = [torch.zeros_like(p) for p in params]
    return grads, params, anchors, precisions


def _stack(case: Case):
    import fastcur

    s = case.shape
    torch.manual_seed(case.seed)
    layers = [fastcur.LoRALinear(s["k"], s["n"], rank=s["r"], alpha=float(s["r"])) for _ in range(4)]
    model = nn.Sequential(*layers).to(device=case.device, dtype=case.dtype)
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.weight.normal_(0, 0.01)
    x = _t(case, s["E"], s["T"], s["k"], offset=5)
    y = _t(case, s["E"], s["T"], s["n"], offset=6)
    return model, x, y


def _step_fn(case: Case, mode: str):
    import fastcur

    model, x, y = _stack(case)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4)
    reg = None
    if mode != "plain":
        reg = fastcur.LaplaceRegularizer(model, kind="diag", lam=0.5)
        reg.fit([(x[:2], y[:2])], lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), progress=False)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = ((model(x) - y) ** 2).mean()
        if mode == "autograd":
            loss = loss + reg.penalty()
        loss.backward()
        if mode == "fused":
            reg.add_penalty_grad_()
        opt.step()
        return loss.detach()

    return step


def baseline(case: Case) -> Prepared:
    part = case.shape["part"]
    if part == 1:
        from torch.func import grad, vmap

        x, go, A, B = _fisher_inputs(case)
        s = 0.5

        def example(A, B, xe, ge):
            return (ge * (s * (xe @ A.mT) @ B.mT)).sum()

        per_example = vmap(grad(example, argnums=(0, 1)), in_dims=(None, None, 0, 0))

        def forward():
            gA, gB = per_example(A, B, x, go)
            return torch.cat([gA.float().square().sum(0).flatten(), gB.float().square().sum(0).flatten()])

        return Prepared(forward, note="torch.func vmap(grad)")
    if part == 2:
        grads, params, anchors, precisions = _penalty_inputs(case)
        lam = 0.3

        def forward():
            total = torch.zeros((), dtype=torch.float32, device=case.device)
            for g, p, a, q in zip(grads, params, anchors, precisions):
                d = p - a
                g.add_(lam * q * d)
                total += (q * d * d).sum()
            return total * (0.5 * lam)

        return Prepared(forward, note="eager loop")
    if part == 3:
        return Prepared(_step_fn(case, "plain"), note="plain LoRA step")
    if part == 4:
        s = case.shape
        x = _t(case, s["E"] * s["T"], s["k"], offset=7)

        def forward():
            xf = x.float()
            return xf.T @ xf

        return Prepared(forward, note="x.float().T @ x.float()")
    raise Skip(f"unknown part {part}")


def fastcur_provider(case: Case) -> Prepared:
    import fastcur
    from fastcur.backend import resolve

    part = case.shape["part"]
    if part == 1:
        x, go, A, B = _fisher_inputs(case)

        def forward():
            FA, FB = fastcur.ops.lora_fisher_diag(x, go, A, B, 0.5)
            return torch.cat([FA.flatten(), FB.flatten()])

        return Prepared(forward, note=f"backend={resolve('lora_fisher_diag', case.device)}")
    if part == 2:
        grads, params, anchors, precisions = _penalty_inputs(case)
        return Prepared(lambda: fastcur.ops.laplace_diag_penalty_grad_(grads, params, anchors, precisions, 0.3),
                        note=f"backend={resolve('laplace_diag_penalty_grad_', case.device)}")
    if part == 3:
        return Prepared(_step_fn(case, "fused"), note="add_penalty_grad_ after backward")
    if part == 4:
        s = case.shape
        x = _t(case, s["E"] * s["T"], s["k"], offset=7)
        return Prepared(lambda: fastcur.ops.kfac_factor(x), note=f"backend={resolve('kfac_factor', case.device)}")
    raise Skip(f"unknown part {part}")


def autograd_penalty(case: Case) -> Prepared:
    if case.shape["part"] != 3:
        raise Skip("only the training step (part 3)")
    return Prepared(_step_fn(case, "autograd"), note="loss + reg.penalty()")


FIELDS = ("part", "E", "T", "n", "k", "r", "L")
SHAPES = [
    (1, 32, 128, 1024, 1024, 16, 0),      # the Fisher target case
    (1, 8, 512, 4096, 1024, 16, 0),
    (2, 0, 0, 1024, 0, 16, 200),          # the penalty target case
    (2, 0, 0, 4096, 0, 64, 50),
    (3, 8, 256, 1024, 1024, 16, 0),       # the training-step target
    (4, 32, 128, 0, 1024, 0, 0),
    (4, 32, 128, 0, 4096, 0, 0),
]
QUICK = [SHAPES[0], SHAPES[2], SHAPES[4], SHAPES[5]]

BENCHMARK = Benchmark(
    name="lalora",
    description="LaLoRA (docs/methods.md, LaLoRA): Fisher accumulation, fused penalty + gradient, regularized step, K-FAC factors; "
                "vs floor = fastcur time / baseline time",
    providers={FLOOR: baseline, FOCUS: fastcur_provider, AUTOGRAD: autograd_penalty},
    floor=FLOOR,
    focus=FOCUS,
    shape_fields=FIELDS,
    shapes=SHAPES,
    quick_shapes=QUICK,
    dtypes=("float32", "bfloat16"),
    quick_dtypes=("float32",),
    modes=("fwd",),
    details={"scale": 0.5, "lam": 0.3, "step_layers": 4, "optimizer": "SGD"},
)


if __name__ == "__main__":
    sys.exit(run_script("lalora"))
