"""JumpLoRALinear, the shared thresholds and their exact reset, the f schedule, IncLoRA and
ELLA: swap and train, f = 0 is LoRA, merge, reset survivors, end_task, three tasks, errors."""
import pytest
import torch
from torch import nn

import fastcur
from fastcur.modules.jump_lora_linear import kth_smallest
from fastcur.ops import reference


def trained(layer, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * scale)
    return layer


class MLP(nn.Module):
    def __init__(self, d_in=16, d_hidden=48, d_out=6):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"fc": nn.Linear(d_in, d_hidden)}),
                                     nn.ModuleDict({"fc": nn.Linear(d_hidden, d_hidden)})])
        self.head = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block["fc"](x))
        return self.head(x)


def train_task_steps(model, mgr, opt, x, target, steps):
    """`steps` optimizer steps of the active task on MSE + the manager's penalty, stepping f."""
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), target) + mgr.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mgr.step()


def sgd_steps(model, mgr, x, target, steps):
    """The resume tests' training: plain SGD, rebuilt per call (they compare managers, not
    optimizer states)."""
    train_task_steps(model, mgr, torch.optim.SGD(mgr.parameters(), lr=1e-3), x, target, steps)


def test_from_linear_shares_storage_names_and_starts_at_base():
    lin = nn.Linear(40, 30)
    m = fastcur.JumpLoRALinear.from_linear(lin)
    assert m.weight is lin.weight and m.bias is lin.bias
    assert m.rank == 8 and m.scaling == 4.0 and m.f == 0.0
    assert m.threshold.log_theta.item() == pytest.approx(-4.7)
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == [
        "lora_A.weight", "lora_B.weight", "threshold.log_theta"]
    x = torch.randn(7, 40)
    torch.testing.assert_close(m(x), lin(x))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("gate", ["weight", "rank"])
def test_forward_matches_reference(backend, gate):
    if backend == "cpp" and not fastcur._extension.available():
        pytest.skip("C++ extension not built")
    m = trained(fastcur.JumpLoRALinear(33, 21, rank=4, alpha=8, gate=gate, f=0.5)).double()
    with torch.no_grad():
        m.threshold.log_theta.fill_(-1.5)
    x = torch.randn(2, 9, 33, dtype=torch.float64)
    A, B, lt = m.lora_A.weight, m.lora_B.weight, m.threshold.log_theta
    if gate == "weight":
        want = reference.jump_linear(x, m.weight, m.bias, A, B, lt, 2.0, 0.5)
    else:
        want = reference.jump_rank_linear(x, m.weight, m.bias, A, B, lt, 2.0)
    with fastcur.use_backend(backend):
        torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)


def test_f0_equals_lora_and_f1_equals_sparse_merge():
    lin = nn.Linear(24, 20)
    m = trained(fastcur.JumpLoRALinear.from_linear(lin, rank=4, alpha=16, f=0.0))
    lora = fastcur.LoRALinear(24, 20, rank=4, alpha=16)
    lora.load_state_dict({**lin.state_dict(), "lora_A.weight": m.lora_A.weight,
                          "lora_B.weight": m.lora_B.weight})
    x = torch.randn(5, 24)
    torch.testing.assert_close(m(x), lora(x), rtol=1e-5, atol=1e-5)
    m.f = 1.0
    with torch.no_grad():
        m.threshold.log_theta.fill_(-2.0)
    y = m(x)
    m.merge()
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    m.unmerge()
    torch.testing.assert_close(m.weight, lin.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_smallest_is_exact(dtype):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5003, generator=g, dtype=dtype).abs()
    values[:50] = values[50]          # ties
    values[60] = 0.0
    chunks = lambda: iter(values.split(777))
    for k in (1, 2, 51, 2500, 5003):
        assert kth_smallest(chunks, k, dtype).item() == torch.kthvalue(values, k).values.item()


def test_reset_over_shared_layers_leaves_lora_many_survivors():
    th = fastcur.JumpThreshold()
    layers = [trained(fastcur.JumpLoRALinear(40, 30, threshold=th), seed=1),
              trained(fastcur.JumpLoRALinear(25, 50, threshold=th), seed=2)]
    own = trained(fastcur.JumpLoRALinear(20, 20, rank=2), seed=3)
    model = nn.Sequential(*layers, own)
    result = fastcur.reset_thresholds(model)
    assert set(result) == {id(th), id(own.threshold)}
    Zs = [(m.lora_B.weight.double() @ m.lora_A.weight.double()).float().detach() for m in layers]
    survivors = sum(int((Z.abs() > th.theta).sum()) for Z in Zs)
    params = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in layers)
    assert abs(survivors - params) <= 1
    allz = torch.cat([Z.abs().flatten() for Z in Zs])
    k = allz.numel() - params
    assert result[id(th)] == torch.kthvalue(allz, k).values.item()
    Z = (own.lora_B.weight @ own.lora_A.weight).detach().abs()
    assert abs(int((Z > own.threshold.theta).sum()) - 2 * 40) <= 1


