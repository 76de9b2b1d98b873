"""fastcur.LaplaceRegularizer (LaLoRA, docs/methods.md, LaLoRA): adapter discovery, diagonal Fisher against
torch.func per-example gradients, K-FAC factors against explicit outer products, the fused
gradient against autograd, the prior on A while B = 0, state files, errors, and the measured
learning / forgetting trade-off on a small two-task run."""
import os

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import fastcur
from fastcur.lalora import find_adapters


def make_model(seed=0, trained=True):
    """LoRA layer -> tanh -> CUR-LoRA layer, adapters moved off their zero init."""
    torch.manual_seed(seed)
    model = nn.Sequential(fastcur.LoRALinear(6, 5, rank=2, alpha=3.0), nn.Tanh(),
                          fastcur.CURLoRALinear.from_linear(nn.Linear(5, 4), rank=2, scale=0.8))
    if trained:
        with torch.no_grad():
            model[0].lora_B.weight.normal_()
            model[2].U.normal_()
    return model.double()


def data(n_batches=3, E=4, T=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(E, T, 6, generator=g, dtype=torch.float64),
             torch.randn(E, T, 4, generator=g, dtype=torch.float64)) for _ in range(n_batches)]


def example_loss(out, y):  # one example's loss: [T, 4] -> scalar
    return ((out - y) ** 2).sum(-1).mean()


def loss_mean(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).sum(-1).mean(-1).mean()


def loss_sum(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).sum(-1).mean(-1).sum()


