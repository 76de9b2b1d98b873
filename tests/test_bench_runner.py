"""The benchmark runner (`fastcur bench`) itself: it runs, reports every provider, and writes
its JSON and PNG. No assertion on speed (benchmarks are not tests)."""
from __future__ import annotations

import importlib.util
import json

import pytest

from fastcur.benchmarks import runner
from fastcur.benchmarks.bench_cur_linear import BENCHMARK

HAS_PEFT = importlib.util.find_spec("peft") is not None


def test_runner_tiny_case(tmp_path, capsys):
    code = runner.main(["cur_linear", "--shapes", "64,32,32,4", "--reps", "5", "--warmup", "0",
                        "--dtype", "float32", "--modes", "fwd", "fwd+bwd", "--threads", "1",
                        "--out", str(tmp_path), "--no-progress", "--no-lock"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "cur_linear.json").read_text())
    assert (tmp_path / "cur_linear.png").stat().st_size > 0
    assert report["floor"] == "nn.Linear (frozen)" and report["complete"] is True
    assert report["machine"]["threads"] == 1 and report["machine"]["torch"]
    assert len(report["results"]) == 2
    assert {r["case"]["mode"] for r in report["results"]} == {"fwd", "fwd+bwd"}
    for res in report["results"]:
        assert {k: res["case"][k] for k in ("M", "n", "k", "r", "dtype")} == dict(M=64, n=32, k=32, r=4, dtype="float32")
        providers = res["providers"]
        assert set(providers) == set(BENCHMARK.providers)
        floor_time = providers[BENCHMARK.floor]["time_ms"]
        for name, r in providers.items():
            if name == "PEFT LoRA" and not HAS_PEFT:
                assert r["status"] == "skipped" and "not installed" in r["reason"]
                continue
            assert r["status"] == "ok", (name, r)
            assert r["time_ms"] > 0 and len(r["samples_ms"]) == 5 and all(s > 0 for s in r["samples_ms"])
            assert r["ratio_vs_floor"] == pytest.approx(r["time_ms"] / floor_time)
            for base in BENCHMARK.baselines:
                base_r = providers[base]
                if base_r["status"] == "ok":
                    assert r["ratios"][base] == pytest.approx(r["time_ms"] / base_r["time_ms"])
            assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
        assert providers[BENCHMARK.floor]["ratio_vs_floor"] == pytest.approx(1.0)
    # the table names every provider and case
    for name in BENCHMARK.providers:
        assert name in out
    assert "fwd+bwd float32 M=64 n=32 k=32 r=4" in out


def test_unknown_benchmark_name(tmp_path, capsys):
    code = runner.main(["no_such_bench", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0
    assert "unknown benchmark 'no_such_bench'" in err and "cur_linear" in err
    assert not (tmp_path / "no_such_bench.json").exists()


def test_bad_arguments(tmp_path, capsys):
    assert runner.main(["cur_linear", "--shapes", "64,32,32", "--out", str(tmp_path)]) == 2
    assert "M,n,k,r" in capsys.readouterr().err
    assert runner.main(["cur_linear", "--reps", "2", "--out", str(tmp_path)]) == 2
    assert "at least 5" in capsys.readouterr().err
    assert runner.main(["cur_linear", "--providers", "nope", "--out", str(tmp_path)]) == 2
    assert "no provider matching" in capsys.readouterr().err


def test_cli_routes_to_runner(tmp_path, capsys):
    from fastcur.cli import main

    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
