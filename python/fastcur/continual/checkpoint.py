"""State files of `fastcur continual`: one per method, rewritten after every task, so `--resume`
continues an interrupted run from each method's last completed task. Nothing is unpickled.

A state is a tree (dicts, lists, tuples, str, numbers, None, tensors, NumPy arrays): the model's
state_dict (base weights included: full fine-tuning, SECURA's merges and IncLoRA's folds change
them), the method's own state (EWC Fisher, replay buffer, IncLoRA's W_past, LaLoRA's curvature),
the RNG states and the method's results so far. It is stored as two files in `<out>/state/`:

- `<method>-<n>.safetensors`: every tensor of the tree (NumPy arrays as tensors), n = tasks done;
- `<method>.json`: the tree with each tensor replaced by {"__tensor__": key}, tuples by
  {"__tuple__": [...]}, arrays by {"__ndarray__": key, "dtype": ...}, and the tensor file's name.

The tensor file is written first (atomically, under a new name), then the JSON (atomically), then
older tensor files are removed: after a crash at any instant the JSON names a complete file.
"""
from __future__ import annotations

import glob
import json
import os
import random

import numpy as np
import torch

from .._atomic import atomic_write, atomic_write_text

FORMAT = "fastcur.continual.state/2"


# ------------------------------------------------------------------ tree <-> (JSON, tensors)
def _flatten(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "iu" else obj.copy())
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"state keys must be str, got {[type(k).__name__ for k in obj]}")
        return {k: _flatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a continual state file")


def _unflatten(obj, tensors: dict[str, torch.Tensor], where: str):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return _tensor(tensors, obj["__tensor__"], where)
        if "__ndarray__" in obj:
            return _tensor(tensors, obj["__ndarray__"], where).numpy().astype(obj["dtype"])
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors, where) for v in obj["__tuple__"])
        return {k: _unflatten(v, tensors, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors, where) for v in obj]
    return obj


def _tensor(tensors, key, where):
    if key not in tensors:
        raise ValueError(f"--resume: {where} refers to tensor {key!r}, which its tensor file lacks (damaged state)")
    return tensors[key]


# ------------------------------------------------------------------ RNG
def rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA, when initialized) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])


# ------------------------------------------------------------------ files
def state_path(out_dir: str | os.PathLike, method: str) -> str:
    """The JSON file of `method`'s state (its tensors sit beside it)."""
    return os.path.join(os.fspath(out_dir), "state", f"{method}.json")


def write_state(path: str, tree: dict, tag: str) -> None:
    """Store `tree` as `path` (JSON) + `<stem>-<tag>.safetensors` beside it (see the module doc)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    body = _flatten(tree, tensors)
    stem = os.path.splitext(path)[0]
    tensor_file = f"{stem}-{tag}.safetensors"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(tensor_file, lambda tmp: save_file(tensors, tmp))
    atomic_write_text(path, json.dumps({"format": FORMAT, "tensors": os.path.basename(tensor_file), "state": body}))
    for old in glob.glob(glob.escape(stem) + "-*.safetensors"):
        if os.path.basename(old) != os.path.basename(tensor_file):
            os.remove(old)


def read_state(path: str) -> dict:
    """The tree `write_state` stored; ValueError naming the file when it is damaged or foreign."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--resume: cannot read the state file {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("tensors"), str):
        raise ValueError(f"--resume: {path} is not a fastcur continual state file (format {FORMAT!r})")
    name = doc["tensors"]
    if os.path.basename(name) != name:
        raise ValueError(f"--resume: {path} names a tensor file outside its folder: {name!r}")
    tensor_file = os.path.join(os.path.dirname(path), name)
    try:
        tensors = load_file(tensor_file)
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"--resume: cannot read the tensor file {tensor_file}: {exc}") from None
    return _unflatten(doc["state"], tensors, path)


def save_state(out_dir, method: str, *, config: dict, completed_tasks: int, model_state: dict,
               method_state: dict, results: dict) -> None:
    """Write the state of `method` after `completed_tasks` tasks (crash-safe, see the module doc)."""
    write_state(state_path(out_dir, method),
                {"method": method, "config": config, "completed_tasks": completed_tasks, "model": dict(model_state),
                 "method_state": method_state, "rng": rng_state(), "results": results},
                tag=str(completed_tasks))


def load_state(out_dir, method: str, config: dict) -> dict | None:
    """The saved state of `method`, or None when there is none. Raises ValueError when the files
    are damaged or foreign, or were written by a run with a different configuration."""
    path = state_path(out_dir, method)
    if not os.path.exists(path):
        return None
    state = read_state(path)
    keys = ("method", "config", "completed_tasks", "model", "method_state", "rng", "results")
    if not isinstance(state, dict) or any(k not in state for k in keys) or state["method"] != method:
        raise ValueError(f"--resume: {path} is not the state of method {method!r} (damaged state)")
    saved = state["config"]
    diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if diff:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r}, now {config.get(k)!r}" for k in diff)
        raise ValueError(f"--resume: the run in {os.fspath(out_dir)} used other settings ({detail}); "
                         f"use the same options, another --out, or drop --resume to start over")
    return state
