"""Report on results built from hand-made per-task lists (the runner's `summarize` computes the
figures): table numbers, n/a retention, seeds' mean ± spread, strict atomic JSON, PNG plots, Markdown."""
import json
import os

import numpy as np
import pytest

from fastcur.continual.report import (aggregate_seeds, format_table, markdown_table, plot_accuracy_matrices,
                                      plot_curves, plot_stability_plasticity, write_markdown_report,
                                      write_results_json)
from fastcur.continual.runner import summarize

BASE = {"probe": 0.6, "probe_generation": 0.5, "perplexity": 3.25, "accuracy": [0.1, 0.2, 0.3]}


def per_task(acc, probe, generation, ppl, **extra):
    return {"acc_matrix": acc, "probe": probe, "probe_generation": generation, "perplexity": ppl,
            "train_loss": [1.0] * len(acc), "trainable_params": 12288, "timed_train_s": 1.23, "timed_steps": 100,
            "train_steps": 100, "peak_memory_mb": 210.4, "completed_tasks": len(acc), "n_tasks": 3, **extra}


def hand_results(base=BASE):
    lora = per_task([[0.8, 0.1, 0.0], [0.5, 0.9, 0.2], [0.4, 0.6, 0.7]], [0.5, 0.4, 0.3], [0.5, 0.25, 0.25],
                    [3.5, 3.9, 4.125])
    cur = per_task([[0.6, 0.0, 0.1], [0.6, 0.7, 0.1], [0.5, 0.7, 0.6]], [0.6, 0.6, 0.54], [0.5, 0.5, 0.5],
                   [3.3, 3.3, 3.4], trainable_params=np.int64(1024), peak_memory_mb=float("nan"))
    ewc = per_task([[0.7, 0.2, 0.3]], [0.55], [0.5], [3.4])
    return {"config": {"seed": 0, "steps": 50, "quick": True}, "tasks": ["largest", "translation", "sentiment"],
            "base": {**{k: v for k, v in base.items() if k != "accuracy"}, "task_accuracy": base["accuracy"],
                     "average_accuracy": float(np.mean(base["accuracy"]))},
            "methods": {name: summarize(r, base) for name, r in (("lora", lora), ("curlora", cur), ("ewc", ewc))}}


def test_summary_figures_from_the_per_task_lists():
    lora = hand_results()["methods"]["lora"]
    assert lora["average_accuracy"] == pytest.approx(1.7 / 3)   # (0.4 + 0.6 + 0.7) / 3
    assert lora["bwt"] == pytest.approx(-0.35)                  # ((0.4-0.8) + (0.6-0.9)) / 2
    assert lora["plasticity"] == pytest.approx(0.8)             # (0.8 + 0.9 + 0.7) / 3
    assert lora["gain_over_base"] == pytest.approx(1.7 / 3 - 0.2)
    assert lora["retention"] == pytest.approx(0.5) and lora["format_retention"] == pytest.approx(0.5)
    assert lora["perplexity"] == 4.125 and lora["ms_per_step"] == pytest.approx(12.3)
    ewc = hand_results()["methods"]["ewc"]
    assert ewc["average_accuracy"] is None and ewc["retention"] is None


def test_retention_is_na_when_the_base_scores_zero():
    r = hand_results({**BASE, "probe": 0.0})
    assert r["methods"]["lora"]["retention"] is None and r["methods"]["lora"]["retention_curve"] == [None] * 3
    assert r["methods"]["lora"]["format_retention"] == pytest.approx(0.5)
    row = next(line for line in format_table(r).splitlines() if line.startswith("lora")).split()
    assert row[1] == "n/a" and row[2] == "0.50"


def test_format_table():
    text = format_table(hand_results())
    lines = text.splitlines()
    assert lines[0].startswith("base model: probe 60.0% (likelihood ranking), 50.0% (generation), held-out "
                               "perplexity 3.25, task accuracy 20.0%")
    assert lines[1].split() == ["method", "retention", "format", "ret.", "plasticity", "avg", "acc", "BWT", "gain",
                                "perplexity", "trainable", "ms/step", "peak", "MB"]
    lora = next(line for line in lines if line.startswith("lora")).split()
    assert lora == ["lora", "0.50", "0.50", "80.0%", "56.7%", "-35.0", "+36.7", "4.12", "12,288", "12.3", "210.4"]
    cur = next(line for line in lines if line.startswith("curlora")).split()
    assert cur[1:3] == ["0.90", "1.00"] and cur[-3:] == ["1,024", "12.3", "n/a"]
    ewc = next(line for line in lines if line.startswith("ewc")).split()
    assert ewc[:3] == ["ewc", "(1/3)", "n/a"]
    assert len({len(line) for line in lines[1:3]}) == 1  # header and rule line up
    md = markdown_table(hand_results())
    assert md.splitlines()[2] == "| lora | 0.50 | 0.50 | 80.0% | 56.7% | -35.0 | +36.7 | 4.12 | 12,288 | 12.3 | 210.4 |"
    with pytest.raises(ValueError, match="'methods'"):
        format_table({"tasks": []})


