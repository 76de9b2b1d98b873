"""fastcur.IMSM on a tiny random Llama built offline: loss, logits and every gradient equal a
two-copy reference (a deep-copied frozen model and the adapted model run separately, the gate as
SPEC §6 writes it, float64); gate 0.5 at init; cached generation equals recomputation; LoRA,
CUR-LoRA and SECURA adapters; bad input."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import fastcur
from fastcur.ops import reference
import tiny_models

transformers = pytest.importorskip("transformers")

METHODS = {
    "lora": fastcur.LoRAConfig(rank=4, alpha=8.0),
    "curlora": fastcur.CURLoRAConfig(rank=4),
    "secura": fastcur.SecuraConfig(rank=4),
}


# float64 by default; sdpa attention: eager NaNs on padding in float64 (transformers 5.23)
tiny_llama = functools.partial(tiny_models.tiny_llama, dtype=torch.float64, attn_implementation="sdpa")


def add_adapters(model, method="lora", seed=1):
    """`method` adapters on every projection (fastcur.inject), with random values (at init
    every method is the identity update, which would make the two streams equal)."""
    fastcur.inject(model, METHODS[method])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in fastcur.adapter_modules(model).values():
            for p in m.adapter_parameters().values():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def make_imsm(method="lora", random_gate=True, dtype=torch.float64):
    imsm = fastcur.IMSM(add_adapters(tiny_llama(dtype=dtype), method), gate_rank=8, gate_dropout=0.0)
    if random_gate:
        with torch.no_grad():
            imsm.W_B.normal_(0, 0.3)
    return imsm


def batch(B=3, T=9, vocab=61, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    prompt_lengths = torch.tensor([4, 6, 2][:B])
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[0, -2:] = 0  # right padding on row 0
    labels = ids.clone()
    labels[torch.arange(T)[None, :] < prompt_lengths[:, None]] = -100
    labels[attention_mask == 0] = -100
    return ids, attention_mask, prompt_lengths, labels


def two_copy_reference(imsm, frozen, ids, attention_mask, prompt_lengths, labels):
    """What the paper's code does: two models, the gate on the concatenation [q ⊕ h ⊕ h' ⊕ q']."""
    tuned = imsm.model
    with torch.no_grad():
        h = frozen.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    h_tuned = tuned.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    pm = (torch.arange(ids.shape[1])[None, :] < prompt_lengths[:, None]) & attention_mask.bool()
    w = pm.to(h.dtype)[..., None]
    q, q_tuned = (h * w).sum(1) / w.sum(1), (h_tuned * w).sum(1) / w.sum(1)
    mixed = reference.imsm_gate(h, h_tuned, q, q_tuned, imsm.W_A, imsm.W_B)
    logits = tuned.lm_head(mixed)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    return loss, logits


def frozen_copy(imsm):
    frozen = copy.deepcopy(imsm.model)
    for m in frozen.modules():
        if isinstance(m, fastcur.AdapterLinear):
            m.adapter_enabled = False
    return frozen


def trainable(imsm):
    return [(n, p) for n, p in imsm.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("method,streams", [("lora", "batched"), ("curlora", "batched"), ("secura", "batched"),
                                            ("lora", "sequential")])
def test_matches_two_copy_reference(method, streams):
    imsm = make_imsm(method)
    imsm.train_streams = streams
    frozen = frozen_copy(imsm)
    ids, am, pl, labels = batch()
    params = trainable(imsm)
    assert {n for n, _ in params} >= {"W_A", "W_B"} and len(params) > 2
    for backend in (("reference", "cpp") if method == "lora" else ("cpp",)):
        with fastcur.use_backend(backend):
            out = imsm(ids, am, prompt_lengths=pl, labels=labels)
        ref_loss, ref_logits = two_copy_reference(imsm, frozen, ids, am, pl, labels)
        torch.testing.assert_close(out.logits, ref_logits, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.loss, ref_loss, rtol=1e-10, atol=1e-10)
        grads = torch.autograd.grad(out.loss, [p for _, p in params])
        ref_grads = torch.autograd.grad(ref_loss, [p for _, p in params])
        for (name, _), g, rg in zip(params, grads, ref_grads):
            assert torch.count_nonzero(rg) > 0, name
            torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-12, msg=f"grad of {name}")


