"""fastcur.inject and the model-level lifecycle on tiny models."""
import copy

import pytest
import torch
from torch import nn

import fastcur
from tiny_models import ids, perturb_adapters, tiny_llama, tiny_lm

ALL = ["layers.0.q_proj", "layers.0.v_proj", "layers.0.up_proj", "layers.0.down_proj",
       "layers.1.q_proj", "layers.1.v_proj", "layers.1.up_proj", "layers.1.down_proj"]
METHODS = {
    "lora": lambda t: fastcur.LoRAConfig(rank=4, alpha=8, target_modules=t),
    "curlora": lambda t: fastcur.CURLoRAConfig(rank=4, target_modules=t),
    "secura": lambda t: fastcur.SecuraConfig(rank=4, inner_rank=6, target_modules=t),
    "jumplora": lambda t: fastcur.JumpLoRAConfig(rank=4, target_modules=t),
}


@pytest.mark.parametrize("target, expected", [
    ("all-linear", ALL),
    (["q_proj", "down_proj"], [n for n in ALL if n.endswith(("q_proj", "down_proj"))]),
    (["1.v_proj"], ["layers.1.v_proj"]),
    (r"layers\.0\.(up|down)_proj", ["layers.0.up_proj", "layers.0.down_proj"]),
    (["lm_head"], ["lm_head"]),                       # named explicitly, the head is adapted
])
def test_targets(target, expected):
    model = fastcur.inject(tiny_lm(), fastcur.LoRAConfig(rank=2, target_modules=target))
    assert list(fastcur.adapter_modules(model)) == expected
    assert all(isinstance(m, fastcur.LoRALinear) for m in fastcur.adapter_modules(model).values())
    assert model.fastcur_config.target_modules == target


@pytest.mark.parametrize("method", list(METHODS))
def test_inject_keeps_outputs_and_freezes_the_rest(method):
    model = tiny_lm()
    base = copy.deepcopy(model)
    x = ids()
    same = fastcur.inject(model, METHODS[method](["q_proj", "up_proj"]))
    assert same is model
    torch.testing.assert_close(model(x), base(x), rtol=1e-6, atol=1e-6)
    layers = fastcur.adapter_modules(model)
    assert len(layers) == 4
    expected = set()
    for name, layer in layers.items():
        assert layer.weight is base.get_submodule(name).weight or torch.equal(layer.weight, base.get_submodule(name).weight)
        expected |= {id(p) for n, p in layer.named_parameters() if n not in ("weight", "bias")}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == expected and trainable
    # a training step moves the outputs away from the base (JumpLoRA from B = 0 learns at f = 0)
    for layer in layers.values():
        if isinstance(layer, fastcur.JumpLoRALinear):
            layer.f = 0.0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).square().mean().backward()
    opt.step()
    assert not torch.allclose(model(x), base(x))


def test_inject_reuses_the_base_weight_storage():
    model = tiny_lm()
    w = model.layers[0].q_proj.weight
    fastcur.inject(model, fastcur.LoRAConfig(rank=2, target_modules=["q_proj"]))
    assert model.layers[0].q_proj.weight is w and not w.requires_grad


def test_all_linear_skips_the_transformers_output_head():
    pytest.importorskip("transformers")
    model = tiny_llama()
    fastcur.inject(model, fastcur.LoRAConfig(rank=2))
    names = list(fastcur.adapter_modules(model))
    assert "lm_head" not in names and len(names) == 2 * 7
    assert {n.rpartition(".")[2] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"}


def test_nothing_matches_names_target_modules():
    model = tiny_lm()
    with pytest.raises(ValueError, match=r"target_modules=\['proj'\].*layers\.0\.q_proj"):
        fastcur.inject(model, fastcur.LoRAConfig(target_modules=["proj"]))
    with pytest.raises(ValueError, match=r"named but not a supported nn.Linear: layers.0.norm \(LayerNorm\)"):
        fastcur.inject(model, fastcur.LoRAConfig(target_modules=["norm"]))
    assert not fastcur.adapter_modules(model)


def test_multihead_attention_out_proj_is_not_adapted():
    model = nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 16))
    fastcur.inject(model, fastcur.LoRAConfig(rank=2))
    assert list(fastcur.adapter_modules(model)) == ["1"]
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        fastcur.inject(nn.Sequential(nn.MultiheadAttention(16, 2)), fastcur.LoRAConfig(target_modules=["out_proj"]))


