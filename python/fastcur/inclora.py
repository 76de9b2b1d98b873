"""IncLoRA with JumpLoRA adapters and the ELLA penalty (docs/methods.md, "JumpLoRA, IncLoRA and
ELLA"): the continual-learning manager that gives every task fresh adapters and folds each
task's sparse update into W. Defaults as the released code: ELLA with λ = 3e4 (`ella_lambda=0`
is plain IncLoRA), the interpolated ELLA delta, the f ramp from 20 % to 80 % of the task's
steps with the threshold reset at its start, per-block θ grouped by the released name rule,
and never the LM head.

    manager = fastcur.IncLoRA(model, target_modules=["q_proj", "v_proj"])
    for task in tasks:
        params = manager.start_task(total_steps=len(task))
        opt = torch.optim.AdamW(params, lr=1e-3)
        for batch in task:
            loss = task_loss(model, batch) + manager.penalty()
            loss.backward(); opt.step(); opt.zero_grad()
            manager.step()              # advances f; resets θ at int(0.2 * total_steps)
        manager.end_task()              # W += sparse ΔW (f = 1), W_past += ΔW, adapters removed

A checkpoint is the model's state_dict (merged base weights and, during a task, the adapter's
tensors) plus the manager's own state (`save` / `load`: the tasks done, the f schedule's
position, W_past). To resume, build the manager with the same options, `load` it (during a
task this puts the task's adapter layers back), then load the model's state_dict.
"""
from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from ._atomic import atomic_write

from .modules.jump_lora_linear import (DEFAULT_LOG_THETA, SCOPES, JumpLoRALinear, JumpThreshold,
                                       f_schedule, reset_step, reset_thresholds,
                                       threshold_group_key)
from .ops.reference import ELLA_DELTAS

DEFAULT_ELLA_LAMBDA = 3e4     # the released training script's --ella-lambda


def ella_penalty(model: nn.Module) -> torch.Tensor:
    """ELLA's P = Σ_layers ‖ΔW_t ⊙ W_past‖_F² / num_layers over the weight-gated JumpLoRALinear
    layers of `model` that hold a W_past, ΔW_t each layer's ELLA delta (`ella_delta`: by default
    the interpolated update it applies; hard mask, no gradient to θ). 0 when there are none."""
    layers = [m for m in model.modules()
              if isinstance(m, JumpLoRALinear) and m.gate == "weight" and m.W_past is not None]
    if not layers:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return sum(m.ella_penalty() for m in layers) / len(layers)


_FORMAT = "fastcur.inclora/1"
_META_KEY = "fastcur_inclora"


# The per-block threshold group (the released name rule; `fastcur.inject` uses it too).
_block_of = threshold_group_key


