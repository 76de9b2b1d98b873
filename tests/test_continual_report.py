"""Report on a hand-built results dict: table numbers, strict atomic JSON, PNG plots, Markdown."""
import json
import os

import numpy as np
import pytest

from fastcur.continual.report import (format_table, markdown_table, method_summary, plot_accuracy_matrices,
                                      plot_curves, write_markdown_report, write_results_json)


def hand_results():
    return {
        "config": {"seed": 0, "steps": 50, "quick": True},
        "tasks": ["arithmetic", "translation", "sentiment"],
        "base": {"probe_accuracy": 0.6, "perplexity": 3.25},
        "methods": {
            "lora": {"acc_matrix": [[0.8, 0.1, 0.0], [0.5, 0.9, 0.2], [0.4, 0.6, 0.7]],
                     "probe_accuracy": [0.5, 0.4, 0.3], "perplexity": [3.5, 3.9, 4.125],
                     "retention": [0.5 / 0.6, 0.4 / 0.6, 0.5], "trainable_params": 12288,
                     "time_per_step_s": 0.0123, "peak_memory_mb": 210.4},
            "curlora": {"acc_matrix": [[0.6, 0.0, 0.1], [0.6, 0.7, 0.1], [0.5, 0.7, 0.6]],
                        "probe_accuracy": [0.6, 0.6, 0.54], "perplexity": [3.3, 3.3, 3.4],
                        "retention": [1.0, 1.0, 0.9], "average_accuracy": np.float64(0.6),
                        "backward_transfer": -0.05, "trainable_params": np.int64(1024),
                        "time_per_step_s": 0.02, "peak_memory_mb": float("nan")},
            "ewc": {"acc_matrix": [[0.7, 0.2, 0.3]], "probe_accuracy": [0.55], "perplexity": [3.4],
                    "retention": [0.55 / 0.6], "trainable_params": 12288},
        },
    }


def test_summary_computes_missing_metrics_and_keeps_given_ones():
    r = hand_results()
    lora = method_summary(r, "lora")
    assert lora["average_accuracy"] == pytest.approx(1.7 / 3)  # (0.4 + 0.6 + 0.7) / 3
    assert lora["backward_transfer"] == pytest.approx(-0.35)   # ((0.4-0.8) + (0.6-0.9)) / 2
    assert lora["retention"] == 0.5 and lora["perplexity"] == 4.125
    assert method_summary(r, "curlora")["backward_transfer"] == -0.05
    ewc = method_summary(r, "ewc")
    assert ewc["average_accuracy"] is None and (ewc["tasks_done"], ewc["tasks_total"]) == (1, 3)


def test_format_table():
    text = format_table(hand_results())
    lines = text.splitlines()
    assert lines[0].startswith("base model: probe accuracy 60.0%, held-out perplexity 3.25")
    assert lines[1].split() == ["method", "avg", "acc", "BWT", "retention", "probe", "acc", "perplexity",
                                "trainable", "ms/step", "peak", "MB"]
    lora = next(line for line in lines if line.startswith("lora")).split()
    assert lora == ["lora", "56.7%", "-35.0", "0.50", "30.0%", "4.12", "12,288", "12.3", "210.4"]
    cur = next(line for line in lines if line.startswith("curlora")).split()
    assert cur == ["curlora", "60.0%", "-5.0", "0.90", "54.0%", "3.40", "1,024", "20.0", "-"]
    ewc = next(line for line in lines if line.startswith("ewc")).split()
    assert ewc[:3] == ["ewc", "(1/3)", "-"] and ewc[-2:] == ["-", "-"]
    assert len({len(line) for line in lines[1:3]}) == 1  # header and rule line up
    md = markdown_table(hand_results())
    assert md.splitlines()[2] == "| lora | 56.7% | -35.0 | 0.50 | 30.0% | 4.12 | 12,288 | 12.3 | 210.4 |"
    with pytest.raises(ValueError, match="'methods'"):
        format_table({"tasks": []})


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
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "five.png", "one.png", "three.png"]


def test_markdown_report_references_its_plots(tmp_path):
    path = write_markdown_report(hand_results(), tmp_path / "report")
    text = path.read_text()
    assert path.name == "report.md"
    for png in ("curves.png", "accuracy_matrices.png"):
        assert f"]({png})" in text and (path.parent / png).stat().st_size > 1000
    assert "| lora | 56.7% | -35.0 |" in text
    assert "`seed=0`" in text and "probe accuracy 60.0%" in text
    lora = text[text.index("### lora"):text.index("### curlora")]
    assert "| translation | 50.0 | 90.0 | 20.0 |" in lora
    ewc = text[text.index("### ewc"):]
    assert "| arithmetic | 70.0 | 20.0 | 30.0 |" in ewc and "\n| translation |" not in ewc
