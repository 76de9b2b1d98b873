"""LoRALinear: PEFT names, init and outputs; merge; state dict; bad input."""
import math

import pytest
import torch
from torch import nn

import fastcur


def test_names_init_and_trainable():
    m = fastcur.LoRALinear(40, 30, rank=4, alpha=8)
    assert set(m.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    assert torch.count_nonzero(m.lora_B.weight) == 0
    bound = 1 / math.sqrt(40)  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.abs().max() > 0.5 * bound
    assert m.scaling == 2.0
    assert fastcur.LoRALinear(40, 30, rank=4, alpha=8, use_rslora=True).scaling == 4.0


def test_matches_peft_lora():
    peft = pytest.importorskip("peft")
    base = nn.Sequential()
    base.add_module("fc", nn.Linear(24, 16))
    ours = fastcur.LoRALinear.from_linear(nn.Linear(24, 16), rank=4, alpha=12)
    with torch.no_grad():
        ours.weight.copy_(base.fc.weight)
        ours.bias.copy_(base.fc.bias)
        ours.lora_B.weight.normal_()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=12, target_modules=["fc"]))
    layer = model.base_model.model.fc
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(ours(x), model(x))


def test_trains_and_merge_unmerge():
    m = fastcur.LoRALinear.from_linear(nn.Linear(32, 8), rank=4)
    x, target = torch.randn(64, 32), torch.randn(64, 8)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.05)
    first = nn.functional.mse_loss(m(x), target).item()
    for _ in range(50):
        loss = nn.functional.mse_loss(m(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
    w0, y = m.weight.detach().clone(), m(x)
    m.merge()
    torch.testing.assert_close(m(x), y)
    torch.testing.assert_close(m.weight, w0 + m.scaling * m.lora_B.weight @ m.lora_A.weight)
    m.unmerge()
    torch.testing.assert_close(m.weight, w0)
    with pytest.raises(RuntimeError, match="not merged"):
        m.unmerge()


def test_errors():
    with pytest.raises(ValueError, match="rank must be a positive int"):
        fastcur.LoRALinear(4, 4, rank=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        fastcur.LoRALinear(4, 4, dropout=1.0)
    m = fastcur.LoRALinear(4, 4, rank=2)
    with pytest.raises(ValueError, match="last dimension in_features = 4"):
        m(torch.randn(2, 5))


@pytest.mark.parametrize("change", ["optimizer_step", "load_state_dict"])
def test_unmerge_after_the_adapter_changed_restores_weight(change):
    m = fastcur.LoRALinear.from_linear(nn.Linear(20, 14, dtype=torch.float64), rank=3)
    with torch.no_grad():
        m.lora_B.weight.normal_()
    w0 = m.weight.detach().clone()
    m.merge()
    if change == "optimizer_step":
        opt = torch.optim.SGD(m.adapter_parameters().values(), lr=0.5)
        for p in m.adapter_parameters().values():
            p.grad = torch.randn_like(p)
        opt.step()
    else:
        m.load_state_dict({"lora_A.weight": torch.randn(3, 20, dtype=torch.float64),
                           "lora_B.weight": torch.randn(14, 3, dtype=torch.float64)}, strict=False)
    m.unmerge()
    torch.testing.assert_close(m.weight, w0, rtol=0, atol=1e-12)
    x = torch.randn(5, 20, dtype=torch.float64)
    A, B = m.lora_A.weight.detach(), m.lora_B.weight.detach()
    torch.testing.assert_close(m(x), x @ w0.T + m.bias + m.scaling * (x @ A.T) @ B.T)