class IncLoRA:
    """Incremental LoRA with JumpLoRA adapters (docs/methods.md, JumpLoRA), optionally with ELLA.

    Args:
        model: any nn.Module; its nn.Linear layers named by `target_modules` get adapters.
        target_modules: None (every nn.Linear except the output head: `get_output_embeddings()`
            or a module named `lm_head`), a list of names (a layer matches when its full name
            equals one or ends with "." + one, as PEFT), or a regex string (full match).
        rank, alpha: of every adapter (s = alpha / r; released: 8 and 32).
        scope: "global" (one θ for all layers, default), "per_block" (the released name rule:
            `threshold_group_key`) or "per_layer".
        ella_lambda: weight of the ELLA penalty (3e4 as released; 0 = plain IncLoRA, and then
            no W_past is kept).
        ella_delta: what ELLA penalizes: "interpolated" (released default), "masked", "sparse".
        bandwidth, reduction: of the straight-through θ gradient.
        f_start, f_end: the f schedule's boundaries as fractions of the task's steps, truncated
            to steps as released (`f_schedule`); θ is reset at step int(f_start * total_steps).
        init_log_theta: θ's log at the start of each task (-4.7).
        jump: True (default) for JumpLoRA adapters; False for the plain IncLoRA / ELLA baselines
            the JumpLoRA paper compares with: f stays 0 (dense LoRA updates, θ neither trained
            nor reset) and end_task folds the dense s B A.

    Only the weight gate is supported: a rank-gated adapter has no weight-space ΔW to merge.
    """

    def __init__(self, model: nn.Module, target_modules=None, *, rank: int = 8, alpha: float = 32.0,
                 scope: str = "global", ella_lambda: float = DEFAULT_ELLA_LAMBDA, bandwidth: float = 1e-3,
                 reduction: str = "mean", f_start: float = 0.2, f_end: float = 0.8,
                 init_log_theta: float = DEFAULT_LOG_THETA, ella_delta: str = "interpolated",
                 jump: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"fastcur.IncLoRA: model must be an nn.Module, got {type(model).__name__}")
        if scope not in SCOPES:
            raise ValueError(f"fastcur.IncLoRA: scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if not isinstance(ella_lambda, (int, float)) or ella_lambda < 0:
            raise ValueError(f"fastcur.IncLoRA: ella_lambda must be a float >= 0, got {ella_lambda!r}")
        if not 0.0 <= f_start <= f_end <= 1.0:
            raise ValueError(f"fastcur.IncLoRA: need 0 <= f_start <= f_end <= 1, got {f_start}, {f_end}")
        if ella_delta not in ELLA_DELTAS:
            raise ValueError(f"fastcur.IncLoRA: ella_delta must be one of {', '.join(map(repr, ELLA_DELTAS))}, "
                             f"got {ella_delta!r}")
        if not isinstance(jump, bool):
            raise TypeError(f"fastcur.IncLoRA: jump must be a bool, got {jump!r}")
        self.model, self.scope, self.ella_lambda, self.jump = model, scope, float(ella_lambda), jump
        self.options = dict(rank=rank, alpha=alpha, bandwidth=bandwidth, reduction=reduction,
                            ella_delta=ella_delta)
        self.f_start, self.f_end, self.init_log_theta = f_start, f_end, init_log_theta
        self.names = self._targets(target_modules)
        if not self.names:
            raise ValueError(f"fastcur.IncLoRA: no nn.Linear layer of the model matches target_modules={target_modules!r}")
        self.W_past: dict[str, torch.Tensor] = {}
        self._originals: dict[str, nn.Linear] = {}
        self.task = 0                 # tasks finished
        self.active = False
        self._step, self._total, self._reset_done = 0, 0, False

    def _targets(self, target_modules) -> list[str]:
        from .inject import output_head   # (inject imports this module)

        head = output_head(self.model) if target_modules is None else None
        names = []
        for name, module in self.model.named_modules():
            if not isinstance(module, nn.Linear) or not name:
                continue
            if target_modules is None:
                ok = module is not head
            elif isinstance(target_modules, str):
                ok = re.fullmatch(target_modules, name) is not None
            else:
                ok = any(name == t or name.endswith("." + t) for t in target_modules)
            if ok:
                names.append(name)
        return names

    def _set(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, module)

    def layers(self) -> dict[str, JumpLoRALinear]:
        """The adapted layers of the current task, by name (empty between tasks)."""
        return {n: self.model.get_submodule(n) for n in self.names} if self.active else {}

    # -- a task ----------------------------------------------------------------------------------
    def start_task(self, total_steps: int | None = None) -> list[nn.Parameter]:
        """Wrap every target layer with a fresh JumpLoRALinear (new A, B and θ) and return the
        trainable parameters. `total_steps` drives the f schedule through `step()` (f = 0 at the
        start); None keeps f = 1 for the whole task (and no reset), where nothing passes the
        gate while B = 0: the layers warn."""
        if self.active:
            raise RuntimeError("fastcur.IncLoRA.start_task: a task is active; call end_task() first")
        shared: dict[str, JumpThreshold] = {}
        for name in self.names:
            lin = self.model.get_submodule(name)
            key = {"global": "", "per_block": _block_of(name), "per_layer": name}[self.scope]
            if key not in shared:
                shared[key] = JumpThreshold(None, self.init_log_theta, device=lin.weight.device,
                                            dtype=lin.weight.dtype, scope=self.scope)
            layer = JumpLoRALinear.from_linear(lin, threshold=shared[key], f=1.0, **self.options)
            self._originals[name] = lin   # the original module, put back at end_task
            if self.ella_lambda > 0 and name in self.W_past:
                layer.set_w_past(self.W_past[name])
            self._set(name, layer)
        self.active = True
        self._step, self._total, self._reset_done = 0, int(total_steps or 0), False
        self._apply_f()
        return self.parameters()

    def parameters(self) -> list[nn.Parameter]:
        """The current task's trainable parameters (A, B of every layer, each θ once; no θ
        with jump=False)."""
        seen, out = set(), []
        for layer in self.layers().values():
            for p in (layer.lora_A.weight, layer.lora_B.weight) + ((layer.threshold.log_theta,) if self.jump else ()):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    @property
    def f(self) -> float:
        if not self.jump:
            return 0.0
        return f_schedule(self._step, self._total, self.f_start, self.f_end) if self._total else 1.0

    def _apply_f(self) -> None:
        f = self.f
        for layer in self.layers().values():
            layer.f = f

    def step(self) -> float:
        """Advance the schedule by one optimizer step; returns the f the next forward uses.
        At the step count `reset_step(total_steps, f_start)` (int(f_start * total_steps), at
        least 1) the thresholds are reset exactly, as the released code does (before f leaves 0)."""
        if not self.active:
            raise RuntimeError("fastcur.IncLoRA.step: no active task; call start_task() first")
        self._step += 1
        if self.jump and self._total and self._step == reset_step(self._total, self.f_start) and not self._reset_done:
            reset_thresholds(list(self.layers().values()), scope=self.scope)
            self._reset_done = True
        self._apply_f()
        return self.f

    def penalty(self) -> torch.Tensor:
        """ella_lambda · ELLA penalty of the model (a 0 tensor when ella_lambda is 0)."""
        if self.ella_lambda == 0 or not self.active:
            return torch.zeros((), device=next(self.model.parameters()).device)
        return self.ella_lambda * ella_penalty(self.model)

    # -- state -------------------------------------------------------------------------------------
    def _settings(self) -> dict:
        return {"names": list(self.names), "scope": self.scope, "ella_lambda": self.ella_lambda, "jump": self.jump,
                "options": dict(self.options), "f_start": self.f_start, "f_end": self.f_end,
                "init_log_theta": self.init_log_theta}

    def state_dict(self) -> dict:
        """{"format", "settings", "task", "active", "step", "total_steps", "reset_done",
        "tensors"}: the options this manager was built with (checked on load), the schedule's
        position, and `W_past.<layer name>` tensors (with ELLA). The adapter tensors of an
        active task are not included: they are in the model's state_dict."""
        return {"format": _FORMAT, "settings": self._settings(), "task": self.task,
                "active": self.active, "step": self._step, "total_steps": self._total,
                "reset_done": self._reset_done,
                "tensors": {f"W_past.{n}": w for n, w in self.W_past.items()}}

    def load_state_dict(self, state: dict) -> "IncLoRA":
        """Restore a `state_dict` into a manager built with the same options and no active task;
        a state saved during a task starts that task again (fresh adapter layers, to be filled
        by the model's state_dict) at the saved position of the f schedule."""
        where = "fastcur.IncLoRA.load_state_dict"
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"{where}: not an IncLoRA state (format {_FORMAT!r})")
        if self.active:
            raise RuntimeError(f"{where}: this manager has an active task; load into one before "
                               f"start_task() or after end_task()")
        mine, saved = self._settings(), state["settings"]
        for key in mine:
            if saved.get(key) != mine[key]:
                raise ValueError(f"{where}: the state was saved with {key}={saved.get(key)!r}, "
                                 f"this manager has {key}={mine[key]!r}")
        past = {k[len("W_past."):]: v for k, v in state["tensors"].items() if k.startswith("W_past.")}
        unknown = sorted(set(past) - set(self.names))
        if unknown:
            raise ValueError(f"{where}: W_past for layers this manager does not adapt: {unknown}")
        for name, w in past.items():
            weight = self.model.get_submodule(name).weight
            if w.shape != weight.shape:
                raise ValueError(f"{where}: W_past of {name!r} has shape {tuple(w.shape)}, "
                                 f"the layer's weight {tuple(weight.shape)}")
        self.W_past = {n: w.to(self.model.get_submodule(n).weight) for n, w in past.items()}
        self.task = int(state["task"])
        if state["active"]:
            self.start_task(int(state["total_steps"]) or None)
            self._step, self._reset_done = int(state["step"]), bool(state["reset_done"])
            self._apply_f()
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write `state_dict()` to a safetensors file atomically (temporary file + rename)."""
        from safetensors.torch import save_file

        state = self.state_dict()
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.pop("tensors").items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={_META_KEY: json.dumps(state)}))

    def load(self, path: str | os.PathLike) -> "IncLoRA":
        """Read a file written by `save` (see `load_state_dict`)."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(_META_KEY)
            if meta is None:
                raise ValueError(f"fastcur.IncLoRA.load: {os.fspath(path)!r} is not an IncLoRA state file")
            state = json.loads(meta)
            state["tensors"] = {k: f.get_tensor(k) for k in f.keys()}
        return self.load_state_dict(state)

    @torch.no_grad()
    def end_task(self) -> None:
        """Merge every layer's sparse ΔW (f = 1; the dense s B A with jump=False) into W, add it
        to W_past (with ELLA), and put the plain nn.Linear layers back."""
        if not self.active:
            raise RuntimeError("fastcur.IncLoRA.end_task: no active task")
        for name, layer in self.layers().items():
            delta = layer.delta_weight(f=1.0 if self.jump else 0.0)
            lin = self._originals.pop(name)
            lin.weight.add_(delta.to(lin.weight.dtype))
            if self.ella_lambda > 0:
                past = self.W_past.get(name)
                self.W_past[name] = delta if past is None else past + delta
            self._set(name, lin)
        self.active = False
        self.task += 1
