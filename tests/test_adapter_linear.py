"""AdapterLinear's switches, shared by every adapter class: `adapter_enabled` (the frozen base
only) and `frozen_batch_rows` (IMSM: the first rows of the batch bypass the adapter); and what
the base gives every class: `module_name`, `to_base_layer`, `adapter_dtype`."""
import pytest
import torch
import torch.nn.functional as F

import fastcur

CLASSES = [
    (fastcur.LoRALinear, {}),
    (fastcur.CURLoRALinear, {"rank": 4}),
    (fastcur.SecuraLinear, {"rank": 4}),
    (fastcur.JumpLoRALinear, {"rank": 4, "f": 0.0}),
]


def perturbed(cls, options, seed=0):
    torch.manual_seed(seed)
    layer = cls(24, 20, **options).double()
    layer(torch.zeros(1, 24, dtype=torch.float64))  # CUR classes select C, R (and init) lazily
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p.add_(torch.randn_like(p) * 0.3)
    return layer


@pytest.mark.parametrize("cls,options", CLASSES, ids=lambda v: getattr(v, "__name__", ""))
def test_adapter_enabled_false_is_the_frozen_base(cls, options):
    layer = perturbed(cls, options)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    base = F.linear(x, layer.weight, layer.bias)
    assert (layer(x) - base).abs().max() > 1e-3  # the adapter does something
    layer.adapter_enabled = False
    torch.testing.assert_close(layer(x), base, rtol=0, atol=0)


@pytest.mark.parametrize("cls,options", CLASSES, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("rows", [0, 2, 4])
def test_frozen_batch_rows_splits_base_and_adapted(cls, options, rows):
    layer = perturbed(cls, options)
    x = torch.randn(4, 5, 24, dtype=torch.float64, requires_grad=True)
    want = torch.cat([F.linear(x[:rows], layer.weight, layer.bias), layer(x[rows:])])
    layer.frozen_batch_rows = rows
    got = layer(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    params = list(layer.adapter_parameters().values())
    g_got = torch.autograd.grad(got.square().sum(), [x] + params)
    g_want = torch.autograd.grad(want.square().sum(), [x] + params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_switches_refuse_a_merged_layer_and_bad_rows():
    layer = perturbed(fastcur.LoRALinear, {})
    x = torch.randn(3, 24, dtype=torch.float64)
    layer.frozen_batch_rows = 4
    with pytest.raises(ValueError, match="frozen_batch_rows = 4 .* got shape \\(3, 24\\)"):
        layer(x)
    layer.merge()
    for switch, value in (("frozen_batch_rows", 1), ("adapter_enabled", False)):
        layer.frozen_batch_rows, layer.adapter_enabled = None, True
        setattr(layer, switch, value)
        with pytest.raises(RuntimeError, match="merged .* unmerge"):
            layer(x)


@pytest.mark.parametrize("cls,options", CLASSES, ids=lambda v: getattr(v, "__name__", ""))
def test_from_linear_records_the_name_and_gives_the_linear_back(cls, options):
    lin = torch.nn.Linear(24, 20).to(torch.bfloat16)
    layer = cls.from_linear(lin, module_name="blocks.0.proj", **options)
    assert layer.module_name == "blocks.0.proj" and not layer.fan_in_fan_out
    assert layer.adapter_dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in layer.adapter_parameters().values())
    base = layer.to_base_layer()
    assert type(base) is torch.nn.Linear and base.weight is lin.weight and base.bias is lin.bias


def test_module_name_must_be_a_string():
    with pytest.raises(TypeError, match="module_name must be a str or None, got 3"):
        fastcur.CURLoRALinear(24, 20, rank=2, module_name=3)
