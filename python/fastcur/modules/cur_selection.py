"""What CURLoRALinear and SecuraLinear share: C and R cut from W by a lazy `select()`, the layer's
own selection stream (seed + qualified name), and the tied fast path, trusted only while C and R
are proven to be exact slices of the current W."""
from __future__ import annotations

import torch

from .._compile_guard import compile_disabled, install

#: `fast_path` values: "auto" (verify on CPU, explicit C, R elsewhere), "verify" (verify on every
#: device: one host sync per forward on a GPU), "off" (always the explicit C, R path).
FAST_PATHS = ("auto", "verify", "off")


class CURSelection:
    """Mixin for an AdapterLinear with buffers `rows`, `cols`, `C`, `R` and a `select()`.

    Subclasses set `_selected`, `_tied_key` and `_adapter_version_at_select` in `select()` and
    name, in `_trained_tensor()`, the adapter tensor whose version counter tells whether training
    has touched the adapter since selection.

    The tied fast path gathers x R^T from x W^T, so it is only correct while C = W[:, cols] and
    R = W[rows] hold exactly. W's version counter misses writes through `weight.data`
    (`weight.data.copy_(...)`, `weight.data = ...`), so `tied` also compares the storage
    pointer and, on every forward, the slices themselves (`torch.equal`, r (n + k) reads: about
    2 % of a 4096 x 4096 GEMV on one CPU thread, less for longer inputs; but a host sync, so on a
    GPU the default `fast_path="auto"` takes the explicit C, R path instead; `fast_path="verify"`
    checks there too).
    """

    _takes_module_name = True

    def _trained_tensor(self) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def from_linear(cls, linear, *, module_name: str | None = None, **options):
        """Wrap `linear` (nn.Linear, or transformers' Conv1D) and select C, R at once from its
        weight, with the stream of `module_name` (the layer's qualified name in the model;
        `fastcur.inject` passes it)."""
        layer = super().from_linear(linear, module_name=module_name, **options)
        if not layer.weight.is_meta:
            layer.select()
        return layer

    def __new__(cls, *args, **kwargs):
        install(cls)  # the compile_disabled methods, before torch.compile can trace an instance
        return super().__new__(cls)

    @compile_disabled("fastcur: a CUR adapter's rows and columns are not selected yet "
                      "(nn.Linear-style constructor, or new base weights loaded) and selection "
                      "runs on the host; call .select() on the layer (or run one eager forward) "
                      "before torch.compile(fullgraph=True)")
    def _select_in_forward(self) -> None:
        # A graph break under torch.compile: without fullgraph the selection runs eagerly.
        self.select()

    def _weight_key(self) -> tuple:
        w = self.weight
        return (id(w), w._version, w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype)

    @property
    def tied(self) -> bool:
        """True while C and R are proven to be exact slices of the current W (see the class doc).

        Always False inside `torch.compile` (W's version counter is data-dependent in a graph,
        so a compiled forward takes the explicit C, R path: the same function, one extra rank-r
        GEMM) and with `fast_path="off"`."""
        if torch.compiler.is_compiling() or not self._selected or self._tied_key != self._weight_key():
            return False
        mode = getattr(self, "fast_path", "auto")
        if mode == "off" or (mode == "auto" and self.weight.device.type != "cpu"):
            return False
        return self._slices_exact()

    @torch.no_grad()
    def _slices_exact(self) -> bool:
        # index_select, not W[:, cols]: advanced indexing of r columns of a 4096 x 4096 W took
        # 10 ms on one CPU thread, index_select 0.16 ms (a base GEMV there: 11.6 ms)
        w = self.weight
        return bool(torch.equal(self.C, w.index_select(1, self.cols)) and torch.equal(self.R, w.index_select(0, self.rows)))

    @torch.no_grad()
    def _verify_tied(self) -> None:
        """Re-establish the tied fast path if C and R are (still) exact slices of W."""
        self._tied_key = self._weight_key() if self._slices_exact() else None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "rows" in state_dict and prefix + "cols" in state_dict:
            self._selected = True             # a saved adapter: keep its indices, C, R (and adapter)
            self._adapter_version_at_select = self._trained_tensor()._version
            self._verify_tied()
        elif (prefix + "weight" in state_dict and self._selected
              and self._trained_tensor()._version == self._adapter_version_at_select):
            self._selected = False            # new base weights, untrained adapter: select again lazily
