"""SecuraLinear: the SECURA adapter (docs/methods.md, SECURA: CABR-LoRA + SigNorm; arXiv 2502.18168)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import resolve
from ..ops import reference
from ..ops.cur_linear import cur_linear
from ..ops.cur_select import cur_select, layer_generator
from ..ops.secura_linear import secura_linear
from ..ops.secura_restrain import RULES, secura_linear_restrained
from ..ops.signorm_merge import signorm_merge
from .adapter_linear import AdapterLinear, LowRankTap
from .._compile_guard import compile_disabled
from .cur_selection import FAST_PATHS, CURSelection


class SecuraLinear(CURSelection, AdapterLinear):
    """`y = signorm(x W^T + b, s (((x R^T) B_c) A_c) C^T + lora_bias)`: SECURA's layer.

    Args (beyond nn.Linear's):
        rank: r, the number of columns/rows of W in C and R (the r lowest-norm ones).
        inner_rank: a (default 4 r); `A_c` [a, r] and `B_c` [r, a] are trained,
            `U = A_c^T B_c^T` [r, r], `ΔW = s C U R`.
        scale: s (default 1).
        init: "svd" (default) or "kaiming" for `A_c`. "svd" reproduces the released code:
            its SVD-based product reduces to exactly `A_c = W[:r, :a]^T`, so no SVD is run
            (needs a <= in_features). "kaiming": kaiming-uniform (a = sqrt(5)) as LoRA's A.
            `B_c` starts at zero, so ΔW = 0 and the output equals the base layer's exactly.
        lora_bias: add a trainable output bias `lora_bias` [out] (zeros) to Δ. It stays part of
            Δ at a merge (as in the released code, where it drives SigNorm after every merge);
            `fold_lora_bias=True` folds it into the layer's bias at a merge and zeroes it.
        signorm: "output" (default; SigNorm in output space) or "off" (plain CABR-LoRA,
            `y = x W^T + b + Δ(x)`).
        norm, scope, k, eps: SigNorm's options (see `fastcur.ops.signorm`): "max"/"raw",
            "token"/"tensor", 6, 1e-10.
        restrain: the released code's restrain rule (docs/methods.md, SECURA), with
            `restrain_min` (1.2), `restrain_ratio` (0.9), `restrain_decay` (0.99). In training
            mode, every forward draws `max((n - r) // 2, n // 4)` output channels without
            replacement from the module's own generator (seeded from `seed` and `module_name`);
            the rule fires, on the device, when the share of `S <= restrain_min` exceeds
            `restrain_ratio`. Eval mode never draws and never restrains. Runs the unfused path.
        restrain_rule: "fastcur" (default: channel j drawn with weight ||W[j]||, the decay on Δ
            only, the share over all of y) or "released" (as the released code: draw positions
            with weights = the row norms sorted in descending order, so low channel indices are
            favoured; the decay on y0 + Δ; the share over y's last two dimensions). See
            `fastcur.ops.secura_restrain`.
        merge_mode: "plain" (default, `W + ΔW`) or "signorm" (`(2W + ΔW) / S_w`, scope
            `merge_scope` "row"/"tensor") for `merge()` and the merge schedule.
        merge_every: N: `fastcur.MergeSchedule` folds this layer every N optimizer steps.
        reselect_on_merge: after a merge, select C, R again from the new W (the tied fast path
            comes back). Default False, as the released code, which selects C, R once: the
            layer then runs the explicit C, R path after a merge.
        fold_lora_bias: at a merge, add lora_bias to the layer's bias and zero it (default False).
        seed: seed of the restrain generator, derived per layer with `module_name`
            (`fastcur.ops.cur_select.layer_seed`; the global RNG is never touched).
        module_name: the layer's qualified name (`fastcur.inject` passes it); None, for a layer
            built directly, seeds from `seed` alone.
        fast_path: "auto" (default), "verify" or "off": see `CURSelection`.

    Tensors: parameters `A_c`, `B_c` (and `lora_bias`), float32 on a bf16/fp16 base and cast
    to the compute dtype at the op's edge; buffers `rows`, `cols` (int64 [r]), `C` [out, r],
    `R` [r, in]. Tied fast path as CURLoRALinear: while C, R are proven exact slices of W the
    fused op gathers x R^T from x W^T. On the C++ CPU kernel the proof is the kernel's own
    check, in C++, of every call (see `_fused_indices`), not a `torch.equal` per forward.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 *, rank: int = 8, inner_rank: int | None = None, scale: float = 1.0, init: str = "svd",
                 lora_bias: bool = False, signorm: str = "output", norm: str = "max", scope: str = "token",
                 k: float = 6.0, eps: float = 1e-10, restrain: bool = False, restrain_min: float = 1.2,
                 restrain_ratio: float = 0.9, restrain_decay: float = 0.99, merge_mode: str = "plain",
                 merge_scope: str = "row", merge_every: int | None = None, reselect_on_merge: bool = False,
                 fold_lora_bias: bool = False, restrain_rule: str = "fastcur", seed: int = 0,
                 module_name: str | None = None, fast_path: str = "auto", _base=None):
        super().__init__(in_features, out_features, bias, device, dtype, _base=_base, module_name=module_name)
        name = "fastcur.SecuraLinear"
        limit = min(in_features, out_features)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
            raise ValueError(f"{name}: rank must be an int in [1, min(in_features, out_features) = "
                             f"{limit}], got {rank!r}")
        a = 4 * rank if inner_rank is None else inner_rank
        if not isinstance(a, int) or isinstance(a, bool) or a < 1:
            raise ValueError(f"{name}: inner_rank must be a positive int, got {inner_rank!r}")
        if init not in ("svd", "kaiming"):
            raise ValueError(f"{name}: init must be 'svd' or 'kaiming', got {init!r}")
        if init == "svd" and a > in_features:
            raise ValueError(f"{name}: init='svd' takes A_c = W[:rank, :inner_rank]^T and needs "
                             f"inner_rank <= in_features = {in_features}, got {a}; use init='kaiming'")
        for arg, value, allowed in (("signorm", signorm, ("output", "off")), ("norm", norm, ("max", "raw")),
                                    ("scope", scope, ("token", "tensor")),
                                    ("merge_mode", merge_mode, ("plain", "signorm")),
                                    ("merge_scope", merge_scope, ("row", "tensor")),
                                    ("restrain_rule", restrain_rule, RULES), ("fast_path", fast_path, FAST_PATHS)):
            if value not in allowed:
                raise ValueError(f"{name}: {arg} must be {' or '.join(map(repr, allowed))}, got {value!r}")
        if merge_every is not None and (not isinstance(merge_every, int) or isinstance(merge_every, bool)
                                        or merge_every < 1):
            raise ValueError(f"{name}: merge_every must be None or a positive int, got {merge_every!r}")
        self.rank, self.inner_rank, self.scale, self.init = rank, a, float(scale), init
        self.signorm, self.norm, self.scope, self.k, self.eps = signorm, norm, scope, float(k), float(eps)
        self.restrain, self.restrain_min = bool(restrain), float(restrain_min)
        self.restrain_ratio, self.restrain_decay = float(restrain_ratio), float(restrain_decay)
        self.merge_mode, self.merge_scope, self.merge_every = merge_mode, merge_scope, merge_every
        self.reselect_on_merge, self.fold_lora_bias, self.seed = reselect_on_merge, fold_lora_bias, seed
        self.restrain_rule, self.fast_path = restrain_rule, fast_path
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        trained = dict(device=self.weight.device, dtype=self.adapter_dtype)
        self.A_c = nn.Parameter(torch.zeros(a, rank, **trained))
        self.B_c = nn.Parameter(torch.zeros(rank, a, **trained))
        self.lora_bias = nn.Parameter(torch.zeros(out_features, **trained)) if lora_bias else None
        self.register_buffer("rows", torch.zeros(rank, dtype=torch.long, device=self.weight.device))
        self.register_buffer("cols", torch.zeros(rank, dtype=torch.long, device=self.weight.device))
        self.register_buffer("C", torch.zeros(out_features, rank, **factory))
        self.register_buffer("R", torch.zeros(rank, in_features, **factory))
        self._generator = layer_generator(seed, module_name)
        self.restrain_fired: torch.Tensor | None = None  # bool scalar of the last restrained forward
        self.merges = 0          # merges folded into W so far (W is no longer the base's after one)
        self._selected = False
        self._tied_key: tuple | None = None
        self._adapter_version_at_select = None

    # -- selection, initialization and the tied fast path -------------------------------------
    @torch.no_grad()
    def select(self, *, init_adapter: bool = True) -> "SecuraLinear":
        """Select C, R (the r lowest-norm columns / rows of the current W); with `init_adapter`
        also initialize A_c (per `init`) and zero B_c (and lora_bias). Returns self."""
        if self.weight.is_meta:
            raise RuntimeError("fastcur.SecuraLinear.select: the weight is on the meta device; "
                               "materialize it (to_empty + load) first")
        rows, cols = cur_select(self.weight, self.rank, "lowest")
        self.rows.copy_(rows)
        self.cols.copy_(cols)
        self.C.copy_(self.weight[:, cols])
        self.R.copy_(self.weight[rows])
        if init_adapter:
            self.reset_adapter()
        self._selected = True
        self._adapter_version_at_select = self.A_c._version
        self._tied_key = self._weight_key()
        return self

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A_c per `init`, B_c = 0 (and lora_bias = 0): ΔW = 0, the output equals the base's."""
        if self.init == "svd":
            # The released code builds A_c from an SVD whose factors multiply back to exactly
            # the leading block of W: A_c = W[:r, :a]^T.
            self.A_c.copy_(self.weight[: self.rank, : self.inner_rank].mT)
        else:
            nn.init.kaiming_uniform_(self.A_c, a=math.sqrt(5))
        self.B_c.zero_()
        if self.lora_bias is not None:
            self.lora_bias.zero_()

    def _trained_tensor(self) -> torch.Tensor:
        return self.A_c

    @compile_disabled("fastcur.SecuraLinear: restrain=True draws its channels on the host "
                      "in training mode (a graph break); for torch.compile(fullgraph=True) use "
                      "restrain=False, or eval mode (which never restrains)")
    def _restrain_channels(self) -> torch.Tensor:
        n, r = self.out_features, self.rank
        count = min(n, max((n - r) // 2, n // 4))
        weights = self.weight.detach().float().norm(dim=1).cpu()
        if self.restrain_rule == "released":
            # The released code draws positions 0..n-1 with weights topk(norms, n).values: the
            # row norms sorted in descending order, not each channel's own norm.
            weights = torch.sort(weights, descending=True).values
        if count == 0:
            return torch.zeros(0, dtype=torch.long, device=self.weight.device)
        if not bool((weights > 0).sum() >= count):
            weights = weights + 1e-12          # an all-zero W: uniform draw instead of an error
        idx = torch.multinomial(weights, count, replacement=False, generator=self._generator)
        return idx.to(self.weight.device)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] (checked by `AdapterLinear.forward`)."""
        if not self._selected:
            self._select_in_forward()
        # float32 adapter tensors on a bf16/fp16 base: cast at the op's edge (autograd casts
        # the gradients back into the float32 parameters)
        dtype = self.weight.dtype
        A_c, B_c = self.A_c.to(dtype), self.B_c.to(dtype)
        lora_bias = None if self.lora_bias is None else self.lora_bias.to(dtype)
        if self.signorm == "off":
            U = A_c.mT @ B_c.mT
            b = self.bias
            if lora_bias is not None:
                b = lora_bias if b is None else b + lora_bias
            rows, cols = (self.rows, self.cols) if self.tied else (None, None)
            return cur_linear(x, self.weight, b, self.C, U, self.R, self.scale, rows=rows, cols=cols)
        if self.restrain and self.training:
            y, self.restrain_fired = secura_linear_restrained(
                x, self.weight, self.bias, self.C, A_c, B_c, self.R, lora_bias,
                self.scale, self.k, self.eps, self.norm, self.scope, self._restrain_channels(),
                self.restrain_min, self.restrain_ratio, self.restrain_decay, self.restrain_rule)
            return y
        rows, cols = self._fused_indices()
        return secura_linear(x, self.weight, self.bias, self.C, A_c, B_c, self.R,
                             lora_bias, self.scale, self.k, self.eps, self.norm, self.scope,
                             rows=rows, cols=cols)

    def _fused_indices(self) -> tuple:
        """rows, cols for `secura_linear` (None, None: the explicit C, R path).

        The C++ CPU kernel checks `R == W[rows]` and `C == W[:, cols]` itself, in C++ without
        copies, and runs the explicit path where they do not hold, so there `tied`'s
        per-forward `torch.equal` on index_select copies (four ATen calls per forward) is not
        repeated: W's storage and version unchanged since the slices were last proven (as
        `tied` requires too) is enough to pass the indices; a write through `weight.data`,
        which the version counter misses, is caught by the kernel's check. Elsewhere (Triton,
        CUDA, torch.compile, `fast_path="off"`) `tied` decides, as before."""
        w = self.weight
        if (w.device.type == "cpu" and self.fast_path != "off" and self._selected
                and not torch.compiler.is_compiling() and self._tied_key == self._weight_key()
                and resolve("secura_linear", w.device) == "cpp"):
            return self.rows, self.cols
        return (self.rows, self.cols) if self.tied else (None, None)

    # -- what regularizers (fastcur.LaplaceRegularizer) read -----------------------------------
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """{"A_c": [a, r], "B_c": [r, a]}. (`lora_bias`, when enabled, is not declared: it is
        not regularized.)"""
        return {"A_c": self.A_c, "B_c": self.B_c}

    def curvature_taps(self, x: torch.Tensor, grad_y: torch.Tensor) -> list:
        """The chain `h = x R^T -> u = h B_c -> v = u A_c -> Δ = s v C^T` is a LoRA pair on h with
        A = B_c^T, B = A_c^T (`transposed`), output gradient at v: `s (dy / S) C`, S the detached
        SigNorm scales of this input (S = 1 with signorm="off"). x [E, T, in], grad_y [E, T, out]."""
        if not self._selected:
            self.select()
        with torch.no_grad():
            h = x @ self.R.mT
            g_delta = grad_y
            if self.signorm != "off":
                y0 = F.linear(x, self.weight, self.bias)
                lb = None if self.lora_bias is None else self.lora_bias.to(x.dtype)
                delta = reference.secura_delta(x, self.C, self.A_c.to(x.dtype), self.B_c.to(x.dtype), self.R, lb,
                                               self.scale)
                S = reference.signorm_scales(y0, delta, self.k, self.eps, self.norm, self.scope)
                g_delta = (grad_y / S).to(grad_y.dtype)
            p = (g_delta @ self.C) * self.scale
        return [LowRankTap("B_c", "A_c", h, p, self.B_c.detach().to(x.dtype).mT.contiguous(),
                           self.A_c.detach().to(x.dtype).mT.contiguous(), 1.0, transposed=True)]

    # -- merging ------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """ΔW = s C (A_c^T B_c^T) R, [out, in], in float32 or wider (for merging only)."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        U = self.A_c.to(acc).mT @ self.B_c.to(acc).mT
        return self.scale * (self.C.to(acc) @ U @ self.R.to(acc))

    @torch.no_grad()
    def merge(self, mode: str | None = None) -> None:
        """Fold C U R into W and reset B_c to zero ("M1" of the released code); training
        continues from C U R = 0. mode: "plain" (`W + ΔW`) or "signorm" (`(2W + ΔW) / S_w`);
        default `merge_mode`. lora_bias stays in Δ (as released); with `fold_lora_bias` it is
        added to the layer's bias instead (one is created, frozen, if the layer had none and
        lora_bias is nonzero) and zeroed. Not reversible. C, R are kept (as released), so the
        layer runs the explicit C, R path afterwards; `reselect_on_merge` selects them again
        from the new W (the tied fast path comes back)."""
        mode = self.merge_mode if mode is None else mode
        if mode not in ("plain", "signorm"):
            raise ValueError(f"fastcur.SecuraLinear.merge: mode must be 'plain' or 'signorm', got {mode!r}")
        if not self._selected:
            self.select()
        if mode == "plain":
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
        else:
            U = self.A_c.mT @ self.B_c.mT
            self.weight.copy_(signorm_merge(self.weight, self.C, U, self.R, self.scale, self.k,
                                            self.eps, self.merge_scope))
        if self.fold_lora_bias:
            self.fold_bias()
        self.B_c.zero_()
        self.merges += 1
        if self.reselect_on_merge:
            self.select(init_adapter=False)
        else:
            self._verify_tied()

    @torch.no_grad()
    def fold_bias(self) -> None:
        """Add lora_bias to the layer's bias (one is created, frozen, if the layer has none and
        lora_bias is nonzero) and zero it; a no-op without lora_bias. `merge` calls it with
        `fold_lora_bias`, `fastcur.merge_and_unload` always (the plain layer has no lora_bias)."""
        if self.lora_bias is None:
            return
        if self.bias is None and bool(self.lora_bias.ne(0).any()):
            self.bias = nn.Parameter(torch.zeros_like(self.lora_bias, dtype=self.weight.dtype), requires_grad=False)
        if self.bias is not None:
            self.bias.add_(self.lora_bias.to(self.bias.dtype))
        self.lora_bias.zero_()

    def extra_repr(self) -> str:
        state = ("tied" if self.tied else "explicit C, R") if self._selected else "not selected yet"
        return (f"{self._base_repr()}, rank={self.rank}, inner_rank={self.inner_rank}, scale={self.scale:g}, "
                f"init={self.init!r}, signorm={self.signorm!r}, norm={self.norm!r}, scope={self.scope!r}"
                + (", lora_bias=True" if self.lora_bias is not None else "")
                + (", restrain=True" if self.restrain else "")
                + (f", merge_every={self.merge_every}, merge_mode={self.merge_mode!r}" if self.merge_every else "")
                + f", {state}")


