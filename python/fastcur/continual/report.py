"""Output of a benchmark run: the stdout table, results.json, PNG plots and a Markdown report.

`results` (what the runner fills; methods may be partial while a run is in progress):

    {"config": {...}, "tasks": [names],
     "base": {"probe_accuracy": float, "perplexity": float},
     "methods": {name: {"acc_matrix": [[...]] (rows: after task i; cols: task j),
                        "probe_accuracy": [after task i], "perplexity": [after task i],
                        "retention": [after task i], "average_accuracy": float,
                        "backward_transfer": float, "trainable_params": int,
                        "time_per_step_s": float, "peak_memory_mb": float}}}

Every file is written atomically (a temporary file in the same folder, then os.replace).
Plots use matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .._atomic import atomic_write, atomic_write_text

CURVES_PNG = "curves.png"
MATRICES_PNG = "accuracy_matrices.png"
REPORT_MD = "report.md"
COLUMNS = ("method", "avg acc", "BWT", "retention", "probe acc", "perplexity", "trainable", "ms/step", "peak MB")


# ------------------------------------------------------------------ atomic writes
_atomic_write, _atomic_write_text = atomic_write, atomic_write_text


def _jsonable(obj):
    """numpy scalars/arrays -> Python; NaN and infinities -> None (strict JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_results_json(path: str | os.PathLike, results: dict) -> Path:
    """results as strict JSON (indented, NaN -> null), written atomically; returns the path."""
    return _atomic_write_text(path, json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n")


# ------------------------------------------------------------------ summary numbers
def _check_results(results) -> dict:
    if not isinstance(results, dict) or not isinstance(results.get("methods"), dict):
        raise ValueError("results must be a dict with a 'methods' dict (see fastcur.continual.report)")
    return results


def _last(values):
    return values[-1] if isinstance(values, (list, tuple)) and values else None


def _acc_rows(method: dict, n_tasks: int) -> np.ndarray:
    """The accuracy matrix as a [rows, n_tasks] float array (rows < n_tasks while in progress)."""
    rows = method.get("acc_matrix") or []
    a = np.full((len(rows), n_tasks), np.nan)
    for i, row in enumerate(rows):
        a[i, :len(row)] = [np.nan if v is None else v for v in row]
    return a


def _seen_curve(a: np.ndarray) -> list[float]:
    return [float(np.nanmean(a[i, :i + 1])) for i in range(a.shape[0])]


def method_summary(results: dict, name: str) -> dict:
    """One method's row of the table as numbers (None where not measured yet)."""
    m = results["methods"][name]
    n_tasks = len(results.get("tasks") or m.get("acc_matrix") or [])
    a = _acc_rows(m, n_tasks)
    done = a.shape[0] == n_tasks and n_tasks > 0
    avg, bwt = m.get("average_accuracy"), m.get("backward_transfer")
    if done and avg is None:
        avg = float(np.nanmean(a[-1]))
    if done and bwt is None:
        bwt = float(np.mean([a[-1, j] - a[j, j] for j in range(n_tasks - 1)])) if n_tasks > 1 else 0.0
    return {"method": name, "average_accuracy": avg, "backward_transfer": bwt,
            "retention": _last(m.get("retention")), "probe_accuracy": _last(m.get("probe_accuracy")),
            "perplexity": _last(m.get("perplexity")), "trainable_params": m.get("trainable_params"),
            "time_per_step_s": m.get("time_per_step_s"), "peak_memory_mb": m.get("peak_memory_mb"),
            "tasks_done": a.shape[0], "tasks_total": n_tasks}


def _fmt(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "signed_pct":
        return f"{100 * value:+.1f}"
    if kind == "ratio":
        return f"{value:.2f}"
    if kind == "count":
        return f"{int(value):,}"
    if kind == "ms":
        return f"{1000 * value:.1f}"
    return f"{value:.1f}"


def _rows(results: dict) -> list[list[str]]:
    rows = []
    for name in results["methods"]:
        s = method_summary(results, name)
        label = name if s["tasks_done"] == s["tasks_total"] else f"{name} ({s['tasks_done']}/{s['tasks_total']})"
        rows.append([label, _fmt(s["average_accuracy"], "pct"), _fmt(s["backward_transfer"], "signed_pct"),
                     _fmt(s["retention"], "ratio"), _fmt(s["probe_accuracy"], "pct"),
                     _fmt(s["perplexity"], "ratio"), _fmt(s["trainable_params"], "count"),
                     _fmt(s["time_per_step_s"], "ms"), _fmt(s["peak_memory_mb"], "num")])
    return rows


def _base_line(results: dict) -> str:
    base = results.get("base") or {}
    tasks = results.get("tasks") or []
    return (f"base model: probe accuracy {_fmt(base.get('probe_accuracy'), 'pct')}, "
            f"held-out perplexity {_fmt(base.get('perplexity'), 'ratio')}; tasks in order: "
            f"{', '.join(tasks) if tasks else '-'}")


def format_table(results: dict) -> str:
    """The final table for stdout: one row per method (BWT in accuracy points; retention =
    probe accuracy / the base model's; perplexity on held-out pretraining text)."""
    results = _check_results(results)
    rows = [list(COLUMNS)] + _rows(results)
    widths = [max(len(r[c]) for r in rows) for c in range(len(COLUMNS))]
    lines = [_base_line(results)]
    for k, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    results = _check_results(results)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join([":---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(results)]
    return "\n".join(lines)


# ------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    plt = _pyplot()
    try:
        return _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)


def plot_curves(results: dict, path: str | os.PathLike) -> Path:
    """Two panels along the task sequence, one line per method: basic-knowledge retention (1.0 for
    the base model before any task) and the average accuracy on the tasks seen so far."""
    results = _check_results(results)
    plt = _pyplot()
    tasks = list(results.get("tasks") or [])
    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, m in results["methods"].items():
        ret = [v for v in (m.get("retention") or []) if v is not None]
        ax_r.plot(range(len(ret) + 1), [1.0] + ret, marker="o", label=name)
        curve = _seen_curve(_acc_rows(m, len(tasks) or len(m.get("acc_matrix") or [])))
        ax_a.plot(range(1, len(curve) + 1), curve, marker="o", label=name)
    ax_r.set_xticks(range(len(tasks) + 1), ["base"] + tasks, rotation=30, ha="right")
    ax_r.set_title("basic-knowledge retention (probe acc / base)")
    ax_r.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_r.set_xlabel("after training on")
    ax_a.set_xticks(range(1, len(tasks) + 1), tasks, rotation=30, ha="right")
    ax_a.set_title("average accuracy on the tasks seen so far")
    ax_a.set_ylim(0, 1)
    ax_a.set_xlabel("after training on")
    for ax in (ax_r, ax_a):
        ax.grid(alpha=0.3)
    handles, labels = ax_a.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy_matrices(results: dict, path: str | os.PathLike) -> Path:
    """One heatmap per method: row i = after training task i, column j = accuracy on task j."""
    results = _check_results(results)
    plt = _pyplot()
    names = list(results["methods"])
    tasks = list(results.get("tasks") or [])
    n = max(1, len(names))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    T = len(tasks)
    size = max(2.6, 0.55 * T + 1.2)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.axis("off")
            continue
        m = results["methods"][names[k]]
        T_m = T or len(m.get("acc_matrix") or [])
        a = np.full((T_m, T_m), np.nan)
        got = _acc_rows(m, T_m)
        a[:got.shape[0]] = got
        image = ax.imshow(a, vmin=0, vmax=1, cmap="viridis")
        for i in range(T_m):
            for j in range(T_m):
                if np.isfinite(a[i, j]):
                    ax.text(j, i, f"{100 * a[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if a[i, j] < 0.6 else "black")
        labels = tasks or [str(j) for j in range(T_m)]
        ax.set_xticks(range(T_m), labels, rotation=45, ha="right", fontsize=7)
        if k % cols == 0:
            ax.set_yticks(range(T_m), labels, fontsize=7)
            ax.set_ylabel("after training on", fontsize=8)
        else:
            ax.set_yticks(range(T_m), [])
        ax.set_title(names[k], fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy on the column's task")
    return _save(fig, path)


# ------------------------------------------------------------------ report
def write_markdown_report(results: dict, out_dir: str | os.PathLike) -> Path:
    """Write the two plots and report.md (config, base model, table, plots, accuracy matrices)
    into out_dir; returns the report's path."""
    results = _check_results(results)
    out = Path(out_dir)
    plot_curves(results, out / CURVES_PNG)
    plot_accuracy_matrices(results, out / MATRICES_PNG)
    tasks = list(results.get("tasks") or [])
    config = results.get("config") or {}
    lines = ["# fastcur continual: results", ""]
    if config:
        lines += ["Configuration: " + ", ".join(f"`{k}={v}`" for k, v in config.items()), ""]
    lines += [_base_line(results) + ".", "",
              "Average accuracy: mean over all tasks after the last one. BWT (backward transfer): mean "
              "change, in accuracy points, of each earlier task's accuracy from just after it was "
              "trained to the end (negative = forgetting). Retention: basic-knowledge probe accuracy "
              "relative to the base model's. Perplexity: on held-out pretraining-style text.", "",
              markdown_table(results), "",
              f"![retention and average accuracy along the task sequence]({CURVES_PNG})", "",
              f"![accuracy matrices]({MATRICES_PNG})", ""]
    if tasks:
        lines += ["## Accuracy matrices (%; row: after training on, column: evaluated on)", ""]
        for name, m in results["methods"].items():
            a = _acc_rows(m, len(tasks))
            lines += [f"### {name}", "", "| after \\ on | " + " | ".join(tasks) + " |",
                      "|:---|" + "---:|" * len(tasks)]
            for i in range(a.shape[0]):
                lines.append(f"| {tasks[i]} | " + " | ".join("-" if not np.isfinite(v) else f"{100 * v:.1f}"
                                                             for v in a[i]) + " |")
            lines.append("")
    return _atomic_write_text(out / REPORT_MD, "\n".join(lines))
