"""Inputs for the JumpLoRA tests: thresholds placed where the tests need them.

`gap=True` puts θ in a gap of the |Z| (or h) values, at least `margin` (relative) away from
every value, with log_theta exactly representable in bfloat16: then no backend, at any
dtype, can disagree with the float64 truth about which entries pass the gate. `gap=False`
puts θ at the median and returns a wide bandwidth, so that many entries fall inside the
straight-through kernel's window (float32/float64 tests of the θ gradient).
"""
from __future__ import annotations

import torch


def _bf16_exact(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


def _draw(lead, k, n, r, bias, seed):
    """x [*lead, k], W [n, k], b [n] (or None), A [r, k], B [n, r]: float64, bf16-exact."""
    g = torch.Generator().manual_seed(seed)
    W = _bf16_exact(torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5)
    x = _bf16_exact(torch.randn(*lead, k, generator=g, dtype=torch.float64))
    b = _bf16_exact(torch.randn(n, generator=g, dtype=torch.float64)) if bias else None
    A = _bf16_exact(torch.randn(r, k, generator=g, dtype=torch.float64) / k ** 0.5)
    B = _bf16_exact(torch.randn(n, r, generator=g, dtype=torch.float64) / r ** 0.5)
    return x, W, b, A, B


def _require_grads(named: dict, grads: str) -> None:
    """Turn on requires_grad for the tensors `grads` names: all, the adapter's and x, or the params."""
    wants = {"all": "x W b A B t", "adapter": "x A B t", "params": "A B t"}[grads].split()
    for key, t in named.items():
        if t is not None and key in wants:
            t.requires_grad_(True)


def place_theta(values: torch.Tensor, *, gap: bool, margin: float = 0.012, lo: float = 0.5,
                hi: float = 1.0):
    """(log_theta [] float64, bandwidth, achieved margin) for the non-negative `values`."""
    v = values.flatten().double().sort().values
    if not gap:
        theta = v[v.numel() // 2].item()
        lt = _bf16_exact(torch.tensor(theta).log())
        return lt, 0.4 * lt.exp().item(), 0.0
    a, b = int(lo * (v.numel() - 1)), max(int(hi * (v.numel() - 1)), int(lo * (v.numel() - 1)) + 1)
    b = min(b, v.numel() - 1)
    if b <= a:   # a single value: θ at 70 % of it
        lt = _bf16_exact((0.7 * v[0]).log())
        return lt, 0.1 * lt.exp().item(), 0.3
    mids = (v[a:b] * v[a + 1:b + 1]).sqrt()
    lts = _bf16_exact(mids.log())
    ths = lts.exp()
    pos = torch.searchsorted(v, ths).clamp(1, v.numel() - 1)
    near = torch.minimum((v[pos] - ths).abs(), (v[pos - 1] - ths).abs()) / ths
    # the lowest θ (most survivors) that keeps twice the margin; else the widest gap
    good = (near >= 2 * margin).nonzero()
    i = int(good[0]) if good.numel() else int(near.argmax())
    m, lt = near[i].item(), lts[i]
    # window half-width m θ / 4: no value inside it
    return lt, 0.5 * lt.exp().item() * min(m, 1.0), m


def reset_inputs(lead, k, n, r, *, seed: int = 0, keep: float | None = None, band: float = 0.04,
                 bias: bool = True, grads: str = "all", row_scale=None):
    """Inputs in the state of the f schedule after its threshold reset (docs/methods.md,
    JumpLoRA): θ between the m-th and (m+1)-th smallest |Z| (the reset's order statistic,
    m = n k - kept, kept = min(r (n + k), n k / 10) as the released k + 1 rule keeps about
    r (n + k) entries; or `keep` n k), so the mask is sparse and the C++ backward takes its
    sampled path; the bandwidth puts about `band` n k entries inside the straight-through
    window |±Z - θ| < ε/2 (its edges midway between two | |Z| - θ | values). log_theta is
    float32-exact. `row_scale` [n] multiplies B's rows (uneven density across row blocks).

    Returns ([x, W, b, A, B, log_theta] float64 masters, bandwidth, {"kept", "band"} counts).
    """
    x, W, b, A, B = _draw(lead, k, n, r, bias, seed=seed)
    if row_scale is not None:
        B = B * torch.as_tensor(row_scale, dtype=torch.float64).reshape(-1, 1)
    z = (B @ A).abs().flatten()
    v = z.sort().values
    total = v.numel()
    kept = max(1, int(keep * total) if keep is not None else min(r * (n + k), total // 10))
    m = total - kept
    theta = (v[m - 1] * v[m]).sqrt() if m >= 1 else v[0] / 2
    lt = theta.log().float().double()
    theta = lt.exp()
    d = (z - theta).abs().sort().values
    q = max(1, int(band * total))
    half = 0.5 * (d[q - 1] + d[q]).item()
    bw = 2.0 * half
    on = int((z > theta).sum())
    window = int(((z - theta).abs() < half).sum())
    _require_grads(dict(x=x, W=W, b=b, A=A, B=B, t=lt), grads)
    return [x, W, b, A, B, lt], bw, {"kept": on, "band": window}


def jump_inputs(lead, k, n, r, *, gap: bool, seed: int = 0, bias: bool = True,
                grads: str = "all", margin: float = 0.012, lo: float = 0.5):
    """[x, W, b, A, B, log_theta] float64 masters (bf16-exact), bandwidth, margin.

    With gap=True, seeds from `seed` on are tried until θ sits `margin` away from every |Z|;
    `lo` is the lowest quantile of |Z| θ may take (0.9: at most about 10 % of Z kept).
    """
    for s in range(seed, seed + 200):
        x, W, b, A, B = _draw(lead, k, n, r, bias, seed=s)
        lt, bw, m = place_theta((B @ A).abs(), gap=gap, margin=margin, lo=lo)
        if not gap or m >= margin:
            break
    else:
        raise RuntimeError("no seed gave the requested margin")
    _require_grads(dict(x=x, W=W, b=b, A=A, B=B, t=lt), grads)
    return [x, W, b, A, B, lt], bw, m


def rank_inputs(lead, k, n, r, *, gap: bool, seed: int = 0, bias: bool = True, grads: str = "all",
                margin: float = 0.015):
    """[x, W, b, A, B, log_theta [r]] float64 masters and the bandwidth (see module doc)."""
    for s in range(seed, seed + 200):
        x, W, b, A, B = _draw(lead, k, n, r, bias, seed=s)
        h = (x.reshape(-1, k) @ A.T)
        lts, bws, ok = [], [], True
        for j in range(r):
            col = h[:, j]
            # thresholds are positive: place θ_j among the positive values (or above them all)
            pos = col[col > 0]
            if pos.numel() < 2:
                lt = _bf16_exact(torch.tensor(-1.0))
                m = ((col - lt.exp()).abs() / lt.exp()).min().item() if col.numel() else 1.0
                bw = 0.5 * m * lt.exp().item() if m < 1.0 else 1e-3
            else:
                lt, bw, m = place_theta(pos, gap=gap, lo=0.0, hi=1.0)
            if gap and col.numel():
                m = ((col - lt.exp()).abs() / lt.exp()).min().item()
                bw = 0.5 * m * lt.exp().item()
                ok = ok and m >= margin
            lts.append(lt)
            bws.append(bw)
        if not gap or ok:
            break
    else:
        raise RuntimeError("no seed gave the requested margin")
    lt = torch.stack(lts)
    bw = min(bws) if gap else max(bws)
    _require_grads(dict(x=x, W=W, b=b, A=A, B=B, t=lt), grads)
    return [x, W, b, A, B, lt], bw


def theta_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of log_theta the jump ops take next to tensors of `dtype` (float32; float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def theta_as_op_takes(fn):
    """fn(x, W, b, A, B, lt, ...) with lt cast to `theta_dtype(W.dtype)`: `check_against_reference`
    casts every input to the test's dtype, and the ops take log θ in float32 next to half
    tensors (the inputs' log θ here are bfloat16-exact, so the cast changes no value)."""
    def wrapped(x, W, b, A, B, lt, *rest):
        return fn(x, W, b, A, B, lt.to(theta_dtype(W.dtype)), *rest)
    return wrapped


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def theta_off_the_half_grid(values, dtype: torch.dtype, *, lo: float = 0.5, hi: float = 0.97,
                            margin: float | None = None, edges: float | None = None,
                            candidates: int = 20000):
    """(log_theta [] float64 holding a float32 value, achieved margin, flips) for the
    non-negative |Z| `values` (a tensor, or a list of tensors: every variant of Z some backend
    or the reference may gate, e.g. from float32 and from half A, B, rounded to half or not).

    The float32 θ = exp(log_theta) lies between the `lo` and `hi` quantiles, at least `margin`
    (relative; default 2 unit roundoffs of `dtype`) away from every value, and log_theta is not
    representable in `dtype`: rounded to it, θ moves past at least one value of every variant
    (`flips`, the smallest count), so a path that rounds log θ to the half dtype gates
    differently. `edges`: with a
    bandwidth ε, (ε, relative margin) also keeps every value that far from θ ± ε/2 (the
    straight-through window's edges). Of the candidates, the one with the most flips.
    """
    variants = [torch.as_tensor(v).flatten().double() for v in
                (values if isinstance(values, (list, tuple)) else [values])]
    v = torch.cat(variants).sort().values
    margin = 2 * _unit_roundoff(dtype) if margin is None else margin
    a, b = v[int(lo * (v.numel() - 1))], v[int(hi * (v.numel() - 1))]
    lts = torch.linspace(a.log().item(), b.log().item(), candidates, dtype=torch.float64)
    lts = lts.float().double().unique()
    lts = lts[lts.to(dtype).double() != lts]                    # off the half grid
    th = lts.exp()

    def nearest(points):
        pos = torch.searchsorted(v, points).clamp(1, v.numel() - 1)
        return torch.minimum((v[pos] - points).abs(), (v[pos - 1] - points).abs()) / th

    near = nearest(th)
    th_half = lts.to(dtype).double().exp()
    flips = torch.stack([(torch.searchsorted(u, th_half) - torch.searchsorted(u, th)).abs()
                         for u in (w.sort().values for w in variants)]).amin(0)
    ok = (near >= margin) & (flips >= 1)
    if edges is not None:
        eps, edge_margin = edges
        ok &= (nearest(th - eps / 2) >= edge_margin) & (nearest(th + eps / 2) >= edge_margin)
    if not ok.any():
        raise RuntimeError(f"no float32 log θ off the {dtype} grid with a margin of {margin:.2e} in |Z|")
    # the most flips (the most sensitive to a rounded θ), then the widest gap
    score = torch.where(ok, flips.double() + near.clamp(max=0.5), torch.full_like(near, -1.0))
    i = int(score.argmax())
    return lts[i], near[i].item(), int(flips[i])
