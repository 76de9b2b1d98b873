"""Output of a benchmark run: the stdout table, results.json, PNG plots and a Markdown report.

`results` (what the runner fills; methods may be partial while a run is in progress):

    {"config": {...}, "tasks": [names],
     "base": {"probe": float (likelihood ranking), "probe_generation": float (exact match),
              "perplexity": float, "task_accuracy": [per task], "average_accuracy": float},
     "methods": {name: {"retention": probe / base probe (None = n/a: the base scores 0),
                        "format_retention": the same for the generation probe,
                        "plasticity": mean accuracy on each task right after training it,
                        "average_accuracy", "bwt", "gain_over_base", "perplexity" (after the last task),
                        "acc_matrix": [[...]] (rows: after task i; cols: task j),
                        "probe", "probe_generation", "perplexity_curve" lists and the retention curves
                        (after each task), "trainable_params", "ms_per_step", "peak_memory_mb",
                        and with several seeds "spread" {figure: standard deviation over the
                        seeds} and "per_seed" {figure: [one value per seed]}}}}

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
TRADEOFF_PNG = "stability_plasticity.png"
REPORT_MD = "report.md"
# (column, summary key, format)
COLUMNS = (("method", None, None), ("retention", "retention", "ratio"), ("format ret.", "format_retention", "ratio"),
           ("plasticity", "plasticity", "pct"), ("avg acc", "average_accuracy", "pct"), ("BWT", "bwt", "signed_pct"),
           ("gain", "gain_over_base", "signed_pct"), ("perplexity", "perplexity", "ratio"),
           ("trainable", "trainable_params", "count"), ("ms/step", "ms_per_step", "num"),
           ("peak MB", "peak_memory_mb", "num"))
SCALARS = ("retention", "format_retention", "plasticity", "average_accuracy", "bwt", "gain_over_base", "perplexity",
           "trainable_params", "ms_per_step", "peak_memory_mb")


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


def _acc_rows(method: dict, n_tasks: int) -> np.ndarray:
    """The accuracy matrix as a [rows, n_tasks] float array (rows < n_tasks while in progress)."""
    rows = method.get("acc_matrix") or []
    a = np.full((len(rows), n_tasks), np.nan)
    for i, row in enumerate(rows):
        a[i, :len(row)] = [np.nan if v is None else v for v in row]
    return a


def _seen_curve(a: np.ndarray) -> list[float]:
    return [float(np.nanmean(a[i, :i + 1])) for i in range(a.shape[0])]


def _mean(values):
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if len(vals) == len(values) and vals else None


def _std(values):
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.std(vals, ddof=1)) if len(vals) == len(values) and len(vals) > 1 else None


def _mean_lists(lists):
    """Element-wise mean of equally long lists (of lists); None where any is None."""
    if not lists or any(len(x) != len(lists[0]) for x in lists):
        return lists[0] if lists else []
    if lists[0] and isinstance(lists[0][0], list):
        return [_mean_lists([x[i] for x in lists]) for i in range(len(lists[0]))]
    return [_mean([x[i] for x in lists]) for i in range(len(lists[0]))]


def aggregate_seeds(per_seed: list[dict], header: dict) -> dict:
    """One results dict from several seeds' (same methods and tasks): every figure's mean, its
    standard deviation over the seeds under "spread" and the seeds' values under "per_seed"."""
    names = list(per_seed[0]["methods"])
    out = {**header, "fine_tuning_seeds": [r.get("fine_tuning_seed") for r in per_seed], "methods": {}}
    for name in names:
        runs = [r["methods"][name] for r in per_seed]
        m: dict = {}
        for key in ("acc_matrix", "probe", "probe_generation", "perplexity_curve", "retention_curve",
                    "format_retention_curve", "train_loss"):
            m[key] = _mean_lists([r.get(key) or [] for r in runs])
        for key in SCALARS:
            m[key] = _mean([r.get(key) for r in runs])
        m["spread"] = {key: _std([r.get(key) for r in runs]) for key in SCALARS}
        m["per_seed"] = {key: [r.get(key) for r in runs] for key in SCALARS}
        m["completed_tasks"] = min(r.get("completed_tasks", 0) for r in runs)
        m["n_tasks"] = runs[0].get("n_tasks")
        out["methods"][name] = m
    return out


