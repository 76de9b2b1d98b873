"""JumpLoRALinear: the JumpLoRA adapter (arXiv 2604.16171; docs/methods.md, "JumpLoRA, IncLoRA
and ELLA"), plus its shared threshold object, the f schedule and the exact threshold reset.

The f schedule runs without user code: a layer built with `total_steps` starts at f = 0, and
every `torch.optim` optimizer step that updates its threshold or factors advances the schedule
of its `JumpThreshold` (a global optimizer step post-hook, `_on_optimizer_step`), resetting θ
at the released code's boundary step.
"""
from __future__ import annotations

import math
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.ella_penalty import ella_penalty as _ella_op
from ..ops.jump_linear import REDUCTIONS, jump_linear, jump_linear_ella, theta_dtype
from ..ops.jump_rank_linear import jump_rank_linear
from ..ops.reference import ELLA_DELTAS
from .adapter_linear import AdapterLinear, LinearTap, LowRankTap

GATES = ("weight", "rank")
SCOPES = ("global", "per_block", "per_layer")
DEFAULT_LOG_THETA = -4.7


def schedule_boundaries(total_steps: int, start: float = 0.2, end: float = 0.8) -> tuple[int, int]:
    """(first, final): the optimizer-step counts where the f ramp starts and ends, truncated to
    integers as the released code does (`int(0.2 * max_steps)`, `int(0.8 * max_steps)`)."""
    return int(start * total_steps), int(end * total_steps)


def reset_step(total_steps: int, start: float = 0.2) -> int:
    """The optimizer-step count after which θ is reset: `int(start * total_steps)` as released,
    but at least 1 (the released callback never sees step 0, so runs under 5 steps would never
    reset there; docs/methods.md, Decisions)."""
    return max(schedule_boundaries(total_steps, start, start)[0], 1)


def f_schedule(step: int, total_steps: int, start: float = 0.2, end: float = 0.8) -> float:
    """The interpolation weight f after `step` optimizer steps of a task of `total_steps` steps,
    as released: with (first, final) = `schedule_boundaries(...)`,
    f = clamp((step - first) / (final - first), 0, 1) (a step from 0 to 1 at `final` when the
    two coincide), and 0 before the first step. `total_steps <= 0` (no schedule) gives 1."""
    if total_steps <= 0:
        return 1.0
    if step <= 0:
        return 0.0          # the released code's start, whatever the boundaries
    first, final = schedule_boundaries(total_steps, start, end)
    if final <= first:
        return 1.0 if step >= final else 0.0
    return min(1.0, max(0.0, (step - first) / (final - first)))


def check_schedule(where: str, total_steps, f_start, f_end) -> None:
    """ValueError naming the argument unless total_steps is None or an int >= 1 and
    0 <= f_start <= f_end <= 1."""
    if total_steps is not None and (not isinstance(total_steps, int) or isinstance(total_steps, bool)
                                    or total_steps < 1):
        raise ValueError(f"{where}: total_steps must be None or an int >= 1, got {total_steps!r}")
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (f_start, f_end))
    if not ok or not 0.0 <= f_start <= f_end <= 1.0:
        raise ValueError(f"{where}: need 0 <= f_start <= f_end <= 1, got f_start={f_start!r}, f_end={f_end!r}")


