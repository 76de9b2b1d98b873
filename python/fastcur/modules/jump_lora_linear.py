"""JumpLoRALinear: the JumpLoRA adapter of docs/methods.md, JumpLoRA (arXiv 2604.16171), plus its shared
threshold object, the f schedule and the exact threshold reset."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.ella_penalty import ella_penalty as _ella_op
from ..ops.jump_linear import REDUCTIONS, jump_linear, jump_linear_ella
from ..ops.jump_rank_linear import jump_rank_linear
from .adapter_linear import AdapterLinear, LinearTap, LowRankTap

GATES = ("weight", "rank")
SCOPES = ("global", "per_block", "per_layer")
DEFAULT_LOG_THETA = -4.7


def f_schedule(step: int, total_steps: int, start: float = 0.2, end: float = 0.8) -> float:
    """The interpolation weight f of docs/methods.md, JumpLoRA at `step` of a task of `total_steps` steps:
    0 until `start` of the steps, linear to 1 at `end`, then 1."""
    if total_steps <= 0:
        return 1.0
    p = step / total_steps
    if p < start:
        return 0.0
    if p >= end:
        return 1.0
    return (p - start) / (end - start)


class JumpThreshold(nn.Module):
    """A threshold θ = exp(log_theta) that one or several JumpLoRALinear layers share.

    `log_theta` is a scalar for the weight gate, `[r]` (one per rank channel) for the rank
    gate. Pass one instance as `threshold=` to every layer of a scope ("global": the whole
    model, "per_block": one transformer block, "per_layer": one layer); `reset_thresholds`
    resets each shared instance exactly over all the layers that hold it.
    """

    def __init__(self, size: int | None = None, init: float = DEFAULT_LOG_THETA, device=None,
                 dtype=None):
        super().__init__()
        shape = () if size is None else (size,)
        self.log_theta = nn.Parameter(torch.full(shape, float(init), device=device, dtype=dtype))

    @property
    def theta(self) -> torch.Tensor:
        return self.log_theta.detach().exp()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.log_theta.shape)}"


class JumpLoRALinear(AdapterLinear):
    """JumpLoRA: `y = x (W + ΔW)^T + b`, `ΔW = s (f J(B A) + (1 - f) B A)` (gate="weight"), or
    `y = x W^T + b + s g B^T`, `g = (x A^T) 1[x A^T > θ_j]` (gate="rank").

    Args (beyond nn.Linear's):
        rank: r; alpha: s = alpha / r (docs/methods.md, JumpLoRA: r = 8, alpha = 32).
        gate: "weight" (the paper's, default) or "rank" (the cheaper rank-gated variant).
        threshold: a `JumpThreshold` to share with other layers; None creates one for this
            layer (per-layer scope). Rank-gated layers need a threshold of size r.
        f: the schedule value in [0, 1] (an attribute; `IncLoRA` drives it). Weight gate only.
        bandwidth: ε of the straight-through kernel; reduction: "mean" or "sum" (weight gate).
        init_log_theta: log θ at init (-4.7) when this layer creates its threshold.

    Tensors: `lora_A.weight` [r, in] (kaiming uniform, a = sqrt(5)), `lora_B.weight` [out, r]
    (zeros: the output equals the base layer's at init), `threshold.log_theta`, and the
    optional buffer `W_past` [out, in] for ELLA (None unless `set_w_past` was called).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 *, rank: int = 8, alpha: float = 32.0, gate: str = "weight",
                 threshold: JumpThreshold | None = None, f: float = 1.0, bandwidth: float = 1e-3,
                 reduction: str = "mean", init_log_theta: float = DEFAULT_LOG_THETA, _base=None):
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
        self.rank, self.alpha, self.gate = rank, float(alpha), gate
        self.scaling = self.alpha / rank
        self.bandwidth, self.reduction = float(bandwidth), reduction
        self.f = f
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
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
        self.register_buffer("W_past", None)
        self._ella_cache: tuple | None = None   # (penalty, versions of A, B, log_theta) of the last forward
        self.reset_adapter()

    # -- state -----------------------------------------------------------------------------------
    @property
    def f(self) -> float:
        return self._f

    @f.setter
    def f(self, value: float) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
            raise ValueError(f"fastcur.JumpLoRALinear: f must be a float in [0, 1], got {value!r}")
        self._f = float(value)

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
        A, B, lt = self.lora_A.weight, self.lora_B.weight, self.threshold.log_theta
        if self.gate == "weight" and self._fuse_ella():
            y, p = jump_linear_ella(x, self.weight, self.bias, A, B, lt, self.scaling, self.W_past,
                                    self.f, self.bandwidth, self.reduction)
            self._ella_cache = (p, self._adapter_versions())
            return y
        if self.gate == "weight":
            return jump_linear(x, self.weight, self.bias, A, B, lt, self.scaling, self.f,
                               self.bandwidth, self.reduction)
        return jump_rank_linear(x, self.weight, self.bias, A, B, lt, self.scaling, self.bandwidth)

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
        A, B, s = self.lora_A.weight.detach(), self.lora_B.weight.detach(), self.scaling
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

    def _fuse_ella(self) -> bool:
        # With a W_past, a training forward also computes the ELLA penalty from the same Z tiles
        # (fastcur.ops.jump_linear_ella) for `ella_penalty()` to pick up; its gradient then joins
        # the layer's backward contraction instead of a second walk over Z.
        return (self.W_past is not None and torch.is_grad_enabled()
                and (self.lora_A.weight.requires_grad or self.lora_B.weight.requires_grad)
                and not torch.compiler.is_compiling())

    def _adapter_versions(self) -> tuple[int, int, int]:
        return (self.lora_A.weight._version, self.lora_B.weight._version,
                self.threshold.log_theta._version)

    def ella_penalty(self) -> torch.Tensor:
        """‖s J(B A) ⊙ W_past‖² of this layer ([]; 0 without W_past). Weight gate only.

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
        return _ella_op(self.lora_A.weight, self.lora_B.weight, self.threshold.log_theta,
                        self.W_past, self.scaling)

    # -- merge -----------------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self, f: float | None = None) -> torch.Tensor:
        """ΔW = s (f J(Z) + (1 - f) Z), [out, in], in float32 or wider (for merging only).
        `f` defaults to the layer's current f; f = 1 gives the sparse update IncLoRA merges."""
        if self.gate != "weight":
            raise RuntimeError("fastcur.JumpLoRALinear: a rank-gated adapter depends on the input; "
                               "it has no weight-space ΔW to merge")
        f = self.f if f is None else f
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        Z = self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc)
        theta = self.threshold.log_theta.detach().to(acc).exp()
        gate = torch.where(Z.abs() > theta, 1.0, 1.0 - f).to(acc)
        return self.scaling * Z * gate

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW (at the current f) into W; forward then runs the plain linear."""
        if self.merged:
            raise RuntimeError("fastcur.JumpLoRALinear.merge: the adapter is already merged")
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW again (exact up to the rounding of W's dtype)."""
        if not self.merged:
            raise RuntimeError("fastcur.JumpLoRALinear.unmerge: the adapter is not merged")
        self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"{self._base_repr()}, rank={self.rank}, alpha={self.alpha:g}, gate={self.gate!r}, "
                f"f={self.f:g}" + (", ella" if self.W_past is not None else "")
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


@torch.no_grad()
def reset_thresholds(model_or_layers: nn.Module | Iterable[JumpLoRALinear],
                     chunk_elems: int = 1 << 20) -> dict[int, float]:
    """docs/methods.md, JumpLoRA's threshold reset, for every weight-gated threshold in a model (or list of layers).

    θ := the k-th smallest |Z| over all layers sharing θ, k = Σ numel(Z) − Σ (numel(A) +
    numel(B)), so about as many entries as LoRA has parameters stay above θ. Exact (radix
    select) and chunked: at most `chunk_elems` entries of Z exist at a time. When k < 1 (the
    adapters have as many parameters as their layers have weights) or the k-th |Z| is 0,
    θ becomes the smallest positive normal float (everything nonzero survives).
    Returns {id(threshold): θ}.
    """
    layers = ([m for m in model_or_layers.modules() if isinstance(m, JumpLoRALinear)]
              if isinstance(model_or_layers, nn.Module) else list(model_or_layers))
    out = {}
    for key, (threshold, group) in _groups(layers).items():
        acc = torch.promote_types(group[0].weight.dtype, torch.float32)
        total = sum(m.out_features * m.in_features for m in group)
        params = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in group)
        k = total - params
        tiny = torch.finfo(acc).tiny
        theta = kth_smallest(_abs_z_chunks(group, acc, chunk_elems), k, acc).item() if k >= 1 else 0.0
        theta = max(theta, tiny)
        threshold.log_theta.fill_(math.log(theta))
        out[key] = theta
    return out
