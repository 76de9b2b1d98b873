"""JumpLoRA's defaults as released (docs/methods.md, "JumpLoRA, IncLoRA and ELLA"): a plain AdamW
loop learns (f starts at 0), the f schedule runs from the optimizer's steps with the released
boundaries and threshold reset, a warning for f = 1 with B = 0, and float32 A, B, θ on a
bfloat16/float16 base."""
import warnings

import pytest
import torch
from torch import nn

import fastcur
from fastcur.modules.jump_lora_linear import JumpLoRALinear, reset_step
from fastcur.ops import reference

from fastcur.testing import assert_close_to_reference
from jump_inputs import jump_inputs, rank_inputs
from tiny_models import tiny_llama


def released_schedule(total_steps, first_frac=0.2, final_frac=0.8):
    """The released JumpInterpCallback (scripts/train_ella.py), re-derived: after optimizer
    step g (1-based) the boundaries are int(frac * max_steps); θ is reset when g == first; f is
    clamp((g - first) / (final - first), 0, 1), set while g <= final. Returns ({g: f after g},
    the reset step or None), with f = 0 before the first step."""
    first, final = int(first_frac * total_steps), int(final_frac * total_steps)
    f, out, reset = 0.0, {0: 0.0}, None
    for g in range(1, total_steps + 1):
        value = min(1.0, max(0.0, (g - first) / (final - first)))
        if g == first:
            reset = g
        if g <= final:
            f = value
        out[g] = f
    return out, reset


@pytest.mark.parametrize("total", [5, 7, 10, 13, 50])
def test_f_schedule_and_reset_step_match_the_released_callback(total):
    expected, reset = released_schedule(total)
    got = {g: fastcur.f_schedule(g, total) for g in range(total + 1)}
    assert got == pytest.approx(expected, abs=0)
    assert reset_step(total) == reset


@pytest.mark.parametrize("total", [1, 2, 3, 4])
def test_short_runs_still_reset_after_the_first_step(total):
    """A departure (docs/methods.md, Decisions): under 5 steps the released reset step is 0,
    which its callback never sees; fastcur resets after step 1. The ramp is the released one."""
    expected, reset = released_schedule(total) if total > 1 else ({0: 0.0, 1: 1.0}, None)
    assert reset is None and reset_step(total) == 1
    assert {g: fastcur.f_schedule(g, total) for g in range(total + 1)} == pytest.approx(expected, abs=0)


def _llama_batch(seed=1, n=4, t=12):
    ids = torch.randint(0, 61, (n, t), generator=torch.Generator().manual_seed(seed))
    return ids


