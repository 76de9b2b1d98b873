"""IncLoRA's defaults as released (docs/methods.md, "JumpLoRA, IncLoRA and ELLA"): λ = 3e4, the
interpolated ELLA delta, never the LM head, per-block threshold groups by the released name
rule (a T5 block's self- and cross-attention share θ), the threshold reset's order statistic
and floor; each against a float64 re-derivation of the released code."""
import math
import re

import pytest
import torch
from torch import nn

import fastcur
from fastcur.modules.jump_lora_linear import JumpLoRALinear

from tiny_models import tiny_llama, tiny_lm

# The released grouping rule (ella/jump_lora.py, threshold_group_key_from_fqn), re-written.
_RELEASED = [re.compile(p) for p in (
    r"\.encoder\.block\.(\d+)\.", r"\.decoder\.block\.(\d+)\.", r"\.encoder\.layer\.(\d+)\.",
    r"\.decoder\.layer\.(\d+)\.", r"\.decoder\.layers\.(\d+)\.", r"\.layers\.(\d+)\.", r"\.h\.(\d+)\.",
    r"\.block\.(\d+)\.")]


def released_group(fqn):
    dotted = "." + fqn
    for pat in _RELEASED:
        m = pat.search(dotted)
        if m:
            return dotted[1:m.end()]
    return fqn


def tiny_t5():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                   num_decoder_layers=2, num_heads=2, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config).eval()


def test_defaults_are_the_released_ones():
    mgr = fastcur.IncLoRA(tiny_lm())
    assert mgr.ella_lambda == 3e4
    assert mgr.options["ella_delta"] == "interpolated"
    assert (mgr.f_start, mgr.f_end, mgr.init_log_theta) == (0.2, 0.8, -4.7)
    assert (mgr.options["rank"], mgr.options["alpha"], mgr.options["bandwidth"]) == (8, 32.0, 1e-3)


@pytest.mark.parametrize("build", [tiny_lm, lambda: tiny_llama(seed=0)], ids=["plain", "llama"])
def test_lm_head_never_adapted_by_default(build):
    model = build()
    mgr = fastcur.IncLoRA(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "lm_head" in linears
    assert set(mgr.names) == set(linears) - {"lm_head"}
    mgr.start_task(total_steps=10)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, JumpLoRALinear)


def test_per_block_groups_follow_the_released_rule_on_t5():
    model = tiny_t5()
    mgr = fastcur.IncLoRA(model, target_modules=["q", "v"], scope="per_block")
    mgr.start_task(total_steps=10)
    layers = mgr.layers()
    cross = [n for n in layers if "EncDecAttention" in n]
    assert cross, list(layers)
    by_threshold = {}
    for name, layer in layers.items():
        by_threshold.setdefault(id(layer.threshold), set()).add(released_group(name))
    # one threshold per released group, and each released group has one threshold
    assert all(len(groups) == 1 for groups in by_threshold.values())
    assert len(by_threshold) == len({released_group(n) for n in layers}) == 4
    block0 = [layers[n].threshold for n in layers if n.startswith("decoder.block.0.")]
    assert len(block0) == 4 and all(t is block0[0] for t in block0)   # self- and cross-attention


def test_inject_per_block_uses_the_same_rule():
    model = tiny_t5()
    fastcur.inject(model, fastcur.JumpLoRAConfig(rank=2, threshold_scope="per_block", target_modules=["q", "v"]))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, JumpLoRALinear)}
    groups = {}
    for name, layer in layers.items():
        groups.setdefault(released_group(name), set()).add(id(layer.threshold))
    assert all(len(ids) == 1 for ids in groups.values())
    assert len({id(m.threshold) for m in layers.values()}) == len(groups)


def _trained(mgr, seed=3, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mgr.layers().values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)