class JumpThreshold(nn.Module):
    """A threshold θ = exp(log_theta) that one or several JumpLoRALinear layers share, and the
    f schedule of those layers.

    `log_theta` is a scalar for the weight gate, `[r]` (one per rank channel) for the rank
    gate, float32 on a bfloat16/float16 `dtype` (in bfloat16, -4.7 rounds to -4.6875 and an
    Adam step of 1e-3 cannot move it). Pass one instance as `threshold=` to every layer of a
    scope ("global": the whole model, "per_block": one transformer block, "per_layer": one
    layer); `reset_thresholds` resets each shared instance exactly over all the layers that hold
    it, with the released rule of its `scope`.

    Schedule (`set_schedule(total_steps, f_start, f_end)`, done by the layers built with
    `total_steps`): `steps` (a buffer, saved with the model's state_dict) counts the optimizer
    steps that updated this threshold or its layers' factors; `f` = `f_schedule(steps, ...)`;
    at the step count `reset_step(total_steps, f_start)` (`int(f_start * total_steps)`, as
    released, at least 1) θ is reset.
    """

    def __init__(self, size: int | None = None, init: float = DEFAULT_LOG_THETA, device=None,
                 dtype=None, scope: str = "per_layer"):
        super().__init__()
        if scope not in SCOPES:
            raise ValueError(f"fastcur.JumpThreshold: scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if dtype in (torch.bfloat16, torch.float16):
            dtype = torch.float32
        shape = () if size is None else (size,)
        self.log_theta = nn.Parameter(torch.full(shape, float(init), device=device, dtype=dtype))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=device))
        self._count = 0     # `steps` on the host: a forward reads f without a device sync
        self.scope = scope
        self.total_steps: int | None = None
        self.f_start, self.f_end = 0.2, 0.8
        self._layers: dict[int, weakref.ref] = {}   # id(layer) -> weak reference

    @property
    def theta(self) -> torch.Tensor:
        return self.log_theta.detach().exp()

    # -- the schedule --------------------------------------------------------------------------
    def set_schedule(self, total_steps: int | None, f_start: float = 0.2, f_end: float = 0.8) -> None:
        """Drive the f of every layer holding this threshold from the optimizer steps (None: no
        schedule). A threshold shared by layers must get the same schedule from each."""
        check_schedule("fastcur.JumpThreshold.set_schedule", total_steps, f_start, f_end)
        if self.total_steps is not None and (self.total_steps, self.f_start, self.f_end) != (total_steps, f_start, f_end):
            raise ValueError(f"fastcur.JumpThreshold.set_schedule: this threshold already runs the schedule "
                             f"total_steps={self.total_steps}, f_start={self.f_start}, f_end={self.f_end}; "
                             f"layers sharing it need the same, got {total_steps}, {f_start}, {f_end}")
        self.total_steps, self.f_start, self.f_end = total_steps, float(f_start), float(f_end)
        if total_steps is not None:
            _SCHEDULED.add(self)
            _ensure_hook()
        else:
            _SCHEDULED.discard(self)

    @property
    def f(self) -> float:
        """The schedule's f now (1 without a schedule)."""
        if self.total_steps is None:
            return 1.0
        return f_schedule(self._count, self.total_steps, self.f_start, self.f_end)

    def attach(self, layer: "JumpLoRALinear") -> None:
        """Remember `layer` (weakly) as one of the layers holding this threshold, and keep a
        running schedule registered. Layers call it at construction and in each training
        forward, so a deep-copied or unpickled model (which carries no weak references)
        re-attaches on its own."""
        ref = self._layers.get(id(layer))
        if ref is None or ref() is not layer:
            self._layers = {k: r for k, r in self._layers.items() if r() is not None}
            self._layers[id(layer)] = weakref.ref(layer)
        if self.total_steps is not None and self not in _SCHEDULED:
            _SCHEDULED.add(self)
            _ensure_hook()

    def layers(self) -> list["JumpLoRALinear"]:
        """The live layers that hold this threshold (not merged)."""
        out = [r() for r in self._layers.values()]
        return [m for m in out if m is not None and m.threshold is self and not m.merged]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._count = int(self.steps)     # (one read at load time)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_layers"] = {}          # weak references do not pickle; layers re-attach
        return state

    def _updated_by(self, param_ids: set[int]) -> bool:
        if id(self.log_theta) in param_ids:
            return True
        return any(id(m.lora_A.weight) in param_ids or id(m.lora_B.weight) in param_ids
                   for m in self.layers())

    @torch.no_grad()
    def step(self) -> float:
        """Count one optimizer step; at the released boundary reset θ over this threshold's
        layers. Returns the f the next forward uses."""
        self._count += 1
        self.steps.fill_(self._count)
        if self.total_steps is not None:
            if self._count == reset_step(self.total_steps, self.f_start):
                reset_thresholds(self.layers(), scope=self.scope)
        return self.f

    def extra_repr(self) -> str:
        sched = "" if self.total_steps is None else f", total_steps={self.total_steps}"
        return f"shape={tuple(self.log_theta.shape)}, scope={self.scope!r}{sched}"


