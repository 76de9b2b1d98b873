"""fastcur.continual.lr_grid: the learning-rate rule picks the smallest rate within 90 % of the
best mean validation accuracy, validates on the last training examples of each task (never
the test set, never what it trained on), and the CLI writes its report."""
import json

import pytest

pytest.importorskip("transformers")
from fastcur.continual import lr_grid  # noqa: E402
from fastcur.continual.runner import RunConfig  # noqa: E402


def test_choose_takes_the_smallest_rate_within_the_tolerance_of_the_best_mean():
    scores = [{"family": "lora", "lr": 1e-3, "mean": 0.5}, {"family": "lora", "lr": 3e-3, "mean": 0.7},
              {"family": "lora", "lr": 1e-2, "mean": 0.6}, {"family": "seq", "lr": 3e-4, "mean": 0.8},
              {"family": "seq", "lr": 1e-4, "mean": 0.8}, {"family": "seq", "lr": 1e-3, "mean": 0.2},
              {"family": "cur", "lr": 0.3, "mean": 0.9}, {"family": "cur", "lr": 0.1, "mean": 0.82},
              {"family": "cur", "lr": 0.03, "mean": 0.8}]
    assert lr_grid.choose(scores, tolerance=1.0) == {"lora": 3e-3, "seq": 1e-4, "cur": 0.3}   # the best
    assert lr_grid.choose(scores, tolerance=0.9) == {"lora": 3e-3, "seq": 1e-4, "cur": 0.1}   # 0.82 >= 0.81
    assert lr_grid.choose(scores, tolerance=0.7) == {"lora": 1e-3, "seq": 1e-4, "cur": 0.03}


def test_the_committed_grid_gives_the_rates_in_methods():
    import os

    from fastcur.continual import methods

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "continual-lr-grid", "results.json")
    with open(path) as fh:
        committed = json.load(fh)
    assert lr_grid.choose(committed["scores"]) == committed["best"] == methods.FAMILY_LR


def test_every_method_family_has_a_grid_and_its_rate_in_methods():
    from fastcur.continual import methods

    assert set(lr_grid.GRIDS) == set(methods.FAMILY_LR)
    for name in methods.available_methods():
        family = methods.family_of(name)
        assert methods.build_method(name).lr == methods.FAMILY_LR[family]
        assert methods.FAMILY_LR[family] in lr_grid.GRIDS[family]


def test_grid_trains_on_all_but_the_validation_split(tmp_path, monkeypatch):
    from fastcur.continual import runner

    cfg = RunConfig(methods=["lora"], size="tiny", pretrain_steps=2, steps=2, batch_size=4, n_train=10, n_test=3,
                    n_probe=4, n_heldout=2, max_len=96, cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "o"),
                    progress=False, workers=1).resolved()
    bench = runner.load_bench(cfg)
    trained, real = [], runner.train_task

    def spy(method, model, task, *args, **kwargs):
        trained.append((task.name, [e.prompt for e in task.train]))
        return real(method, model, task, *args, **kwargs)

    monkeypatch.setattr(runner, "train_task", spy)
    result = lr_grid.run_grid(cfg, {"lora": (1e-3, 1e-2)}, n_val=3, progress=False)
    assert [s["lr"] for s in result["scores"]] == [1e-3, 1e-2]
    assert result["best"]["lora"] in (1e-3, 1e-2)
    for s in result["scores"]:
        assert list(s["accuracy"]) == [t.name for t in bench.tasks]
        assert s["mean"] == pytest.approx(sum(s["accuracy"].values()) / len(bench.tasks))
    by_name = {t.name: t for t in bench.tasks}
    assert len(trained) == 2 * len(bench.tasks)
    for name, prompts in trained:
        assert prompts == [e.prompt for e in by_name[name].train[:-3]]


def test_cli_writes_results_and_report(tmp_path, capsys):
    from fastcur.cli import main

    out = tmp_path / "grid"
    argv = ["continual-lr-grid", "--size", "tiny", "--families", "curlora", "--steps", "2", "--n-train", "70",
            "--workers", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["best"]) == {"curlora"} and len(saved["scores"]) == len(lr_grid.GRIDS["curlora"])
    assert "## curlora (chosen:" in (out / "report.md").read_text()
    assert main(["continual-lr-grid", "--families", "nope", "--out", str(out)]) == 2
    assert "unknown family 'nope'" in capsys.readouterr().err