def test_inject_twice_under_one_name_is_refused():
    model = fastcur.inject(tiny_lm(), fastcur.LoRAConfig(rank=2, target_modules=["q_proj"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already holds an adapter named 'default'.*another adapter_name"):
        fastcur.inject(model, fastcur.CURLoRAConfig(rank=2, target_modules=["v_proj"]))
    assert model.state_dict().keys() == state.keys() and fastcur.adapter_names(model) == ["default"]


def test_a_layer_that_cannot_take_the_adapter_leaves_the_model_unchanged():
    model = tiny_lm(d=24, h=40)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    # rank 30 fits up_proj/down_proj (24 x 40) only up to 24
    with pytest.raises(ValueError, match=r"module 'layers.0.up_proj' \(in_features=24, out_features=40.*rank"):
        fastcur.inject(model, fastcur.CURLoRAConfig(rank=30, target_modules=["up_proj"]))
    assert not fastcur.adapter_modules(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_bad_arguments():
    with pytest.raises(TypeError, match="config must be a fastcur adapter config"):
        fastcur.inject(tiny_lm(), {"rank": 2})
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fastcur.inject("model", fastcur.LoRAConfig())


@pytest.mark.parametrize("scope, groups", [("global", 1), ("per_block", 2), ("per_layer", 4)])
def test_jumplora_threshold_sharing(scope, groups):
    model = fastcur.inject(tiny_lm(), fastcur.JumpLoRAConfig(rank=4, threshold_scope=scope,
                                                             target_modules=["q_proj", "v_proj"]))
    layers = fastcur.adapter_modules(model)
    thresholds = {id(m.threshold) for m in layers.values()}
    assert len(thresholds) == groups
    if scope == "per_block":
        assert layers["layers.0.q_proj"].threshold is layers["layers.0.v_proj"].threshold
    assert all(m.threshold.log_theta.requires_grad for m in layers.values())
    rank_gated = fastcur.inject(tiny_lm(), fastcur.JumpLoRAConfig(rank=3, gate="rank", target_modules=["q_proj"]))
    assert all(m.threshold.log_theta.shape == (3,) for m in fastcur.adapter_modules(rank_gated).values())


def test_print_trainable_parameters(capsys):
    model = fastcur.inject(tiny_lm(d=24, h=40), fastcur.LoRAConfig(rank=2, target_modules=["q_proj"]))
    total = 29 * 24 + 2 * (24 * 25 + 24 * 24 + 24 * 41 + 40 * 25 + 2 * 24) + 24 * 29
    trainable = 2 * (2 * 24 + 24 * 2)
    total += trainable
    assert fastcur.print_trainable_parameters(model) == (trainable, total)
    out = capsys.readouterr().out.strip()
    assert out == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    # a shared threshold counts once
    jump = fastcur.inject(tiny_lm(), fastcur.JumpLoRAConfig(rank=2, target_modules=["q_proj"]))
    assert fastcur.print_trainable_parameters(jump)[0] == 2 * (2 * 24 + 24 * 2) + 1


@pytest.mark.parametrize("method", list(METHODS))
def test_disable_adapters_runs_the_base_and_restores(method):
    model = tiny_lm()
    base = copy.deepcopy(model)
    fastcur.inject(model, METHODS[method](["q_proj", "down_proj"]))
    perturb_adapters(model)
    x = ids()
    adapted = model(x)
    assert not torch.allclose(adapted, base(x))
    with fastcur.disable_adapters(model) as m:
        assert m is model
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)
    layer = model.layers[0].q_proj
    layer.adapter_enabled = False      # a layer switched off by hand stays off afterwards
    with pytest.raises(KeyError):
        with fastcur.disable_adapters(model):
            raise KeyError("inside")
    assert layer.adapter_enabled is False and model.layers[1].q_proj.adapter_enabled is True
    with pytest.raises(ValueError, match="no fastcur adapter layer"):
        with fastcur.disable_adapters(tiny_lm()):
            pass


# -- lifecycle: merge, unmerge, merge_and_unload, unload -----------------------------------------
def _adapted(method, **overrides):
    model = tiny_lm()
    base = copy.deepcopy(model)
    config = METHODS[method](["q_proj", "up_proj", "down_proj"])
    for k, v in overrides.items():
        setattr(config, k, v)
    fastcur.inject(model, config)
    perturb_adapters(model)
    return model, base


@pytest.mark.parametrize("method", ["lora", "curlora", "jumplora"])
def test_merge_unmerge_keep_outputs(method):
    model, base = _adapted(method)
    x = ids()
    y = model(x)
    weights = {n: m.weight.detach().clone() for n, m in fastcur.adapter_modules(model).items()}
    assert fastcur.merge(model) is model
    assert all(m.merged for m in fastcur.adapter_modules(model).values())
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    fastcur.merge(model)                       # already merged: left alone
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        with fastcur.disable_adapters(model):
            model(x)
    fastcur.unmerge(model)
    for n, m in fastcur.adapter_modules(model).items():
        assert not m.merged
        torch.testing.assert_close(m.weight, weights[n], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "curlora", "jumplora", "secura"])
def test_merge_and_unload_gives_plain_linears_with_the_same_outputs(method):
    # SECURA keeps outputs through a merge when SigNorm is off (plain CABR-LoRA)
    model, base = _adapted(method, **({"signorm": "off"} if method == "secura" else {}))
    x = ids()
    y = model(x)
    names = list(fastcur.adapter_modules(model))
    assert fastcur.merge_and_unload(model) is model
    assert not fastcur.adapter_modules(model) and not hasattr(model, "fastcur_config")
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(x), base(x))
    fastcur.inject(model, fastcur.LoRAConfig(rank=2))          # a plain model again


@pytest.mark.parametrize("method", ["lora", "curlora", "jumplora", "secura"])
def test_unload_gives_the_base_back(method):
    model, base = _adapted(method)
    x = ids()
    if method != "secura":
        fastcur.merge(model)                   # merged layers are unmerged first
    fastcur.unload(model)
    assert not fastcur.adapter_modules(model)
    tol = 0 if method == "secura" else 1e-6
    torch.testing.assert_close(model(x), base(x), rtol=tol, atol=tol)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())