def test_frozen_stream_is_the_base_model_and_switches_are_restored():
    imsm = make_imsm()
    ids, am, _, _ = batch()
    base = frozen_copy(imsm)
    h, h_tuned, _ = imsm.streams(ids, am)
    torch.testing.assert_close(h, base.model(input_ids=ids, attention_mask=am).last_hidden_state,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_tuned, imsm.model.model(input_ids=ids, attention_mask=am).last_hidden_state,
                               rtol=1e-12, atol=1e-12)
    assert not torch.allclose(h, h_tuned)
    assert all(m.frozen_batch_rows is None and not m.detach_frozen_rows for m in imsm.adapters.values())


@pytest.mark.parametrize("grad", [False, True])
def test_frozen_rows_paths_of_an_additive_adapter(grad):
    """LoRA without input gradient runs one base GEMM for both streams; with it, two (the frozen
    rows cut from the graph): both equal the frozen layer on rows [:2] and the adapted on [2:]."""
    layer = add_adapters(tiny_llama()).model.layers[0].mlp.up_proj
    x = torch.randn(5, 3, layer.in_features, dtype=torch.float64, requires_grad=grad)
    layer.frozen_batch_rows, layer.detach_frozen_rows = 2, True
    y = layer(x)
    layer.frozen_batch_rows = None
    torch.testing.assert_close(y[:2], F.linear(x[:2], layer.weight, layer.bias), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(y[2:], layer(x[2:]), rtol=1e-14, atol=1e-14)
    if grad:
        (gx,) = torch.autograd.grad(y.sum(), x)
        assert torch.count_nonzero(gx[:2]) == 0 and torch.count_nonzero(gx[2:]) > 0


def test_gate_is_half_at_init():
    imsm = make_imsm(random_gate=False)
    assert torch.count_nonzero(imsm.W_B) == 0 and torch.count_nonzero(imsm.W_A) > 0
    bound = 1 / (4 * imsm.hidden_size) ** 0.5
    assert imsm.W_A.abs().max() <= bound
    ids, am, pl, _ = batch()
    h, h_tuned, _ = imsm.streams(ids, am)
    logits = imsm(ids, am, prompt_lengths=pl).logits
    torch.testing.assert_close(logits, imsm.model.lm_head(0.5 * h + 0.5 * h_tuned), rtol=1e-12, atol=1e-12)


def test_query_means_use_prompt_tokens_only():
    """Changing answer tokens changes nothing at prompt positions; changing prompt lengths does."""
    imsm = make_imsm()
    ids, am, pl, _ = batch()
    a = imsm(ids, am, prompt_lengths=pl).logits
    other = ids.clone()
    other[0, 5:] = (other[0, 5:] + 1) % 61  # row 0's prompt is 4 tokens
    b = imsm(other, am, prompt_lengths=pl).logits
    torch.testing.assert_close(a[0, :4], b[0, :4], rtol=1e-12, atol=1e-12)
    c = imsm(ids, am, prompt_lengths=pl + 1).logits
    assert not torch.allclose(a[0, :4], c[0, :4])
    mask_form = imsm(ids, am, prompt_mask=torch.arange(9)[None, :] < pl[:, None]).logits
    torch.testing.assert_close(mask_form, a, rtol=0, atol=0)


def test_gate_dropout_in_training_only():
    imsm = fastcur.IMSM(add_adapters(tiny_llama()), gate_dropout=0.5)
    with torch.no_grad():
        imsm.W_B.normal_(0, 0.3)
    ids, am, pl, labels = batch()
    imsm.eval()
    e1, e2 = imsm(ids, am, prompt_lengths=pl).logits, imsm(ids, am, prompt_lengths=pl).logits
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    imsm.train()
    t1, t2 = imsm(ids, am, prompt_lengths=pl).logits, imsm(ids, am, prompt_lengths=pl).logits
    assert not torch.allclose(t1, t2) and not torch.allclose(t1, e1)
    imsm(ids, am, prompt_lengths=pl, labels=labels).loss.backward()
    assert imsm.W_A.grad is not None and torch.isfinite(imsm.W_A.grad).all()
    # generate() decodes without dropout and restores the training mode
    g1, g2 = imsm.generate(ids[:, :4], max_new_tokens=4), imsm.generate(ids[:, :4], max_new_tokens=4)
    assert torch.equal(g1, g2) and imsm.training
    imsm.eval()
    assert torch.equal(imsm.generate(ids[:, :4], max_new_tokens=4), g1)


@pytest.mark.parametrize("method", list(METHODS))
def test_generate_with_cache_equals_recomputation(method):
    imsm = make_imsm(method)
    ids = batch(B=2, T=5)[0]
    n = 6
    out = imsm.generate(ids, max_new_tokens=n)
    assert out.shape == (2, 5 + n) and torch.equal(out[:, :5], ids)
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            logits = imsm(seq, prompt_lengths=torch.full((2,), 5)).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert all(m.frozen_batch_rows is None for m in imsm.adapters.values())


def test_generate_left_padding_matches_unpadded_rows():
    imsm = make_imsm()
    ids = batch(B=2, T=6)[0]
    padded = ids.clone()
    padded[1, :2] = 0
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    out = imsm.generate(padded, attention_mask=mask, max_new_tokens=4)
    alone = imsm.generate(ids[1:, 2:], max_new_tokens=4)
    assert torch.equal(out[1, 6:], alone[0, 4:])
    assert torch.equal(out[0], imsm.generate(ids[:1], max_new_tokens=4)[0])


def test_generate_stops_at_eos():
    imsm = make_imsm()
    ids = batch(B=2, T=5)[0]
    free = imsm.generate(ids, max_new_tokens=6)
    eos = int(free[0, 6])  # row 0's second generated token
    out = imsm.generate(ids, max_new_tokens=6, eos_token_id=eos)
    assert torch.equal(out[0, 5:7], free[0, 5:7])
    assert (out[0, 7:] == eos).all()


def test_save_and_load_reproduce_outputs(tmp_path):
    imsm = make_imsm("secura")
    ids, am, pl, _ = batch()
    expected = imsm(ids, am, prompt_lengths=pl).logits
    imsm.save_adapter(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "imsm_config.json", "imsm_gate.safetensors"]
    loaded = fastcur.IMSM.load_adapter(tiny_llama(), tmp_path / "ckpt")
    assert loaded.gate_rank == 8 and loaded.gate_dropout == imsm.gate_dropout
    torch.testing.assert_close(loaded(ids, am, prompt_lengths=pl).logits, expected, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="has no imsm_gate.safetensors"):
        (tmp_path / "ckpt" / "imsm_gate.safetensors").unlink()
        fastcur.IMSM.load_adapter(tiny_llama(), tmp_path / "ckpt")


def test_float32_model_runs_the_fused_kernel():
    imsm = make_imsm(dtype=torch.float32)
    ids, am, pl, labels = batch()
    out = imsm(ids, am, prompt_lengths=pl, labels=labels)
    out.loss.backward()
    assert out.logits.dtype == torch.float32 and imsm.W_B.grad is not None


# -- bad input ------------------------------------------------------------------------------------
def test_model_without_adapters_is_rejected():
    with pytest.raises(ValueError, match="no fastcur adapter layers"):
        fastcur.IMSM(tiny_llama())


@pytest.mark.parametrize("kwargs,message", [
    (dict(gate_rank=0), "gate_rank must be a positive int, got 0"),
    (dict(gate_dropout=1.0), r"gate_dropout must be in \[0, 1\), got 1.0"),
    (dict(train_streams="both"), "train_streams must be 'batched' or 'sequential', got 'both'"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastcur.IMSM(add_adapters(tiny_llama()), **kwargs)


def test_bad_forward_input():
    imsm = make_imsm()
    ids, am, pl, labels = batch()
    with pytest.raises(ValueError, match=r"prompt_lengths must be in \[1, T = 9\].*got \[4, 10, 2\]"):
        imsm(ids, am, prompt_lengths=torch.tensor([4, 10, 2]))
    with pytest.raises(ValueError, match=r"prompt_lengths must be 3 integers"):
        imsm(ids, am, prompt_lengths=torch.tensor([4, 6]))
    with pytest.raises(ValueError, match=r"labels must have input_ids' shape \(3, 9\), got \(2, 9\)"):
        imsm(ids, am, prompt_lengths=pl, labels=labels[:2])
    with pytest.raises(ValueError, match=r"attention_mask must have input_ids' shape \(3, 9\), got \(2, 9\)"):
        imsm(ids, am[:2], prompt_lengths=pl)
    with pytest.raises(ValueError, match=r"prompt_mask must have input_ids' shape"):
        imsm(ids, am, prompt_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        imsm(torch.randn(3, 9))
    with pytest.raises(ValueError, match="at least one attended prompt token"):
        imsm(ids, torch.zeros_like(am))


def test_merged_adapter_is_rejected():
    imsm = make_imsm()
    layer = imsm.model.model.layers[0].self_attn.q_proj
    layer.merge()
    with pytest.raises(RuntimeError, match="needs unmerged adapters"):
        imsm(batch()[0])
    assert layer.frozen_batch_rows is None