# The released per-block grouping rule (ella/jump_lora.py of the JumpLoRA code): the first of
# these patterns (in this order) found in "." + the qualified name ends the block's prefix, so
# T5's self- and cross-attention of one block (`decoder.block.3.layer.0/1...`) share θ.
_BLOCK_PATTERNS = tuple(re.compile(p) for p in (
    r"\.encoder\.block\.(\d+)\.", r"\.decoder\.block\.(\d+)\.", r"\.encoder\.layer\.(\d+)\.",
    r"\.decoder\.layer\.(\d+)\.", r"\.decoder\.layers\.(\d+)\.", r"\.layers\.(\d+)\.",
    r"\.h\.(\d+)\.", r"\.block\.(\d+)\."))


def threshold_group_key(name: str) -> str:
    """The per-block threshold group of the layer named `name`, by the released rule: its name up
    to the first block pattern's match (`model.layers.3.self_attn.q_proj` -> `model.layers.3`,
    `decoder.block.3.layer.1.EncDecAttention.q` -> `decoder.block.3`), else the name itself."""
    dotted = "." + name
    for pattern in _BLOCK_PATTERNS:
        m = pattern.search(dotted)
        if m:
            return dotted[1:m.end() - 1]
    return name


# Thresholds with a running schedule, and the one global optimizer hook that steps them.
_SCHEDULED: "weakref.WeakSet[JumpThreshold]" = weakref.WeakSet()
_HOOK = None


def _on_optimizer_step(optimizer, args, kwargs) -> None:
    """After any torch.optim step: advance the schedule of every threshold it updated."""
    if not _SCHEDULED:
        return
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for threshold in list(_SCHEDULED):
        if threshold._updated_by(ids):
            threshold.step()


def _ensure_hook() -> None:
    global _HOOK
    if _HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK = register_optimizer_step_post_hook(_on_optimizer_step)