@pytest.mark.parametrize("scope", ["global", "per_block"])
def test_reset_takes_the_released_order_statistic(scope):
    model = tiny_lm()
    mgr = fastcur.IncLoRA(model, scope=scope, ella_lambda=0.0)
    mgr.start_task(total_steps=10)
    _trained(mgr)
    for _ in range(2):                     # int(0.2 * 10) = 2: the reset step
        mgr.step()
    groups = {}
    for layer in mgr.layers().values():
        groups.setdefault(id(layer.threshold), (layer.threshold, []))[1].append(layer)
    assert len(groups) == (1 if scope == "global" else 2)
    for threshold, layers in groups.values():
        Z = torch.cat([(m.lora_B.weight.double() @ m.lora_A.weight.double()).float().abs().flatten()
                       for m in layers])
        k = Z.numel() - sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in layers)
        # released: global kthvalue(|Z|, k + 1); per block kthvalue(|Z|, max(k, 1))
        rank = k + 1 if scope == "global" else max(k, 1)
        want = max(torch.kthvalue(Z, rank).values.item(), 1e-12)
        assert threshold.log_theta.item() == pytest.approx(math.log(want), abs=1e-6)


def test_reset_floor_is_the_released_1e_minus_12():
    mgr = fastcur.IncLoRA(tiny_lm(), ella_lambda=0.0)
    mgr.start_task(total_steps=10)          # B = 0: every |Z| is 0
    mgr.step(); mgr.step()
    theta = next(iter(mgr.layers().values())).threshold
    assert theta.log_theta.item() == pytest.approx(math.log(1e-12), rel=1e-6)


def test_ella_penalty_mid_ramp_is_the_released_interpolated_delta():
    torch.manual_seed(0)
    model = tiny_lm().double()
    mgr = fastcur.IncLoRA(model)
    mgr.start_task(total_steps=10)
    _trained(mgr, seed=1)
    for _ in range(10):
        mgr.step()
    mgr.end_task()
    mgr.start_task(total_steps=10)
    _trained(mgr, seed=2)
    for _ in range(5):                      # f = (5 - 2) / 6 = 0.5
        mgr.step()
    layers = mgr.layers()
    assert all(m.f == 0.5 for m in layers.values())
    total = 0.0
    for name, m in layers.items():          # ella/lora_utils.py, "interpolated", in float64
        raw = m.lora_B.weight @ m.lora_A.weight
        jump = raw * (raw.abs() > m.threshold.log_theta.detach().exp()).double()
        delta = (0.5 * jump + 0.5 * raw) * m.scaling
        total = total + torch.sum((delta * mgr.W_past[name]) ** 2)
    want = 3e4 * total / len(layers)
    got = mgr.penalty()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    params = [p for m in layers.values() for p in (m.lora_A.weight, m.lora_B.weight)]
    for a, e in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


def test_plain_inclora_and_ella_baselines_fold_the_dense_update():
    """jump=False: the IncLoRA / ELLA baselines of the JumpLoRA paper: f stays 0, θ is neither
    trained nor reset, end_task folds s B A, and ELLA penalizes that dense ΔW."""
    torch.manual_seed(0)
    model = tiny_lm().double()
    mgr = fastcur.IncLoRA(model, jump=False)
    params = mgr.start_task(total_steps=10)
    layers = mgr.layers()
    assert not any(p is m.threshold.log_theta for m in layers.values() for p in params)
    _trained(mgr, seed=1)
    theta = {n: m.threshold.log_theta.detach().clone() for n, m in layers.items()}
    for _ in range(10):
        assert mgr.step() == 0.0
    assert all(m.f == 0.0 and torch.equal(m.threshold.log_theta, theta[n]) for n, m in layers.items())
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    dense = {n: m.scaling * (m.lora_B.weight @ m.lora_A.weight).detach() for n, m in layers.items()}
    mgr.end_task()
    for n in layers:
        torch.testing.assert_close(model.get_submodule(n).weight, before[n] + dense[n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mgr.W_past[n], dense[n], rtol=1e-12, atol=1e-12)
    mgr.start_task(total_steps=10)
    _trained(mgr, seed=2)
    layers = mgr.layers()
    want = 3e4 * sum(torch.sum((m.scaling * (m.lora_B.weight @ m.lora_A.weight) * mgr.W_past[n]) ** 2)
                     for n, m in layers.items()) / len(layers)
    torch.testing.assert_close(mgr.penalty(), want, rtol=1e-10, atol=0)
    with pytest.raises(TypeError, match="jump must be a bool"):
        fastcur.IncLoRA(model, jump=1)
