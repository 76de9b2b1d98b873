"""The base of every fastcur adapter layer: a frozen nn.Linear-compatible weight and bias."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._checks import FLOATING


@dataclass
class LowRankTap:
    """A LoRA-shaped adapter term `scale * (x A^T) B^T` read from the layer input `x`.

    x [E, T, in], grad_out [E, T, out] (the layer's output gradient, per example), A [r, in]
    and B [out, r] the tensors named `a_name`, `b_name` in `adapter_parameters()`.
    Curvature: per-example gradients `g_B,e = scale G_e^T (X_e A^T)`, `g_A,e = scale (G_e B)^T X_e`.
    `transposed=True`: the parameters named `a_name`, `b_name` hold A^T and B^T (SECURA's B_c, A_c).
    """
    a_name: str
    b_name: str
    x: torch.Tensor
    grad_out: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    transposed: bool = False


@dataclass
class LinearTap:
    """A trainable tensor P [out_p, in_p] used as a linear map inside the adapter: its
    per-example gradient is `out_grads_e^T inputs_e` with inputs [E, T, in_p] (what P is applied
    to) and out_grads [E, T, out_p] (the loss gradient at P's output). Cheapest when in_p is small
    (the diagonal Fisher runs through `lora_fisher_diag` with an identity of size in_p)."""
    name: str
    inputs: torch.Tensor
    out_grads: torch.Tensor
    transposed: bool = False  # the parameter holds P^T ([in_p, out_p]), applied as `inputs @ param`


class AdapterLinear(nn.Module):
    """A linear layer `y = x W^T + b` with frozen `weight` [out, in] and `bias` [out].

    Subclasses add the adapter's tensors and implement `adapted_forward`. The constructor takes
    nn.Linear's arguments, so a model definition can swap the class; `from_linear` wraps an
    existing layer and reuses its weight and bias storage (they are frozen in place, as PEFT does).

    Two switches, shared by every adapter (plain attributes, so `torch.compile` guards on them):
    - `adapter_enabled` (default True): False runs the frozen base only (`fastcur.disable_adapters`).
    - `frozen_batch_rows` (default None): an int N makes the first N entries along dim 0 of the
      input bypass the adapter and the rest use it: IMSM's frozen and tuned streams in one batch.
      With `detach_frozen_rows` (default False) those N rows are also cut from the autograd
      graph (IMSM: nothing trainable sits upstream of the frozen stream, so its backward is waste).

    Under `torch.autocast` the layer computes in the autocast dtype, as nn.Linear does (the
    fused ops cast their inputs: `fastcur.ops._autocast`); outside it, x must have W's dtype.

    Precision (as PEFT and the released code): on a bfloat16/float16 base, subclasses create their
    trainable adapter tensors in float32 (`adapter_dtype`) and cast them to the compute dtype at
    the fused op's edge, so gradients and optimizer updates land in the float32 parameters.

    transformers' `Conv1D` (GPT-2's `c_attn`, weight stored [in, out]) is wrapped too: the layer
    keeps a [out, in] copy of its weight (`fan_in_fan_out = True`) and `to_base_layer()` gives a
    Conv1D back. `module_name` is the layer's qualified name in its model (`fastcur.inject` sets
    it; None for a layer built directly); layers that draw random numbers derive their stream
    from it (`fastcur.ops.cur_select.layer_seed`).
    """

    # whether the constructor takes `module_name` (layers whose selection depends on it)
    _takes_module_name: ClassVar[bool] = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, _base: tuple[nn.Parameter, nn.Parameter | None] | None = None,
                 module_name: str | None = None):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"fastcur.{name}: {arg} must be a positive int, got {value!r}")
        if dtype is not None and dtype not in FLOATING:
            raise TypeError(f"fastcur.{name}: dtype must be floating (float32, bfloat16, float16, "
                            f"float64), got {dtype}")
        if module_name is not None and not isinstance(module_name, str):
            raise TypeError(f"fastcur.{name}: module_name must be a str or None, got {module_name!r}")
        self.in_features, self.out_features = in_features, out_features
        self.module_name = module_name
        self.fan_in_fan_out = False          # True when wrapping a transformers Conv1D
        self._base_class: type[nn.Module] = nn.Linear
        self._merged_tensors: dict[str, torch.Tensor] | None = None
        self.merged = False
        self.adapter_enabled = True
        self.frozen_batch_rows: int | None = None
        self.detach_frozen_rows = False
        if _base is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                       requires_grad=False)
            self.bias = (nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
                         if bias else None)
            self._reset_base_parameters()
        else:
            self.weight, self.bias = _base
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)

    @torch.no_grad()
    def _reset_base_parameters(self) -> None:
        # nn.Linear's initialization, so a swapped-in class starts from the same distribution.
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Module, *, module_name: str | None = None, **options):
        """Wrap `linear`, an nn.Linear (its weight and bias are reused, same storage, and
        frozen) or a transformers `Conv1D` (weight [in, out]: the layer holds a frozen [out, in]
        copy of it and reuses the bias). `module_name`: the layer's qualified name in its model."""
        conv = is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or conv):
            raise TypeError(f"fastcur.{cls.__name__}.from_linear: expected an nn.Linear or a transformers "
                            f"Conv1D, got {type(linear).__name__}")
        if linear.weight.dtype not in FLOATING:
            raise TypeError(f"fastcur.{cls.__name__}.from_linear: the layer's weight must be floating "
                            f"(float32, bfloat16, float16, float64), got {linear.weight.dtype}")
        if conv:
            in_features, out_features = linear.weight.shape
            weight = nn.Parameter(linear.weight.detach().mT.contiguous(), requires_grad=False)
        else:
            in_features, out_features, weight = linear.in_features, linear.out_features, linear.weight
        if cls._takes_module_name:
            options["module_name"] = module_name
        layer = cls(in_features, out_features, linear.bias is not None, _base=(weight, linear.bias), **options)
        layer.module_name = module_name
        if conv:
            layer.fan_in_fan_out, layer._base_class = True, type(linear)
        return layer

    def to_base_layer(self) -> nn.Module:
        """The plain layer this adapter wraps, holding this layer's current weight and bias:
        an nn.Linear sharing their storage, or (`fan_in_fan_out`) a Conv1D of the class wrapped,
        with the weight transposed back to [in, out]. The adapter's own update is not in it
        unless it was merged."""
        if self.fan_in_fan_out:
            with torch.device("meta"):
                base = self._base_class(self.out_features, self.in_features)
            base.weight = nn.Parameter(self.weight.detach().mT.contiguous(), requires_grad=False)
            base.bias = self.bias
        else:
            base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
            base.weight = self.weight
            base.bias = self.bias
        base.train(self.training)
        return base

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype of the trainable adapter tensors: float32 on a bfloat16/float16 base (as
        PEFT and the released code), else the base's dtype (float32, float64)."""
        dtype = self.weight.dtype
        return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype

    # -- merge bookkeeping ---------------------------------------------------------------------
    def _delta_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors `delta_weight` reads (subclasses that merge reversibly)."""
        raise NotImplementedError(f"fastcur.{type(self).__name__} does not declare its delta tensors")

    def _delta_from(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """ΔW [out, in] computed from `tensors` (a `_delta_tensors()` mapping), float32 or wider."""
        raise NotImplementedError(f"fastcur.{type(self).__name__} does not compute a delta")

    def delta_weight(self) -> torch.Tensor:
        """ΔW [out, in] of the adapter as it is now, float32 or wider (for merging only)."""
        return self._delta_from(self._delta_tensors())

    @torch.no_grad()
    def _merge_delta(self) -> None:
        # W += ΔW, remembering the (small) tensors ΔW was computed from: an adapter changed
        # while merged (an optimizer step, load_state_dict, .data writes) must not change what
        # unmerge subtracts, or W would be corrupted for good.
        tensors = {k: t.detach().clone() for k, t in self._delta_tensors().items()}
        self.weight.add_(self._delta_from(tensors).to(self.weight.dtype))
        self._merged_tensors = tensors
        self.merged = True

    @torch.no_grad()
    def _unmerge_delta(self) -> None:
        # Subtract exactly the ΔW that merge added (from the tensors remembered at merge).
        tensors = self._merged_tensors if self._merged_tensors is not None else self._delta_tensors()
        self.weight.sub_(self._delta_from(tensors).to(self.weight.dtype))
        self._merged_tensors = None
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]: the adapted layer, or the frozen base where a switch says so."""
        self._check_input(x)
        if not self.adapter_enabled:
            self._check_unmerged("adapter_enabled=False")
            return F.linear(x, self.weight, self.bias)
        rows = self.frozen_batch_rows
        if rows is None:
            return self.adapted_forward(x)
        self._check_unmerged("frozen_batch_rows")
        if x.dim() < 2 or not 0 <= rows <= x.shape[0]:
            raise ValueError(f"fastcur.{type(self).__name__}: frozen_batch_rows = {rows} needs an input "
                             f"with at least 2 dims and >= {rows} rows on dim 0, got shape {tuple(x.shape)}")
        if not (torch.is_grad_enabled() and x.requires_grad):
            # No input gradient wanted (e.g. decoding): an additive adapter lets one base GEMM
            # serve both streams, so W is read once per call instead of twice.
            delta = self.adapter_delta(x[rows:])
            if delta is not None:
                y = F.linear(x, self.weight, self.bias)
                y[rows:] += delta
                return y
        frozen = F.linear(x[:rows].detach() if self.detach_frozen_rows else x[:rows], self.weight, self.bias)
        return torch.cat([frozen, self.adapted_forward(x[rows:])], dim=0)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] with the adapter applied (input already checked)."""
        raise NotImplementedError(f"fastcur.{type(self).__name__} does not implement adapted_forward()")

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """Optional: for adapters whose output is `F.linear(x, W, b) + delta(x)` (LoRA), the
        delta alone, x [..., in] -> [..., out]; None (the default) for any other adapter.
        Only the `frozen_batch_rows` path uses it."""
        return None

    def _check_unmerged(self, what: str) -> None:
        # A merged W already holds the update: the frozen base is gone until unmerge().
        if self.merged:
            raise RuntimeError(f"fastcur.{type(self).__name__}: {what} needs the frozen base, but the "
                               f"adapter is merged into the weight; call unmerge() first")

    # -- what regularizers (fastcur.LaplaceRegularizer) read --------------------------------------
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter's trainable tensors, {name relative to this module: parameter}.

        Every adapter class declares its own (LoRA: `lora_A.weight`, `lora_B.weight`; CUR-LoRA:
        `U`), so model-level tools find adapters by this method, never by class name.
        """
        raise NotImplementedError(f"fastcur.{type(self).__name__} does not declare its adapter tensors "
                                  f"(implement adapter_parameters())")

    def curvature_taps(self, x: torch.Tensor, grad_y: torch.Tensor) -> list:
        """How the adapter tensors' per-example gradients follow from this layer's input
        x [E, T, in] and output gradient grad_y [E, T, out]: a list of `LowRankTap` /
        `LinearTap` covering every tensor of `adapter_parameters()` exactly once."""
        raise NotImplementedError(f"fastcur.{type(self).__name__} does not describe its curvature "
                                  f"(implement curvature_taps())")

    def _check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"fastcur.{name}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"fastcur.{name}: input must have last dimension in_features = "
                             f"{self.in_features}, got shape {tuple(x.shape)}")
        if x.dtype != self.weight.dtype and not self._autocast_compatible(x):
            raise TypeError(f"fastcur.{name}: input dtype {x.dtype} does not match the layer's dtype "
                            f"{self.weight.dtype}; cast the input or the module (module.to(dtype))")
        if x.device != self.weight.device:
            raise ValueError(f"fastcur.{name}: input is on {x.device} but the layer is on "
                             f"{self.weight.device}; move one of them")

    def _autocast_compatible(self, x: torch.Tensor) -> bool:
        # Under torch.autocast the layer computes in the autocast dtype, like nn.Linear: the
        # fused ops cast x, W and the adapter tensors (`fastcur.ops._autocast`), so an input in
        # another autocast-eligible dtype (not float64, which autocast leaves alone) is fine.
        eligible = (torch.float32, torch.bfloat16, torch.float16)
        kind = x.device.type
        return (x.dtype in eligible and self.weight.dtype in eligible
                and torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind))

    def _base_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else ""))


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is transformers' `Conv1D` (GPT-2: `y = x W + b`, weight [in, out]),
    recognised without importing transformers."""
    kind = type(module)
    return (kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)
