"""Elastic weight consolidation on the adapter tensors (`lora-ewc` of `fastcur continual`).

Online EWC (Kirkpatrick et al. 2017; Schwarz et al. 2018): after each task, the diagonal
empirical Fisher of the adapter tensors on that task's training data is added to a running
sum, and the anchor moves to the current tensors; training then pays
`(λ/2) Σ_p F_p (θ_p - θ*_p)^2`. The per-example Fisher comes from fastcur's fused
`lora_fisher_diag` (through `LaplaceRegularizer`'s curvature taps, so every fastcur adapter
works), and the penalty is the fused `laplace_diag_penalty` op.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..lalora import LaplaceRegularizer
from ..ops import lalora as ops


class EWC:
    """Diagonal online EWC over every fastcur adapter tensor of `model`.

    Args:
        model: a model holding fastcur adapter layers (`adapter_parameters()`).
        lam: λ, the penalty strength.
        gamma: decay of the running Fisher sum before each new task's Fisher is added (1: plain sum).
    Tensors: `fisher[name]`, `anchors[name]` with the shapes of the adapter tensors
    (names as `LaplaceRegularizer`'s: `<module path>.<tensor name>`).
    """

    def __init__(self, model: nn.Module, lam: float = 1.0, gamma: float = 1.0):
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise ValueError(f"EWC: lam must be a number >= 0, got {lam!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"EWC: gamma must be in [0, 1], got {gamma!r}")
        self.model, self.lam, self.gamma = model, float(lam), float(gamma)
        # prior_precision=0: the Fisher alone; precisions are sum_e g_e^2, divided by n below.
        self._estimator = LaplaceRegularizer(model, kind="diag", lam=1.0, prior_precision=0.0)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchors: dict[str, torch.Tensor] = {}
        self.tasks = 0

    def _tensors(self) -> dict[str, nn.Parameter]:
        return self._estimator._adapter_tensors()

    @torch.no_grad()
    def consolidate(self, batches: Iterable, loss_fn: Callable, max_batches: int | None = None) -> None:
        """Add the mean per-example Fisher of `loss_fn` over `batches` to the running sum and
        anchor at the current adapter tensors."""
        self._estimator.fit(batches, loss_fn, max_batches=max_batches, reduction="mean", progress=False)
        n = max(self._estimator.n_samples, 1)
        for name, q in self._estimator.precisions.items():
            f = q / n
            self.fisher[name] = f if name not in self.fisher else self.gamma * self.fisher[name] + f
        self.anchors = {n_: a.clone() for n_, a in self._estimator.anchors.items()}
        self.tasks += 1

    def penalty(self) -> torch.Tensor:
        """`(λ/2) Σ F (θ - θ*)^2` (0-dim float32; a 0 tensor before the first task ends)."""
        current = self._tensors()
        if not self.fisher:
            return torch.zeros((), device=next(iter(current.values())).device)
        names = sorted(self.fisher)
        params = [current[n] for n in names]
        anchors = [self.anchors[n].to(current[n].dtype) for n in names]
        fisher = [self.fisher[n].to(current[n].dtype) for n in names]
        return ops.laplace_diag_penalty(params, anchors, fisher, self.lam).float()

    def state_dict(self) -> dict:
        return {"lam": self.lam, "gamma": self.gamma, "tasks": self.tasks,
                "fisher": {k: v.cpu() for k, v in self.fisher.items()},
                "anchors": {k: v.cpu() for k, v in self.anchors.items()}}

    def load_state_dict(self, state: dict) -> None:
        current = self._tensors()
        if set(state["fisher"]) - set(current):
            raise RuntimeError(f"EWC.load_state_dict: saved tensors {sorted(set(state['fisher']) - set(current))} "
                               f"are not adapter tensors of this model")
        dev = lambda n, t: t.to(current[n].device)  # noqa: E731
        self.lam, self.gamma, self.tasks = float(state["lam"]), float(state["gamma"]), int(state["tasks"])
        self.fisher = {k: dev(k, v) for k, v in state["fisher"].items()}
        self.anchors = {k: dev(k, v) for k, v in state["anchors"].items()}
