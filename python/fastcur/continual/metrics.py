"""Continual-learning metrics on the accuracy matrix `acc` ([T, T] array-like:
acc[i, j] = accuracy on task j after training tasks 0..i in order).

- average_accuracy: mean of the last row (every task, after the whole sequence).
- backward_transfer (BWT, Lopez-Paz & Ranzato 2017): mean over j < T-1 of acc[T-1, j] - acc[j, j];
  negative = forgetting.
- forgetting (Chaudhry et al. 2018): mean over j < T-1 of max_{i < T-1} acc[i, j] - acc[T-1, j].
- average_accuracy_curve: after task i, the mean accuracy on the tasks seen so far (acc[i, :i+1]).
- retention: probe accuracy relative to the base model's (None when the base scores 0).
For T = 1, backward transfer and forgetting are 0 (no earlier task to lose).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _matrix(acc, name: str = "acc") -> np.ndarray:
    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
        raise ValueError(f"{name} must be a square [T, T] matrix with T >= 1, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite, got {a.tolist()}")
    return a


def average_accuracy(acc) -> float:
    """Mean of the last row of `acc`: accuracy over all tasks after the last one."""
    return float(_matrix(acc)[-1].mean())


def backward_transfer(acc) -> float:
    """mean_{j < T-1} (acc[T-1, j] - acc[j, j]); 0.0 when T = 1."""
    a = _matrix(acc)
    T = a.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean([a[T - 1, j] - a[j, j] for j in range(T - 1)]))


def forgetting(acc) -> float:
    """mean_{j < T-1} (max_{i < T-1} acc[i, j] - acc[T-1, j]); 0.0 when T = 1."""
    a = _matrix(acc)
    T = a.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean([a[:T - 1, j].max() - a[T - 1, j] for j in range(T - 1)]))


def average_accuracy_curve(acc) -> list[float]:
    """[mean(acc[i, :i+1]) for i in range(T)]: accuracy on the tasks seen so far, task by task."""
    a = _matrix(acc)
    return [float(a[i, :i + 1].mean()) for i in range(a.shape[0])]


def retention(probe_acc: float, base_probe_acc: float) -> float | None:
    """probe_acc / base_probe_acc (may exceed 1). A base accuracy of 0 leaves nothing to retain:
    retention is then None (reported as n/a)."""
    for name, v in (("probe_acc", probe_acc), ("base_probe_acc", base_probe_acc)):
        if not isinstance(v, (int, float, np.floating)) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name} must be an accuracy in [0, 1], got {v!r}")
    if base_probe_acc == 0:
        return None
    return float(probe_acc) / float(base_probe_acc)


def retention_curve(probe_accs: Sequence[float], base_probe_acc: float) -> list[float | None]:
    """retention(p, base_probe_acc) for each probe accuracy p (one per task in the sequence)."""
    return [retention(p, base_probe_acc) for p in probe_accs]
