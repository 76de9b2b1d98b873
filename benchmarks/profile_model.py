"""Where a whole-model training step's time goes, per method (the providers of bench_model.py).

    python benchmarks/profile_model.py [--shape B,T,d,L,r,V] [--reps 9] [--threads 1] [--top 12]
                                       [--providers NAME ...]

1. CPU seconds per step of this process (`time.process_time`), steps interleaved round-robin
   over the providers, median over reps and the paired ratio against PEFT LoRA (median over reps
   of the ratio of the two steps of the same rep). Process CPU time, unlike wall time, is not
   inflated by other processes waiting for the same cores, so on a shared machine it shows the
   work a step does (what it cannot hide: cache and memory-bandwidth contention).
2. torch.profiler over 3 steps per provider: the ops with the most self CPU time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

if __package__ in (None, ""):          # run as a script: use the installed package's runner
    from fastcur.benchmarks.bench_model import BENCHMARK, SIZES
    from fastcur.benchmarks.providers import PEFT_LORA
    from fastcur.benchmarks.runner import Case
else:
    from .bench_model import BENCHMARK, SIZES
    from .providers import PEFT_LORA
    from .runner import Case


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default=",".join(map(str, SIZES["cpu"]["shapes"][0])),
                   help=f"{','.join(BENCHMARK.shape_fields)} (default: --size cpu's)")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=12, help="profiler rows per provider (0: no profile)")
    p.add_argument("--providers", nargs="+", default=None, help="names containing one of these (and PEFT LoRA)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = dict(zip(BENCHMARK.shape_fields, (int(v) for v in args.shape.split(","))))
    case = Case(shape, torch.float32, torch.device("cpu"), "train")
    names = [n for n in BENCHMARK.providers if args.providers is None or n == PEFT_LORA
             or any(s.lower() in n.lower() for s in args.providers)]
    steps = {n: BENCHMARK.providers[n](case).forward for n in names}
    for step in steps.values():
        step(), step()                              # warm-up
    cpu = {n: [] for n in names}
    for rep in range(args.reps):
        shift = rep % len(names)
        for n in names[shift:] + names[:shift]:
            t0 = time.process_time()
            steps[n]()
            cpu[n].append(time.process_time() - t0)
    print(f"CPU seconds per step, {args.threads} thread(s), {args.reps} interleaved reps, shape {shape}")
    for n in names:
        paired = statistics.median(a / b for a, b in zip(cpu[n], cpu[PEFT_LORA]))
        print(f"  {n:22s} {statistics.median(cpu[n]) * 1e3:8.1f} ms   paired vs {PEFT_LORA}: {paired:.3f}x")
    if args.top > 0:
        from torch.profiler import ProfilerActivity, profile

        for n in names:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    steps[n]()
            print(f"\n== {n}: torch.profiler, 3 steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top,
                                            max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
