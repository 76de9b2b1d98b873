"""SecuraLinear and MergeSchedule: swap nn.Linear and train, init, SigNorm properties, restrain,
merge modes and schedule, the tied fast path around merges, state dicts, bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcur
from fastcur.ops import reference
from fastcur.ops.cur_select import layer_generator


def trained(m, seed=1, lora_bias=False):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.B_c.copy_(torch.randn(m.B_c.shape, generator=g) * 0.3)
        if lora_bias and m.lora_bias is not None:
            m.lora_bias.copy_(torch.randn(m.lora_bias.shape, generator=g) * 0.1)
    return m


def explicit_forward(m, x):
    """The module's function in float64 from docs/methods.md (SECURA) with its own tensors."""
    d = torch.float64
    t = lambda v: None if v is None else v.detach().to(d)  # noqa: E731
    return reference.secura_linear(x.to(d), t(m.weight), t(m.bias), t(m.C), t(m.A_c), t(m.B_c), t(m.R),
                                   t(m.lora_bias), m.scale, m.k, m.eps, m.norm, m.scope)


def test_from_linear_init_and_trainable():
    lin = nn.Linear(40, 30)
    m = fastcur.SecuraLinear.from_linear(lin, rank=4)
    assert m.weight is lin.weight and m.bias is lin.bias and m.inner_rank == 16
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["A_c", "B_c"]
    rows, cols = fastcur.ops.cur_select(lin.weight, 4, "lowest")
    assert torch.equal(m.rows, rows) and torch.equal(m.cols, cols) and m.tied
    assert torch.equal(m.C, lin.weight[:, cols]) and torch.equal(m.R, lin.weight[rows])
    # init="svd": the released code's SVD product is exactly W[:r, :a]^T.
    assert torch.equal(m.A_c, lin.weight[:4, :16].T) and torch.equal(m.B_c, torch.zeros(4, 16))
    x = torch.randn(2, 7, 40)
    assert torch.equal(m(x), lin(x))  # SigNorm of Δ = 0: S = 2, y = y0 exactly


def test_svd_init_matches_an_svd_product():
    """Documents the equivalence: U_s diag(s) V_s^T of W[:r, :a] is W[:r, :a] itself."""
    W = torch.randn(12, 20, dtype=torch.float64)
    Us, s, Vh = torch.linalg.svd(W[:3, :8], full_matrices=False)
    m = fastcur.SecuraLinear.from_linear(nn.Linear(20, 12, dtype=torch.float64), rank=3, inner_rank=8)
    with torch.no_grad():
        m.weight.copy_(W)
    m.select()
    torch.testing.assert_close(m.A_c, (Us @ torch.diag(s) @ Vh).T)


