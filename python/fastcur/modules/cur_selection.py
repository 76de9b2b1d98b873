"""What CURLoRALinear and SecuraLinear share: C and R cut from W by a lazy `select()`, and the
tied fast path, trusted only while C and R are known to be exact slices of the current W."""
from __future__ import annotations

import torch


class CURSelection:
    """Mixin for an AdapterLinear with buffers `rows`, `cols`, `C`, `R` and a `select()`.

    Subclasses set `_selected`, `_tied_key` and `_adapter_version_at_select` in `select()` and
    name, in `_trained_tensor()`, the adapter tensor whose version counter tells whether training
    has touched the adapter since selection."""

    def _trained_tensor(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.compiler.disable(reason="fastcur: a CUR adapter's rows and columns are not selected yet "
                            "(nn.Linear-style constructor, or new base weights loaded) and selection "
                            "runs on the host; call .select() on the layer (or run one eager forward) "
                            "before torch.compile(fullgraph=True)")
    def _select_in_forward(self) -> None:
        # A graph break under torch.compile: without fullgraph the selection runs eagerly.
        self.select()

    def _weight_key(self) -> tuple:
        return (id(self.weight), self.weight._version)

    @property
    def tied(self) -> bool:
        """True while C and R are known to be exact slices of the current W.

        Always False inside `torch.compile`: W's version counter is data-dependent in a graph,
        so a compiled forward takes the explicit C, R path (the same function, one extra
        rank-r GEMM) and never trusts indices a later in-place change of W could invalidate."""
        if torch.compiler.is_compiling():
            return False
        return self._selected and self._tied_key == self._weight_key()

    @torch.no_grad()
    def _verify_tied(self) -> None:
        """Re-establish the tied fast path if C and R are (still) exact slices of W."""
        exact = torch.equal(self.C, self.weight[:, self.cols]) and torch.equal(self.R, self.weight[self.rows])
        self._tied_key = self._weight_key() if exact else None

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
