"""fastcur.continual.estimate: the time printed before a run agrees with the committed quick run
it was calibrated on, and scales with workers, seeds and methods as the runner does."""
import json
import os

import pytest

pytest.importorskip("transformers")
from fastcur.continual import estimate  # noqa: E402
from fastcur.continual.runner import RunConfig  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "continual-quick")


def _cfg(tmp_path, **kw):
    return RunConfig(cache_dir=str(tmp_path / "empty-cache"), out=str(tmp_path / "o"), **kw).resolved()


def test_quick_estimate_matches_the_committed_cold_run(tmp_path):
    with open(os.path.join(RESULTS, "results.json")) as fh:
        run = json.load(fh)
    with open(os.path.join(RESULTS, "pretrain.json")) as fh:
        pretrain = json.load(fh)
    workers = run["config"]["workers"]
    measured = pretrain["seconds"] + sum(m["wall_time_s"] for m in run["methods"].values()) / workers
    cfg = _cfg(tmp_path, quick=True, methods=list(run["methods"]), workers=workers)
    got = estimate.seconds(cfg)
    assert got["pretraining"] == pytest.approx(pretrain["seconds"], rel=0.05)
    assert got["total"] == pytest.approx(measured, rel=0.1)


def test_estimate_scales_with_workers_seeds_and_methods(tmp_path):
    one = estimate.seconds(_cfg(tmp_path, quick=True, workers=1))
    two = estimate.seconds(_cfg(tmp_path, quick=True, workers=2))
    assert one["training"] == pytest.approx(2 * two["training"])
    seeds = estimate.seconds(_cfg(tmp_path, quick=True, workers=2, seeds=3))
    assert seeds["training"] == pytest.approx(3 * two["training"])
    few = estimate.seconds(_cfg(tmp_path, quick=True, workers=1, methods=["lora"]))
    assert few["training"] < one["training"] / 10
    assert estimate.seconds(_cfg(tmp_path, quick=True, model_dir=str(tmp_path)))["pretraining"] == 0.0
    assert "about" in estimate.describe(_cfg(tmp_path, quick=False))