def test_secura_merge_is_the_methods_fold():
    model, base = _adapted("secura", merge_mode="plain")
    x = ids()
    layers = fastcur.adapter_modules(model)
    expected = {n: (m.weight + m.delta_weight()).detach().clone() for n, m in layers.items()}
    fastcur.merge(model)
    for n, m in layers.items():
        torch.testing.assert_close(m.weight, expected[n])
        assert torch.count_nonzero(m.B_c) == 0
    y = model(x)                               # B_c = 0: the output is the plain linear's of the new W
    with pytest.raises(ValueError, match="cannot be undone"):
        fastcur.unmerge(model)
    fastcur.merge_and_unload(model)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_rank_gated_jumplora_cannot_merge_and_nothing_changes():
    model, _ = _adapted("jumplora", gate="rank")
    weights = [m.weight.detach().clone() for m in fastcur.adapter_modules(model).values()]
    for fn in (fastcur.merge, fastcur.merge_and_unload):
        with pytest.raises(ValueError, match="rank-gated JumpLoRALinear"):
            fn(model)
    assert all(torch.equal(m.weight, w) for m, w in zip(fastcur.adapter_modules(model).values(), weights))
    fastcur.unload(model)                      # unloading needs no merge
    assert not fastcur.adapter_modules(model)


def test_lifecycle_needs_adapters():
    for fn in (fastcur.merge, fastcur.unmerge, fastcur.merge_and_unload, fastcur.unload):
        with pytest.raises(ValueError, match="no fastcur adapter layer"):
            fn(tiny_lm())
