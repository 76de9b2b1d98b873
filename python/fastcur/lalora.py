"""LaLoRA (docs/methods.md, LaLoRA): a Laplace (EWC-style) regularizer on the adapter tensors of a model.

    reg = fastcur.LaplaceRegularizer(model, kind="diag", lam=1.0)
    reg.fit(source_batches, loss_fn)          # curvature at the anchor θ0 (Stage I)
    for batch in target_batches:              # Stage II
        loss = task_loss(model, batch)
        loss.backward()
        reg.add_penalty_grad_()               # or: (loss + reg.penalty()).backward()
        opt.step(); opt.zero_grad()

Adapters are found through `adapter_parameters()` / `curvature_taps()`, which every fastcur
adapter module declares (AdapterLinear's interface), never by class name.

Curvature, per adapted tensor P (shape [out_p, in_p]; per-example gradient g_e):
- diag: `Λ = n F + δ = sum_e g_e^2 + δ` (F the empirical Fisher, mean over the n examples).
  LoRA A/B come from one fused `lora_fisher_diag` call per layer; other tensors (CUR-LoRA's U)
  from their `LinearTap` (inputs, output gradients).
- kfac: `F ≈ G ⊗ S` with `S = E_tokens[i i^T]` (in_p x in_p) and `G = E_examples[sum_t o o^T]`
  (out_p x out_p), i.e. token sums of output-gradient outer products averaged over examples
  (exact for T = 1; cross-token terms dropped for sequences). LoRA A: i = x, o = s dy B;
  LoRA B: i = x A^T, o = s dy (docs/methods.md's G_B with the scale s included, which makes G ⊗ S a
  Fisher of B's gradient); CUR-LoRA U: i = x R^T, o = s dy C; SECURA B_c, A_c: the LoRA pair
  of the chain `x R^T -> B_c -> A_c`, with output gradient `s (dy / S) C` (S the layer's
  detached SigNorm scales; restrain's channel decay is ignored). A factor wider than
  `kfac_max_dim` keeps its diagonal only. Penalty `(λ/2) [n tr(G Δ S Δ^T) + δ ||Δ||^2]`.
Per-example gradients: the examples are the leading dimension of each adapted layer's input
([E, T, in], or [E, in] with T = 1). `reduction="mean"` (default) means `loss_fn` averages over
the E examples of a batch (its output gradients are multiplied by E); `"sum"` that it sums.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ._atomic import atomic_write
from .modules.adapter_linear import LinearTap, LowRankTap
from .ops import lalora as ops

_FORMAT = "fastcur.lalora/1"


def find_adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every submodule that declares adapter tensors (`adapter_parameters()`), by qualified name."""
    found = []
    for name, module in model.named_modules():
        if callable(getattr(module, "adapter_parameters", None)):
            found.append((name, module))
    return found