def _train(model, steps, lr=1e-2):
    """A plain AdamW loop (no fastcur call): the losses and the adapter gradients of step 1."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    ids = _llama_batch()
    losses, first_grads = [], None
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.detach().abs().sum().item() for n, p in model.named_parameters()
                           if p.requires_grad and p.grad is not None}
        opt.step()
        losses.append(loss.item())
    return losses, first_grads


@pytest.mark.parametrize("gate", ["weight", "rank"])
def test_tiny_llama_learns_with_the_default_config_and_a_plain_adamw_loop(gate):
    # initializer_range 0.2: with HF's 0.02 the MLP's inner activations (~1e-3) all sit below
    # the rank gate's θ = exp(-4.7) ≈ 0.009 in down_proj, which then gets no gradient at all
    model = tiny_llama(seed=0, initializer_range=0.2).train()
    fastcur.inject(model, fastcur.JumpLoRAConfig(rank=8, gate=gate))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)      # no dead-gate warning by default
        losses, grads = _train(model, 25)
    assert losses[-1] < 0.9 * losses[0], losses
    lora_b = [v for n, v in grads.items() if n.endswith("lora_B.weight")]
    assert lora_b and all(v > 0 for v in lora_b)
    layers = [m for m in model.modules() if isinstance(m, JumpLoRALinear)]
    assert layers and all(m.lora_A.weight.grad.abs().sum() > 0 for m in layers)


def test_schedule_runs_from_the_optimizer_without_user_code():
    total = 20
    model = tiny_llama(seed=0).train()
    fastcur.inject(model, fastcur.JumpLoRAConfig(rank=8, total_steps=total,
                                                 target_modules=["q_proj", "v_proj"]))
    layers = [m for m in model.modules() if isinstance(m, JumpLoRALinear)]
    threshold = layers[0].threshold
    assert all(m.threshold is threshold for m in layers) and threshold.scope == "global"
    assert all(m.f == 0.0 for m in layers)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _llama_batch()
    expected, reset_step = released_schedule(total)
    for g in range(1, total + 1):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        assert all(m.f == expected[g] for m in layers), g
        if g == reset_step:
            # the released reset: the (k + 1)-th smallest |Z| over every layer (global scope)
            Z = torch.cat([(m.lora_B.weight.double() @ m.lora_A.weight.double()).float().abs().flatten()
                           for m in layers])
            k = Z.numel() - sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in layers)
            want = max(torch.kthvalue(Z, k + 1).values.item(), 1e-12)
            assert threshold.log_theta.item() == pytest.approx(torch.tensor(want).log().item(), abs=1e-6)
    assert int(threshold.steps) == total
    # an optimizer over other parameters does not step this schedule
    other = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    other.step()
    assert int(threshold.steps) == total


def test_warns_once_when_training_at_f_1_with_b_0():
    layer = fastcur.JumpLoRALinear(12, 10, rank=2, f=1.0)
    x = torch.randn(3, 12)
    with pytest.warns(RuntimeWarning, match="f = 1 and B = 0"):
        layer(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x).sum().backward()                       # once per layer
        with torch.no_grad():
            fastcur.JumpLoRALinear(12, 10, rank=2, f=1.0)(x)   # not training: no warning


def test_total_steps_needs_f_0_and_the_weight_gate():
    with pytest.raises(ValueError, match="total_steps runs the f schedule"):
        fastcur.JumpLoRAConfig(total_steps=10, f=0.5)
    with pytest.raises(ValueError, match="total_steps runs the f schedule"):
        fastcur.JumpLoRALinear(4, 4, gate="rank", total_steps=10)
    with pytest.raises(ValueError, match="total_steps must be None or an int >= 1"):
        fastcur.JumpLoRALinear(4, 4, total_steps=0)
    layer = fastcur.JumpLoRALinear(4, 4, total_steps=10)
    with pytest.raises(ValueError, match="f is driven by the schedule"):
        layer.f = 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate", ["weight", "rank"])
def test_half_base_keeps_float32_adapter_and_threshold(dtype, gate):
    """A, B, θ float32 on a half base; forward and the float32 gradients of A, B against the
    float64 reference with the repository's rule at the base's dtype (θ placed in a gap)."""
    make = jump_inputs if gate == "weight" else rank_inputs
    (x, W, b, A, B, lt), *_ = make((16,), 24, 20, 4, gap=True, seed=3, grads="params")
    lin = nn.Linear(24, 20).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(b)
    layer = fastcur.JumpLoRALinear.from_linear(lin, rank=4, alpha=8.0, gate=gate, f=0.5)
    assert layer.weight.dtype == dtype
    params = (layer.lora_A.weight, layer.lora_B.weight, layer.threshold.log_theta)
    assert {p.dtype for p in params} == {torch.float32}
    assert (layer.threshold.log_theta == torch.tensor(-4.7)).all()   # bf16 would give -4.6875
    with torch.no_grad():
        for p, v in zip(params, (A, B, lt)):
            p.copy_(v.detach().reshape(p.shape))
    dy = torch.randn(16, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    (y.double() * dy).sum().backward()

    def ref(t):
        leaves = [v.detach().to(t).requires_grad_(i in (3, 4)) for i, v in enumerate((x, W, b, A, B, lt))]
        fn = reference.jump_linear if gate == "weight" else reference.jump_rank_linear
        extra = (0.5,) if gate == "weight" else ()
        out = fn(*leaves[:5], leaves[5].reshape(params[2].shape), layer.scaling, *extra)
        grads = torch.autograd.grad((out * dy.to(t)).sum(), [leaves[3], leaves[4]])
        return out, grads

    truth, (tA, tB) = ref(torch.float64)
    lowp, (lA, lB) = ref(dtype)
    assert_close_to_reference(y, lowp, truth)
    for p, lg, tg, name in ((params[0], lA, tA, "dA"), (params[1], lB, tB, "dB")):
        assert p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
        assert_close_to_reference(p.grad.to(dtype), lg, tg, name)


def test_bf16_threshold_moves_under_adam():
    """In bfloat16, log θ = -4.7 is stored as -4.6875 and a 1e-3 Adam step rounds away; the
    float32 θ of a bfloat16 base moves."""
    torch.manual_seed(0)
    layer = fastcur.JumpLoRALinear.from_linear(nn.Linear(32, 32).to(torch.bfloat16), rank=4, f=1.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.02)
    opt = torch.optim.Adam([layer.threshold.log_theta], lr=1e-3)
    x = torch.randn(64, 32).to(torch.bfloat16)
    moved = []
    for _ in range(3):
        opt.zero_grad()
        layer(x).float().square().mean().backward()
        assert layer.threshold.log_theta.grad.dtype == torch.float32
        opt.step()
        moved.append(layer.threshold.log_theta.item())
    assert layer.threshold.log_theta.grad.abs().item() > 0
    assert all(abs(v - (-4.7)) > 5e-4 for v in moved), moved
    bf = torch.tensor(-4.7, dtype=torch.bfloat16)
    assert (bf - 1e-3).item() == bf.item()          # why θ must not be bfloat16


def test_schedule_survives_deepcopy_and_torch_save():
    import copy
    import io

    layer = fastcur.JumpLoRALinear(8, 6, rank=2, total_steps=10)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        opt = torch.optim.AdamW([p for p in clone.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            clone(torch.randn(4, 8)).square().sum().backward()
            opt.step()
            opt.zero_grad()
        assert int(clone.threshold.steps) == 3 and clone.f == fastcur.f_schedule(3, 10)
    assert int(layer.threshold.steps) == 0 and layer.f == 0.0


def test_schedule_position_loads_with_the_state_dict():
    layer = fastcur.JumpLoRALinear(8, 6, rank=2, total_steps=10)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):
        layer(torch.randn(3, 8)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    fresh = fastcur.JumpLoRALinear(8, 6, rank=2, total_steps=10)
    assert fresh.f == 0.0
    fresh.load_state_dict(layer.state_dict())
    assert int(fresh.threshold.steps) == 4 and fresh.f == layer.f == fastcur.f_schedule(4, 10) > 0
