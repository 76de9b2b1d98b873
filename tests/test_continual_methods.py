"""fastcur.continual methods: the registry and its errors, which layers each method adapts and
trains, that a method's saved state (model + method) continues exactly as the uninterrupted
object would (what --resume relies on), the replay buffer, and EWC against explicit
per-example gradients."""
import copy
import functools
import random

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import fastcur  # noqa: E402
from fastcur.continual.evaluate import greedy_generate  # noqa: E402
from fastcur.continual.ewc import EWC  # noqa: E402
from fastcur.continual.methods import (MethodContext, available_methods, build_method, linear_targets,  # noqa: E402
                                       lm_loss, parse_methods)
from fastcur.continual.replay import ReplayBuffer  # noqa: E402
from fastcur.continual.runner import train_task  # noqa: E402
from fastcur.continual.tasks import Example, Task  # noqa: E402
from tiny_models import byte_llama  # noqa: E402

EXPECTED = ["seq", "lora", "lora-er", "lora-ewc", "curlora", "secura", "secura-released", "inclora", "ella", "jumplora-inclora",
            "jumplora-ella", "lalora-diag-1e2", "lalora-diag-1e3", "lalora-diag-1e4", "lalora-kfac-1e3", "imsm-lora"]


tiny_llama = functools.partial(byte_llama, num_hidden_layers=1, num_key_value_heads=4)


def make_batch(examples):
    """Bytes of prompt + " " + answer, loss on the answer only."""
    rows = [([257] + list(e.prompt.encode()), list((" " + e.answer).encode()) + [258]) for e in examples]
    T = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), T), 256)
    labels = torch.full((len(rows), T), -100)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
        mask[i, :len(p) + len(a)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "prompt_lengths": torch.tensor([len(p) for p, _ in rows])}


def toy_task(name, fn, n=24, seed=0):
    rng = random.Random(f"{name}{seed}")
    pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n)]
    return Task(name, name, [Example(f"{name} {a} {b} =", fn(a, b)) for a, b in pairs], [])


TASKS = [toy_task("add", lambda a, b: str((a + b) % 10)), toy_task("mul", lambda a, b: str(a * b % 10))]


def context(steps=2):
    pre = [Example("", f"item {i} is {i % 7}.") for i in range(16)]
    return MethodContext(make_batch=make_batch, pretraining=pre, steps=steps, batch_size=4, seed=0, fisher_batches=2)


def test_registry_lists_every_method_of_the_issue():
    assert available_methods()[:len(EXPECTED)] == EXPECTED
    assert parse_methods(None) == available_methods() == parse_methods("all")
    assert parse_methods("lora, seq,lora") == ["lora", "seq"]


@pytest.mark.parametrize("spec", ["lora,nope", "", "LoRA"])
def test_unknown_methods_name_the_valid_ones(spec):
    with pytest.raises(ValueError, match="--methods: unknown method") as exc:
        parse_methods(spec)
    for name in EXPECTED:
        assert name in str(exc.value)


def test_linear_targets_skip_the_lm_head_and_error_without_linears():
    model = tiny_llama()
    names = linear_targets(model)
    assert "lm_head" not in names and len(names) == 7
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in names)
    with pytest.raises(ValueError, match="no nn.Linear layer to adapt.*Conv1d"):
        linear_targets(nn.Sequential(nn.Embedding(10, 4), nn.Conv1d(4, 4, 1)))


def _run(method_name, model, method, tasks, ctx, start=0):
    for i in range(start, len(tasks)):
        train_task(method, model, tasks[i], i, ctx, device=torch.device("cpu"))


@pytest.mark.parametrize("name", EXPECTED)
def test_method_trains_and_its_state_resumes_exactly(name):
    # IncLoRA folds only what passes the JumpReLU gate at the task's end: a few more steps
    base, ctx = tiny_llama(), context(steps=6 if name.startswith("jumplora") else 2)
    batch = make_batch(TASKS[0].train[:4] + TASKS[1].train[:4])
    probe = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        base_logits = base(**probe).logits

    model, method = copy.deepcopy(base), build_method(name)
    method.setup(model, ctx)
    embed = model.get_input_embeddings().weight
    assert embed.requires_grad == (name == "seq")   # adapter methods freeze the base
    _run(name, model, method, TASKS[:1], ctx)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_method = copy.deepcopy(method.state_dict())
    _run(name, model, method, TASKS, ctx, start=1)
    run_model = method.evaluation_model().eval()
    with torch.no_grad():
        logits = run_model(**probe).logits
    assert torch.isfinite(logits).all()
    assert (logits - base_logits).abs().max() > 1e-4, "training changed nothing"

    # A fresh copy restored from the task-1 state, trained on task 2, is the same model.
    model2, method2 = copy.deepcopy(base), build_method(name)
    method2.setup(model2, ctx)
    model2.load_state_dict(saved_model)
    method2.load_state_dict(saved_method)
    _run(name, model2, method2, TASKS, ctx, start=1)
    with torch.no_grad():
        torch.testing.assert_close(method2.evaluation_model().eval()(**probe).logits, logits, rtol=0, atol=0)


def test_adapter_methods_train_only_adapter_tensors():
    ctx = context()
    for name, expected in (("lora", {"lora_A.weight", "lora_B.weight"}), ("curlora", {"U"}),
                           ("secura", {"A_c", "B_c"})):
        model = tiny_llama()
        method = build_method(name)
        method.setup(model, ctx)
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert len(trained) == len(expected) * 7, name        # every adapted linear layer
        assert all(any(n.endswith("." + s) for s in expected) for n in trained), (name, trained)
        assert sum(p.numel() for p in method.parameters()) == sum(
            p.numel() for m in fastcur.adapter_modules(model).values() for p in m.adapter_parameters().values())


