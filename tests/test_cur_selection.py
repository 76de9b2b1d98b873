"""The tied fast path shared by CURLoRALinear and SecuraLinear (modules/cur_selection.py): it is
taken only while C and R are proven exact slices of the current W, so writes through
`weight.data` (which W's version counter misses) switch to the explicit C, R path."""
import pytest
import torch
from torch import nn

import fastcur
from fastcur.ops import reference


def build(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "curlora":
        m = fastcur.CURLoRALinear.from_linear(nn.Linear(33, 21), rank=5)
        with torch.no_grad():
            m.U.copy_(torch.randn(m.U.shape, generator=g))
        return m
    m = fastcur.SecuraLinear.from_linear(nn.Linear(33, 21), rank=3)
    with torch.no_grad():
        m.B_c.copy_(0.3 * torch.randn(m.B_c.shape, generator=g))
    return m


def float64_forward(m, x):
    """The layer's math in float64 from its current W, b and its own C, R (docs/methods.md)."""
    t = lambda v: None if v is None else v.detach().double()  # noqa: E731
    if isinstance(m, fastcur.CURLoRALinear):
        return reference.cur_linear(x.double(), t(m.weight), t(m.bias), t(m.C), t(m.U), t(m.R), m.scale)
    return reference.secura_linear(x.double(), t(m.weight), t(m.bias), t(m.C), t(m.A_c), t(m.B_c), t(m.R),
                                   t(m.lora_bias), m.scale, m.k, m.eps, m.norm, m.scope)


@pytest.mark.parametrize("write", ["data_copy", "data_assign"])
@pytest.mark.parametrize("kind", ["curlora", "secura"])
def test_writes_through_data_leave_the_tied_path(kind, write):
    m = build(kind)
    assert m.tied
    new = torch.randn(21, 33)
    if write == "data_copy":
        m.weight.data.copy_(new)
    else:
        m.weight.data = new
    assert not m.tied
    x = torch.randn(4, 33, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y.double(), float64_forward(m, x.detach()), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    x64 = x.detach().double().requires_grad_()
    float64_forward(m, x64).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["curlora", "secura"])
def test_writing_the_same_values_back_keeps_the_path(kind):
    m = build(kind)
    m.weight.data.copy_(m.weight.detach().clone())
    assert m.tied  # the slices still compare equal: the fast path stays correct


@pytest.mark.parametrize("kind", ["curlora", "secura"])
def test_fast_path_options(kind):
    m = build(kind)
    m.fast_path = "off"
    assert not m.tied
    m.fast_path = "verify"
    assert m.tied
    x = torch.randn(3, 33)
    torch.testing.assert_close(m(x).double(), float64_forward(m, x), rtol=1e-5, atol=1e-5)
    cls = fastcur.CURLoRALinear if kind == "curlora" else fastcur.SecuraLinear
    with pytest.raises(ValueError, match="fast_path must be"):
        cls(20, 12, rank=3, fast_path="sometimes")