class JumpLoRALinear(AdapterLinear):
    """JumpLoRA: `y = x (W + ΔW)^T + b`, `ΔW = s (f J(B A) + (1 - f) B A)` (gate="weight"), or
    `y = x W^T + b + s g B^T`, `g = (x A^T) 1[x A^T > θ_j]` (gate="rank").

    Args (beyond nn.Linear's):
        rank: r; alpha: s = alpha / r (docs/methods.md, JumpLoRA: r = 8, alpha = 32).
        gate: "weight" (the paper's, default) or "rank" (the cheaper rank-gated variant).
        threshold: a `JumpThreshold` to share with other layers; None creates one for this
            layer (per-layer scope). Rank-gated layers need a threshold of size r.
        f: the interpolation weight in [0, 1] while no schedule runs (default 0: the released
            code's start; at f = 1 with B = 0 nothing passes the gate and nothing learns, which
            a training forward warns about once). Weight gate only; `IncLoRA` sets it.
        total_steps: the task's optimizer steps; set, the f schedule runs on its own (see the
            module doc): f = 0, then the released ramp from `f_start` to `f_end` of the steps,
            θ reset at `int(f_start * total_steps)`. Needs f = 0. Weight gate only.
        f_start, f_end: the ramp's boundaries as fractions of total_steps (0.2, 0.8 as released).
        bandwidth: ε of the straight-through kernel; reduction: "mean" or "sum" (weight gate).
        ella_delta: what ELLA penalizes (`fastcur.ops.ella_penalty`): "interpolated" (default,
            as released), "masked" or "sparse".
        init_log_theta: log θ at init (-4.7) when this layer creates its threshold.

    Tensors: `lora_A.weight` [r, in] (kaiming uniform, a = sqrt(5)), `lora_B.weight` [out, r]
    (zeros: the output equals the base layer's at init), `threshold.log_theta`, and the
    optional buffer `W_past` [out, in] for ELLA (None unless `set_w_past` was called). A, B
    and θ are float32 on a bfloat16/float16 base (`adapter_dtype`) and cast to the base's
    dtype at the fused op's edge, so gradients and optimizer updates land in float32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 *, rank: int = 8, alpha: float = 32.0, gate: str = "weight",
                 threshold: JumpThreshold | None = None, f: float = 0.0, bandwidth: float = 1e-3,
                 reduction: str = "mean", init_log_theta: float = DEFAULT_LOG_THETA,
                 total_steps: int | None = None, f_start: float = 0.2, f_end: float = 0.8,
                 ella_delta: str = "interpolated", _base=None):
        super().__init__(in_features, out_features, bias, device, dtype, _base=_base)
        name = "fastcur.JumpLoRALinear"
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"{name}: rank must be a positive int, got {rank!r}")
        if gate not in GATES:
            raise ValueError(f"{name}: gate must be 'weight' or 'rank', got {gate!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"{name}: reduction must be 'mean' or 'sum', got {reduction!r}")
        if not isinstance(bandwidth, (int, float)) or not bandwidth > 0:
            raise ValueError(f"{name}: bandwidth must be > 0, got {bandwidth!r}")
        if ella_delta not in ELLA_DELTAS:
            raise ValueError(f"{name}: ella_delta must be one of {', '.join(map(repr, ELLA_DELTAS))}, "
                             f"got {ella_delta!r}")
        check_schedule(name, total_steps, f_start, f_end)
        if total_steps is not None and (gate != "weight" or f != 0.0):
            raise ValueError(f"{name}: total_steps runs the f schedule of the weight gate, which starts "
                             f"at f = 0; got gate={gate!r}, f={f!r}")
        self.rank, self.alpha, self.gate = rank, float(alpha), gate
        self.scaling = self.alpha / rank
        self.bandwidth, self.reduction, self.ella_delta = float(bandwidth), reduction, ella_delta
        self.total_steps, self.f_start, self.f_end = total_steps, float(f_start), float(f_end)
        self._f = None
        self.f = f
        self._gate_checked = False
        factory = dict(device=self.weight.device, dtype=self.adapter_dtype)
        self.lora_A = nn.Linear(in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, out_features, bias=False, **factory)
        want = () if gate == "weight" else (rank,)
        if threshold is None:
            threshold = JumpThreshold(None if gate == "weight" else rank, init_log_theta, **factory)
        if not isinstance(threshold, JumpThreshold):
            raise TypeError(f"{name}: threshold must be a fastcur.JumpThreshold, got {type(threshold).__name__}")
        if tuple(threshold.log_theta.shape) != want:
            raise ValueError(f"{name}: a {gate}-gated layer of rank {rank} needs a threshold of shape "
                             f"{want}, got {tuple(threshold.log_theta.shape)}")
        self.threshold = threshold
        threshold.attach(self)
        if total_steps is not None:
            threshold.set_schedule(total_steps, f_start, f_end)
        self.register_buffer("W_past", None)
        self._ella_cache: tuple | None = None   # (penalty, versions of A, B, log_theta) of the last forward
        self.reset_adapter()

    # -- state -----------------------------------------------------------------------------------
    @property
    def f(self) -> float:
        """The interpolation weight the next forward uses: the schedule's (see `total_steps`)
        when one runs, else the value set."""
        if self.total_steps is not None:
            return self.threshold.f
        return self._f

    @f.setter
    def f(self, value: float) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
            raise ValueError(f"fastcur.JumpLoRALinear: f must be a float in [0, 1], got {value!r}")
        if self.total_steps is not None and self._f is not None and float(value) != self._f:
            raise ValueError(f"fastcur.JumpLoRALinear: f is driven by the schedule (total_steps="
                             f"{self.total_steps}); build the layer without total_steps to set it")
        self._f = float(value)

    @property
    def fixed_f(self) -> float:
        """The f option the layer was built with (what runs when no schedule does)."""
        return self._f

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A kaiming-uniform (a = sqrt(5)), B zeros: the adapter starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def set_w_past(self, W_past: torch.Tensor | None) -> None:
        """Attach (or drop, with None) ELLA's W_past [out, in] (copied to W's dtype/device)."""
        if W_past is not None:
            if tuple(W_past.shape) != tuple(self.weight.shape):
                raise ValueError(f"fastcur.JumpLoRALinear.set_w_past: W_past must have shape "
                                 f"{tuple(self.weight.shape)}, got {tuple(W_past.shape)}")
            W_past = W_past.detach().to(device=self.weight.device, dtype=self.weight.dtype)
        self.W_past = W_past

    # -- forward ---------------------------------------------------------------------------------
    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] (checked by `AdapterLinear.forward`)."""
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        A, B, lt = self._compute_tensors()
        f = self.f
        training = self._training_adapter()
        if training:
            self.threshold.attach(self)
        if self.gate == "weight" and f == 1.0 and not self._gate_checked and training:
            self._warn_dead_gate()
        # With a W_past, a training forward also computes the ELLA penalty from the same Z tiles
        # (fastcur.ops.jump_linear_ella) for `ella_penalty()` to pick up; its gradient then joins
        # the layer's backward contraction instead of a second walk over Z.
        if self.gate == "weight" and self.W_past is not None and training:
            y, p = jump_linear_ella(x, self.weight, self.bias, A, B, lt, self.scaling, self.W_past,
                                    f, self.bandwidth, self.reduction, self.ella_delta)
            self._ella_cache = (p, self._adapter_versions())
            return y
        if self.gate == "weight":
            return jump_linear(x, self.weight, self.bias, A, B, lt, self.scaling, f,
                               self.bandwidth, self.reduction)
        return jump_rank_linear(x, self.weight, self.bias, A, B, lt, self.scaling, self.bandwidth)

    def _compute_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, log_theta) as the ops take them: A, B in the base's dtype (the float32 factors
        of a bfloat16/float16 base cast at the fused op's edge, differentiably: their gradients
        arrive in float32); log_theta float32 (float64 on a float64 base), never rounded to a
        half dtype (docs/methods.md, JumpLoRA, precision)."""
        dtype = self.weight.dtype
        A, B = (t if t.dtype == dtype else t.to(dtype) for t in (self.lora_A.weight, self.lora_B.weight))
        lt, want = self.threshold.log_theta, theta_dtype(dtype)
        return A, B, (lt if lt.dtype == want else lt.to(want))

    def _training_adapter(self) -> bool:
        return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and (self.lora_A.weight.requires_grad or self.lora_B.weight.requires_grad))

    def _warn_dead_gate(self) -> None:
        # Once per layer (one host read of B, at the first training forward with f = 1).
        self._gate_checked = True
        if not bool(self.lora_B.weight.detach().any()):
            warnings.warn("fastcur.JumpLoRALinear: training with f = 1 and B = 0: no entry of ΔW passes "
                          "the gate, so A and B get zero gradients and nothing learns. Start at f = 0 "
                          "(the default) or give total_steps to run the f schedule (docs/methods.md).",
                          RuntimeWarning, stacklevel=3)

    # -- what regularizers (fastcur.LaplaceRegularizer) read -----------------------------------
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """{"lora_A.weight": [r, in], "lora_B.weight": [out, r]} (the threshold, shared across
        layers, is not declared)."""
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def curvature_taps(self, x: torch.Tensor, grad_y: torch.Tensor) -> list:
        """Per-example gradients of A and B from x [E, T, in] and grad_y [E, T, out].

        gate="rank": exact, two linear maps: B on g = h ⊙ 1[h > θ] (output gradient s dy), A on x
        (output gradient s (dy B) ⊙ 1[h > θ]). gate="weight": exact while f = 0 (plain LoRA);
        for f > 0 the gradient passes through the [out, in] gate mask per example, which no tap
        describes: fit the curvature at f = 0 (the start of a task) or use gate="rank"."""
        A, B, s = self.lora_A.weight.detach().to(x.dtype), self.lora_B.weight.detach().to(x.dtype), self.scaling
        if self.gate == "rank":
            with torch.no_grad():
                h = x @ A.mT
                keep = h > self.threshold.theta
                g = h * keep
                dh = (grad_y @ B) * s * keep
            return [LinearTap("lora_B.weight", g, grad_y * s), LinearTap("lora_A.weight", x, dh)]
        if self.f != 0.0:
            raise ValueError(f"fastcur.JumpLoRALinear.curvature_taps: the weight gate with f = {self.f:g} > 0 "
                             f"has no low-rank per-example gradient; collect curvature at f = 0 or use gate='rank'")
        return [LowRankTap("lora_A.weight", "lora_B.weight", x, grad_y, A, B, s)]

    def _adapter_versions(self) -> tuple:
        return (self.lora_A.weight._version, self.lora_B.weight._version,
                self.threshold.log_theta._version, self.f, self.ella_delta)

    def ella_penalty(self) -> torch.Tensor:
        """‖D ⊙ W_past‖² of this layer ([]; 0 without W_past), ELLA's delta D of `ella_delta`
        at the current f (`fastcur.ops.ella_penalty`). Weight gate only.

        After a training forward the value that forward computed (fused with the layer, see
        `fastcur.ops.jump_linear_ella`) is returned, once, while A, B and θ are unchanged since;
        otherwise the penalty is computed on its own (`fastcur.ops.ella_penalty`)."""
        if self.gate != "weight":
            raise RuntimeError("fastcur.JumpLoRALinear.ella_penalty: ELLA needs gate='weight'")
        if self.W_past is None:
            return self.weight.new_zeros(())
        cache, self._ella_cache = self._ella_cache, None
        if cache is not None and cache[1] == self._adapter_versions():
            return cache[0]
        A, B, lt = self._compute_tensors()
        return _ella_op(A, B, lt, self.W_past, self.scaling, self.f, self.ella_delta)

    # -- merge -----------------------------------------------------------------------------------
    def _delta_tensors(self) -> dict[str, torch.Tensor]:
        """What ΔW is computed from: A, B, log θ, and f and s as float64 scalars (f moves with
        the schedule, θ with the optimizer: `merge` remembers all of them)."""
        if self.gate != "weight":
            raise RuntimeError("fastcur.JumpLoRALinear: a rank-gated adapter depends on the input; "
                               "it has no weight-space ΔW to merge")
        return {"A": self.lora_A.weight, "B": self.lora_B.weight, "log_theta": self.threshold.log_theta,
                "f": torch.tensor(self.f, dtype=torch.float64),
                "scale": torch.tensor(self.scaling, dtype=torch.float64)}

    def _delta_from(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """ΔW = s (f J(Z) + (1 - f) Z), Z = B A, [out, in], in float32 or wider."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        f, scale = float(tensors["f"]), float(tensors["scale"])
        Z = tensors["B"].detach().to(acc) @ tensors["A"].detach().to(acc)
        theta = tensors["log_theta"].detach().to(acc).exp()
        gate = f * (Z.abs() > theta).to(acc) + (1.0 - f)    # (torch.where of two floats is float32)
        return scale * Z * gate

    @torch.no_grad()
    def delta_weight(self, f: float | None = None) -> torch.Tensor:
        """ΔW = s (f J(Z) + (1 - f) Z), [out, in], in float32 or wider (for merging only).
        `f` defaults to the layer's current f; f = 1 gives the sparse update IncLoRA merges."""
        tensors = self._delta_tensors()
        if f is not None:
            tensors["f"] = torch.tensor(float(f), dtype=torch.float64)
        return self._delta_from(tensors)

    def merge(self) -> None:
        """Fold ΔW (at the current f) into W; forward then runs the plain linear. Undo with
        `unmerge`."""
        if self.merged:
            raise RuntimeError("fastcur.JumpLoRALinear.merge: the adapter is already merged")
        self._merge_delta()

    def unmerge(self) -> None:
        """Subtract the ΔW that `merge` added (exact up to the rounding of W's dtype), even if A,
        B, θ or f changed while merged (an optimizer step, load_state_dict, the f schedule)."""
        if not self.merged:
            raise RuntimeError("fastcur.JumpLoRALinear.unmerge: the adapter is not merged")
        self._unmerge_delta()

    def extra_repr(self) -> str:
        return (f"{self._base_repr()}, rank={self.rank}, alpha={self.alpha:g}, gate={self.gate!r}, "
                f"f={self.f:g}" + (f", total_steps={self.total_steps}" if self.total_steps else "")
                + (", ella" if self.W_past is not None else "")
                + (", merged=True" if self.merged else ""))