class LaplaceRegularizer:
    """Laplace / EWC penalty `(λ/2) Σ (θ - θ0)^T Λ (θ - θ0)` on every adapter tensor of `model`.

    Args:
        model: any nn.Module containing fastcur adapters (modules with `adapter_parameters()`).
        kind: "diag" (diagonal empirical Fisher) or "kfac" (block-diagonal K-FAC).
        lam: λ, the learning / forgetting knob.
        prior_precision: δ added to the precision (gives A, whose Fisher is 0 while B = 0, a prior).
        kfac_max_dim: K-FAC factors wider than this keep only their diagonal.
    Tensors regularized: exactly the adapter tensors that require grad, named
    `<module path>.<tensor name>` (e.g. `layers.0.lora_A.weight`).
    """

    def __init__(self, model: nn.Module, kind: str = "diag", lam: float = 1.0, prior_precision: float = 1e-4,
                 kfac_max_dim: int = 4096):
        if not isinstance(model, nn.Module):
            raise TypeError(f"fastcur.LaplaceRegularizer: model must be an nn.Module, got {type(model).__name__}")
        if kind not in ("diag", "kfac"):
            raise ValueError(f"fastcur.LaplaceRegularizer: kind must be 'diag' or 'kfac', got {kind!r}")
        for arg, value in (("lam", lam), ("prior_precision", prior_precision)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"fastcur.LaplaceRegularizer: {arg} must be a number >= 0, got {value!r}")
        if isinstance(kfac_max_dim, bool) or not isinstance(kfac_max_dim, int) or kfac_max_dim < 1:
            raise ValueError(f"fastcur.LaplaceRegularizer: kfac_max_dim must be a positive int, got {kfac_max_dim!r}")
        self.model, self.kind, self.lam = model, kind, float(lam)
        self.prior_precision, self.kfac_max_dim = float(prior_precision), kfac_max_dim
        self.n_samples = 0
        self.anchors: dict[str, torch.Tensor] = {}
        self.precisions: dict[str, torch.Tensor] = {}                       # diag, float32
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}    # kfac (S, G), float32
        self._cache: list | None = None
        if not self._adapter_tensors():
            raise ValueError("fastcur.LaplaceRegularizer: the model has no adapter tensors that require grad "
                             "(no module declares adapter_parameters(), or all are frozen)")

    # -- discovery ---------------------------------------------------------------------------------
    def _adapter_tensors(self) -> dict[str, nn.Parameter]:
        out = {}
        for mname, module in find_adapters(self.model):
            try:
                declared = module.adapter_parameters()
            except NotImplementedError as exc:
                raise TypeError(f"fastcur.LaplaceRegularizer: module '{mname}': {exc}") from exc
            for pname, p in declared.items():
                if p.requires_grad:
                    out[f"{mname}.{pname}" if mname else pname] = p
        return out

    @property
    def fitted(self) -> bool:
        return bool(self.anchors)

    def _require_fit(self, what: str) -> dict[str, nn.Parameter]:
        if not self.fitted:
            raise RuntimeError(f"fastcur.LaplaceRegularizer.{what}: no curvature yet; call fit(batches, loss_fn) "
                               f"or load(path) first")
        current = self._adapter_tensors()
        if set(current) != set(self.anchors):
            missing, extra = sorted(set(self.anchors) - set(current)), sorted(set(current) - set(self.anchors))
            raise RuntimeError(f"fastcur.LaplaceRegularizer.{what}: the model's adapters changed since fit: "
                               f"missing {missing}, new {extra}")
        for name, p in current.items():
            if p.shape != self.anchors[name].shape:
                raise RuntimeError(f"fastcur.LaplaceRegularizer.{what}: adapter tensor '{name}' changed shape since "
                                   f"fit: {tuple(self.anchors[name].shape)} -> {tuple(p.shape)}")
        return current

    # -- Stage I -------------------------------------------------------------------------------------
    def fit(self, batches: Iterable, loss_fn: Callable, max_batches: int | None = None, *,
            reduction: str = "mean", progress: bool | None = None) -> "LaplaceRegularizer":
        """Collect curvature at the current adapter values (the anchor θ0).

        Args:
            batches: an iterable of batches (anything `loss_fn` accepts).
            loss_fn: `loss_fn(model, batch) -> scalar loss`; see `reduction`.
            max_batches: stop after this many batches (None: all).
            reduction: "mean" if the loss averages over the batch's examples, "sum" if it sums.
            progress: show a tqdm bar (None: only on a terminal).
        The model runs in eval mode during fit (restored after); no `.grad` is touched.
        """
        from tqdm.auto import tqdm

        if reduction not in ("mean", "sum"):
            raise ValueError(f"fastcur.LaplaceRegularizer.fit: reduction must be 'mean' or 'sum', got {reduction!r}")
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                        or max_batches < 1):
            raise ValueError(f"fastcur.LaplaceRegularizer.fit: max_batches must be a positive int or None, "
                             f"got {max_batches!r}")
        tensors = self._adapter_tensors()
        adapters = find_adapters(self.model)
        sums: dict[str, object] = {}
        counts = {"examples": 0, "tokens": {}, "transposed": set()}
        captured: list = []

        def hook(module, inputs, output):
            if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
                captured.append((module, inputs[0].detach(), output))

        handles = [m.register_forward_hook(hook) for _, m in adapters]
        names = {id(m): n for n, m in adapters}
        was_training = self.model.training
        self.model.eval()
        n_batches = 0
        try:
            total = max_batches if max_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
            for batch in tqdm(batches, total=total, disable=progress is False if progress is not None else None,
                              desc="LaLoRA fit", leave=False):
                if max_batches is not None and n_batches >= max_batches:
                    break
                captured.clear()
                with torch.enable_grad():
                    loss = loss_fn(self.model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise TypeError("fastcur.LaplaceRegularizer.fit: loss_fn must return a scalar tensor")
                if not captured:
                    raise RuntimeError("fastcur.LaplaceRegularizer.fit: loss_fn ran no adapter layer of the model")
                grads = torch.autograd.grad(loss, [c[2] for c in captured], allow_unused=True)
                batch_examples = None
                for (module, x, out), gy in zip(captured, grads):
                    x3 = _per_example(x)
                    if gy is None:
                        gy = torch.zeros_like(out)
                    gy3 = _per_example(gy.detach())
                    if reduction == "mean":
                        gy3 = gy3 * x3.shape[0]
                    batch_examples = max(batch_examples or 0, x3.shape[0])
                    self._accumulate(names[id(module)], module, x3, gy3, tensors, sums, counts)
                counts["examples"] += batch_examples
                n_batches += 1
        finally:
            for h in handles:
                h.remove()
            captured.clear()
            self.model.train(was_training)
        if n_batches == 0:
            raise ValueError("fastcur.LaplaceRegularizer.fit: batches is empty (no batch to collect curvature from)")
        missing = sorted(set(tensors) - set(sums))
        if missing:
            raise RuntimeError(f"fastcur.LaplaceRegularizer.fit: loss_fn never ran the adapters of {missing}")
        self.n_samples = counts["examples"]
        self.anchors = {n: p.detach().clone() for n, p in tensors.items()}
        self.precisions, self.factors = {}, {}
        for name in tensors:
            if self.kind == "diag":
                self.precisions[name] = sums[name] + self.prior_precision
            else:
                S, G = sums[name]
                tokens = counts["tokens"][name]
                S, G = S / max(tokens, 1), G / max(self.n_samples, 1)
                # A parameter holding P^T: tr(G Δ S Δ^T) with Δ = Δp^T equals tr(S Δp G Δp^T),
                # so the factors trade places and every penalty formula below stays as it is.
                self.factors[name] = (G, S) if name in counts["transposed"] else (S, G)
        self._cache = None
        return self

    def _accumulate(self, mname, module, x3, gy3, tensors, sums, counts) -> None:
        prefix = f"{mname}." if mname else ""

        def add(name, value):
            if name not in tensors:
                return
            if name in sums:
                if isinstance(value, tuple):
                    sums[name] = tuple(a + b for a, b in zip(sums[name], value))
                else:
                    sums[name] = sums[name] + value
            else:
                sums[name] = value
            counts["tokens"][name] = counts["tokens"].get(name, 0) + x3.shape[0] * x3.shape[1]

        for tap in module.curvature_taps(x3, gy3):
            if isinstance(tap, LowRankTap):
                a_name, b_name = prefix + tap.a_name, prefix + tap.b_name
                if tap.transposed:
                    counts["transposed"].update((a_name, b_name))
                if self.kind == "diag":
                    FA, FB = ops.lora_fisher_diag(tap.x, tap.grad_out, tap.A, tap.B, tap.scale)
                    add(a_name, FA.mT if tap.transposed else FA)
                    add(b_name, FB.mT if tap.transposed else FB)
                else:
                    with torch.no_grad():
                        h = tap.x @ tap.A.mT
                        gh = (tap.grad_out @ tap.B) * tap.scale
                        add(a_name, (self._factor(tap.x), self._factor(gh)))
                        add(b_name, (self._factor(h), self._factor(tap.grad_out * tap.scale)))
            elif isinstance(tap, LinearTap):
                name = prefix + tap.name
                if tap.transposed:
                    counts["transposed"].add(name)
                if self.kind == "diag":
                    i_dim, o_dim = tap.inputs.shape[-1], tap.out_grads.shape[-1]
                    eye = torch.eye(i_dim, dtype=tap.inputs.dtype, device=tap.inputs.device)
                    dummy = torch.zeros(o_dim, i_dim, dtype=tap.inputs.dtype, device=tap.inputs.device)
                    _, F = ops.lora_fisher_diag(tap.inputs, tap.out_grads, eye, dummy, 1.0)  # g = O^T I
                    add(name, F.mT if tap.transposed else F)
                else:
                    add(name, (self._factor(tap.inputs), self._factor(tap.out_grads)))
            else:
                raise TypeError(f"fastcur.LaplaceRegularizer: {type(module).__name__}.curvature_taps returned "
                                f"{type(tap).__name__}, expected LowRankTap or LinearTap")

    def _factor(self, t: torch.Tensor) -> torch.Tensor:
        return ops.kfac_factor(t, diagonal=t.shape[-1] > self.kfac_max_dim)

    # -- Stage II ------------------------------------------------------------------------------------
    def _groups(self, current):
        """[(params, anchors, precisions)] per dtype/device, precisions cast once and cached."""
        if self._cache is None:
            groups: dict = {}
            for name, p in current.items():
                key = (p.dtype, p.device)
                a = self.anchors[name].to(device=p.device, dtype=p.dtype)
                q = self.precisions[name].to(device=p.device, dtype=p.dtype)
                for lst, v in zip(groups.setdefault(key, ([], [], [])), (name, a, q)):
                    lst.append(v)
            self._cache = list(groups.values())
        return [([current[n] for n in names], a, q) for names, a, q in self._cache]

    def penalty(self) -> torch.Tensor:
        """`(λ/2) Σ (θ - θ0)^T Λ (θ - θ0)`, differentiable in the adapter tensors (0-dim, float32)."""
        current = self._require_fit("penalty")
        total = None
        if self.kind == "diag":
            for params, anchors, precisions in self._groups(current):
                v = ops.laplace_diag_penalty(params, anchors, precisions, self.lam).float()
                total = v if total is None else total + v
        else:
            for name, p in current.items():
                S, G = self.factors[name]
                delta = (p - self.anchors[name].to(p.device, p.dtype)).to(S.dtype)
                v = (0.5 * self.lam) * (self.n_samples * ops.kfac_penalty(delta, S.to(p.device), G.to(p.device))
                                        + self.prior_precision * delta.square().sum())
                total = v if total is None else total + v
        return total

    @torch.no_grad()
    def add_penalty_grad_(self) -> torch.Tensor:
        """Add `λ Λ (θ - θ0)` into every adapter tensor's `.grad` (created as zeros where None),
        without autograd; diag: one multi-tensor launch per dtype. Returns the penalty value."""
        current = self._require_fit("add_penalty_grad_")
        for p in current.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        total = torch.zeros((), dtype=torch.float32, device=next(iter(current.values())).device)
        if self.kind == "diag":
            for params, anchors, precisions in self._groups(current):
                grads = [p.grad for p in params]
                total += ops.laplace_diag_penalty_grad_(grads, params, anchors, precisions, self.lam).float()
        else:
            for name, p in current.items():
                S, G = self.factors[name]
                delta = (p - self.anchors[name].to(p.device, p.dtype)).to(S.dtype)
                S, G = S.to(p.device), G.to(p.device)
                half = torch.tensor(0.5 * self.lam * self.n_samples, dtype=S.dtype, device=p.device)
                g = ops.kfac_penalty_grad(half, delta, S, G).add_(delta, alpha=self.lam * self.prior_precision)
                p.grad.add_(g.to(p.grad.dtype))
                total += (0.5 * self.lam) * (self.n_samples * ops.kfac_penalty(delta, S, G)
                                             + self.prior_precision * delta.square().sum())
        return total

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{"format", "kind", "lam", "prior_precision", "kfac_max_dim", "n_samples", "tensors"}; the
        tensors are `anchor.<name>` and `precision.<name>` (diag) or `kfac_S.<name>`, `kfac_G.<name>`."""
        self._require_fit("state_dict")
        tensors = {f"anchor.{n}": a for n, a in self.anchors.items()}
        if self.kind == "diag":
            tensors.update({f"precision.{n}": q for n, q in self.precisions.items()})
        else:
            for n, (S, G) in self.factors.items():
                tensors[f"kfac_S.{n}"], tensors[f"kfac_G.{n}"] = S, G
        return {"format": _FORMAT, "kind": self.kind, "lam": self.lam, "prior_precision": self.prior_precision,
                "kfac_max_dim": self.kfac_max_dim, "n_samples": self.n_samples, "tensors": tensors}

    def load_state_dict(self, state: dict) -> "LaplaceRegularizer":
        """Restore curvature saved by `state_dict` (validated against this model's adapters)."""
        fn = "fastcur.LaplaceRegularizer.load_state_dict"
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"{fn}: not a LaLoRA state (format {_FORMAT!r})")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"{fn}: the state lacks {missing}")
        if state["kind"] != self.kind:
            raise ValueError(f"{fn}: state has kind {state['kind']!r}, this regularizer {self.kind!r}")
        tensors = state["tensors"]
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError(f"{fn}: 'tensors' must map names to tensors")
        current = self._adapter_tensors()
        anchors = {k[len("anchor."):]: v for k, v in tensors.items() if k.startswith("anchor.")}
        if set(anchors) != set(current):
            raise RuntimeError(f"{fn}: saved adapter tensors {sorted(anchors)} do not match the model's {sorted(current)}")
        for n, p in current.items():
            if anchors[n].shape != p.shape:
                raise RuntimeError(f"{fn}: '{n}' has shape {tuple(p.shape)} in the model but "
                                   f"{tuple(anchors[n].shape)} in the state")
            _check_curvature(fn, self.kind, n, p.shape, tensors)
        try:
            scalars = (float(state["lam"]), float(state["prior_precision"]), int(state["kfac_max_dim"]),
                       int(state["n_samples"]))
        except (TypeError, ValueError):
            raise ValueError(f"{fn}: lam, prior_precision, kfac_max_dim and n_samples must be numbers, got "
                             f"{[state[k] for k in ('lam', 'prior_precision', 'kfac_max_dim', 'n_samples')]}") from None
        dev = lambda n, t: t.to(current[n].device)  # noqa: E731
        self.anchors = {n: dev(n, a).to(current[n].dtype) for n, a in anchors.items()}
        if self.kind == "diag":
            self.precisions = {n: dev(n, tensors[f"precision.{n}"]) for n in anchors}
        else:
            self.factors = {n: (dev(n, tensors[f"kfac_S.{n}"]), dev(n, tensors[f"kfac_G.{n}"])) for n in anchors}
        self.lam, self.prior_precision, self.kfac_max_dim, self.n_samples = scalars
        self._cache = None
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to a safetensors file atomically (temporary file + rename)."""
        from safetensors.torch import save_file

        state = self.state_dict()
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.pop("tensors").items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"fastcur_lalora": json.dumps(state)}))

    def load(self, path: str | os.PathLike) -> "LaplaceRegularizer":
        """Read a file written by `save` (validated against this model's adapters). A missing,
        damaged or foreign file raises one line naming the file: FileNotFoundError for a
        missing one, ValueError or RuntimeError (a state of other adapters) otherwise."""
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        fn = "fastcur.LaplaceRegularizer.load"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{fn}: no such file {path!r}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = (f.metadata() or {}).get("fastcur_lalora")
                if meta is None:
                    raise ValueError("no 'fastcur_lalora' metadata (not written by LaplaceRegularizer.save)")
                state = json.loads(meta)
                if not isinstance(state, dict):
                    raise ValueError(f"its 'fastcur_lalora' metadata is a JSON {type(state).__name__}, not an object")
                state["tensors"] = {k: f.get_tensor(k) for k in f.keys()}
            return self.load_state_dict(state)
        except (SafetensorError, ValueError, RuntimeError, OSError) as e:
            reason = " ".join(str(e).split()).removeprefix("fastcur.LaplaceRegularizer.load_state_dict: ")
            kind = RuntimeError if type(e) is RuntimeError else ValueError
            raise kind(f"{fn}: {path!r} is not a usable LaLoRA state file: {reason}") from None

    def __repr__(self) -> str:
        return (f"LaplaceRegularizer(kind={self.kind!r}, lam={self.lam:g}, prior_precision={self.prior_precision:g}, "
                f"tensors={len(self.anchors) or len(self._adapter_tensors())}, fitted={self.fitted})")


_STATE_KEYS = ("kind", "lam", "prior_precision", "kfac_max_dim", "n_samples", "tensors")


def _check_curvature(fn: str, kind: str, name: str, shape: torch.Size, tensors: dict) -> None:
    """The saved curvature of adapter tensor `name` (shape [rows, cols]) is present and fits it:
    diag: `precision.<name>` of the same shape; kfac: `kfac_S.<name>` over cols and
    `kfac_G.<name>` over rows, each [m, m] or its diagonal [m]."""
    if kind == "diag":
        q = tensors.get(f"precision.{name}")
        if q is None or q.shape != shape:
            got = "missing" if q is None else f"shape {tuple(q.shape)}"
            raise ValueError(f"{fn}: 'precision.{name}' must have shape {tuple(shape)}, got {got}")
        return
    for key, m in ((f"kfac_S.{name}", shape[-1]), (f"kfac_G.{name}", shape[0])):
        t = tensors.get(key)
        if t is None or t.shape not in ((m,), (m, m)):
            got = "missing" if t is None else f"shape {tuple(t.shape)}"
            raise ValueError(f"{fn}: '{key}' must have shape ({m}, {m}) or ({m},), got {got}")


def _per_example(t: torch.Tensor) -> torch.Tensor:
    """[E, ..., d] -> [E, T, d] (T = product of the middle dims; [E, d] -> [E, 1, d])."""
    if t.dim() == 1:
        return t.reshape(1, 1, -1)
    return t.reshape(t.shape[0], -1, t.shape[-1])