def test_reset_chunked_equals_unchunked():
    th = fastcur.JumpThreshold()
    layers = [trained(fastcur.JumpLoRALinear(64, 48, threshold=th), seed=s) for s in (1, 2)]
    big = fastcur.reset_thresholds(layers)[id(th)]
    small = fastcur.reset_thresholds(layers, chunk_elems=100)[id(th)]
    assert big == small


def test_f_schedule():
    vals = [fastcur.f_schedule(s, 100) for s in (0, 19, 20, 50, 79, 80, 100)]
    assert vals == [0.0, 0.0, 0.0, pytest.approx(0.5), pytest.approx(59 / 60), 1.0, 1.0]


@pytest.mark.parametrize("scope,count", [("global", 1), ("per_block", 3), ("per_layer", 3)])
def test_inclora_scopes(scope, count):
    model = MLP()
    mgr = fastcur.IncLoRA(model, scope=scope)
    mgr.start_task(total_steps=10)
    layers = mgr.layers()
    assert set(layers) == {"blocks.0.fc", "blocks.1.fc", "head"}
    assert len({id(m.threshold) for m in layers.values()}) == count
    assert len(mgr.parameters()) == 2 * 3 + count


def test_inclora_target_modules_and_reset_at_the_released_step():
    model = MLP()
    mgr = fastcur.IncLoRA(model, target_modules=["fc"])
    mgr.start_task(total_steps=10)
    assert set(mgr.layers()) == {"blocks.0.fc", "blocks.1.fc"}
    assert isinstance(model.head, nn.Linear)
    for m in mgr.layers().values():
        assert m.f == 0.0
        trained(m)
    threshold = next(iter(mgr.layers().values())).threshold
    assert mgr.step() == 0.0 and threshold.log_theta.item() == pytest.approx(-4.7)
    assert mgr.step() == 0.0                # step int(0.2 * 10) = 2: the released reset, f still 0
    assert threshold.log_theta.item() != pytest.approx(-4.7)
    assert mgr.step() == pytest.approx(1 / 6)


def test_end_task_merges_exactly_and_removes_adapters():
    torch.manual_seed(0)
    model = MLP().double()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    mgr = fastcur.IncLoRA(model, ella_lambda=0.5)
    mgr.start_task(total_steps=5)
    for m in mgr.layers().values():
        trained(m)
    for _ in range(5):
        mgr.step()
    x = torch.randn(11, 16, dtype=torch.float64)
    deltas = {n: m.delta_weight(f=1.0) for n, m in mgr.layers().items()}
    y_adapted = model(x)
    mgr.end_task()
    assert not any(isinstance(m, fastcur.JumpLoRALinear) for m in model.modules())
    assert isinstance(model.blocks[0]["fc"], nn.Linear)
    torch.testing.assert_close(model(x), y_adapted, rtol=1e-12, atol=1e-12)
    for name, d in deltas.items():
        torch.testing.assert_close(model.get_submodule(name).weight, base[name + ".weight"] + d)
        torch.testing.assert_close(mgr.W_past[name], d)
        assert (d == 0).float().mean() > 0.3  # the merged update is sparse
    assert list(model.state_dict()) == list(base)


def test_ella_value_and_gradients():
    torch.manual_seed(0)
    model = MLP().double()
    mgr = fastcur.IncLoRA(model, ella_lambda=2.0)
    mgr.start_task(total_steps=4)
    for m in mgr.layers().values():
        trained(m)
    for _ in range(4):
        mgr.step()
    mgr.end_task()
    mgr.start_task(total_steps=4)
    layers = mgr.layers()
    for i, m in enumerate(layers.values()):
        trained(m, seed=10 + i)
        with torch.no_grad():
            m.threshold.log_theta.fill_(-2.5)
    P = fastcur.ella_penalty(model)
    assert all(m.f == 0.0 for m in layers.values())     # before the ramp: the interpolated delta is s Z
    want = sum(reference.ella_penalty(m.lora_A.weight, m.lora_B.weight, m.threshold.log_theta,
                                      mgr.W_past[n], m.scaling, m.f, "interpolated")
               for n, m in layers.items()) / len(layers)
    torch.testing.assert_close(P, want)
    assert P.item() > 0
    torch.testing.assert_close(mgr.penalty(), 2.0 * want)
    params = [p for m in layers.values() for p in (m.lora_A.weight, m.lora_B.weight)]
    got = torch.autograd.grad(P, params)
    exp = torch.autograd.grad(want, params)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e)


