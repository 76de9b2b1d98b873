"""The learning-rate rule of `fastcur continual`: from a small grid per parameterization family, the
smallest rate that learns nearly as well as the best, on a validation split of the tasks' training
data.

The papers' learning rates are for 1.5-8 B models and thousands of steps (CURLoRA's released runs:
2.5e-4) and none transfers to the benchmark's 0.5 M-parameter base and 100 steps per task. So every
method gets the rate of its family, chosen the same way for each family:

- family representatives: `seq` (full weights), `lora` (LoRA-style A/B: also lora-er, lora-ewc,
  lalora-*, jumplora-*, imsm-lora), `curlora` (an r x r core between fixed C and R), `secura`
  (CABR: A/B between C and R, SigNorm; also secura-released);
- for each rate of the family's grid and each built-in task: a fresh copy of the base trained on
  that task alone with the run's recipe (steps, batch, warm-up, cosine decay, clipping) on the
  training examples but the last `n_val`, then scored on those last `n_val` (never the test set);
- the family's rate is the smallest one whose mean validation accuracy over the tasks is at
  least `TOLERANCE` (90 %) of the family's best mean.

The rule looks at plasticity only (how well a task is learnt: never at retention, which is what
the benchmark then measures), as the papers tune their rates for task accuracy. It takes the
smallest rate that learns nearly as well as the best one rather than the best one itself,
because near the top of the grid validation accuracy is flat while the damage to the base grows
steeply: on the quick base LoRA at 1e-2 (the best mean, 96.2 %) learnt the sequence no better
than at 3e-3 (89.1 %) but kept 0.16 of the base's facts against 0.60. Methods are compared at
rates that learn about equally well.

    fastcur continual-lr-grid --out benchmarks/results/continual-lr-grid     # results.json + report.md
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time

import torch

GRIDS = {   # each family's best sits inside its grid (a first grid that ended at 1e-2 / 3e-2 had
            # LoRA's and the CUR families' best at its top)
    "seq": (1e-4, 3e-4, 1e-3, 3e-3),
    "lora": (1e-3, 3e-3, 1e-2, 3e-2),
    "curlora": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
    "secura": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
}
N_VAL = 64
TOLERANCE = 0.9   # a family's rate: the smallest whose mean validation accuracy is >= 90 % of its best


def _score(cfg, family: str, lr: float, n_val: int) -> dict:
    """Validation accuracy of `family` at `lr` on each built-in task trained alone from the base."""
    from . import evaluate
    from .methods import MethodContext, build_method
    from .runner import load_bench, seed_everything, train_task

    bench = load_bench(cfg)
    device = torch.device(cfg.device)
    accuracy = {}
    for index, task in enumerate(bench.tasks):
        if len(task.train) <= n_val:
            raise ValueError(f"task {task.name!r} has {len(task.train)} training examples; the grid keeps "
                             f"the last {n_val} for validation and needs more (--n-train)")
        fit = copy.copy(task)
        fit.train, val = task.train[:-n_val], task.train[-n_val:]

        def make_batch(examples):
            batch = evaluate.training_batch(examples, bench.tokenizer, cfg.max_len)
            return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels", "prompt_lengths")}

        model = copy.deepcopy(bench.model)
        ctx = MethodContext(make_batch=make_batch, pretraining=bench.pretraining, steps=cfg.steps,
                            batch_size=cfg.batch_size, seed=cfg.seed)
        seed_everything(cfg.seed, "setup")
        method = build_method(family)
        method.lr = lr
        method.setup(model, ctx)
        train_task(method, model, fit, index, ctx, device=device)
        accuracy[task.name] = float(evaluate.accuracy(method.evaluation_model(), val, bench.tokenizer, batch_size=64))
    return {"family": family, "lr": lr, "accuracy": accuracy, "mean": sum(accuracy.values()) / len(accuracy)}


def _init(threads: int) -> None:
    torch.set_num_threads(threads)


def run_grid(cfg, grids: dict | None = None, n_val: int = N_VAL, workers: int = 1, progress: bool = True) -> dict:
    """Score every (family, rate) of `grids` (default GRIDS) with the resolved RunConfig `cfg`'s
    base, tasks and recipe; returns {"config", "n_val", "scores": [...], "best": {family: lr}}."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from tqdm.auto import tqdm

    from .runner import load_bench

    grids = GRIDS if grids is None else grids
    load_bench(cfg)   # pretrain (or load) the base once, before any worker needs it
    jobs = [(family, lr) for family, rates in grids.items() for lr in rates]
    start = time.perf_counter()
    with tqdm(total=len(jobs), desc="lr grid", disable=not progress, file=sys.stderr) as bar:
        if workers == 1:
            scores = []
            for family, lr in jobs:
                scores.append(_score(cfg, family, lr, n_val))
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init,
                                     initargs=(max(1, torch.get_num_threads() // workers),)) as pool:
                futures = [pool.submit(_score, cfg, family, lr, n_val) for family, lr in jobs]
                scores = []
                for future in futures:
                    scores.append(future.result())
                    bar.update(1)
    return {"config": {**cfg.identity(), "workers": workers}, "n_val": n_val, "seconds": time.perf_counter() - start,
            "scores": scores, "tolerance": TOLERANCE, "best": choose(scores)}


def choose(scores: list[dict], tolerance: float = TOLERANCE) -> dict:
    """{family: the smallest rate whose mean validation accuracy is at least `tolerance` times the
    family's best mean}, families in the order they first appear in `scores`."""
    best: dict = {}
    for s in scores:
        best[s["family"]] = max(best.get(s["family"], s["mean"]), s["mean"])
    return {family: min(s["lr"] for s in scores if s["family"] == family and s["mean"] >= tolerance * top)
            for family, top in best.items()}


def format_report(result: dict) -> str:
    """Markdown: one table per family (validation accuracy per task and mean), the chosen rate."""
    lines = ["# fastcur continual: learning-rate grid", "",
             f"Validation split: the last {result['n_val']} training examples of each task; each rate trains a "
             f"fresh copy of the base on each task alone ({result['config']['steps']} steps, batch "
             f"{result['config']['batch_size']}, warm-up, cosine decay, clipping). Chosen (bold): the smallest rate "
             f"whose mean is at least {100 * result.get('tolerance', TOLERANCE):.0f} % of the family's best mean.", ""]
    for family, lr in result["best"].items():
        rows = [s for s in result["scores"] if s["family"] == family]
        tasks = list(rows[0]["accuracy"])
        lines += [f"## {family} (chosen: {lr:g})", "", "| lr | " + " | ".join(tasks) + " | mean |",
                  "|---:|" + "---:|" * (len(tasks) + 1)]
        for s in rows:
            cells = " | ".join(f"{100 * s['accuracy'][t]:.1f}" for t in tasks)
            mark = " **" if s["lr"] == lr else " "
            lines.append(f"| {s['lr']:g} | {cells} |{mark}{100 * s['mean']:.1f}{mark.strip()} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .._atomic import atomic_write_text
    from .runner import RunConfig

    p = argparse.ArgumentParser(prog="fastcur continual-lr-grid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="continual-lr-grid", help="folder for results.json and report.md")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="steps per task (default: the quick mode's)")
    p.add_argument("--families", help=f"comma-separated subset of {', '.join(GRIDS)}")
    p.add_argument("--workers", type=int, default=None, help="processes (default: 2 on a CPU with 2+ threads)")
    p.add_argument("--cache-dir", help="where the pretrained built-in model is cached")
    p.add_argument("--size", choices=["tiny", "quick", "full"], help="the built-in model's size (default quick)")
    p.add_argument("--n-train", type=int, help="training examples per task, the validation split included")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    try:
        families = GRIDS if args.families is None else {f: GRIDS[f] for f in args.families.split(",")}
    except KeyError as exc:
        print(f"fastcur continual-lr-grid: error: unknown family {exc}; valid: {', '.join(GRIDS)}", file=sys.stderr)
        return 2
    cfg = RunConfig(methods=list(families), seed=args.seed, steps=args.steps, cache_dir=args.cache_dir,
                    out=args.out, size=args.size, n_train=args.n_train, progress=args.progress).resolved()
    workers = cfg.workers if args.workers is None else args.workers
    result = run_grid(cfg, families, workers=workers, progress=args.progress)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(result, indent=2) + "\n")
    report = format_report(result)
    atomic_write_text(os.path.join(args.out, "report.md"), report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
