"""`fastcur continual`: the continual-learning benchmark from the command line.

    fastcur continual --quick                        # every method, built-in model and tasks
    fastcur continual --methods lora,curlora --steps 100 --out runs/a
    fastcur continual --model ./my-llm --tasks a.jsonl b.jsonl --probe facts.jsonl --device cuda
    fastcur continual --out runs/a --resume          # continue an interrupted run
"""
from __future__ import annotations

import argparse
import os
import sys

from .methods import available_methods


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="quick", action="store_true", default=True,
                      help="the quick benchmark (default): small model and data, 100 steps per task")
    mode.add_argument("--full", dest="quick", action="store_false",
                      help="the full benchmark: larger model, more data, 300 steps per task")
    p.add_argument("--methods", default="all",
                   help=f"comma-separated methods or 'all' (default); valid: {', '.join(available_methods())}")
    p.add_argument("--model", dest="model_dir", metavar="DIR",
                   help="a local Hugging Face causal LM folder (with its tokenizer) instead of the built-in one")
    p.add_argument("--tasks", dest="task_files", nargs="+", metavar="FILE",
                   help="JSONL task files (one object per line: prompt, answer[, choices]), in training order")
    p.add_argument("--probe", dest="probe_file", metavar="FILE",
                   help="JSONL basic-knowledge probe (default: the built-in world's held-out questions)")
    p.add_argument("--steps", type=int, help="optimizer steps per task (default: 100 quick, 300 full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default="continual-results", metavar="DIR",
                   help="folder for results.json, the plots, report.md and the resumable state")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where the pretrained built-in model is cached (default: ~/.cache/fastcur/continual)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from each method's last completed task")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    small = p.add_argument_group("sizes (advanced; default: the mode's)")
    small.add_argument("--batch-size", type=int)
    small.add_argument("--max-len", type=int, default=192, help="tokens per training example (default 192)")
    small.add_argument("--n-train", type=int, help="training examples per built-in task")
    small.add_argument("--n-test", type=int, help="test examples per built-in task")
    small.add_argument("--n-probe", type=int, help="probe questions evaluated")
    small.add_argument("--n-heldout", type=int, help="held-out texts for perplexity")
    small.add_argument("--size", choices=["tiny", "quick", "full"],
                       help="size of the built-in model (tiny: tests and smoke runs only)")
    small.add_argument("--pretrain-steps", type=int, help="pretraining steps of the built-in model")


def _check_files(args) -> None:
    for opt, paths in (("--tasks", args.task_files or []), ("--probe", [args.probe_file] if args.probe_file else [])):
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{opt}: file not found: {path}")
    if args.model_dir is not None and not os.path.isdir(args.model_dir):
        raise FileNotFoundError(f"--model: directory not found: {args.model_dir}")


def config_from_args(args):
    from .methods import parse_methods
    from .runner import RunConfig

    _check_files(args)
    return RunConfig(methods=parse_methods(args.methods), quick=args.quick, steps=args.steps, seed=args.seed,
                     device=args.device, dtype=args.dtype, out=args.out, cache_dir=args.cache_dir,
                     model_dir=args.model_dir, task_files=args.task_files, probe_file=args.probe_file,
                     batch_size=args.batch_size, max_len=args.max_len, n_train=args.n_train, n_test=args.n_test,
                     n_probe=args.n_probe, n_heldout=args.n_heldout, pretrain_steps=args.pretrain_steps, size=args.size,
                     resume=args.resume, progress=args.progress).resolved()


def run_from_args(args) -> int:
    """Entry point of `fastcur continual`: 0 on success, 2 with a one-line error otherwise."""
    from .runner import run

    try:
        cfg = config_from_args(args)
        run(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fastcur continual: error: {exc}", file=sys.stderr)
        return 2
    print(f"results, plots and report in {os.path.abspath(cfg.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastcur continual", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