def test_ella_penalty_after_a_forward_is_the_fused_value_with_equal_gradients():
    """A training forward computes each layer's ELLA value with the layer (jump_linear_ella);
    `mgr.penalty()` picks it up, and loss + penalty has the same value and gradients as the
    layer and the penalty computed apart (reference ops). After an update, it is recomputed."""
    torch.manual_seed(0)
    model = MLP().double()
    mgr = fastcur.IncLoRA(model, ella_lambda=0.5)
    mgr.start_task()
    for m in mgr.layers().values():
        trained(m)
    mgr.end_task()
    mgr.start_task()
    layers = mgr.layers()
    for i, m in enumerate(layers.values()):
        trained(m, seed=20 + i)
        with torch.no_grad():
            m.threshold.log_theta.fill_(-2.5)
    x = torch.randn(7, 16, dtype=torch.float64)
    params = [p for m in layers.values() for p in (m.lora_A.weight, m.lora_B.weight)]

    y = model(x)
    assert all(m._ella_cache is not None for m in layers.values())       # fused path taken
    loss = y.square().mean() + mgr.penalty()
    assert all(m._ella_cache is None for m in layers.values())           # consumed once
    got = torch.autograd.grad(loss, params)

    with fastcur.use_backend("reference"):
        y_ref = model(x)
    pen = sum(reference.ella_penalty(m.lora_A.weight, m.lora_B.weight, m.threshold.log_theta,
                                     mgr.W_past[n], m.scaling) for n, m in layers.items()) / len(layers)
    want_loss = y_ref.square().mean() + 0.5 * pen
    want = torch.autograd.grad(want_loss, params)
    torch.testing.assert_close(loss, want_loss)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)

    model(x)
    with torch.no_grad():
        params[0].add_(0.1)                                                # an optimizer step
    pen_now = sum(reference.ella_penalty(m.lora_A.weight, m.lora_B.weight, m.threshold.log_theta,
                                         mgr.W_past[n], m.scaling) for n, m in layers.items()) / len(layers)
    torch.testing.assert_close(mgr.penalty(), 0.5 * pen_now)             # stale value not used


def test_three_tasks_learned_in_sequence():
    torch.manual_seed(0)
    model = MLP(8, 32, 2)
    mgr = fastcur.IncLoRA(model, rank=4, alpha=16, ella_lambda=0.01)
    teachers = [MLP(8, 32, 2) for _ in range(3)]
    x = torch.randn(256, 8)
    steps = 80
    for t, teacher in enumerate(teachers):
        target = teacher(x).detach()
        opt = torch.optim.Adam(mgr.start_task(total_steps=steps), lr=0.02)
        first = nn.functional.mse_loss(model(x), target).item()
        train_task_steps(model, mgr, opt, x, target, steps)
        mgr.end_task()
        final = nn.functional.mse_loss(model(x), target).item()
        assert final < 0.5 * first, (t, first, final)
    assert mgr.task == 3 and set(mgr.W_past) == {"blocks.0.fc", "blocks.1.fc", "head"}


def test_bad_input_errors():
    with pytest.raises(ValueError, match="rank must be a positive int"):
        fastcur.JumpLoRALinear(4, 4, rank=0)
    with pytest.raises(ValueError, match="gate must be 'weight' or 'rank'"):
        fastcur.JumpLoRALinear(4, 4, gate="row")
    with pytest.raises(ValueError, match=r"needs a threshold of shape \(2,\)"):
        fastcur.JumpLoRALinear(4, 4, rank=2, gate="rank", threshold=fastcur.JumpThreshold())
    with pytest.raises(TypeError, match="threshold must be a fastcur.JumpThreshold"):
        fastcur.JumpLoRALinear(4, 4, threshold=torch.zeros(()))
    m = fastcur.JumpLoRALinear(4, 4)
    with pytest.raises(ValueError, match=r"f must be a float in \[0, 1\]"):
        m.f = 2.0
    with pytest.raises(ValueError, match="input must have last dimension in_features = 4"):
        m(torch.randn(3, 5))
    with pytest.raises(TypeError, match="does not match the layer's dtype"):
        m(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"W_past must have shape \(4, 4\)"):
        m.set_w_past(torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match="no weight-space"):
        fastcur.JumpLoRALinear(4, 4, rank=2, gate="rank").merge()
    with pytest.raises(ValueError, match="no nn.Linear layer of the model matches"):
        fastcur.IncLoRA(MLP(), target_modules=["nope"])
    with pytest.raises(ValueError, match="scope must be one of"):
        fastcur.IncLoRA(MLP(), scope="block")
    mgr = fastcur.IncLoRA(MLP())
    with pytest.raises(RuntimeError, match="no active task"):
        mgr.end_task()
    mgr.start_task(10)
    with pytest.raises(RuntimeError, match="a task is active"):
        mgr.start_task(10)


