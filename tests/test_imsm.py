"""fastcur.IMSM on a tiny random Llama built offline: loss, logits and every gradient equal a
two-copy reference (a deep-copied frozen model and the adapted model run separately, the gate as
docs/methods.md writes it, float64); gate 0.5 at init; cached generation equals recomputation;
LoRA, CUR-LoRA and SECURA adapters; the released code's behaviour (frozen stream in eval mode,
gate dropout after both projections, float32 gate on a bfloat16 model, prompt lengths required
in training); bad input."""
import copy
import functools
import warnings

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
    never = int(free.max()) + 1                  # several stop ids: the same as the one produced
    assert torch.equal(imsm.generate(ids, max_new_tokens=6, eos_token_id=[never, eos]), out)
    with pytest.raises(ValueError, match="eos_token_id"):
        imsm.generate(ids, max_new_tokens=6, eos_token_id=[1.5])


def test_save_and_load_reproduce_outputs(tmp_path):
    imsm = make_imsm("secura")
    ids, am, pl, _ = batch()
    expected = imsm(ids, am, prompt_lengths=pl).logits
    imsm.save_adapter(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert {"imsm_config.json", "imsm_gate.safetensors"} <= set(files)  # beside fastcur.save_adapter's files
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
    (dict(train_streams="both"), "train_streams must be 'auto', 'batched' or 'sequential', got 'both'"),
    (dict(gate_dropout_at="gate"), "gate_dropout_at must be 'both' or 'hidden', got 'gate'"),
    (dict(gate_init="normal"), "gate_init must be 'zeros' or 'linear', got 'normal'"),
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
        imsm(ids, torch.zeros_like(am), prompt_lengths=pl)


def test_merged_adapter_is_rejected():
    imsm = make_imsm()
    layer = imsm.model.model.layers[0].self_attn.q_proj
    layer.merge()
    ids, am, pl, _ = batch()
    for training in (True, False):  # the streams one after the other, and batched
        imsm.train(training)
        with pytest.raises(RuntimeError, match="needs unmerged adapters"):
            imsm(ids, am, prompt_lengths=pl)
    assert layer.frozen_batch_rows is None


# -- the released code's behaviour ------------------------------------------------------------------
def test_training_forward_needs_the_prompt():
    imsm = make_imsm()
    ids, am, pl, labels = batch()
    imsm.train()
    with pytest.raises(ValueError, match="training-mode forward needs prompt_lengths .* answer tokens"):
        imsm(ids, am, labels=labels)
    imsm(ids, am, prompt_mask=am.bool(), labels=labels)  # a deliberate choice is accepted
    imsm.eval()
    imsm(ids, am)  # evaluation: every attended token is prompt


def released_gate(h, h_tuned, q, q_tuned, W_A, W_B, m_hidden, m_gate):
    """The released gate in float64: cat([q, h, h', q']) -> Linear(W_A) -> Dropout -> Linear(W_B)
    -> Dropout -> sigmoid, each dropout an explicit mask (None: off)."""
    B, T, d = h.shape
    x = torch.cat([q[:, None].expand(B, T, d), h, h_tuned, q_tuned[:, None].expand(B, T, d)], -1).double()
    z = x @ W_A.double()
    z = z if m_hidden is None else z * m_hidden.double()
    u = z @ W_B.double()
    u = u if m_gate is None else u * m_gate.double()
    g = torch.sigmoid(u)
    return g * h.double() + (1 - g) * h_tuned.double()


@pytest.mark.parametrize("at", ["both", "hidden"])
def test_gate_dropout_placement(at, monkeypatch):
    """Training with dropout 0.4: the logits and the gate's gradients equal the released gate fed
    the masks the module drew (after W_A, and after W_B with at="both")."""
    imsm = fastcur.IMSM(add_adapters(tiny_llama()), gate_dropout=0.4, gate_dropout_at=at)
    with torch.no_grad():
        imsm.W_B.normal_(0, 0.3)
    drawn = []
    original = imsm._dropout_mask
    monkeypatch.setattr(imsm, "_dropout_mask", lambda shape, device: drawn.append(original(shape, device)) or drawn[-1])
    ids, am, pl, labels = batch()
    imsm.train()
    out = imsm(ids, am, prompt_lengths=pl, labels=labels)
    assert [tuple(m.shape) for m in drawn] == [(3, 9, 8)] + ([(3, 9, imsm.hidden_size)] if at == "both" else [])
    assert all(set(m.unique().tolist()) == {0.0, 1 / 0.6} for m in drawn)
    frozen = frozen_copy(imsm)
    with torch.no_grad():
        h = frozen.model(input_ids=ids, attention_mask=am).last_hidden_state
    h_tuned = imsm.model.model(input_ids=ids, attention_mask=am).last_hidden_state
    pm = ((torch.arange(9)[None, :] < pl[:, None]) & am.bool()).double()[..., None]
    q, q_tuned = (h * pm).sum(1) / pm.sum(1), (h_tuned * pm).sum(1) / pm.sum(1)
    mixed = released_gate(h, h_tuned, q, q_tuned, imsm.W_A, imsm.W_B, drawn[0], drawn[1] if at == "both" else None)
    logits = imsm.model.lm_head(mixed)
    torch.testing.assert_close(out.logits, logits, rtol=1e-10, atol=1e-10)
    ref_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    grads = torch.autograd.grad(out.loss, [imsm.W_A, imsm.W_B])
    for g, rg in zip(grads, torch.autograd.grad(ref_loss, [imsm.W_A, imsm.W_B])):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-12)


