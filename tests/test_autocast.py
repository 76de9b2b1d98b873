"""bfloat16 autocast on the CPU for every adapter class: under `torch.autocast("cpu",
torch.bfloat16)` a float32 layer computes what its bfloat16 copy computes (as nn.Linear does),
through the fused ops, with float32 gradients for its float32 parameters; a mixed-precision
training run of a tiny causal LM stays finite and learns, for every method."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastcur
from tiny_models import METHODS, batch, inject_method, one_thread, tiny_causal_lm, trainable  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = [
    (fastcur.LoRALinear, {}),
    (fastcur.CURLoRALinear, {"rank": 4}),
    (fastcur.SecuraLinear, {"rank": 4}),
    (fastcur.SecuraLinear, {"rank": 4, "signorm": "off", "lora_bias": True}),
    (fastcur.JumpLoRALinear, {"rank": 4, "f": 0.5}),
    (fastcur.JumpLoRALinear, {"rank": 4, "gate": "rank"}),
]
IDS = ["lora", "curlora", "secura", "secura-off", "jumplora-weight", "jumplora-rank"]
BF16 = torch.bfloat16


def perturbed(cls, options, seed=0):
    """A float32 layer over nn.Linear(24, 20) whose adapter is nonzero."""
    torch.manual_seed(seed)
    layer = cls.from_linear(torch.nn.Linear(24, 20), **options)
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p.add_(torch.randn_like(p) * 0.3)
    return layer


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def bf16_copy(layer):
    """The layer in bfloat16, but a JumpLoRA threshold kept in float32: autocast leaves log θ
    alone (the jump ops take it in float32), and `.to(BF16)` would round it (a step of up to
    3 % in θ)."""
    low = copy.deepcopy(layer).to(BF16)
    if isinstance(low, fastcur.JumpLoRALinear):
        low.threshold.log_theta.data = layer.threshold.log_theta.detach().clone()
    return low


@pytest.mark.parametrize("cls,options", LAYERS, ids=IDS)
@pytest.mark.parametrize("in_dtype", [torch.float32, BF16], ids=["x-f32", "x-bf16"])
def test_layer_under_autocast_computes_like_its_bf16_copy(cls, options, in_dtype):
    layer = perturbed(cls, options)
    low = bf16_copy(layer)
    x = torch.randn(3, 5, 24)
    with autocast():
        y = layer(x.to(in_dtype))
    assert y.dtype == BF16
    torch.testing.assert_close(y, low(x.to(BF16)))
    # ... and stays near the float32 layer: bfloat16 rounding, not another function
    y32 = layer(x)
    assert (y.float() - y32).abs().max() <= 0.05 * y32.abs().max()


@pytest.mark.parametrize("cls,options", LAYERS, ids=IDS)
def test_gradients_reach_float32_parameters(cls, options):
    layer = perturbed(cls, options)
    low = bf16_copy(layer)
    x = torch.randn(3, 5, 24)
    with autocast():
        loss = layer(x).float().square().mean()
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert names, "the layer has trainable parameters"
    grads = torch.autograd.grad(loss, [layer.get_parameter(n) for n in names])
    low_grads = torch.autograd.grad(low(x.to(BF16)).float().square().mean(),
                                    [low.get_parameter(n) for n in names])
    for name, g, g_low in zip(names, grads, low_grads):
        assert g.dtype == torch.float32, name
        assert torch.isfinite(g).all(), name
        # the float32 parameter's gradient is the bfloat16 computation's, widened
        torch.testing.assert_close(g, g_low.float(), msg=name)


@pytest.mark.parametrize("cls,options", LAYERS[:3], ids=IDS[:3])
def test_switches_under_autocast_follow_nn_linear(cls, options):
    layer = perturbed(cls, options)
    x = torch.randn(4, 5, 24)
    with autocast():
        base = F.linear(x, layer.weight, layer.bias)
        adapted = layer(x)
        layer.adapter_enabled = False
        off = layer(x)
        layer.adapter_enabled = True
        layer.frozen_batch_rows = 1
        split = layer(x)
    assert off.dtype == split.dtype == base.dtype == BF16
    torch.testing.assert_close(off, base, rtol=0, atol=0)
    torch.testing.assert_close(split, torch.cat([base[:1], adapted[1:]]), rtol=0, atol=0)


def test_float64_layer_is_left_alone_and_mismatch_outside_autocast_still_raises():
    layer = perturbed(fastcur.CURLoRALinear, {"rank": 4}).double()
    x = torch.randn(3, 24, dtype=torch.float64)
    with autocast():
        y = layer(x)
    assert y.dtype == torch.float64          # autocast does not touch float64, neither does fastcur
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="input dtype torch.bfloat16 does not match .* torch.float32"):
        perturbed(fastcur.SecuraLinear, {"rank": 4})(torch.randn(3, 24, dtype=BF16))


@pytest.mark.parametrize("method", METHODS)
def test_mixed_precision_training_stays_finite_and_learns(method):
    model = inject_method(tiny_causal_lm("llama"), method).train()
    params = trainable(model)
    ids = batch(4, 12)
    with torch.no_grad():
        loss32 = model(input_ids=ids, labels=ids).loss
    opt = torch.optim.AdamW(params.values(), lr=2e-2)
    losses = []
    for _ in range(5):
        with autocast():
            out = model(input_ids=ids, labels=ids)
        assert out.logits.dtype == BF16      # the LM head ran in bfloat16 under autocast
        out.loss.backward()
        for name, p in params.items():
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert all(torch.isfinite(p).all() for p in params.values())
    assert abs(losses[0] - loss32.item()) < 0.05, (losses[0], loss32.item())
    assert losses[-1] < losses[0] - 0.02, losses


def test_jump_linear_ella_under_autocast_computes_like_its_bf16_copy():
    """The fused ELLA path (a JumpLoRALinear with a W_past, in training) under bf16 autocast."""
    torch.manual_seed(0)
    layer = fastcur.JumpLoRALinear(24, 20, rank=4, f=0.5)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
        layer.threshold.log_theta.fill_(-3.0)
    layer.set_w_past(torch.randn(20, 24))
    x = torch.randn(6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        p = layer.ella_penalty()
    assert y.dtype == torch.bfloat16 and p.dtype == torch.bfloat16
    ref = fastcur.ops.reference.jump_linear_ella(
        x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16(), layer.lora_A.weight.bfloat16(),
        layer.lora_B.weight.bfloat16(), layer.threshold.log_theta.detach(), layer.scaling,   # (log θ float32)
        layer.W_past.bfloat16(), 0.5)
    torch.testing.assert_close(y, ref[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(p, ref[1], rtol=2e-2, atol=2e-2)
    (y.float().square().sum() + p.float()).backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.weight.grad).all()