def test_inclora_checkpoint_between_tasks(tmp_path):
    """model.state_dict() + IncLoRA.save after a task; a fresh model and manager resumed from
    them run the next task exactly as the original does (W_past, task count, ELLA penalty)."""
    torch.manual_seed(0)
    model = MLP().double()
    x, target = torch.randn(32, 16, dtype=torch.float64), torch.randn(32, 6, dtype=torch.float64)
    mgr = fastcur.IncLoRA(model, rank=4, ella_lambda=0.5)
    mgr.start_task(total_steps=6)
    for m in mgr.layers().values():
        trained(m)
    sgd_steps(model, mgr, x, target, 6)
    mgr.end_task()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    mgr.save(tmp_path / "inclora.safetensors")

    model2 = MLP().double()
    mgr2 = fastcur.IncLoRA(model2, rank=4, ella_lambda=0.5).load(tmp_path / "inclora.safetensors")
    model2.load_state_dict(torch.load(tmp_path / "model.pt"))
    assert mgr2.task == 1 and not mgr2.active
    assert set(mgr2.W_past) == set(mgr.W_past)
    for name, w in mgr.W_past.items():
        assert torch.equal(mgr2.W_past[name], w)
    for m_, g in ((model, mgr), (model2, mgr2)):
        torch.manual_seed(5)
        g.start_task(total_steps=4)
        for i, layer in enumerate(g.layers().values()):
            trained(layer, seed=30 + i)
    torch.testing.assert_close(mgr2.penalty(), mgr.penalty(), rtol=0, atol=0)
    assert mgr.penalty().item() > 0
    torch.testing.assert_close(model2(x), model(x), rtol=0, atol=0)


def test_inclora_checkpoint_during_a_task(tmp_path):
    """Saved mid-task (after the θ reset), the resumed manager re-creates the task's layers at
    the same point of the f schedule; with the model's state_dict loaded, outputs, f, the
    following steps and the merged W_past match the original's."""
    torch.manual_seed(0)
    model = MLP().double()
    x, target = torch.randn(32, 16, dtype=torch.float64), torch.randn(32, 6, dtype=torch.float64)
    mgr = fastcur.IncLoRA(model, rank=4, ella_lambda=0.5)
    mgr.start_task()
    for m in mgr.layers().values():
        trained(m, scale=0.05)
    mgr.end_task()                                    # a W_past for the second task's penalty
    mgr.start_task(total_steps=10)
    for m in mgr.layers().values():
        trained(m, seed=2)
    sgd_steps(model, mgr, x, target, 4)
    assert mgr._reset_done and 0 < mgr.f < 1 and mgr.penalty().item() > 0
    torch.save(model.state_dict(), tmp_path / "model.pt")
    mgr.save(tmp_path / "inclora.safetensors")

    model2 = MLP().double()
    mgr2 = fastcur.IncLoRA(model2, rank=4, ella_lambda=0.5).load(tmp_path / "inclora.safetensors")
    model2.load_state_dict(torch.load(tmp_path / "model.pt"))
    assert mgr2.active and mgr2.task == 1 and mgr2.f == mgr.f
    assert set(mgr2.layers()) == set(mgr.layers())
    torch.testing.assert_close(model2(x), model(x), rtol=0, atol=0)
    sgd_steps(model, mgr, x, target, 3)
    sgd_steps(model2, mgr2, x, target, 3)
    torch.testing.assert_close(model2(x), model(x), rtol=0, atol=0)
    mgr.end_task()
    mgr2.end_task()
    for name, w in mgr.W_past.items():
        assert torch.equal(mgr2.W_past[name], w)