def test_seeds_are_reported_as_mean_and_spread():
    one, two = hand_results(), hand_results()
    two["methods"]["lora"] = summarize(per_task([[0.8, 0.1, 0.0], [0.5, 0.9, 0.2], [0.6, 0.6, 0.7]],
                                                [0.5, 0.4, 0.42], [0.5, 0.25, 0.25], [3.5, 3.9, 4.125]), BASE)
    agg = aggregate_seeds([one, two], {"tasks": one["tasks"], "base": one["base"]})
    lora = agg["methods"]["lora"]
    assert lora["retention"] == pytest.approx((0.5 + 0.7) / 2)
    assert lora["spread"]["retention"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert lora["per_seed"]["retention"] == pytest.approx([0.5, 0.7])
    assert lora["acc_matrix"][2] == pytest.approx([0.5, 0.6, 0.7])
    assert agg["methods"]["curlora"]["spread"]["retention"] == pytest.approx(0.0)
    row = next(line for line in format_table(agg).splitlines() if line.startswith("lora"))
    assert row.split()[1:4] == ["0.60", "±", "0.14"]


def test_results_json_is_strict_and_atomic(tmp_path):
    path = tmp_path / "out" / "results.json"
    path.parent.mkdir()
    path.write_text("old")
    write_results_json(path, hand_results())
    data = json.loads(path.read_text())  # strict: NaN became null
    assert data["methods"]["curlora"]["peak_memory_mb"] is None
    assert data["methods"]["curlora"]["trainable_params"] == 1024
    assert data["methods"]["lora"]["acc_matrix"][1] == [0.5, 0.9, 0.2]
    assert os.listdir(path.parent) == ["results.json"]  # no temporary file left behind
    with pytest.raises(TypeError):
        write_results_json(path, {"methods": {}, "bad": object()})
    assert json.loads(path.read_text()) == data  # a failed write leaves the old file
    assert os.listdir(path.parent) == ["results.json"]


def _png_shape(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(path).shape


def test_plots_are_pngs_with_one_panel_per_method(tmp_path):
    r = hand_results()
    _png_shape(plot_stability_plasticity(r, tmp_path / "tradeoff.png"))
    h1, w1, _ = _png_shape(plot_curves(r, tmp_path / "curves.png"))
    assert w1 > h1  # two panels side by side
    one = {**r, "methods": {"lora": r["methods"]["lora"]}}
    _, w_one, _ = _png_shape(plot_accuracy_matrices(one, tmp_path / "one.png"))
    _, w_three, _ = _png_shape(plot_accuracy_matrices(r, tmp_path / "three.png"))
    assert w_three > 2 * w_one
    five = {**r, "methods": {f"m{i}": r["methods"]["lora"] for i in range(5)}}
    h_five, _, _ = _png_shape(plot_accuracy_matrices(five, tmp_path / "five.png"))
    h_three, _, _ = _png_shape(tmp_path / "three.png")
    assert h_five > 1.5 * h_three  # a second row of heatmaps
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "five.png", "one.png", "three.png", "tradeoff.png"]


def test_markdown_report_references_its_plots(tmp_path):
    path = write_markdown_report(hand_results(), tmp_path / "report")
    text = path.read_text()
    assert path.name == "report.md"
    for png in ("curves.png", "accuracy_matrices.png", "stability_plasticity.png"):
        assert f"]({png})" in text and (path.parent / png).stat().st_size > 1000
    assert "| lora | 0.50 | 0.50 | 80.0% | 56.7% | -35.0 |" in text
    assert "`seed=0`" in text and "probe 60.0%" in text
    lora = text[text.index("### lora"):text.index("### curlora")]
    assert "| translation | 50.0 | 90.0 | 20.0 |" in lora
    ewc = text[text.index("### ewc"):]
    assert "| largest | 70.0 | 20.0 | 30.0 |" in ewc and "\n| translation |" not in ewc


def test_label_offsets_move_labels_of_close_markers_apart():
    from fastcur.continual.report import label_offsets

    # two pairs of markers on top of each other, a fifth near the second pair, one alone
    points = [(0.67, 1.0), (0.675, 1.0), (0.97, 0.24), (0.98, 0.23), (0.99, 0.25), (0.4, 0.1)]
    offsets = label_offsets(points)
    assert offsets[0] == (4, 4) and offsets[1] == (4, -6)        # the second of a pair: a line lower
    assert offsets[2] == (4, 4) and offsets[3] == (4, -6)
    assert offsets[4] == (4, -16)                                 # near both of the second pair
    assert offsets[5] == (4, 4) and label_offsets([]) == []

