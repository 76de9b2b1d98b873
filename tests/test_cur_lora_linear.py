"""CURLoRALinear: swapping nn.Linear, training, state dicts, merge, selection, bad input."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import fastcur
from fastcur.ops import reference


def explicit_forward(m, x):
    """The module's function in float64, straight from docs/methods.md (CURLoRA), with its own C, R, U."""
    d = torch.float64
    return reference.cur_linear(x.to(d), m.weight.to(d), None if m.bias is None else m.bias.to(d),
                                m.C.to(d), m.U.to(d), m.R.to(d), m.scale)


def trained_copy(m, seed=1):
    with torch.no_grad():
        m.U.copy_(torch.randn(m.U.shape, generator=torch.Generator().manual_seed(seed)))
    return m


def test_from_linear_shares_storage_and_freezes_base():
    lin = nn.Linear(40, 30)
    m = fastcur.CURLoRALinear.from_linear(lin, rank=6)
    assert m.weight is lin.weight and m.bias is lin.bias
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["U"]
    assert torch.equal(m.C, lin.weight[:, m.cols]) and torch.equal(m.R, lin.weight[m.rows])
    x = torch.randn(7, 40)
    torch.testing.assert_close(m(x), lin(x))  # U = 0 at init: the base layer's output
    assert m.tied


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_forward_and_grad_match_reference_tied_and_explicit(backend):
    if backend == "cpp" and not fastcur._extension.available():
        pytest.skip("C++ extension not built")
    m = trained_copy(fastcur.CURLoRALinear.from_linear(nn.Linear(33, 21), rank=5, scale=0.5))
    x = torch.randn(2, 9, 33)
    with fastcur.use_backend(backend):
        assert m.tied
        torch.testing.assert_close(m(x).double(), explicit_forward(m, x), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            m.weight.mul_(1.5)  # W changed in place: C, R are no longer slices of W
        assert not m.tied
        torch.testing.assert_close(m(x).double(), explicit_forward(m, x), rtol=1e-5, atol=1e-5)


def test_swap_class_in_model_definition_and_train():
    """A model written with nn.Linear's signature takes CURLoRALinear unchanged and learns."""
    class Net(nn.Module):
        def __init__(self, linear=nn.Linear):
            super().__init__()
            self.fc1, self.fc2 = linear(16, 64), linear(64, 4)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    base = Net()
    model = Net(lambda i, o: fastcur.CURLoRALinear(i, o, rank=4))
    model.load_state_dict(base.state_dict(), strict=False)  # base weights, adapter fresh
    assert not model.fc1._selected  # selection is lazy
    x = torch.randn(256, 16)
    target = Net()(x).detach()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert torch.equal(model.fc1.weight, base.fc1.weight)  # base stayed frozen
    assert torch.equal(model.fc1.C, base.fc1.weight[:, model.fc1.cols])


def test_bfloat16_training_stays_finite_and_learns():
    torch.manual_seed(0)
    m = fastcur.CURLoRALinear.from_linear(nn.Linear(64, 32).to(torch.bfloat16), rank=8)
    x = torch.randn(128, 64, dtype=torch.bfloat16)
    target = torch.randn(128, 32, dtype=torch.bfloat16) * 0.1 + m(x).detach()
    opt = torch.optim.Adam([m.U], lr=0.02)
    first = None
    for _ in range(40):
        loss = (m(x).float() - target.float()).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(m.U).all() and loss.item() < first


def test_state_dict_round_trip():
    m = trained_copy(fastcur.CURLoRALinear.from_linear(nn.Linear(24, 18), rank=4, seed=3))
    state = copy.deepcopy(m.state_dict())
    assert set(state) == {"weight", "bias", "U", "rows", "cols", "C", "R"}
    fresh = fastcur.CURLoRALinear(24, 18, rank=4, seed=99)
    fresh.load_state_dict(state)
    x = torch.randn(5, 24)
    assert torch.equal(fresh.rows, m.rows) and torch.equal(fresh.cols, m.cols)
    assert fresh.tied
    torch.testing.assert_close(fresh(x), m(x))


def test_state_dict_after_merge_keeps_explicit_slices():
    m = trained_copy(fastcur.CURLoRALinear.from_linear(nn.Linear(24, 18), rank=4))
    m.merge()
    fresh = fastcur.CURLoRALinear(24, 18, rank=4)
    fresh.load_state_dict(m.state_dict())
    assert not fresh.tied  # W holds the merged update: C, R are not its slices any more
    x = torch.randn(3, 24)
    torch.testing.assert_close(fresh(x).double(), explicit_forward(fresh, x), rtol=1e-5, atol=1e-5)


def test_loading_base_weights_before_training_reselects():
    m = fastcur.CURLoRALinear(30, 20, rank=3, select="lowest")
    m.select()
    new_base = nn.Linear(30, 20)
    with torch.no_grad():
        new_base.weight[:, 7] *= 1e-3  # column 7 is now clearly the lowest-norm column
        new_base.weight[11] *= 1e-3
    m.load_state_dict(new_base.state_dict(), strict=False)
    m(torch.randn(2, 30))
    assert 7 in m.cols.tolist() and 11 in m.rows.tolist()
    assert m.tied and torch.equal(m.C, new_base.weight[:, m.cols])


def test_loading_base_weights_after_training_keeps_adapter():
    m = fastcur.CURLoRALinear.from_linear(nn.Linear(30, 20), rank=3)
    opt = torch.optim.SGD([m.U], lr=0.1)
    m(torch.randn(4, 30)).sum().backward()
    opt.step()
    rows, C = m.rows.clone(), m.C.clone()
    m.load_state_dict(nn.Linear(30, 20).state_dict(), strict=False)
    assert torch.equal(m.rows, rows) and torch.equal(m.C, C)
    assert not m.tied  # W changed under a trained adapter: the explicit C, R are used
    x = torch.randn(3, 30)
    torch.testing.assert_close(m(x).double(), explicit_forward(m, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_merge_then_unmerge_restores_weight(dtype):
    lin = nn.Linear(50, 40).to(dtype)
    m = trained_copy(fastcur.CURLoRALinear.from_linear(lin, rank=6, scale=0.3))
    w0 = m.weight.detach().clone()
    x = torch.randn(6, 50, dtype=dtype)
    y_adapter = m(x)
    m.merge()
    assert m.merged and not m.tied
    torch.testing.assert_close(m(x), y_adapter)
    expected = w0.double() + 0.3 * m.C.double() @ m.U.double() @ m.R.double()
    torch.testing.assert_close(m.weight.double(), expected)
    m.unmerge()
    torch.testing.assert_close(m.weight, w0)
    torch.testing.assert_close(m(x), y_adapter)
    with pytest.raises(RuntimeError, match="not merged"):
        m.unmerge()


def test_lowest_selection_is_exact():
    w = torch.randn(20, 30)
    m = fastcur.CURLoRALinear.from_linear(nn.Linear(30, 20), rank=5, select="lowest")
    with torch.no_grad():
        m.weight.copy_(w)
    m.select()
    wn = w.double().numpy()
    assert sorted(m.cols.tolist()) == sorted(np.argsort((wn ** 2).sum(0), kind="stable")[:5].tolist())
    assert sorted(m.rows.tolist()) == sorted(np.argsort((wn ** 2).sum(1), kind="stable")[:5].tolist())


def test_sample_prefers_low_norm_columns_and_is_seeded():
    w = torch.randn(64, 64)
    w[:, :32] *= 0.1   # columns 0..31 have 1/100 of the energy of columns 32..63
    w[:32] *= 0.1
    picks = []
    for seed in range(20):
        rows, cols = fastcur.ops.cur_select(w, 8, "sample", generator=torch.Generator().manual_seed(seed))
        assert len(set(cols.tolist())) == 8 and len(set(rows.tolist())) == 8  # no duplicates
        picks += cols.tolist()
    low = sum(c < 32 for c in picks) / len(picks)
    assert low > 0.9, f"share of low-norm columns {low:.2f}"
    a = fastcur.ops.cur_select(w, 8, "sample", generator=torch.Generator().manual_seed(5))
    b = fastcur.ops.cur_select(w, 8, "sample", generator=torch.Generator().manual_seed(5))
    c = fastcur.ops.cur_select(w, 8, "sample", generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


def test_sample_with_replacement_keeps_duplicates():
    w = torch.ones(16, 16)
    w[:, 3] = 1e-3  # one column with almost all of the inverted probability
    _, cols = fastcur.ops.cur_select(w, 6, "sample", replace=True, generator=torch.Generator().manual_seed(0))
    assert cols.tolist().count(3) > 1
    _, cols = fastcur.ops.cur_select(w, 6, "sample", replace=False, generator=torch.Generator().manual_seed(0))
    assert len(set(cols.tolist())) == 6


def test_zero_columns_and_zero_matrix_give_finite_probabilities():
    w = torch.randn(10, 12)
    w[:, 4] = 0
    rows, cols = fastcur.ops.cur_select(w, 3, "sample", generator=torch.Generator().manual_seed(0))
    assert 4 in cols.tolist()  # a zero column is the "lowest-energy" one by far
    rows, cols = fastcur.ops.cur_select(torch.zeros(10, 12), 3, "sample", generator=torch.Generator().manual_seed(0))
    assert len(set(cols.tolist())) == 3


def test_selection_does_not_touch_global_rng():
    lin = nn.Linear(20, 20)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fastcur.CURLoRALinear.from_linear(lin, rank=4)
    assert torch.equal(torch.rand(3), expected)


def test_extra_repr():
    m = fastcur.CURLoRALinear(12, 10, rank=3, select="lowest", seed=7)
    assert "rank=3" in repr(m) and "select='lowest'" in repr(m) and "not selected yet" in repr(m)
    m.select()
    assert "tied" in repr(m)


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(rank=0), ValueError, "rank must be an int in [1, min(in_features, out_features) = 10]"),
    (dict(rank=11), ValueError, "rank must be an int in [1, min(in_features, out_features) = 10]"),
    (dict(rank=2.5), ValueError, "rank must be an int"),
    (dict(select="top"), ValueError, "select must be 'sample' or 'lowest'"),
    (dict(dtype=torch.int32), TypeError, "dtype must be floating"),
])
def test_constructor_errors(kwargs, exc, message):
    with pytest.raises(exc) as info:
        fastcur.CURLoRALinear(12, 10, **kwargs)
    assert message in str(info.value)


def test_forward_errors():
    m = fastcur.CURLoRALinear.from_linear(nn.Linear(12, 10), rank=3)
    with pytest.raises(ValueError, match=r"input must have last dimension in_features = 12, got shape \(4, 11\)"):
        m(torch.randn(4, 11))
    with pytest.raises(TypeError, match="input dtype torch.float64 does not match the layer's dtype torch.float32"):
        m(torch.randn(4, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="input is on meta but the layer is on cpu"):
        m(torch.randn(4, 12, device="meta"))


def test_from_linear_errors():
    with pytest.raises(TypeError, match="expected an nn.Linear or a transformers Conv1D, got Conv1d"):
        fastcur.CURLoRALinear.from_linear(nn.Conv1d(3, 3, 1))
    lin = nn.Linear(4, 4)
    lin.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match="weight must be floating"):
        fastcur.CURLoRALinear.from_linear(lin, rank=2)


@pytest.mark.parametrize("change", ["optimizer_step", "load_state_dict", "data_write"])
def test_unmerge_after_the_adapter_changed_restores_weight(change):
    m = trained_copy(fastcur.CURLoRALinear.from_linear(nn.Linear(30, 20, dtype=torch.float64), rank=4))
    w0 = m.weight.detach().clone()
    m.merge()
    if change == "optimizer_step":
        opt = torch.optim.SGD([m.U], lr=0.5)
        m.U.grad = torch.randn_like(m.U)
        opt.step()
    elif change == "load_state_dict":
        m.load_state_dict({"U": torch.randn(4, 4, dtype=torch.float64)}, strict=False)
    else:
        m.U.data.mul_(3.0)
    m.unmerge()
    torch.testing.assert_close(m.weight, w0, rtol=0, atol=1e-12)
    x = torch.randn(3, 30, dtype=torch.float64)
    torch.testing.assert_close(m(x), explicit_forward(m, x))  # the changed adapter, unmerged
