"""bench_secura runs through the runner: the layer benchmark and the two op benchmarks loaded
by `module:part`; every provider runs (PEFT may be absent). No assertion on speed."""
from __future__ import annotations

import importlib.util
import json

import pytest

from fastcur.benchmarks import runner
from fastcur.benchmarks.bench_secura import BENCHMARK, BENCHMARKS

HAS_PEFT = importlib.util.find_spec("peft") is not None


@pytest.mark.parametrize("name,shape,bench,mode", [
    ("secura", "48,24,20,3,6", BENCHMARK, "fwd+bwd"),
    ("secura:signorm", "16,40", BENCHMARKS["signorm"], "fwd+bwd"),
    ("secura:signorm_merge", "24,20,3", BENCHMARKS["signorm_merge"], "infer"),
])
def test_secura_benchmarks_run(tmp_path, capsys, name, shape, bench, mode):
    code = runner.main([name, "--shapes", shape, "--reps", "5", "--warmup", "0", "--dtype", "float32",
                        "--modes", mode, "--threads", "1", "--out", str(tmp_path), "--no-progress",
                        "--no-plot", "--no-memory"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / f"{bench.name}.json").read_text())
    (res,) = report["results"]
    assert set(res["providers"]) == set(bench.providers)
    for pname, r in res["providers"].items():
        if pname.startswith("PEFT") and not HAS_PEFT:
            assert r["status"] == "skipped"
            continue
        assert r["status"] == "ok", (pname, r)


def test_unknown_part(tmp_path, capsys):
    assert runner.main(["secura:nope", "--out", str(tmp_path)]) != 0
    assert "has no part 'nope'" in capsys.readouterr().err