class MergeSchedule:
    """Fold SecuraLinear layers into their W every N optimizer steps ("M1" of SECURA's code).

        sched = fastcur.MergeSchedule(model, optimizer)           # each layer's merge_every
        sched = fastcur.MergeSchedule(model, optimizer, every=100, mode="signorm")

    With an optimizer, a step post-hook counts each optimizer step once, and `step()` is then a
    no-op (a loop that also calls it, as one written for the hook-less form does, does not count
    steps twice); without one, call `step()` after each optimizer step. `every` overrides the
    layers' `merge_every` (layers with neither are never merged); `mode` overrides their
    `merge_mode`. `remove()` detaches the hook (`step()` counts again afterwards).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 every: int | None = None, mode: str | None = None):
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise ValueError(f"fastcur.MergeSchedule: every must be None or a positive int, got {every!r}")
        if mode not in (None, "plain", "signorm"):
            raise ValueError(f"fastcur.MergeSchedule: mode must be None, 'plain' or 'signorm', got {mode!r}")
        self.layers = [m for m in model.modules() if isinstance(m, SecuraLinear)]
        if not self.layers:
            raise ValueError("fastcur.MergeSchedule: the model has no SecuraLinear layer")
        self.every, self.mode, self.steps, self.merges = every, mode, 0, 0
        self._handle = (optimizer.register_step_post_hook(lambda *_: self._count_step())
                        if optimizer is not None else None)

    def step(self) -> None:
        """Count one optimizer step and fold the layers whose period has come; a no-op while
        the schedule is hooked on an optimizer (the hook counts the step)."""
        if self._handle is None:
            self._count_step()

    def _count_step(self) -> None:
        self.steps += 1
        for layer in self.layers:
            period = self.every or layer.merge_every
            if period and self.steps % period == 0:
                layer.merge(self.mode)
                self.merges += 1

    def state_dict(self) -> dict:
        """{"steps", "merges", "every", "mode"}: what resumes the schedule."""
        return {"steps": self.steps, "merges": self.merges, "every": self.every, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters of `state_dict()`; `every` and `mode` must match this schedule's."""
        for key in ("every", "mode"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"fastcur.MergeSchedule.load_state_dict: {key} = {state.get(key)!r} in the "
                                 f"state, but this schedule has {key} = {getattr(self, key)!r}")
        self.steps, self.merges = int(state["steps"]), int(state["merges"])

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
