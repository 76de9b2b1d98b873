"""bench_imsm runs through the runner: the training-step and the generation benchmarks, every
provider on a tiny model. No assertion on speed."""
from __future__ import annotations

import json

import pytest

from fastcur.benchmarks import runner

pytest.importorskip("transformers")

from fastcur.benchmarks.bench_imsm import BENCHMARK, BENCHMARKS  # noqa: E402


@pytest.mark.parametrize("name,shape,bench,mode", [
    ("imsm", "2,8,64,1", BENCHMARK, "fwd+bwd"),
    ("imsm:generate", "2,6,64,1,3", BENCHMARKS["generate"], "infer"),
])
def test_imsm_benchmarks_run(tmp_path, capsys, name, shape, bench, mode):
    code = runner.main([name, "--shapes", shape, "--reps", "5", "--warmup", "0", "--dtype", "float32",
                        "--modes", mode, "--threads", "1", "--out", str(tmp_path), "--no-progress",
                        "--no-plot", "--no-memory", "--no-lock"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / f"{bench.name}.json").read_text())
    (res,) = report["results"]
    assert set(res["providers"]) == set(bench.providers)
    for pname, r in res["providers"].items():
        assert r["status"] == "ok", (pname, r)