def test_frozen_stream_runs_in_eval_mode():
    """Attention dropout 0.5 in the base model: in training the frozen memory h is the base model
    in eval mode (no dropout) while the tuned stream trains with dropout; train_streams='auto'
    runs the streams one after the other, 'batched' (which would drop out frozen rows) refuses."""
    model = add_adapters(tiny_llama(attention_dropout=0.5))
    imsm = fastcur.IMSM(model, gate_dropout=0.0)
    ids, am, pl, _ = batch()
    frozen = frozen_copy(imsm).eval()
    with torch.no_grad():
        expected = frozen.model(input_ids=ids, attention_mask=am).last_hidden_state
    seen = []
    imsm.interweave = lambda h, h_tuned, q, q_tuned: seen.append((h, h_tuned)) or h  # noqa: E731
    imsm.train()
    imsm(ids, am, prompt_lengths=pl)
    imsm(ids, am, prompt_lengths=pl)
    (h1, t1), (h2, t2) = seen
    torch.testing.assert_close(h1, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h2, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(t1, t2)  # the tuned stream did drop out
    assert imsm.training and all(m.training for m in imsm.model.modules())  # modes restored
    imsm.train_streams = "batched"
    with pytest.raises(ValueError, match=r"train_streams='batched' would apply the base model's dropout "
                                         r"\(layers.0.self_attn.attention_dropout = 0.5\)"):
        imsm(ids, am, prompt_lengths=pl)


def test_auto_streams_are_sequential_on_the_cpu():
    imsm = make_imsm()
    assert imsm.train_streams == "auto"
    imsm.train()
    assert imsm._runs_sequential()
    imsm.eval()
    assert not imsm._runs_sequential()  # evaluation: one batched pass


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_model_trains_a_float32_gate(dtype):
    """On a bfloat16 / float16 model the gate W_A, W_B is float32 and gets float32 gradients; the
    logits (model dtype), loss and gate gradients obey the tolerance rule against the float64
    two-copy reference, with the half-precision two-copy reference (float32 gate, as released)
    measuring the dtype's own error."""
    from fastcur.testing import assert_close_to_reference

    imsm = make_imsm(dtype=dtype)
    assert imsm.W_A.dtype == imsm.W_B.dtype == torch.float32
    assert imsm.model.lm_head.weight.dtype == dtype
    ids, am, pl, labels = batch()
    imsm.train()
    out = imsm(ids, am, prompt_lengths=pl, labels=labels)
    grads = torch.autograd.grad(out.loss, [imsm.W_A, imsm.W_B])
    assert out.logits.dtype == dtype and all(g.dtype == torch.float32 for g in grads)

    def two_copy(model_dtype):
        tuned = copy.deepcopy(imsm.model).to(model_dtype)
        frozen = frozen_copy(imsm).to(model_dtype)
        W_A = imsm.W_A.detach().to(torch.promote_types(model_dtype, torch.float32)).requires_grad_()
        W_B = imsm.W_B.detach().to(W_A.dtype).requires_grad_()
        with torch.no_grad():
            h = frozen.model(input_ids=ids, attention_mask=am).last_hidden_state
            h_tuned = tuned.model(input_ids=ids, attention_mask=am).last_hidden_state
        pm = ((torch.arange(9)[None, :] < pl[:, None]) & am.bool())[..., None]
        h, h_tuned = h.to(W_A.dtype), h_tuned.to(W_A.dtype)  # the released code's .float()
        q, q_tuned = (h * pm).sum(1) / pm.sum(1), (h_tuned * pm).sum(1) / pm.sum(1)
        mixed = reference.imsm_gate(h, h_tuned, q, q_tuned, W_A, W_B).to(model_dtype)
        logits = tuned.lm_head(mixed)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return logits, loss, torch.autograd.grad(loss, [W_A, W_B])

    truth, truth_loss, truth_grads = two_copy(torch.float64)
    low, low_loss, low_grads = two_copy(dtype)
    assert_close_to_reference(out.logits, low, truth, "logits")
    assert_close_to_reference(out.loss.to(dtype), low_loss.to(dtype), truth_loss, "loss")
    for name, g, lg, tg in zip(("W_A", "W_B"), grads, low_grads, truth_grads):
        assert_close_to_reference(g, lg, tg, f"grad of {name}")


def test_generate_makes_no_deprecated_call():
    imsm = make_imsm()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        imsm.generate(batch(B=2, T=5)[0], max_new_tokens=3)
    deprecated = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    assert not deprecated, deprecated


def test_save_and_load_keep_the_dropout_placement(tmp_path):
    imsm = fastcur.IMSM(add_adapters(tiny_llama()), gate_dropout=0.2, gate_dropout_at="hidden")
    imsm.save_adapter(tmp_path / "ckpt")
    loaded = fastcur.IMSM.load_adapter(tiny_llama(), tmp_path / "ckpt")
    assert (loaded.gate_dropout, loaded.gate_dropout_at) == (0.2, "hidden")


def test_released_gate_init():
    """gate_init="linear": both projections drawn as nn.Linear draws them (kaiming-uniform,
    bounds 1/sqrt(fan_in)), as the released code; the gate is then not 0.5 at init."""
    torch.manual_seed(0)
    imsm = fastcur.IMSM(add_adapters(tiny_llama()), gate_init="linear")
    d, r = imsm.hidden_size, imsm.gate_rank
    for W, fan_in in ((imsm.W_A, 4 * d), (imsm.W_B, r)):
        bound = 1 / fan_in ** 0.5
        assert W.abs().max() <= bound and W.abs().max() > 0.8 * bound  # uniform up to the bound
    assert W.std() > 0.4 * bound  # spread, not a constant


@pytest.mark.parametrize("at", ["both", "hidden"])
def test_gate_stays_float32_under_autocast(at):
    """Under CPU autocast (bfloat16) the gate's projections still run in float32: a training
    gate gives the same output with and without autocast around it (fused and unfused paths)."""
    imsm = make_imsm(dtype=torch.float32)
    imsm.gate_dropout_at = at
    ids, am, pl, labels = batch()
    imsm.eval()
    h, h_tuned, _ = imsm.streams(ids, am)
    pm = ((torch.arange(9)[None, :] < pl[:, None]) & am.bool())[..., None]
    q, q_tuned = (h * pm).sum(1) / pm.sum(1), (h_tuned * pm).sum(1) / pm.sum(1)
    h_tuned, q_tuned = h_tuned.detach().requires_grad_(), q_tuned.detach().requires_grad_()
    gm = torch.ones(*h.shape) if at == "both" else None  # the unfused path, as dropout "both" takes
    plain = fastcur.ops.imsm_gate(h, h_tuned, q, q_tuned, imsm.W_A, imsm.W_B, None, gm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = fastcur.ops.imsm_gate(h, h_tuned, q, q_tuned, imsm.W_A, imsm.W_B, None, gm)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=1e-6, atol=1e-6)
    weights = torch.randn(plain.shape, generator=torch.Generator().manual_seed(3))
    leaves = [imsm.W_A, imsm.W_B, h_tuned, q_tuned]
    for g, rg in zip(torch.autograd.grad((cast * weights).sum(), leaves),
                     torch.autograd.grad((plain * weights).sum(), leaves)):
        torch.testing.assert_close(g, rg, rtol=1e-6, atol=1e-6)