def test_kaiming_init_and_lora_bias():
    m = fastcur.SecuraLinear(30, 20, rank=2, inner_rank=5, init="kaiming", lora_bias=True)
    x = torch.randn(4, 30)
    m(x)
    assert 0 < m.A_c.abs().max() <= 1 / 2 ** 0.5 + 1e-6  # kaiming-uniform a=sqrt(5): bound 1/sqrt(fan_in = r)
    assert m.lora_bias is not None and torch.equal(m.lora_bias, torch.zeros(20))
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"A_c", "B_c", "lora_bias"}


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("norm,scope", [("max", "token"), ("raw", "tensor")])
def test_forward_matches_spec_tied_and_explicit(backend, norm, scope):
    if backend == "cpp" and not fastcur._extension.available():
        pytest.skip("C++ extension not built")
    m = trained(fastcur.SecuraLinear.from_linear(nn.Linear(33, 21), rank=5, scale=0.5, norm=norm, scope=scope,
                                                 lora_bias=True), lora_bias=True)
    x = torch.randn(2, 9, 33)
    with fastcur.use_backend(backend):
        assert m.tied
        torch.testing.assert_close(m(x).double(), explicit_forward(m, x), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            m.weight.mul_(1.5)
        assert not m.tied
        torch.testing.assert_close(m(x).double(), explicit_forward(m, x), rtol=1e-5, atol=1e-5)


def test_signorm_off_is_plain_cabr_lora():
    m = trained(fastcur.SecuraLinear.from_linear(nn.Linear(20, 16), rank=3, signorm="off", lora_bias=True),
                lora_bias=True)
    x = torch.randn(5, 20, dtype=torch.float32)
    d = reference.secura_delta(x.double(), m.C.double(), m.A_c.double(), m.B_c.double(), m.R.double(),
                               m.lora_bias.double(), m.scale)
    torch.testing.assert_close(m(x).double(), F.linear(x.double(), m.weight.double(), m.bias.double()) + d,
                               rtol=1e-5, atol=1e-5)


def test_no_gradient_through_S():
    m = trained(fastcur.SecuraLinear.from_linear(nn.Linear(12, 10, dtype=torch.float64), rank=2))
    x = torch.randn(6, 12, dtype=torch.float64)
    y = m(x)
    dy = torch.randn_like(y)
    (gB,) = torch.autograd.grad(y, [m.B_c], dy)
    # Expected: the gradient of (2 y0 + Δ) / S with S a constant taken from the forward.
    y0 = F.linear(x, m.weight, m.bias)
    B = m.B_c.detach().requires_grad_()
    delta = reference.secura_delta(x, m.C, m.A_c, B, m.R)
    S = reference.signorm_scales(y0, delta.detach())
    (gB_const,) = torch.autograd.grad((2 * y0 + delta) / S, [B], dy)
    torch.testing.assert_close(gB, gB_const, rtol=1e-10, atol=1e-12)


def test_token_scope_row_independent_in_module():
    m = trained(fastcur.SecuraLinear.from_linear(nn.Linear(16, 12), rank=2))
    x = torch.randn(8, 16)
    full = m(x)
    torch.testing.assert_close(m(x[2:3]), full[2:3], rtol=1e-6, atol=1e-6)


def _net(linear=nn.Linear, dtype=torch.float32):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = linear(16, 64, dtype=dtype), linear(64, 4, dtype=dtype)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))
    return Net()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_swap_class_and_training_learns(dtype):
    """nn.Linear swapped for SecuraLinear in a model definition: loss falls, stays finite."""
    torch.manual_seed(0)
    base = _net(dtype=dtype)
    net = _net(lambda i, o, dtype: fastcur.SecuraLinear(i, o, dtype=dtype, rank=4), dtype)
    net.load_state_dict(base.state_dict(), strict=False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 16, generator=g).to(dtype)
    with torch.no_grad():  # a reachable target: the base model plus a small rank-1 change of fc2
        teacher = copy.deepcopy(base)
        teacher.fc2.weight.add_(0.5 * torch.randn(4, 1, generator=g).to(dtype) @ torch.randn(1, 64, generator=g).to(dtype))
        target = teacher(x)
    params = [p for p in net.parameters() if p.requires_grad]
    assert params and all(n.endswith(("A_c", "B_c")) for n, p in net.named_parameters() if p.requires_grad)
    opt = torch.optim.Adam(params, lr=2e-2)
    losses = []
    for _ in range(80):
        loss = F.mse_loss(net(x).float(), target.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    # SigNorm damps the adapter (y = (2 y0 + Δ) / S, S near 2 for small ratios): slower than LoRA.
    assert losses[-1] < 0.85 * losses[0]
    assert torch.equal(net.fc1.weight, base.fc1.weight)  # W frozen


def test_restrain_fires_exactly_when_share_condition_holds():
    m = trained(fastcur.SecuraLinear.from_linear(nn.Linear(24, 20), rank=2, restrain=True, seed=5))
    x = torch.randn(6, 24)
    y0 = F.linear(x, m.weight, m.bias)
    delta = reference.secura_delta(x, m.C, m.A_c, m.B_c, m.R)
    S = reference.signorm_scales(y0, delta)
    share = (S <= 1.2).float().mean().item()
    for ratio, fires in ((share - 0.01, True), (min(share + 0.01, 1.0), False)):
        m.restrain_ratio = ratio
        gen_state = m._generator.get_state()
        y = m(x)
        assert bool(m.restrain_fired) == fires
        # The channels the module drew, re-drawn from the same generator state.
        g = torch.Generator()
        g.set_state(gen_state)
        count = max((20 - 2) // 2, 20 // 4)
        ch = torch.multinomial(m.weight.detach().norm(dim=1), count, replacement=False, generator=g)
        c = torch.ones(20)
        if fires:
            c[ch] = 0.99
        torch.testing.assert_close(y, (2 * y0 + delta * c) / S, rtol=1e-5, atol=1e-6)


def test_restrain_never_draws_in_eval():
    m = trained(fastcur.SecuraLinear.from_linear(nn.Linear(24, 20), rank=2, restrain=True,
                                                 restrain_ratio=0.0, restrain_min=2.0))
    m.eval()
    state = m._generator.get_state()
    x = torch.randn(3, 24)
    y1, y2 = m(x), m(x)
    assert torch.equal(m._generator.get_state(), state) and torch.equal(y1, y2)
    m.train()
    m(x)
    assert not torch.equal(m._generator.get_state(), state) and bool(m.restrain_fired)


def test_restrain_is_seeded_and_leaves_global_rng_alone():
    a = trained(fastcur.SecuraLinear.from_linear(nn.Linear(24, 20), rank=2, restrain=True, restrain_ratio=0.0,
                                                 restrain_min=2.0, seed=9))
    b = copy.deepcopy(a)
    b._generator = layer_generator(9, None)  # a layer built without a name
    x = torch.randn(3, 24)
    before = torch.get_rng_state()
    assert torch.equal(a(x), b(x))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_plain_merge_keeps_selection_and_lora_bias_in_delta(dtype):
    """The released default: C, R selected once, lora_bias stays part of Δ after a merge."""
    m = trained(fastcur.SecuraLinear.from_linear(nn.Linear(30, 20, dtype=dtype), rank=3, lora_bias=True),
                lora_bias=True)
    W = m.weight.detach().clone()
    b = m.bias.detach().clone()
    rows, cols, C, R = m.rows.clone(), m.cols.clone(), m.C.clone(), m.R.clone()
    dW = m.scale * (m.C.double() @ m.A_c.double().T @ m.B_c.double().T @ m.R.double())
    lb = m.lora_bias.detach().clone()
    m.merge("plain")
    torch.testing.assert_close(m.weight.double(), W.double() + dW)
    assert torch.equal(m.bias, b) and torch.equal(m.lora_bias, lb)
    assert torch.equal(m.B_c, torch.zeros_like(m.B_c))
    assert torch.equal(m.rows, rows) and torch.equal(m.cols, cols) and torch.equal(m.C, C) and torch.equal(m.R, R)
    assert not m.tied  # C, R are the old slices, W moved
    x = torch.randn(4, 30, dtype=dtype)
    # Δ = lora_bias now (C U R = 0): SigNorm of y0 = x W'^T + b and Δ = lora_bias, in float64
    y0 = F.linear(x.double(), m.weight.double(), m.bias.double())
    expected = reference.signorm(y0, lb.double().expand_as(y0), 6.0, 1e-10, "max", "token")
    torch.testing.assert_close(m(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_plain_merge_with_fold_and_reselect_options(dtype):
    m = trained(fastcur.SecuraLinear.from_linear(nn.Linear(30, 20, dtype=dtype), rank=3, lora_bias=True,
                                                 fold_lora_bias=True, reselect_on_merge=True), lora_bias=True)
    W = m.weight.detach().clone()
    b = m.bias.detach().clone()
    dW = m.scale * (m.C.double() @ m.A_c.double().T @ m.B_c.double().T @ m.R.double())
    lb = m.lora_bias.detach().clone()
    m.merge("plain")
    torch.testing.assert_close(m.weight.double(), W.double() + dW)
    torch.testing.assert_close(m.bias, b + lb)
    assert torch.equal(m.B_c, torch.zeros_like(m.B_c)) and torch.equal(m.lora_bias, torch.zeros_like(lb))
    assert m.tied  # reselected from the new W
    x = torch.randn(4, 30, dtype=dtype)
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias))  # Δ = 0 again


@pytest.mark.parametrize("scope", ["row", "tensor"])
def test_signorm_merge_mode_matches_reference(scope):
    m = trained(fastcur.SecuraLinear.from_linear(nn.Linear(30, 20), rank=3, merge_mode="signorm",
                                                 merge_scope=scope))
    W = m.weight.detach().double().clone()
    U = m.A_c.detach().double().T @ m.B_c.detach().double().T
    expected = reference.signorm_merge(W, m.C.double(), U, m.R.double(), m.scale, 6.0, 1e-10, scope)
    m.merge()
    torch.testing.assert_close(m.weight.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(m.B_c, torch.zeros_like(m.B_c))


def test_merge_without_reselect_runs_explicit_path():
    m = trained(fastcur.SecuraLinear.from_linear(nn.Linear(30, 20), rank=3))  # reselect_on_merge=False
    C, R = m.C.clone(), m.R.clone()
    m.merge()
    assert not m.tied and torch.equal(m.C, C) and torch.equal(m.R, R)
    trained(m, seed=4)
    x = torch.randn(5, 30)
    torch.testing.assert_close(m(x).double(), explicit_forward(m, x), rtol=1e-5, atol=1e-5)


def test_merge_schedule_with_optimizer_hook():
    torch.manual_seed(0)
    net = _net(lambda i, o, dtype: fastcur.SecuraLinear(i, o, dtype=dtype, rank=4, merge_every=3))
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    sched = fastcur.MergeSchedule(net, opt)
    x, t = torch.randn(32, 16), torch.randn(32, 4)
    weights = []
    for step in range(1, 7):
        loss = F.mse_loss(net(x), t)
        opt.zero_grad()
        loss.backward()
        w_before = net.fc1.weight.detach().clone()
        opt.step()
        changed = not torch.equal(net.fc1.weight, w_before)
        assert changed == (step % 3 == 0)
        if step % 3 == 0:
            assert torch.equal(net.fc1.B_c, torch.zeros_like(net.fc1.B_c))
        else:
            assert net.fc1.B_c.abs().sum() > 0
        weights.append(changed)
    assert sched.steps == 6 and sched.merges == 4  # two layers, twice
    sched.remove()
    opt.step()
    assert sched.steps == 6


def test_merge_schedule_counts_each_optimizer_step_once():
    """A loop that also calls sched.step() after a hooked optimizer step counts each step once."""
    net = _net(lambda i, o, dtype: fastcur.SecuraLinear(i, o, dtype=dtype, rank=2, merge_every=2))
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    sched = fastcur.MergeSchedule(net, opt)
    x, t = torch.randn(8, 16), torch.randn(8, 4)
    for _ in range(4):
        loss = F.mse_loss(net(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()          # the hook counted this step already
    assert sched.steps == 4 and sched.merges == 4 and net.fc1.merges == 2
    sched.remove()
    sched.step()              # without the hook, step() counts again
    assert sched.steps == 5


def test_merge_schedule_explicit_every_and_mode():
    net = _net(lambda i, o, dtype: fastcur.SecuraLinear(i, o, dtype=dtype, rank=2))
    sched = fastcur.MergeSchedule(net, every=2, mode="signorm")
    trained(net.fc1)
    W = net.fc1.weight.detach().clone()
    U = net.fc1.A_c.detach().T @ net.fc1.B_c.detach().T
    expected = reference.signorm_merge(W, net.fc1.C, U, net.fc1.R)
    sched.step()
    assert torch.equal(net.fc1.weight, W)
    sched.step()
    torch.testing.assert_close(net.fc1.weight, expected)


def test_state_dict_round_trip():
    m = trained(fastcur.SecuraLinear.from_linear(nn.Linear(20, 16), rank=3, lora_bias=True), lora_bias=True)
    sd = m.state_dict()
    assert set(sd) == {"weight", "bias", "A_c", "B_c", "lora_bias", "rows", "cols", "C", "R"}
    other = fastcur.SecuraLinear(20, 16, rank=3, lora_bias=True)
    other.load_state_dict(sd)
    assert other.tied
    x = torch.randn(4, 20)
    assert torch.equal(other(x), m(x))


def test_loading_base_weights_before_training_reselects():
    lin = nn.Linear(20, 16)
    m = fastcur.SecuraLinear(20, 16, rank=3)
    m(torch.randn(2, 20))
    m.load_state_dict(lin.state_dict(), strict=False)
    x = torch.randn(3, 20)
    assert torch.equal(m(x), lin(x)) and m.tied
    assert torch.equal(m.A_c, lin.weight[:3, :12].T)


def test_extra_repr():
    m = fastcur.SecuraLinear.from_linear(nn.Linear(8, 6), rank=2, merge_every=5, restrain=True)
    s = repr(m)
    assert "rank=2" in s and "inner_rank=8" in s and "restrain=True" in s and "merge_every=5" in s and "tied" in s


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(rank=0), ValueError, "rank must be an int in [1, min(in_features, out_features) = 6]"),
    (dict(rank=2, inner_rank=0), ValueError, "inner_rank must be a positive int"),
    (dict(rank=2, inner_rank=9), ValueError, "needs inner_rank <= in_features = 8"),
    (dict(init="svd2"), ValueError, "init must be 'svd' or 'kaiming'"),
    (dict(signorm="weight"), ValueError, "signorm must be 'output' or 'off'"),
    (dict(norm="l1"), ValueError, "norm must be 'max' or 'raw'"),
    (dict(scope="row"), ValueError, "scope must be 'token' or 'tensor'"),
    (dict(merge_mode="dora"), ValueError, "merge_mode must be 'plain' or 'signorm'"),
    (dict(merge_every=0), ValueError, "merge_every must be None or a positive int"),
    (dict(dtype=torch.int32), TypeError, "dtype must be floating"),
])
def test_constructor_errors(kwargs, exc, message):
    kwargs.setdefault("rank", 2)
    with pytest.raises(exc) as info:
        fastcur.SecuraLinear(8, 6, **kwargs)
    assert message in str(info.value) and "SecuraLinear" in str(info.value)


def test_forward_merge_and_schedule_errors():
    m = fastcur.SecuraLinear(8, 6, rank=2)
    with pytest.raises(ValueError, match="input must have last dimension in_features = 8"):
        m(torch.randn(3, 7))
    with pytest.raises(TypeError, match="does not match the layer's dtype"):
        m(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="mode must be 'plain' or 'signorm'"):
        m.merge("dora")
    with pytest.raises(ValueError, match="has no SecuraLinear layer"):
        fastcur.MergeSchedule(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="every must be None or a positive int"):
        fastcur.MergeSchedule(m, every=0)
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        fastcur.SecuraLinear.from_linear(m)


def test_released_restrain_rule_matches_float64_rederivation():
    """restrain_rule="released": positions drawn with weights = the row norms sorted in descending
    order, the decay on y0 + Δ, re-derived here in float64 from the released code's formula."""
    m = trained(fastcur.SecuraLinear.from_linear(nn.Linear(24, 20), rank=2, restrain=True, restrain_ratio=0.0,
                                                 restrain_min=2.0, restrain_rule="released", seed=5),
                lora_bias=False)
    x = torch.randn(2, 5, 24)
    gen_state = m._generator.get_state()
    y = m(x)
    assert bool(m.restrain_fired)
    g = torch.Generator()
    g.set_state(gen_state)
    norms = m.weight.detach().float().norm(dim=1)
    ch = torch.multinomial(torch.topk(norms, k=20).values, max((20 - 2) // 2, 20 // 4), generator=g)
    d = torch.float64
    y0 = F.linear(x.to(d), m.weight.to(d), m.bias.to(d))
    delta = reference.secura_delta(x.to(d), m.C.to(d), m.A_c.detach().to(d), m.B_c.detach().to(d), m.R.to(d))
    S = reference.signorm_scales(y0, delta)
    summand = y0 + delta
    summand[..., ch] = summand[..., ch] * 0.99
    torch.testing.assert_close(y.double(), (y0 + summand) / S, rtol=1e-5, atol=1e-5)


def test_released_restrain_share_counts_over_the_last_two_dims():
    """The released share divides by T n: with a batch of 2 every hit counts twice, so a ratio of
    1.5 fires there and never in the default rule (share over all elements, at most 1)."""
    x = torch.randn(2, 4, 24)
    for rule, fires in (("released", True), ("fastcur", False)):
        m = trained(fastcur.SecuraLinear.from_linear(nn.Linear(24, 20), rank=2, restrain=True, restrain_min=2.0,
                                                     restrain_ratio=1.5, restrain_rule=rule))
        m(x)
        assert bool(m.restrain_fired) == fires
    with pytest.raises(ValueError, match="restrain_rule"):
        fastcur.SecuraLinear(24, 20, rank=2, restrain_rule="paper")


@pytest.mark.parametrize("norm", ["max", "raw"])
def test_signorm_jumps_at_zero_delta_and_max_form_is_scale_free(norm):
    """Both SigNorm forms are discontinuous at Δ = 0 (S = 2 there, y = y0): an arbitrarily small
    nonzero Δ changes the output by a finite amount. raw: S -> 2 - σ(0) = 1.5, every output
    scaled by 4/3. max: S depends on Δ only through L / (max L + eps), the same for Δ and c Δ
    while max L >> eps (scale-free); as max L falls below eps = 1e-10, S -> 2 - σ(-3) and
    y -> 1.024 y0 (still a jump)."""
    g = torch.Generator().manual_seed(0)
    y0 = torch.randn(5, 16, generator=g, dtype=torch.float64) + 2.0
    direction = torch.randn(5, 16, generator=g, dtype=torch.float64)
    at_zero = reference.signorm(y0, torch.zeros_like(y0), norm=norm)
    torch.testing.assert_close(at_zero, y0, rtol=0, atol=0)
    vanishing = reference.signorm(y0, 1e-20 * direction, norm=norm)
    limit = 4 / 3 if norm == "raw" else 2 / (2 - torch.sigmoid(torch.tensor(-3.0, dtype=torch.float64)))
    torch.testing.assert_close(vanishing, limit * y0, rtol=1e-6, atol=1e-9)
    assert ((vanishing - y0) / y0).abs().min() > 0.02
    if norm == "max":
        S = [reference.signorm_scales(y0, c * direction, norm="max") for c in (1e-6, 1e-3, 1.0, 1e3)]
        for s in S[1:]:
            torch.testing.assert_close(s, S[0], rtol=1e-4, atol=1e-6)
        # per token, the largest L gets S = 2 - σ(3): that output is 2 / 1.047 = 1.91 times y0
        ratio = reference.signorm(y0, 1e-6 * direction, norm="max") / y0
        torch.testing.assert_close(ratio.max(-1).values, torch.full((5,), 2 / (2 - torch.sigmoid(
            torch.tensor(3.0, dtype=torch.float64)).item()), dtype=torch.float64), rtol=1e-4, atol=1e-6)


def test_signorm_default_is_normalized():
    assert fastcur.SecuraLinear(8, 6, rank=2).norm == "max" and fastcur.SecuraConfig().norm == "max"


def test_merge_and_unload_folds_the_kept_lora_bias():
    """lora_bias stays in Δ at a merge; merge_and_unload folds it into the plain layer's bias
    (creating one where the layer had none), so nothing of the adapter is dropped."""
    net = _net(lambda i, o, dtype: fastcur.SecuraLinear(i, o, dtype=dtype, rank=2, lora_bias=True, signorm="off",
                                                      bias=False))
    for layer in (net.fc1, net.fc2):
        layer.select()
        trained(layer, lora_bias=True)
    x = torch.randn(5, 16)
    expected = net(x).detach()
    lb = net.fc1.lora_bias.detach().clone()
    fastcur.merge_and_unload(net)
    assert isinstance(net.fc1, nn.Linear) and torch.equal(net.fc1.bias, lb)
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)  # signorm off: the merge is exact


# -- the tied indices on the C++ CPU kernel: checked there, not by torch.equal per forward --------
@pytest.mark.parametrize("where", ["row", "col"])
def test_one_entry_written_through_data_is_caught(where):
    """A write through `weight.data` (W's version counter misses it) to one entry of a selected
    row or column: the module still passes the indices (storage and version unchanged), the C++
    kernel finds R != W[rows] (or C != W[:, cols]) and runs the explicit path; forward and the
    gradients match the float64 layer with the new W and the old C, R."""
    m = trained(fastcur.SecuraLinear.from_linear(nn.Linear(37, 29), rank=3))
    assert m.tied
    with torch.no_grad():
        if where == "row":
            m.weight.data[m.rows[1], 5] += 0.5
        else:
            m.weight.data[7, m.cols[2]] += 0.5
    assert not m.tied
    x = torch.randn(3, 11, 37, requires_grad=True)
    y = m(x)
    x64 = x.detach().double().requires_grad_()
    truth = explicit_forward(m, x64)
    torch.testing.assert_close(y.double(), truth, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    truth.backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


def test_column_written_between_forward_and_backward():
    """A write through `weight.data` to a selected column after the forward: the backward's own
    check of C == W[:, cols] sends it to the explicit path, so its gradients equal those of the
    layer with fast_path="off" (never tied) under the same write."""
    grads = []
    for fast_path in ("auto", "off"):
        torch.manual_seed(0)
        m = trained(fastcur.SecuraLinear.from_linear(nn.Linear(37, 29), rank=3, fast_path=fast_path))
        x = torch.randn(40, 37, requires_grad=True)
        y = m(x)
        with torch.no_grad():
            m.weight.data[:, m.cols[0]] *= 2.0
        y.backward(torch.ones_like(y))
        grads.append((x.grad, m.A_c.grad, m.B_c.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
