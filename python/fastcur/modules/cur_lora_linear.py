"""CURLoRALinear: the CUR-LoRA adapter (docs/methods.md, CURLoRA; arXiv 2408.14572)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.cur_linear import cur_linear
from ..ops.cur_select import INVERSE_EPS, cur_select, layer_generator
from .adapter_linear import AdapterLinear, LinearTap
from .cur_selection import FAST_PATHS, CURSelection


class CURLoRALinear(CURSelection, AdapterLinear):
    """`y = x W^T + b + s * ((x R^T) U^T) C^T` with C = W[:, cols], R = W[rows], U trained.

    Args (beyond nn.Linear's):
        rank: r, the number of selected columns and rows (1 <= r <= min(in, out)).
        scale: s (default 1, unscaled C and R as the paper's code).
        select: "sample" (inverted-norm probabilities, seeded) or "lowest" (deterministic).
        replace: sample with replacement (the reference code's behaviour; default False).
        inverse_eps: e in the inverted probabilities `1 / (p + e)` (default 0.001, the released
            code's; 0 is the paper's pure 1/p). See docs/methods.md (CURLoRA).
        seed: seed of the selection; the generator is seeded from `seed` and `module_name`
            (`fastcur.ops.cur_select.layer_seed`), so every layer of a model draws its own
            columns, stably across runs and save/load (the global RNG is never touched).
        module_name: the layer's qualified name (`fastcur.inject` passes it). None, for a layer
            built directly, derives the stream from `seed` alone: same-shape layers with the
            same seed then draw the same columns (give each its own seed or name).
        fast_path: "auto" (default), "verify" or "off": see `CURSelection`.

    Tensors: `U` [r, r] (the only trainable tensor, zeros at init, so the output equals the
    base layer's until training moves it; float32 on a bf16/fp16 base, cast to the compute
    dtype at the op's edge); buffers `rows` [r], `cols` [r] (int64), `C` [out, r], `R` [r, in]
    (frozen copies, so the adapter stays valid when W changes).

    Tied fast path: while C and R are exact slices of the current W, the fused op gathers
    x R^T from x W^T and dy C from dy W. A change of W (merge, an optimizer step,
    load_state_dict, a write through `weight.data`) switches to the explicit C, R: the layer
    compares W's version counter and storage, and (on CPU) the slices themselves every forward.

    Selection happens in `from_linear`; with the nn.Linear-style constructor it happens at the
    first forward or at `.select()`, and again if base weights are loaded with
    `load_state_dict` before U has been trained.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 *, rank: int = 8, scale: float = 1.0, select: str = "sample", replace: bool = False,
                 inverse_eps: float = INVERSE_EPS, seed: int = 0, module_name: str | None = None,
                 fast_path: str = "auto", _base=None):
        super().__init__(in_features, out_features, bias, device, dtype, _base=_base, module_name=module_name)
        limit = min(in_features, out_features)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
            raise ValueError(f"fastcur.CURLoRALinear: rank must be an int in [1, min(in_features, "
                             f"out_features) = {limit}], got {rank!r}")
        if select not in ("sample", "lowest"):
            raise ValueError(f"fastcur.CURLoRALinear: select must be 'sample' or 'lowest', got {select!r}")
        if isinstance(inverse_eps, bool) or not isinstance(inverse_eps, (int, float)) or not inverse_eps >= 0:
            raise ValueError(f"fastcur.CURLoRALinear: inverse_eps must be a number >= 0, got {inverse_eps!r}")
        if fast_path not in FAST_PATHS:
            raise ValueError(f"fastcur.CURLoRALinear: fast_path must be one of {FAST_PATHS}, got {fast_path!r}")
        self.rank, self.scale, self.selection, self.replace, self.seed = rank, float(scale), select, replace, seed
        self.inverse_eps, self.fast_path = float(inverse_eps), fast_path
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.U = nn.Parameter(torch.zeros(rank, rank, device=self.weight.device, dtype=self.adapter_dtype))
        self.register_buffer("rows", torch.zeros(rank, dtype=torch.long, device=self.weight.device))
        self.register_buffer("cols", torch.zeros(rank, dtype=torch.long, device=self.weight.device))
        self.register_buffer("C", torch.zeros(out_features, rank, **factory))
        self.register_buffer("R", torch.zeros(rank, in_features, **factory))
        self._selected = False
        self._tied_key: tuple | None = None      # (id, version) of W when C, R were verified slices
        self._adapter_version_at_select = None

    # -- selection and the tied fast path ------------------------------------------------------
    @torch.no_grad()
    def select(self) -> "CURLoRALinear":
        """(Re)select rows and columns from the current W and copy C, R; returns self."""
        if self.weight.is_meta:
            raise RuntimeError("fastcur.CURLoRALinear.select: the weight is on the meta device; "
                               "materialize it (to_empty + load) first")
        generator = layer_generator(self.seed, self.module_name)
        rows, cols = cur_select(self.weight, self.rank, self.selection, replace=self.replace, generator=generator,
                                inverse_eps=self.inverse_eps)
        self.rows.copy_(rows)
        self.cols.copy_(cols)
        self.C.copy_(self.weight[:, cols])
        self.R.copy_(self.weight[rows])
        self._selected = True
        self._adapter_version_at_select = self.U._version
        self._tied_key = self._weight_key()
        return self

    def _trained_tensor(self) -> torch.Tensor:
        return self.U

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] (checked by `AdapterLinear.forward`)."""
        if not self._selected:
            self._select_in_forward()
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        tied = self.tied
        return cur_linear(x, self.weight, self.bias, self.C, self.U.to(self.weight.dtype), self.R, self.scale,
                          rows=self.rows if tied else None, cols=self.cols if tied else None)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """{"U": U [r, r]}: the only trainable tensor."""
        return {"U": self.U}

    def curvature_taps(self, x: torch.Tensor, grad_y: torch.Tensor) -> list:
        """U is a linear map between the r-dim projections: inputs h = x R^T [E, T, r], output
        gradients s * grad_y C [E, T, r], so `g_U,e = s (dy_e C)^T (x_e R^T)` (the method's dU per
        example). x [E, T, in], grad_y [E, T, out]."""
        if not self._selected:
            self.select()
        with torch.no_grad():
            h = x @ self.R.mT
            p = (grad_y @ self.C) * self.scale
        return [LinearTap("U", h, p)]

    def _delta_tensors(self) -> dict[str, torch.Tensor]:
        return {"C": self.C, "U": self.U, "R": self.R}

    def _delta_from(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """ΔW = s C U R, [out, in], in float32 or wider (for merging only)."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        return self.scale * (tensors["C"].to(acc) @ tensors["U"].to(acc) @ tensors["R"].to(acc))

    def merge(self) -> None:
        """Fold ΔW into W; the forward then runs the plain linear. Undo with `unmerge`."""
        if self.merged:
            raise RuntimeError("fastcur.CURLoRALinear.merge: the adapter is already merged")
        if not self._selected:
            self.select()
        self._merge_delta()

    def unmerge(self) -> None:
        """Subtract the ΔW that `merge` added (remembered C, U, R: a U or C, R changed while
        merged does not corrupt W). W is restored up to its dtype's rounding; the tied fast path
        comes back only if C and R are exact slices of the restored W."""
        if not self.merged:
            raise RuntimeError("fastcur.CURLoRALinear.unmerge: the adapter is not merged")
        self._unmerge_delta()
        self._verify_tied()

    def extra_repr(self) -> str:
        state = ("tied" if self.tied else "explicit C, R") if self._selected else "not selected yet"
        return (f"{self._base_repr()}, rank={self.rank}, scale={self.scale:g}, select={self.selection!r}, "
                f"replace={self.replace}, inverse_eps={self.inverse_eps:g}, seed={self.seed}, {state}" + (", merged=True" if self.merged else ""))
