"""The `fastcur` console script: `fastcur info`, `fastcur demo`, `fastcur continual`,
`fastcur continual-lr-grid`, `fastcur bench`."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    from .info import format_info, info, missing_cuda_kernels
    from . import _extension

    facts = info()
    print(json.dumps(facts, indent=2, default=str) if args.json else format_info(facts))
    if args.require_cuda_kernels:
        if not _extension.available():
            print(f"error: the C++ extension did not load: {_extension.load_error()}", file=sys.stderr)
            return 1
        if not facts["extension_build"]["cuda"]:
            print("error: the extension was built without CUDA sources", file=sys.stderr)
            return 1
        missing = missing_cuda_kernels()
        if missing or not _extension.KERNELS:
            print(f"error: ops without a CUDA kernel: {', '.join(missing) or 'no ops registered'}", file=sys.stderr)
            return 1
        print(f"cuda-check: all {len(_extension.KERNELS)} fastcur ops have a CUDA kernel "
              f"({', '.join(sorted(_extension.KERNELS))})")
    return 0


def _cmd_demo(args) -> int:
    from .demo import check_options, run_demo

    try:
        check_options(args.steps, args.device, args.seed)
    except ValueError as exc:
        print(f"fastcur demo: error: {exc}", file=sys.stderr)
        return 2
    run_demo(steps=args.steps, device=args.device, seed=args.seed)
    return 0


def _cmd_continual(args) -> int:
    from .continual.cli import run_from_args

    return run_from_args(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastcur", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print the version, what is built, and which backend runs where")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.add_argument("--require-cuda-kernels", action="store_true",
                   help="exit 1 unless the extension was built with CUDA and every op has a CUDA kernel")
    p.set_defaults(fn=_cmd_info)

    p = sub.add_parser("demo", help="train a small model whose nn.Linear layers became CURLoRALinear")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("continual", help="the continual-learning benchmark: forgetting, method by method")
    from .continual.cli import add_arguments as continual_arguments

    continual_arguments(p)
    p.set_defaults(fn=_cmd_continual)

    # `fastcur bench ...` and `fastcur continual-lr-grid ...` hand every argument to their own parser.
    sub.add_parser("bench", help="run benchmarks (see `fastcur bench --help`)", add_help=False)
    sub.add_parser("continual-lr-grid", add_help=False,
                   help="the continual benchmark's learning-rate rule: a grid per method family "
                        "(see `fastcur continual-lr-grid --help`)")

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["continual-lr-grid"]:
        from .continual.lr_grid import main as grid_main

        return grid_main(argv[1:])
    if argv[:1] == ["bench"]:
        from .benchmarks.runner import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
