"""`fastcur continual`: the continual-learning benchmark from the command line.

    fastcur continual --quick                        # every method, one seed, built-in model and tasks
    fastcur continual --full                         # every method, 3 seeds, the larger built-in model
    fastcur continual --methods lora,curlora --steps 100 --seeds 2 --out runs/a
    fastcur continual --model ./my-llm --tasks a.jsonl b.jsonl --probe facts.jsonl --heldout text.txt
    fastcur continual --out runs/a --resume          # continue an interrupted run with its own options
"""
from __future__ import annotations

import argparse
import os
import sys

from .methods import available_methods


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options; every default is None ("not given"), resolved in `config_from_args`, so that
    --resume can tell which options the user gave."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="quick", action="store_const", const=True,
                      help="the quick benchmark (default): every method, one seed, 100 steps per task")
    mode.add_argument("--full", dest="quick", action="store_const", const=False,
                      help="the full benchmark: larger model, more data, 300 steps per task, 3 seeds")
    p.add_argument("--methods", help=f"comma-separated methods or 'all' (default); valid: {', '.join(available_methods())}")
    p.add_argument("--model", dest="model_dir", metavar="DIR",
                   help="a local Hugging Face causal LM folder (with its tokenizer) instead of the built-in one")
    p.add_argument("--tasks", dest="task_files", nargs="+", metavar="FILE",
                   help="JSONL task files (one object per line: prompt, answer[, choices]), in training order")
    p.add_argument("--probe", dest="probe_file", metavar="FILE",
                   help="JSONL knowledge probe (default: the built-in world's held-out questions); give "
                        "choices to rank them by likelihood")
    p.add_argument("--heldout", dest="heldout_file", metavar="FILE",
                   help="plain text, one passage per line, for perplexity (default: the built-in world's "
                        "held-out text; with --model and --probe, the probe's questions and answers)")
    p.add_argument("--steps", type=int, help="optimizer steps per task (default: 100 quick, 300 full)")
    p.add_argument("--seed", type=int, help="seed of the base model, data and the first fine-tuning run (default 0)")
    p.add_argument("--seeds", type=int, help="fine-tuning seeds, reported as mean ± spread (default: 1 quick, 3 full)")
    p.add_argument("--device", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32")
    p.add_argument("--out", metavar="DIR",
                   help="folder for results.json, the plots, report.md and the resumable state "
                        "(default continual-results)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where the pretrained built-in model is cached (default: ~/.cache/fastcur/continual)")
    p.add_argument("--resume", action="store_const", const=True,
                   help="continue the run in --out with its own options (read from its run.json)")
    p.add_argument("--workers", type=int,
                   help="methods trained at once, each in its own process with its share of the threads "
                        "(default: 2 on a CPU with 2 or more threads, 1 on a GPU)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bars")
    small = p.add_argument_group("sizes (advanced; default: the mode's)")
    small.add_argument("--batch-size", type=int)
    small.add_argument("--max-len", type=int, help="tokens per training example (default 192)")
    small.add_argument("--n-train", type=int, help="training examples per built-in task")
    small.add_argument("--n-test", type=int, help="test examples per built-in task")
    small.add_argument("--n-probe", type=int, help="probe questions evaluated")
    small.add_argument("--n-heldout", type=int, help="held-out texts for perplexity")
    small.add_argument("--size", choices=["tiny", "quick", "full"],
                       help="size of the built-in model (tiny: tests and smoke runs only)")
    small.add_argument("--pretrain-steps", type=int, help="pretraining steps of the built-in model")


def _given(args) -> dict:
    """The options the user gave, as RunConfig fields."""
    from .methods import parse_methods

    d = {k: v for k, v in vars(args).items() if v is not None and k not in ("fn", "command")}
    if "methods" in d:
        d["methods"] = parse_methods(d["methods"])
    return d


def _check_files(cfg) -> None:
    for opt, paths in (("--tasks", cfg.task_files or []), ("--probe", [cfg.probe_file] if cfg.probe_file else []),
                       ("--heldout", [cfg.heldout_file] if cfg.heldout_file else [])):
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{opt}: file not found: {path}")
    if cfg.model_dir is not None and not os.path.isdir(cfg.model_dir):
        raise FileNotFoundError(f"--model: directory not found: {cfg.model_dir}")


def config_from_args(args):
    """The RunConfig of the parsed options; with --resume, the interrupted run's own (checked)."""
    from .runner import RunConfig, resume_config

    given = _given(args)
    resume = given.pop("resume", False)
    if resume:
        out = given.pop("out", None)
        if out is None:
            raise ValueError("--resume needs --out: the folder of the run to continue")
        cfg = resume_config(out, given)
    else:
        cfg = RunConfig(**given).resolved()
    _check_files(cfg)
    return cfg


def run_from_args(args) -> int:
    """Entry point of `fastcur continual`: 0 on success, 2 with a one-line error otherwise."""
    from .runner import run

    try:
        cfg = config_from_args(args)
        run(cfg)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        message = " ".join(str(exc).split())   # one line
        print(f"fastcur continual: error: {message}", file=sys.stderr)
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
