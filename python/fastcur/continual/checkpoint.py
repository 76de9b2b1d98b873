"""Atomic state files of `fastcur continual`: one per method, rewritten after every task, so
`--resume` continues an interrupted run from each method's last completed task.

A state holds the model's state_dict (base weights included: full fine-tuning, SECURA's merges
and IncLoRA's folds change them), the method's own state (EWC Fisher, replay buffer, IncLoRA's
W_past, LaLoRA's curvature, merge counters), the RNG states and the method's results so far.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from .._atomic import atomic_write

FORMAT = "fastcur.continual.state/1"


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, then os.replace (never a torn file)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA, when present) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_path(out_dir: str | os.PathLike, method: str) -> str:
    return os.path.join(os.fspath(out_dir), "state", f"{method}.pt")


def save_state(out_dir, method: str, *, config: dict, completed_tasks: int, model_state: dict,
               method_state: dict, results: dict) -> None:
    """Write the state of `method` after `completed_tasks` tasks (atomic)."""
    atomic_torch_save({"format": FORMAT, "method": method, "config": config, "completed_tasks": completed_tasks,
                       "model": {k: v.detach().cpu() for k, v in model_state.items()},
                       "method_state": method_state, "rng": rng_state(), "results": results},
                      state_path(out_dir, method))


def load_state(out_dir, method: str, config: dict) -> dict | None:
    """The saved state of `method`, or None when there is none. Raises ValueError when the file
    is not a state file, or was written by a run with a different configuration."""
    path = state_path(out_dir, method)
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - name the file whatever went wrong
        raise ValueError(f"--resume: cannot read the state file {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"--resume: {path} is not a fastcur continual state file (format {FORMAT!r})")
    saved = state["config"]
    diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if diff:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r}, now {config.get(k)!r}" for k in diff)
        raise ValueError(f"--resume: the run in {os.fspath(out_dir)} used other settings ({detail}); "
                         f"use the same options, another --out, or drop --resume to start over")
    return state