def per_example_fisher(model, batches):
    """sum over all examples of squared per-example gradients: torch.func vmap over grad."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def single(p, x, y):
        return example_loss(functional_call(model, p, (x.unsqueeze(0),))[0], y)

    F = {n: torch.zeros_like(p) for n, p in params.items()}
    with fastcur.use_backend("reference"):  # torch.func transforms plain PyTorch
        for x, y in batches:
            g = vmap(grad(single), in_dims=(None, 0, 0))(params, x, y)
            for n in F:
                F[n] += g[n].square().sum(0)
    return F


def test_discovers_declared_adapter_tensors():
    model = make_model()
    assert [n for n, _ in find_adapters(model)] == ["0", "2"]
    reg = fastcur.LaplaceRegularizer(model)
    assert sorted(reg._adapter_tensors()) == ["0.lora_A.weight", "0.lora_B.weight", "2.U"]
    model[0].lora_A.weight.requires_grad_(False)  # a frozen adapter tensor is not regularized
    assert sorted(reg._adapter_tensors()) == ["0.lora_B.weight", "2.U"]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_diag_fisher_equals_torch_func_per_example(backend, reduction):
    if backend == "cpp" and not fastcur._extension.available():
        pytest.skip("C++ extension not built")
    model, batches = make_model(), data()
    with fastcur.use_backend(backend):
        reg = fastcur.LaplaceRegularizer(model, kind="diag", prior_precision=0.25)
        reg.fit(batches, loss_mean if reduction == "mean" else loss_sum, reduction=reduction, progress=False)
    want = per_example_fisher(model, batches)
    assert reg.n_samples == 12
    for name, F in want.items():
        torch.testing.assert_close(reg.precisions[name].double(), F + 0.25, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reg.anchors[name], dict(model.named_parameters())[name].detach())


def test_max_batches_and_2d_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(fastcur.LoRALinear(6, 4, rank=3)).double()
    with torch.no_grad():
        model[0].lora_B.weight.normal_()
    batches = [(x[:, 0], y[:, 0]) for x, y in data(n_batches=5, E=3, T=1)]
    reg = fastcur.LaplaceRegularizer(model).fit(batches, loss_mean, max_batches=2, progress=False)
    assert reg.n_samples == 6
    want = per_example_fisher(model, [(x.unsqueeze(1), y.unsqueeze(1)) for x, y in batches[:2]])
    for name, F in want.items():
        torch.testing.assert_close(reg.precisions[name].double() - 1e-4, F, rtol=1e-5, atol=1e-8)


def test_kfac_factors_equal_explicit_outer_products():
    model, batches = make_model(), data(n_batches=2)
    reg = fastcur.LaplaceRegularizer(model, kind="kfac").fit(batches, loss_mean, progress=False)
    lora, cur = model[0], model[2]
    A, B, s = lora.lora_A.weight.detach(), lora.lora_B.weight.detach(), lora.scaling
    # layer inputs and per-example output gradients, recorded by hand
    xs, gys = {}, {}
    outs = {}
    def record(key):
        def hook(module, inputs, output):
            xs.setdefault(key, []).append(inputs[0].detach())
            outs.setdefault(key, []).append(output)
        return hook

    hooks = [m.register_forward_hook(record(k)) for k, m in (("lora", lora), ("cur", cur))]
    for batch in batches:
        loss = loss_mean(model, batch) * batch[0].shape[0]  # per-example gradients
        for k in outs:
            gys.setdefault(k, []).append(torch.autograd.grad(loss, outs[k][-1], retain_graph=True)[0])
    for h in hooks:
        h.remove()
    x, gy = torch.cat(xs["lora"]), torch.cat(gys["lora"])       # [E, T, 6], [E, T, 5]
    E, T = x.shape[:2]

    def outer_sum(t):  # sum over all rows of t t^T, with explicit outer products
        rows = t.reshape(-1, t.shape[-1])
        return sum(torch.outer(v, v) for v in rows)

    expected = {
        "0.lora_A.weight": (outer_sum(x) / (E * T), outer_sum(s * gy @ B) / E),
        "0.lora_B.weight": (outer_sum(x @ A.mT) / (E * T), outer_sum(s * gy) / E),
    }
    xc, gc = torch.cat(xs["cur"]), torch.cat(gys["cur"])
    expected["2.U"] = (outer_sum(xc @ cur.R.mT) / (E * T), outer_sum(cur.scale * gc @ cur.C) / E)
    for name, (S, G) in expected.items():
        torch.testing.assert_close(reg.factors[name][0], S)
        torch.testing.assert_close(reg.factors[name][1], G)


def test_kfac_max_dim_keeps_big_factors_diagonal():
    model, batches = make_model(), data(n_batches=1)
    reg = fastcur.LaplaceRegularizer(model, kind="kfac", kfac_max_dim=5).fit(batches, loss_mean, progress=False)
    full = fastcur.LaplaceRegularizer(model, kind="kfac").fit(batches, loss_mean, progress=False)
    S_A = reg.factors["0.lora_A.weight"][0]
    assert S_A.shape == (6,)  # k = 6 > 5
    torch.testing.assert_close(S_A, full.factors["0.lora_A.weight"][0].diagonal())
    assert reg.factors["0.lora_B.weight"][1].shape == (5, 5)  # n = 5 <= 5 stays full


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_penalty_value_and_fused_gradient_equal_autograd(kind):
    model, batches = make_model(), data()
    reg = fastcur.LaplaceRegularizer(model, kind=kind, lam=0.7, prior_precision=0.01)
    reg.fit(batches, loss_mean, progress=False)
    params = dict(reg._adapter_tensors())
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1 * torch.randn_like(p))
    # the definition: (lam/2) d^T Λ d with Λ formed explicitly
    want = 0.0
    for name, p in params.items():
        d = (p - reg.anchors[name]).detach()
        if kind == "diag":
            want += 0.5 * 0.7 * (reg.precisions[name].double() * d * d).sum()
        else:
            S, G = (f if f.dim() == 2 else torch.diag(f) for f in reg.factors[name])
            Lam = reg.n_samples * torch.kron(G, S) + 0.01 * torch.eye(d.numel(), dtype=torch.float64)
            v = d.reshape(-1)
            want += 0.5 * 0.7 * v @ Lam.double() @ v
    value = reg.penalty()
    torch.testing.assert_close(value.double(), torch.as_tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-8)
    value.backward()
    auto = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = torch.full_like(p, 0.5)  # add_penalty_grad_ adds into what is there
    fused = reg.add_penalty_grad_()
    torch.testing.assert_close(fused.double(), value.detach().double(), rtol=1e-6, atol=1e-9)
    for n, p in params.items():
        torch.testing.assert_close(p.grad, auto[n] + 0.5, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_A_fisher_zero_while_B_zero_and_prior_still_regularizes_it(kind):
    torch.manual_seed(0)
    model = nn.Sequential(fastcur.LoRALinear(6, 4, rank=2)).double()  # B = 0 at init
    reg = fastcur.LaplaceRegularizer(model, kind=kind, lam=2.0, prior_precision=0.5)
    reg.fit(data(E=3)[:1] and [(x, y[..., :4]) for x, y in data(E=3)], loss_mean, progress=False)
    A = model[0].lora_A.weight
    if kind == "diag":
        assert torch.equal(reg.precisions["0.lora_A.weight"], torch.full_like(A, 0.5, dtype=torch.float64))
        assert reg.precisions["0.lora_B.weight"].max() > 0.5
    else:
        assert torch.equal(reg.factors["0.lora_A.weight"][1], torch.zeros(2, 2, dtype=torch.float64))
    with torch.no_grad():
        A.add_(1.0)  # move A only
    value = reg.penalty()
    torch.testing.assert_close(value, torch.tensor(0.5 * 2.0 * 0.5 * A.numel(), dtype=value.dtype))
    value.backward()
    torch.testing.assert_close(A.grad, torch.full_like(A, 2.0 * 0.5))


def test_state_dict_save_load_roundtrip(tmp_path):
    for kind in ("diag", "kfac"):
        model, batches = make_model(), data()
        reg = fastcur.LaplaceRegularizer(model, kind=kind, lam=0.3).fit(batches, loss_mean, progress=False)
        with torch.no_grad():
            model[2].U.add_(0.2)
        path = tmp_path / f"{kind}.safetensors"
        reg.save(path)
        assert sorted(os.listdir(tmp_path)) == sorted(f"{k}.safetensors" for k in ("diag", "kfac")[: 1 + (kind == "kfac")])
        other = fastcur.LaplaceRegularizer(model, kind=kind).load(path)
        assert other.lam == 0.3 and other.n_samples == reg.n_samples
        torch.testing.assert_close(other.penalty(), reg.penalty())
        other2 = fastcur.LaplaceRegularizer(model, kind=kind).load_state_dict(reg.state_dict())
        torch.testing.assert_close(other2.penalty(), reg.penalty())


def test_save_is_atomic(tmp_path, monkeypatch):
    model, batches = make_model(), data(n_batches=1)
    reg = fastcur.LaplaceRegularizer(model).fit(batches, loss_mean, progress=False)
    path = tmp_path / "state.safetensors"
    reg.save(path)
    before = path.read_bytes()
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        reg.save(path)
    assert path.read_bytes() == before  # the old file is intact
    assert os.listdir(tmp_path) == ["state.safetensors"]  # no temporary file left


def test_errors(tmp_path):
    model, batches = make_model(), data(n_batches=1)
    reg = fastcur.LaplaceRegularizer(model)
    with pytest.raises(RuntimeError, match="call fit"):
        reg.penalty()
    with pytest.raises(RuntimeError, match="call fit"):
        reg.add_penalty_grad_()
    with pytest.raises(ValueError, match="batches is empty"):
        reg.fit([], loss_mean)
    with pytest.raises(ValueError, match="kind must be 'diag' or 'kfac'"):
        fastcur.LaplaceRegularizer(model, kind="full")
    with pytest.raises(ValueError, match="lam must be a number >= 0"):
        fastcur.LaplaceRegularizer(model, lam=-1.0)
    with pytest.raises(ValueError, match="no adapter tensors"):
        fastcur.LaplaceRegularizer(nn.Linear(3, 3))
    reg.fit(batches, loss_mean, progress=False)
    # the model's adapters change shape: a new, wider LoRA layer in place of the old one
    model[0] = fastcur.LoRALinear(6, 5, rank=3).double()
    with pytest.raises(RuntimeError, match=r"'0.lora_A.weight' changed shape since fit: \(2, 6\) -> \(3, 6\)"):
        reg.penalty()
    reg2 = fastcur.LaplaceRegularizer(make_model()).fit(batches, loss_mean, progress=False)
    reg2.save(tmp_path / "s.safetensors")
    with pytest.raises(RuntimeError, match="has shape"):
        fastcur.LaplaceRegularizer(model).load(tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="kind 'diag'"):
        fastcur.LaplaceRegularizer(make_model(), kind="kfac").load(tmp_path / "s.safetensors")

    class Undeclared(fastcur.AdapterLinear):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="does not declare its adapter tensors"):
        fastcur.LaplaceRegularizer(nn.Sequential(Undeclared(3, 3), make_model()))


@pytest.fixture
def one_thread():
    # Hundreds of tiny steps: one thread avoids thread wake-ups costing more than the math
    # on a loaded 2-core machine (the result does not depend on it).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_task_tradeoff_lam_lowers_forgetting_and_learning(one_thread):
    """The paper's trade-off, measured: train on task 1, fit at the anchor, train on task 2
    with λ in {0, 1, 30}; forgetting of task 1 falls and learning of task 2 falls as λ rises."""
    torch.manual_seed(0)
    k, n = 12, 8
    W1, W2 = torch.randn(n, k), torch.randn(n, k)
    X1, X2 = torch.randn(256, k), torch.randn(256, k)
    Y1, Y2 = X1 @ W1.T * 0.5, X2 @ W2.T * 0.5
    base = nn.Linear(k, n)

    def mse(model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    def train(model, X, Y, steps, reg=None):
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
        for step in range(steps):
            i = (step * 32) % 256
            loss = mse(model, (X[i:i + 32], Y[i:i + 32]))
            if reg is not None:
                loss = loss + reg.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()

    torch.manual_seed(1)
    model = nn.Sequential(fastcur.LoRALinear.from_linear(base, rank=4, alpha=4.0))
    train(model, X1, Y1, 300)
    task1_before = mse(model, (X1, Y1)).item()
    anchor_state = {k_: v.clone() for k_, v in model.state_dict().items()}
    results = {}
    for lam in (0.0, 1.0, 30.0):
        model.load_state_dict(anchor_state)
        reg = fastcur.LaplaceRegularizer(model, kind="diag", lam=lam)
        reg.fit([(X1[i:i + 32], Y1[i:i + 32]) for i in range(0, 256, 32)], mse, progress=False)
        train(model, X2, Y2, 150, reg)
        with torch.no_grad():
            results[lam] = (mse(model, (X1, Y1)).item() - task1_before, mse(model, (X2, Y2)).item())
    forgetting = [results[lam][0] for lam in (0.0, 1.0, 30.0)]
    task2_loss = [results[lam][1] for lam in (0.0, 1.0, 30.0)]
    print("lam -> (task-1 forgetting, task-2 loss):", results)
    assert forgetting[0] > forgetting[1] > forgetting[2], results
    assert task2_loss[0] < task2_loss[1] < task2_loss[2], results


def make_secura_model(seed=0):
    """SECURA layer -> tanh -> LoRA layer; B_c moved off zero so SigNorm scales are not all 2."""
    torch.manual_seed(seed)
    model = nn.Sequential(fastcur.SecuraLinear.from_linear(nn.Linear(6, 5), rank=2, inner_rank=3, scale=0.7),
                          nn.Tanh(), fastcur.LoRALinear(5, 4, rank=2))
    with torch.no_grad():
        model[0].B_c.normal_()
        model[0].A_c.normal_()
        model[2].lora_B.weight.normal_()
    return model.double()


def test_secura_adapters_discovered_and_diag_fisher_equals_torch_func():
    model, batches = make_secura_model(), data()
    reg = fastcur.LaplaceRegularizer(model, kind="diag", prior_precision=0.5)
    assert sorted(reg._adapter_tensors()) == ["0.A_c", "0.B_c", "2.lora_A.weight", "2.lora_B.weight"]
    reg.fit(batches, loss_mean, progress=False)
    want = per_example_fisher(model, batches)  # S is detached in the layer, as in the regularizer
    for name, F in want.items():
        assert reg.precisions[name].shape == F.shape
        torch.testing.assert_close(reg.precisions[name].double(), F + 0.5, rtol=1e-5, atol=1e-5)


def test_secura_kfac_factors_follow_the_parameter_orientation():
    model, batches = make_secura_model(), data(n_batches=2)
    reg = fastcur.LaplaceRegularizer(model, kind="kfac").fit(batches, loss_mean, progress=False)
    layer = model[0]
    xs, outs, gys = [], [], []
    def record(module, inputs, output):
        xs.append(inputs[0].detach())
        outs.append(output)

    hook = layer.register_forward_hook(record)
    for batch in batches:
        loss = loss_mean(model, batch) * batch[0].shape[0]
        gys.append(torch.autograd.grad(loss, outs[-1])[0])
    hook.remove()
    x, gy = torch.cat(xs), torch.cat(gys)
    E, T = x.shape[:2]
    with torch.no_grad():
        y0 = torch.nn.functional.linear(x, layer.weight, layer.bias)
        delta = fastcur.ops.reference.secura_delta(x, layer.C, layer.A_c, layer.B_c, layer.R, None, layer.scale)
        S = fastcur.ops.reference.signorm_scales(y0, delta)
        h = x @ layer.R.mT                               # input of B_c       [E, T, r]
        u = h @ layer.B_c                                # input of A_c       [E, T, a]
        gv = layer.scale * (gy / S) @ layer.C            # grad at v = u A_c  [E, T, r]
        gu = gv @ layer.A_c.mT                           # grad at u          [E, T, a]

    def outer(t):
        rows = t.reshape(-1, t.shape[-1])
        return rows.mT @ rows

    # B_c [r, a] maps h to u as `h @ B_c`: its gradient is h^T gu, so in tr(G Δ S Δ^T) the
    # [r, r] factor (G slot) is the input side and the [a, a] factor (S slot) the gradient side.
    torch.testing.assert_close(reg.factors["0.B_c"][0], outer(gu) / E)
    torch.testing.assert_close(reg.factors["0.B_c"][1], outer(h) / (E * T))
    torch.testing.assert_close(reg.factors["0.A_c"][0], outer(gv) / E)
    torch.testing.assert_close(reg.factors["0.A_c"][1], outer(u) / (E * T))
    # and the penalty is the quadratic form of the per-example gradients' second moment
    with torch.no_grad():
        layer.B_c.add_(torch.randn_like(layer.B_c) * 0.1)
    d = (layer.B_c - reg.anchors["0.B_c"]).detach()
    G_in, S_g = outer(h) / (E * T), outer(gu) / E
    explicit = reg.n_samples * torch.trace(G_in @ d @ S_g @ d.mT)
    got = reg.penalty() * 2 / reg.lam - reg.prior_precision * d.square().sum()
    got -= reg.n_samples * fastcur.ops.kfac_penalty((layer.A_c - reg.anchors["0.A_c"]).detach(), *reg.factors["0.A_c"])
    for n in ("2.lora_A.weight", "2.lora_B.weight"):
        p = dict(model.named_parameters())[n]
        got -= reg.n_samples * fastcur.ops.kfac_penalty((p - reg.anchors[n]).detach(), *reg.factors[n])
    torch.testing.assert_close(got, explicit.to(got.dtype), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("gate", ["rank", "weight"])
def test_jumplora_adapters_diag_fisher_equals_torch_func(gate):
    torch.manual_seed(0)
    model = nn.Sequential(fastcur.JumpLoRALinear.from_linear(nn.Linear(6, 5), rank=3, gate=gate, f=0.0),
                          nn.Tanh(), fastcur.LoRALinear(5, 4, rank=2)).double()
    with torch.no_grad():
        model[0].lora_B.weight.normal_()
        model[0].lora_A.weight.normal_()
        model[0].threshold.log_theta.fill_(-0.5)  # θ ≈ 0.6: the rank gate closes on some channels
        model[2].lora_B.weight.normal_()
    model[0].threshold.log_theta.requires_grad_(False)
    batches = data()
    reg = fastcur.LaplaceRegularizer(model, kind="diag", prior_precision=0.5).fit(batches, loss_mean, progress=False)
    assert sorted(reg._adapter_tensors()) == ["0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight",
                                             "2.lora_B.weight"]
    # torch.func cannot vmap the gates' straight-through autograd Functions: the per-example
    # truth here is one plain backward per example.
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    with fastcur.use_backend("reference"):
        for x, y in batches:
            for e in range(x.shape[0]):
                g = torch.autograd.grad(example_loss(model(x[e:e + 1])[0], y[e]), list(params.values()))
                for n, ge in zip(params, g):
                    want[n] += ge.square()
    for name, F in want.items():
        torch.testing.assert_close(reg.precisions[name].double(), F + 0.5, rtol=1e-5, atol=1e-5)


def test_jumplora_weight_gate_with_open_schedule_is_refused_clearly():
    model = nn.Sequential(fastcur.JumpLoRALinear.from_linear(nn.Linear(6, 4), rank=2, f=0.5)).double()
    with pytest.raises(ValueError, match="weight gate with f = 0.5 > 0"):
        fastcur.LaplaceRegularizer(model).fit(data(n_batches=1), loss_mean, progress=False)


def _damaged_files(tmp_path, good):
    """name -> a damaged copy of the saved state `good` (bytes) or a foreign safetensors file."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()["fastcur_lalora"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    data = good.read_bytes()
    files = {"garbage": b"not a safetensors file at all", "truncated": data[: len(data) // 2],
             "empty": b""}
    out = {}
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
        out[name] = tmp_path / name
    def variant(name, metadata, tensors=tensors):
        save_file(tensors, str(tmp_path / name), metadata=metadata)
        out[name] = tmp_path / name
    variant("no_metadata", None)
    variant("bad_json", {"fastcur_lalora": "{not json"})
    variant("json_list", {"fastcur_lalora": "[1, 2]"})
    variant("missing_key", {"fastcur_lalora": json.dumps({k: v for k, v in meta.items() if k != "n_samples"})})
    variant("bad_number", {"fastcur_lalora": json.dumps({**meta, "lam": "banana"})})
    first = next(k for k in tensors if k.startswith("precision."))
    variant("wrong_precision", {"fastcur_lalora": json.dumps(meta)},
            {**tensors, first: torch.zeros(1, dtype=tensors[first].dtype)})
    variant("no_precision", {"fastcur_lalora": json.dumps(meta)},
            {k: v for k, v in tensors.items() if k != first})
    return out


def test_damaged_state_file_gives_one_line_naming_the_file(tmp_path):
    model, batches = make_model(), data(n_batches=1)
    good = tmp_path / "good.safetensors"
    fastcur.LaplaceRegularizer(model).fit(batches, loss_mean, progress=False).save(good)
    reasons = {"no_metadata": "no 'fastcur_lalora' metadata", "bad_json": "Expecting property name",
               "json_list": "a JSON list", "missing_key": r"lacks \['n_samples'\]",
               "bad_number": "must be numbers", "wrong_precision": r"'precision\..*' must have shape",
               "no_precision": r"'precision\..*' must have shape .* got missing"}
    for name, path in _damaged_files(tmp_path, good).items():
        with pytest.raises(ValueError) as err:
            fastcur.LaplaceRegularizer(model).load(path)
        message = str(err.value)
        assert "\n" not in message and repr(str(path)) in message, (name, message)
        assert message.startswith("fastcur.LaplaceRegularizer.load: "), (name, message)
        if name in reasons:
            assert __import__("re").search(reasons[name], message), (name, message)
    with pytest.raises(FileNotFoundError, match="no such file .*nowhere.safetensors"):
        fastcur.LaplaceRegularizer(model).load(tmp_path / "nowhere.safetensors")
    fastcur.LaplaceRegularizer(model).load(good)  # the intact file still loads


def test_damaged_kfac_factors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    model, batches = make_model(), data(n_batches=1)
    good = tmp_path / "kfac.safetensors"
    fastcur.LaplaceRegularizer(model, kind="kfac").fit(batches, loss_mean, progress=False).save(good)
    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(good))
    key = next(k for k in tensors if k.startswith("kfac_S."))
    tensors[key] = torch.zeros(tensors[key].shape[-1] + 1, dtype=tensors[key].dtype)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"bad.safetensors.*'kfac_S\..*' must have shape \((\d+), \1\) or \(\1,\)"):
        fastcur.LaplaceRegularizer(model, kind="kfac").load(tmp_path / "bad.safetensors")
