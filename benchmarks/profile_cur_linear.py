"""Where the time of CURLoRALinear goes, piece by piece, against frozen nn.Linear (CPU).

    python benchmarks/profile_cur_linear.py [--shape 2048,2048,2048,16] [--dtype float32]
                                            [--threads 2] [--reps 15] [--profiler] [--wait-idle S]

Times (median of --reps after warm-up, pieces interleaved round-robin as the runner does) the
parts the C++ CPU kernel is made of (csrc/cur_linear.h: base GEMM, tied gather, r x r GEMM,
the rank-(r+1) update GEMM into the output; the same in the backward) next to the whole
op, the module, and the floor, so a gap to the floor can be pinned on one piece. With
--profiler it also prints torch.profiler's per-op table for one module fwd+bwd.
Not part of `fastcur bench` (the runner only picks up bench_*.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fastcur
from fastcur.benchmarks.runner import DTYPES, OthersMonitor, cpu_model, machine_lock, wait_until_idle


def _timeit(fns: dict, reps: int, warmup: float = 0.5) -> dict:
    for fn in fns.values():
        t0 = time.perf_counter()
        calls = 0
        while calls < 3 or time.perf_counter() - t0 < warmup:
            fn()
            calls += 1
    samples = {k: [] for k in fns}
    names = list(fns)
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="2048,2048,2048,16", help="M,n,k,r")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--profiler", action="store_true")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for other processes to go quiet first")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    M, n, k, r = (int(v) for v in args.shape.split(","))
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(k, n).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
    lin.requires_grad_(False)
    floor_lin = torch.nn.Linear(k, n).to(dtype).requires_grad_(False)
    with torch.no_grad():
        floor_lin.weight.copy_(lin.weight)
        floor_lin.bias.copy_(lin.bias)
    mod = fastcur.CURLoRALinear.from_linear(lin, rank=r, seed=0)
    with torch.no_grad():
        mod.U.copy_(torch.randn(r, r, generator=g).to(dtype) * 0.02)
    W, b, C, U, R, rows, cols = mod.weight, mod.bias, mod.C, mod.U.detach(), mod.R, mod.rows, mod.cols
    x = torch.randn(M, k, generator=g).to(dtype)
    dy = torch.randn(M, n, generator=g).to(dtype)
    y = x @ W.t()
    h = y[:, rows].contiguous()
    z = h @ U.t()
    dx = dy @ W
    gg = dx[:, cols].contiguous()
    xg = x.clone().requires_grad_(True)
    xf = x.clone().requires_grad_(True)
    ones = torch.ones(M, 1, dtype=dtype)
    op = torch.ops.fastcur.cur_linear.default
    op_bwd = torch.ops.fastcur.cur_linear_bwd.default
    _, h_op = op(x, W, b, C, U, R, 1.0, rows, cols)

    def module_step():
        xg.grad = None
        mod.U.grad = None
        mod(xg).backward(dy)

    def floor_step():
        xf.grad = None
        floor_lin(xf).backward(dy)

    pieces = {
        # floor
        "floor fwd: F.linear (addmm with bias)": lambda: F.linear(x, W, b),
        "floor bwd: dy @ W": lambda: dy @ W,
        "floor fwd: nn.Linear module, autograd on": lambda: floor_lin(xf),
        "floor fwd+bwd (nn.Linear, autograd)": floor_step,
        # forward pieces of the cpp kernel
        "fwd: base mm x @ W^T (no bias)": lambda: x @ W.t(),
        "fwd: gather y[:, rows]": lambda: y.index_select(1, rows),
        "fwd: h @ U^T (M x r x r)": lambda: h @ U.t(),
        "fwd: cat [z|1], cat [C^T;b]": lambda: (torch.cat([z, ones], 1), torch.cat([C.t().mul(1.0), b[None]], 0)),
        "fwd: y.addmm_([z|1], [C^T;b]) (rank r+1)": lambda: y.addmm_(torch.cat([z, ones], 1),
                                                                    torch.cat([C.t().mul(1.0), b[None]], 0)),
        "fwd: y.add_(b) (a bias pass, for scale)": lambda: y.add_(b),
        "fwd: whole op fastcur::cur_linear": lambda: op(x, W, b, C, U, R, 1.0, rows, cols),
        "fwd: fastcur.ops.cur_linear (checks + op)": lambda: fastcur.ops.cur_linear(x, W, b, C, U, R, 1.0,
                                                                                   rows=rows, cols=cols),
        "fwd: CURLoRALinear module, autograd on": lambda: mod(xg),
        # backward pieces
        "bwd: base mm dy @ W": lambda: dy @ W,
        "bwd: gather dx[:, cols]": lambda: dx.index_select(1, cols),
        "bwd: dx.addmm_(g U, R) (rank r)": lambda: dx.addmm_(gg @ U, R),
        "bwd: dU = g^T h": lambda: gg.t() @ h,
        "bwd: whole op fastcur::cur_linear_bwd": lambda: op_bwd(dy, x, W, C, U, R, h_op, 1.0, cols, True),
        # the module as trained
        "CURLoRALinear fwd+bwd (module, autograd)": module_step,
    }
    with machine_lock():              # take turns with fastcur runners on this machine
        if args.wait_idle > 0:
            wait_until_idle(args.wait_idle)
        monitor = OthersMonitor().start()
        times = _timeit(pieces, args.reps)
        others = monitor.stop()
    print(f"cur_linear pieces: M={M} n={n} k={k} r={r} {args.dtype}, {args.threads} threads, "
          f"{cpu_model()}, torch {torch.__version__}, median of {args.reps}; other processes used "
          f"{'?' if others is None else f'{others:.0%}'} of the cores meanwhile")
    floor = times["floor fwd+bwd (nn.Linear, autograd)"]
    for name, ms in times.items():
        print(f"  {name:<45s} {ms:9.3f} ms   {ms / floor * 100:6.1f} % of floor fwd+bwd")
    f_sum = times["fwd: base mm x @ W^T (no bias)"] + times["fwd: gather y[:, rows]"] + \
        times["fwd: h @ U^T (M x r x r)"] + times["fwd: y.addmm_([z|1], [C^T;b]) (rank r+1)"]
    b_sum = times["bwd: base mm dy @ W"] + times["bwd: gather dx[:, cols]"] + \
        times["bwd: dx.addmm_(g U, R) (rank r)"] + times["bwd: dU = g^T h"]
    print(f"  sum of fwd pieces {f_sum:.3f} ms, of bwd pieces {b_sum:.3f} ms; "
          f"module / floor = {times['CURLoRALinear fwd+bwd (module, autograd)'] / floor:.3f}x")

    if args.profiler:
        from torch.profiler import ProfilerActivity, profile

        module_step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                module_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        floor_step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                floor_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
