"""pytest-benchmark suite for cur_linear: each provider of bench_cur_linear, small shapes.

    make bench-pytest          # = pytest -q benchmarks --benchmark-only

Not collected by `pytest tests` (testpaths = tests). Benchmarks, not tests: nothing here
asserts on time. The workloads are the ones `fastcur bench cur_linear` times (same
factories, same modes), so the two never disagree on what is measured.
"""
from __future__ import annotations

import pytest
import torch

from fastcur.benchmarks.bench_cur_linear import BENCHMARK
from fastcur.benchmarks.runner import Case, Skip, build_step

SHAPES = [dict(M=256, n=512, k=512, r=16)]
MODES = ["fwd", "fwd+bwd"]
THREADS = 2


@pytest.fixture(autouse=True)
def _fixed_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{M}-n{n}-k{k}-r{r}".format(**s))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(BENCHMARK.providers))
def test_cur_linear(benchmark, provider, mode, shape):
    case = Case(shape, torch.float32, torch.device("cpu"), mode)
    try:
        step, prepared = build_step(BENCHMARK, provider, case)
    except ImportError as exc:
        pytest.skip(f"{provider}: {exc}")
    except Skip as exc:
        pytest.skip(f"{provider}: {exc}")
    benchmark.group = f"cur_linear {mode} " + " ".join(f"{k}={v}" for k, v in shape.items())
    benchmark.extra_info.update({"provider": provider, "mode": mode, "note": prepared.note, **shape})
    benchmark.pedantic(step, warmup_rounds=3, rounds=20, iterations=1)
