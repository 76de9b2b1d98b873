"""fastcur adapters inside transformers models: tiny randomly initialised LlamaForCausalLM and
Qwen2ForCausalLM built from configs offline, every method injected into the attention and MLP
projections. Training lowers the loss with activation checkpointing on, checkpointed gradients
equal plain ones, `generate()` (KV cache) gives the tokens of a cache-free greedy loop, and a
saved adapter loaded into a fresh base model reproduces the outputs exactly."""
import pytest
import torch

import fastcur
from tiny_models import (ARCHS, METHODS, PROJECTIONS, batch, inject_method, one_thread,  # noqa: F401
                         tiny_causal_lm, trainable)

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [(arch, method) for arch in ARCHS for method in METHODS]
IDS = [f"{arch}-{method}" for arch, method in CASES]


def adapters(model):
    return fastcur.adapter_modules(model)


def perturb(model, seed=0, std=0.1):
    """Move every adapter's declared tensors away from their (zero-update) init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters(model).values():
            for p in layer.adapter_parameters().values():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


@pytest.mark.parametrize("arch,method", CASES, ids=IDS)
def test_inject_covers_attention_and_mlp_projections(arch, method):
    model = inject_method(tiny_causal_lm(arch), method)
    found = adapters(model)
    want = {f"model.layers.{i}.{part}.{p}" for i in range(2) for part, p in
            [("self_attn", p) if p.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else ("mlp", p)
             for p in PROJECTIONS]}
    assert set(found) == want
    assert isinstance(model.lm_head, torch.nn.Linear) and not model.lm_head.weight.requires_grad
    assert not model.model.embed_tokens.weight.requires_grad
    if arch == "qwen2":                       # q/k/v carry biases, kept (frozen) by the adapters
        assert found["model.layers.0.self_attn.q_proj"].bias is not None


@pytest.mark.parametrize("arch,method", CASES, ids=IDS)
def test_training_with_activation_checkpointing_lowers_the_loss(arch, method):
    model = inject_method(tiny_causal_lm(arch), method).train()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    calls = []
    # a pre-hook: the recompute stops early, right after the last tensor backward needs
    probe = adapters(model)["model.layers.1.self_attn.q_proj"]
    probe.register_forward_pre_hook(lambda *_: calls.append(1))
    ids = batch(4, 12)
    opt = torch.optim.AdamW(trainable(model).values(), lr=2e-2)
    losses = []
    for _ in range(5):
        calls.clear()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert len(calls) == 2                # forward, then the recompute in backward
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02, losses


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_checkpointed_gradients_equal_plain_ones(method, reentrant):
    """Llama only (Qwen2's layers are the same code path; the training test runs both)."""
    arch, ids = "llama", batch(2, 10)
    grads = []
    for checkpointing in (False, True):
        model = perturb(inject_method(tiny_causal_lm(arch), method)).train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in trainable(model).items()})
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys()
    assert all(g is not None for g in ckpt.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)


@pytest.mark.parametrize("arch,method", CASES, ids=IDS)
def test_generate_matches_a_cache_free_greedy_loop(arch, method):
    model = perturb(inject_method(tiny_causal_lm(arch), method)).eval()
    base = tiny_causal_lm(arch)
    ids = batch(2, 5)
    model.generation_config.eos_token_id = None  # the cache-free loop below never stops early
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             do_sample=False, pad_token_id=0)
        assert out.shape == (2, 11) and torch.equal(out[:, :5], ids)
        seq = ids
        for _ in range(6):
            logits = model(input_ids=seq, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out, seq)
        # the adapters take part: the adapted model's logits are not the base model's
        assert (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("arch,method", CASES, ids=IDS)
def test_trained_adapter_saves_and_loads_into_a_fresh_base(arch, method, tmp_path):
    model = inject_method(tiny_causal_lm(arch), method).train()
    ids = batch(2, 8)
    opt = torch.optim.AdamW(trainable(model).values(), lr=2e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    fastcur.save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"fastcur_adapter.safetensors", "fastcur_adapter.json"}
    loaded = fastcur.load_adapter(tiny_causal_lm(arch), tmp_path).eval()
    assert set(fastcur.adapter_modules(loaded)) == set(fastcur.adapter_modules(model))
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert (want - tiny_causal_lm(arch)(input_ids=ids).logits).abs().max() > 1e-4  # it trained
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(loaded.generate(input_ids=ids, **gen), model.generate(input_ids=ids, **gen))
    # the loaded adapter trains on: its trainable tensors are the saved model's
    assert trainable(loaded).keys() == trainable(model).keys()