def test_inclora_checkpoint_errors(tmp_path):
    mgr = fastcur.IncLoRA(MLP(), rank=4, ella_lambda=0.5)
    mgr.start_task()
    mgr.end_task()
    path = tmp_path / "inclora.safetensors"
    mgr.save(path)
    with pytest.raises(ValueError, match=r"saved with options=.*'rank': 4.*this manager has options=.*'rank': 8"):
        fastcur.IncLoRA(MLP(), ella_lambda=0.5).load(path)
    with pytest.raises(ValueError, match="saved with ella_lambda=0.5, this manager has ella_lambda=30000.0"):
        fastcur.IncLoRA(MLP(), rank=4).load(path)
    with pytest.raises(ValueError, match="saved with names="):
        fastcur.IncLoRA(MLP(), target_modules=["fc"], rank=4, ella_lambda=0.5).load(path)
    busy = fastcur.IncLoRA(MLP(), rank=4, ella_lambda=0.5)
    busy.start_task()
    with pytest.raises(RuntimeError, match="has an active task"):
        busy.load(path)
    state = mgr.state_dict()
    state["tensors"] = {"W_past.head": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"W_past of 'head' has shape \(3, 3\), the layer's weight \(6, 48\)"):
        fastcur.IncLoRA(MLP(), rank=4, ella_lambda=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="not an IncLoRA state"):
        fastcur.IncLoRA(MLP()).load_state_dict({"format": "something else"})
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="is not an IncLoRA state file"):
        fastcur.IncLoRA(MLP()).load(other)


@pytest.mark.parametrize("change", ["optimizer_step", "load_state_dict", "set_f"])
def test_unmerge_after_the_adapter_changed_restores_weight(change):
    """merge, then A, B, θ or f change (an optimizer step, which also advances the f schedule;
    load_state_dict; a new f), then unmerge: W is the original W again (issue 19, item 4)."""
    scheduled = change != "set_f"
    opts = dict(total_steps=10) if scheduled else dict(f=0.4)
    m = trained(fastcur.JumpLoRALinear.from_linear(nn.Linear(30, 20, dtype=torch.float64), rank=4,
                                                   alpha=16, **opts))
    with torch.no_grad():
        m.threshold.log_theta.fill_(-1.5)
    if scheduled:
        for _ in range(4):
            m.threshold._count += 1       # f = 1/3 at step 4, without the reset at step 2
        m.threshold.steps.fill_(4)
    w0 = m.weight.detach().clone()
    f0 = m.f
    assert 0.0 < f0 < 1.0
    # what merge must add: ΔW re-derived in float64 from the tensors as they are at merge
    dw0 = reference.jump_delta_weight(m.lora_A.weight.detach(), m.lora_B.weight.detach(),
                                      m.threshold.log_theta.detach(), m.scaling, f0)
    m.merge()
    torch.testing.assert_close(m.weight, w0 + dw0, rtol=0, atol=1e-12)
    if change == "optimizer_step":
        opt = torch.optim.SGD(list(m.adapter_parameters().values()) + [m.threshold.log_theta], lr=0.5)
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.randn_like(p)
        opt.step()
        assert m.f != f0                  # the schedule moved too
    elif change == "load_state_dict":
        m.load_state_dict({"lora_A.weight": torch.randn(4, 30, dtype=torch.float64),
                           "lora_B.weight": torch.randn(20, 4, dtype=torch.float64),
                           "threshold.log_theta": torch.tensor(-0.5, dtype=torch.float64)}, strict=False)
    else:
        m.f = 0.9
    m.unmerge()
    torch.testing.assert_close(m.weight, w0, rtol=0, atol=1e-12)
    # and the changed adapter runs on the original W
    x = torch.randn(3, 30, dtype=torch.float64)
    dw = reference.jump_delta_weight(m.lora_A.weight.detach(), m.lora_B.weight.detach(),
                                     m.threshold.log_theta.detach(), m.scaling, m.f)
    torch.testing.assert_close(m(x), nn.functional.linear(x, w0 + dw, m.bias))


def test_rank_gate_merge_is_refused_and_leaves_the_layer_unchanged():
    m = trained(fastcur.JumpLoRALinear(12, 10, rank=3, gate="rank"))
    w0 = m.weight.detach().clone()
    with pytest.raises(RuntimeError, match="no weight-space"):
        m.merge()
    assert not m.merged and m._merged_tensors is None
    assert torch.equal(m.weight, w0)
    with pytest.raises(RuntimeError, match="not merged"):
        m.unmerge()