def _fmt(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "signed_pct":
        return f"{100 * value:+.1f}"
    if kind == "ratio":
        return f"{value:.2f}"
    if kind == "count":
        return f"{int(value):,}"
    return f"{value:.1f}"


def _cell(m: dict, key: str, kind: str) -> str:
    text = _fmt(m.get(key), kind)
    spread = (m.get("spread") or {}).get(key)
    if spread is not None and kind in ("pct", "signed_pct", "ratio"):
        text += " ± " + (f"{100 * spread:.1f}" if kind != "ratio" else f"{spread:.2f}")
    return text


def _rows(results: dict) -> list[list[str]]:
    rows = []
    for name, m in results["methods"].items():
        done, total = m.get("completed_tasks"), m.get("n_tasks")
        label = name if done == total else f"{name} ({done}/{total})"
        rows.append([label] + [_cell(m, key, kind) for _, key, kind in COLUMNS[1:]])
    return rows


def _base_line(results: dict) -> str:
    base = results.get("base") or {}
    tasks = results.get("tasks") or []
    return (f"base model: probe {_fmt(base.get('probe'), 'pct')} (likelihood ranking), "
            f"{_fmt(base.get('probe_generation'), 'pct')} (generation), held-out perplexity "
            f"{_fmt(base.get('perplexity'), 'ratio')}, task accuracy {_fmt(base.get('average_accuracy'), 'pct')}; "
            f"tasks in order: {', '.join(tasks) if tasks else '-'}")


def format_table(results: dict) -> str:
    """The final table for stdout: one row per method (see the module doc for each figure)."""
    results = _check_results(results)
    rows = [[c for c, _, _ in COLUMNS]] + _rows(results)
    widths = [max(len(r[c]) for r in rows) for c in range(len(COLUMNS))]
    lines = [_base_line(results)]
    for k, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    results = _check_results(results)
    lines = ["| " + " | ".join(c for c, _, _ in COLUMNS) + " |", "|" + "|".join([":---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
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
        ret = [np.nan if v is None else v for v in (m.get("retention_curve") or [])]
        ax_r.plot(range(len(ret) + 1), [1.0] + ret, marker="o", label=name)
        curve = _seen_curve(_acc_rows(m, len(tasks) or len(m.get("acc_matrix") or [])))
        ax_a.plot(range(1, len(curve) + 1), curve, marker="o", label=name)
    ax_r.set_xticks(range(len(tasks) + 1), ["base"] + tasks, rotation=30, ha="right")
    ax_r.set_title("knowledge retention (likelihood probe / base)")
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


def label_offsets(points: list[tuple[float, float]], near: float = 0.04) -> list[tuple[int, int]]:
    """Label offsets (points) for markers at `points` (x, y): (4, 4), up and right, unless the
    marker is within `near` of the span of each axis of earlier ones: then its label goes down
    by the first whole number of lines (10 points) that none of theirs took, so that labels of
    close markers do not overlap."""
    if not points:
        return []
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    sx, sy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    lines: list[int] = []
    for i, (x, y) in enumerate(points):
        taken = {lines[j] for j in range(i) if abs(x - xs[j]) < near * sx and abs(y - ys[j]) < near * sy}
        lines.append(min(set(range(len(taken) + 1)) - taken))
    return [(4, 4 - 10 * k) for k in lines]


def plot_stability_plasticity(results: dict, path: str | os.PathLike) -> Path:
    """Retention (y) against plasticity (x), one point per finished method (error bars: the
    spread over seeds); LaLoRA's λ sweep joined by a line in the order of λ."""
    results = _check_results(results)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    sweep, points = [], []
    for name, m in results["methods"].items():
        x, y = m.get("plasticity"), m.get("retention")
        if x is None or y is None:
            continue
        spread = m.get("spread") or {}
        ax.errorbar(x, y, xerr=spread.get("plasticity"), yerr=spread.get("retention"), fmt="o", capsize=3)
        points.append((name, x, y))
        if name.startswith("lalora-diag-"):
            sweep.append((x, y))
    for (name, x, y), offset in zip(points, label_offsets([(x, y) for _, x, y in points])):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=offset, fontsize=7,
                    arrowprops=None if offset[1] == 4 else {"arrowstyle": "-", "lw": 0.4, "color": "grey"})
    if len(sweep) > 1:
        ax.plot(*zip(*sweep), color="grey", lw=0.8, ls="--", label="LaLoRA diag: λ sweep")
        ax.legend(fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("plasticity: accuracy on each task right after training it")
    ax.set_ylabel("retention: knowledge probe after the last task / base")
    ax.set_title("stability against plasticity (up and right is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------ report
def write_markdown_report(results: dict, out_dir: str | os.PathLike) -> Path:
    """Write the two plots and report.md (config, base model, table, plots, accuracy matrices)
    into out_dir; returns the report's path."""
    results = _check_results(results)
    out = Path(out_dir)
    plot_curves(results, out / CURVES_PNG)
    plot_accuracy_matrices(results, out / MATRICES_PNG)
    plot_stability_plasticity(results, out / TRADEOFF_PNG)
    tasks = list(results.get("tasks") or [])
    config = results.get("config") or {}
    lines = ["# fastcur continual: results", ""]
    if config:
        lines += ["Configuration: " + ", ".join(f"`{k}={v}`" for k, v in config.items()), ""]
    lines += [_base_line(results) + ".", "",
              "Retention: the knowledge probe (the true value ranked first by likelihood among the "
              "attribute's values) after the last task, relative to the base model's (n/a when the "
              "base scores 0). Format ret.: the same questions answered by greedy generation (exact "
              "match), relative to the base. Plasticity: mean accuracy on each task right after "
              "training it. Avg acc: mean over all tasks after the last one. BWT (backward transfer): "
              "mean change, in accuracy points, of each earlier task's accuracy from just after it was "
              "trained to the end (negative = forgetting). Gain: avg acc minus the base model's. "
              "Perplexity: on held-out text, after the last task. ms/step: mean training step time over the "
              "timed steps (the first steps of each task are left out). With several seeds: mean ± "
              "standard deviation over the seeds.", "",
              markdown_table(results), "",
              f"![retention against plasticity]({TRADEOFF_PNG})", "",
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