# ---------------------------------------------------------------------------------------------
# The exact threshold reset (docs/methods.md, JumpLoRA)
# ---------------------------------------------------------------------------------------------

def _abs_z_chunks(layers: list[JumpLoRALinear], acc: torch.dtype,
                  chunk_elems: int) -> Callable[[], Iterator[torch.Tensor]]:
    """A factory of iterators over |Z| of every layer, a block of rows at a time (flat).

    Each entry is accumulated rank by rank in float64 (a product, exact for float32 factors,
    then one correctly rounded add per rank) and rounded to `acc`: every entry is the same
    value whatever the block size. A BLAS product is not: its summation order depends on the
    number of rows (seen with MKL on Intel CPUs), which made θ depend on `chunk_elems`.
    """
    def gen():
        for layer in layers:
            A = layer.lora_A.weight.detach().to(torch.float64)
            B = layer.lora_B.weight.detach().to(torch.float64)
            rows = max(1, chunk_elems // max(A.shape[1], 1))
            for i0 in range(0, B.shape[0], rows):
                Bc = B[i0:i0 + rows]
                z = torch.zeros(Bc.shape[0], A.shape[1], dtype=torch.float64, device=A.device)
                term = torch.empty_like(z)
                for j in range(A.shape[0]):
                    torch.mul(Bc[:, j:j + 1], A[j], out=term)
                    z.add_(term)
                yield z.abs_().to(acc).reshape(-1)
    return gen


def kth_smallest(chunks: Callable[[], Iterable[torch.Tensor]], k: int, dtype: torch.dtype) -> torch.Tensor:
    """The exact k-th smallest (1-based) of non-negative float values given as chunks.

    Radix select on the IEEE bit patterns (non-negative floats order like their bits as
    integers): 16 bits per pass, a 65536-bin histogram accumulated over the chunks, so the
    memory is one chunk plus the histogram; 2 passes for float32, 4 for float64. `chunks`
    is called once per pass and must yield the same values each time.
    """
    bits, itype = (32, torch.int32) if dtype == torch.float32 else (64, torch.int64)
    prefix, remaining = 0, k
    for p in range(bits // 16):
        shift = bits - 16 * (p + 1)
        hist = None
        for chunk in chunks():
            key = chunk.to(dtype).contiguous().view(itype).to(torch.int64)
            if p:
                key = key[(key >> (shift + 16)) == prefix]
            counts = torch.bincount((key >> shift) & 0xFFFF, minlength=65536)
            hist = counts if hist is None else hist + counts
        cum = hist.cumsum(0)
        digit = int(torch.searchsorted(cum, torch.tensor(remaining, device=cum.device)).item())
        if digit:
            remaining -= int(cum[digit - 1].item())
        prefix = (prefix << 16) | digit
    value = torch.tensor(prefix, dtype=torch.int64)
    return value.to(itype).view(dtype) if dtype == torch.float64 else value.to(torch.int32).view(dtype)


def _groups(layers: Iterable[JumpLoRALinear]) -> dict[int, tuple[JumpThreshold, list[JumpLoRALinear]]]:
    groups: dict[int, tuple[JumpThreshold, list[JumpLoRALinear]]] = {}
    for layer in layers:
        if layer.gate != "weight":
            continue
        groups.setdefault(id(layer.threshold), (layer.threshold, []))[1].append(layer)
    return groups


RESET_FLOOR = 1e-12   # the released reset's floor: log(max(θ, 1e-12))


def reset_rank(total: int, params: int, scope: str) -> int:
    """Which order statistic (1-based) of |Z| the released reset takes, over a group with `total`
    entries of Z and `params` adapter parameters (k = total - params): the (k + 1)-th smallest for
    the global threshold, the max(k, 1)-th for a per-block one (the released code's two branches
    differ by one; fastcur's per-layer scope follows the per-block branch)."""
    k = total - params
    return k + 1 if scope == "global" else max(k, 1)


@torch.no_grad()
def reset_thresholds(model_or_layers: nn.Module | Iterable[JumpLoRALinear],
                     chunk_elems: int = 1 << 20, *, scope: str | None = None) -> dict[int, float]:
    """The released threshold reset (docs/methods.md), for every weight-gated threshold in a
    model (or list of layers).

    θ := the `reset_rank(...)`-th smallest |Z| over all layers sharing θ (about k = Σ numel(Z)
    − Σ (numel(A) + numel(B)), so about as many entries as LoRA has parameters stay above θ),
    then θ := max(θ, 1e-12) as released. `scope` picks the rule ("global" or not); None uses
    each threshold's own `scope`. Exact (radix select) and chunked: at most `chunk_elems`
    entries of Z exist at a time. A rank below 1 (the adapters have more parameters than their
    layers have weights) gives the floor. Returns {id(threshold): θ}.
    """
    layers = ([m for m in model_or_layers.modules() if isinstance(m, JumpLoRALinear)]
              if isinstance(model_or_layers, nn.Module) else list(model_or_layers))
    out = {}
    for key, (threshold, group) in _groups(layers).items():
        acc = torch.promote_types(group[0].lora_A.weight.dtype, torch.float32)
        total = sum(m.out_features * m.in_features for m in group)
        params = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in group)
        k = reset_rank(total, params, scope or threshold.scope)
        theta = kth_smallest(_abs_z_chunks(group, acc, chunk_elems), k, acc).item() if 1 <= k <= total else 0.0
        theta = max(theta, RESET_FLOOR)
        threshold.log_theta.fill_(math.log(theta))
        out[key] = theta
    return out
