"""transformers' Conv1D (GPT-2's c_attn / c_proj / c_fc, weight stored [in, out]) under every
adapter method: `fastcur.inject` wraps it, the layer's output matches a float64 re-derivation
from the Conv1D's own weight, and merge / unmerge / merge_and_unload / unload / save / load and
IMSM work on it."""
import pytest
import torch

import fastcur
from fastcur.ops import reference

transformers = pytest.importorskip("transformers")
from tiny_models import adamw_losses

CONFIGS = {
    "lora": fastcur.LoRAConfig(rank=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]),
    "curlora": fastcur.CURLoRAConfig(rank=4, target_modules=["c_attn", "c_proj", "c_fc"]),
    "secura": fastcur.SecuraConfig(rank=4, inner_rank=8, target_modules=["c_attn", "c_proj", "c_fc"]),
    "jumplora": fastcur.JumpLoRAConfig(rank=4, target_modules=["c_attn", "c_proj", "c_fc"]),
}


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def ids(seed=0):
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in fastcur.adapter_modules(model).values():
            for name, p in layer.named_parameters():
                if p.requires_grad and "log_theta" not in name:
                    p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def rederived(layer, conv_weight, conv_bias, x):
    """The layer's output in float64 from the Conv1D's [in, out] weight: W = conv_weight^T."""
    d = torch.float64
    W, b, x = conv_weight.to(d).T, conv_bias.to(d), x.to(d)
    t = lambda v: None if v is None else v.detach().to(d)  # noqa: E731
    if isinstance(layer, fastcur.LoRALinear):
        return x @ W.T + b + layer.scaling * (x @ t(layer.lora_A.weight).T) @ t(layer.lora_B.weight).T
    if isinstance(layer, fastcur.CURLoRALinear):
        C, R = W[:, layer.cols], W[layer.rows]     # C, R cut from the Conv1D's weight
        return reference.cur_linear(x, W, b, C, t(layer.U), R, layer.scale)
    if isinstance(layer, fastcur.SecuraLinear):
        C, R = W[:, layer.cols], W[layer.rows]
        return reference.secura_linear(x, W, b, C, t(layer.A_c), t(layer.B_c), R, t(layer.lora_bias),
                                       layer.scale, layer.k, layer.eps, layer.norm, layer.scope)
    return reference.jump_linear(x, W, b, t(layer.lora_A.weight), t(layer.lora_B.weight),
                                 t(layer.threshold.log_theta), layer.scaling, layer.f)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_inject_wraps_conv1d_and_matches_float64(method):
    base = tiny_gpt2()
    convs = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in base.named_modules()
             if type(m).__name__ == "Conv1D"}
    x_ids = ids()
    base_logits = base(x_ids).logits
    model = fastcur.inject(tiny_gpt2(), CONFIGS[method])
    layers = fastcur.adapter_modules(model)
    assert set(layers) == set(convs) and len(layers) == 8
    for name, layer in layers.items():
        assert layer.fan_in_fan_out and layer.module_name == name
        assert torch.equal(layer.weight, convs[name][0].T)
    torch.testing.assert_close(model(x_ids).logits, base_logits, rtol=1e-5, atol=1e-5)  # Δ = 0 at init
    perturb(model)
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"):
        layer = layers[name]
        xin = torch.randn(3, 5, layer.in_features)
        torch.testing.assert_close(layer(xin).double(), rederived(layer, *convs[name], xin), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "curlora", "jumplora"])
def test_merge_unmerge_and_merge_and_unload_give_conv1d_back(method):
    model = fastcur.inject(tiny_gpt2(), CONFIGS[method])
    perturb(model)
    x_ids = ids(3)
    adapted = model(x_ids).logits
    w0 = {n: layer.weight.detach().clone() for n, layer in fastcur.adapter_modules(model).items()}
    fastcur.merge(model)
    torch.testing.assert_close(model(x_ids).logits, adapted, rtol=1e-4, atol=1e-4)
    fastcur.unmerge(model)
    for n, layer in fastcur.adapter_modules(model).items():
        torch.testing.assert_close(layer.weight, w0[n], rtol=0, atol=1e-6)
    merged = fastcur.merge_and_unload(model)
    c_attn = merged.transformer.h[0].attn.c_attn
    assert type(c_attn).__name__ == "Conv1D" and c_attn.weight.shape == (32, 96)
    torch.testing.assert_close(merged(x_ids).logits, adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_unload_restores_the_conv1d_weights_exactly(method):
    base = tiny_gpt2()
    model = fastcur.inject(tiny_gpt2(), CONFIGS[method])
    perturb(model)
    plain = fastcur.unload(model)
    assert not fastcur.adapter_modules(plain)
    for (n, a), (_, b) in zip(plain.state_dict().items(), base.state_dict().items()):
        assert torch.equal(a, b), n
    assert type(plain.transformer.h[1].mlp.c_fc).__name__ == "Conv1D"


@pytest.mark.parametrize("method", list(CONFIGS))
def test_save_load_round_trip_and_training(method, tmp_path):
    model = fastcur.inject(tiny_gpt2(), CONFIGS[method]).train()
    x_ids = ids(5)
    losses = adamw_losses(model, x_ids, steps=8, lr=1e-2)
    assert losses[-1] < losses[0], losses
    model.eval()
    fastcur.save_adapter(model, tmp_path)
    loaded = fastcur.load_adapter(tiny_gpt2(), tmp_path)
    assert torch.equal(loaded(x_ids).logits, model(x_ids).logits)


def test_imsm_over_conv1d_adapters():
    model = fastcur.inject(tiny_gpt2(), CONFIGS["lora"])
    imsm = fastcur.IMSM(model)
    out = imsm(ids(), prompt_lengths=torch.tensor([4, 5]))
    assert out.logits.shape == (2, 9, 64) and torch.isfinite(out.logits).all()