def test_inclora_methods_add_fresh_adapters_per_task_and_fold_them():
    model, ctx = tiny_llama(), context()
    method = build_method("jumplora-ella")
    method.setup(model, ctx)
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    train_task(method, model, TASKS[0], 0, ctx, device=torch.device("cpu"))
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear                               # adapters removed after the task
    assert not torch.equal(q.weight, before)                  # ... their update folded into W
    assert set(method.state_dict()["inclora"]["tensors"]) == {f"W_past.{n}" for n in linear_targets(model)}


def test_replay_buffer_keeps_examples_and_mixes_a_share():
    buf = ReplayBuffer(per_task=5, ratio=0.25, seed=0)
    batch = TASKS[1].train[:8]
    rng = random.Random(0)
    assert buf.mix(batch, rng) == batch                       # empty buffer: unchanged
    buf.add_task(0, TASKS[0].train)
    assert len(buf) == 5 and all(e in TASKS[0].train for e in buf.examples)
    mixed = buf.mix(batch, rng)
    assert len(mixed) == 8 and mixed[:6] == batch[:6] and all(e in buf.examples for e in mixed[6:])
    other = ReplayBuffer()
    other.load_state_dict(buf.state_dict())
    assert other.examples == buf.examples and other.ratio == 0.25
    with pytest.raises(ValueError, match="ratio"):
        ReplayBuffer(ratio=1.0)


def test_ewc_fisher_and_penalty_match_explicit_per_example_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(fastcur.LoRALinear(5, 3, rank=2, alpha=2.0)).double()
    with torch.no_grad():
        model[0].lora_B.weight.normal_()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]

    def loss_fn(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).sum(-1).mean()

    ewc = EWC(model, lam=3.0)
    assert float(ewc.penalty()) == 0.0
    ewc.consolidate(batches, loss_fn)
    params = {"0.lora_A.weight": model[0].lora_A.weight, "0.lora_B.weight": model[0].lora_B.weight}
    expect = {n: torch.zeros_like(p) for n, p in params.items()}
    for e in range(6):
        grads = torch.autograd.grad(((model(x[e:e + 1]) - y[e:e + 1]) ** 2).sum(), list(params.values()))
        for n, g in zip(params, grads):
            expect[n] += g ** 2 / 6
    for n in params:
        torch.testing.assert_close(ewc.fisher[n], expect[n])
    assert float(ewc.penalty().detach()) == 0.0                # at the anchor
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1)
    want = 1.5 * sum((expect[n] * 0.01).sum() for n in params)
    torch.testing.assert_close(ewc.penalty().double(), want, rtol=1e-5, atol=1e-7)
    ewc.consolidate(batches, loss_fn)                          # online: Fisher sums over tasks
    assert all(torch.all(ewc.fisher[n] >= expect[n] - 1e-12) for n in params)


def _trained_imsm():
    """An imsm-lora method after the first task (a trained gate, nonzero W_B) and its evaluated model."""
    model, ctx = tiny_llama(), context()
    method = build_method("imsm-lora")
    method.setup(model, ctx)
    _run("imsm-lora", model, method, TASKS[:1], ctx)
    return method, method.evaluation_model().eval()


def test_imsm_perplexity_uses_a_causal_query():
    method, evaluated = _trained_imsm()
    ids = make_batch(TASKS[0].train[:2])["input_ids"]
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 256
    with torch.no_grad():
        a, b = evaluated(input_ids=ids).logits, evaluated(input_ids=changed).logits
        whole = method.imsm(ids).logits                      # IMSM's query over every token: not causal
        whole_changed = method.imsm(changed).logits
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=0)  # the past never sees the future
    assert (whole[:, :-1] - whole_changed[:, :-1]).abs().max() > 0


def test_imsm_evaluation_generates_with_the_cache_as_without():
    _, evaluated = _trained_imsm()
    batch = make_batch(TASKS[0].train[:3] + TASKS[0].train[-2:])   # rows of different lengths
    lengths = batch["prompt_lengths"]
    ids = batch["input_ids"] * (torch.arange(batch["input_ids"].shape[1]) < lengths[:, None])
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    args = (evaluated, ids, mask, lengths)
    loop = greedy_generate(*args, [5, 3, 5, 4, 5], [300], use_model_generate=False)  # 300: never produced
    assert greedy_generate(*args, [5, 3, 5, 4, 5], [300]) == loop                    # the KV-cached path
    stop = [loop[0][1], loop[3][0]]                 # several stop ids: each row ends at its first one
    stopped = greedy_generate(*args, 5, stop)
    assert stopped == greedy_generate(*args, 5, stop, use_model_generate=False)
    assert stopped[0] == loop[0][:min(loop[0].index(t) for t in stop if t in loop[0]) + 1]


def test_secura_released_is_the_released_codes_recipe():
    model, ctx = tiny_llama(), context()
    method = build_method("secura-released")
    method.setup(model, ctx)
    layers = list(fastcur.adapter_modules(model).values())
    assert layers and all(m.norm == "raw" and m.scope == "tensor" and m.lora_bias is not None
                          and m.merge_every == 1 and not m.reselect_on_merge for m in layers)
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    train_task(method, model, TASKS[0], 0, ctx, device=torch.device("cpu"))
    assert method.schedule.merges >= 1 and not torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)
