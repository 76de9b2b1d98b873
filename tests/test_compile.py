"""torch.compile(fullgraph=True) of an injected model's training step on the CPU, for every
method: the same losses, gradients and parameters as eager. Backend "aot_eager": Dynamo's
trace and AOTAutograd's joint forward/backward graph (fake tensors, functionalization, the ops'
registered fake kernels and autograd formulas) without Inductor's C++ codegen, which would
take minutes on CI's 2 cores and treats the custom ops as opaque calls anyway.

Inside a compiled graph the CUR layers take the explicit C, R path (W's version counter,
which guards the tied fast path, is data-dependent there); eager takes the tied path, so the
comparison also checks that both paths compute the same function."""
import pytest
import torch

import fastcur
from tiny_models import METHODS, batch, inject_method, one_thread, tiny_causal_lm, trainable  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def train(model, step, ids, steps=3):
    """(losses, grads of the first step, final parameters) of SGD on a fixed batch."""
    params = trainable(model)
    opt = torch.optim.SGD(params.values(), lr=0.5)
    losses, first_grads = [], None
    for _ in range(steps):
        loss = step(ids)
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in params.items()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), first_grads, {n: p.detach().clone() for n, p in params.items()}


@pytest.mark.parametrize("method", METHODS)
def test_compiled_training_step_equals_eager(method):
    torch._dynamo.reset()
    ids = batch(2, 8)
    results = []
    for compiled in (False, True):
        model = inject_method(tiny_causal_lm("llama", layers=1), method).train()

        def step(ids):
            return model(input_ids=ids, labels=ids).loss

        if compiled:
            step = torch.compile(step, fullgraph=True, backend="aot_eager")
        results.append(train(model, step, ids))
    (l_e, g_e, p_e), (l_c, g_c, p_c) = results
    torch.testing.assert_close(l_c, l_e)
    assert l_e[-1] < l_e[0]                     # the step trains something
    assert g_e.keys() == g_c.keys() and any(g.abs().max() > 0 for g in g_e.values())
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name], msg=name)
        torch.testing.assert_close(p_c[name], p_e[name], msg=name)


def test_lazy_selection_is_a_named_graph_break():
    """A CUR layer built with the nn.Linear-style constructor selects C, R at its first forward,
    on the host: fullgraph names the fix; without fullgraph the selection runs eagerly."""
    torch._dynamo.reset()
    x = torch.randn(3, 16)
    for cls in (fastcur.CURLoRALinear, fastcur.SecuraLinear):
        layer = cls(16, 12, rank=4)
        with pytest.raises(Exception, match=r"not selected yet .* call \.select\(\) on the layer"):
            torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
        y = torch.compile(layer, backend="aot_eager")(x)
        torch.testing.assert_close(y, layer(x))
        assert layer._selected
        fresh = cls(16, 12, rank=4).select()  # the documented fix
        torch.testing.assert_close(torch.compile(fresh, fullgraph=True, backend="aot_eager")(x), fresh(x))


def test_restrain_in_training_mode_is_a_named_graph_break():
    """SECURA's restrain draws its channels on the host: fullgraph names it; without fullgraph
    the draw runs eagerly and the compiled layer follows eager (same generator sequence)."""
    torch._dynamo.reset()
    x = torch.randn(3, 16)

    def build():
        torch.manual_seed(0)
        layer = fastcur.SecuraLinear.from_linear(torch.nn.Linear(16, 12), rank=4, restrain=True,
                                                 restrain_min=10.0, restrain_ratio=0.0)
        with torch.no_grad():
            layer.B_c.normal_()
        return layer

    with pytest.raises(Exception, match="restrain=True draws its channels on the host"):
        torch.compile(build(), fullgraph=True, backend="aot_eager")(x)
    eager, compiled = build(), build()
    step = torch.compile(compiled, backend="aot_eager")
    for _ in range(2):
        torch.testing.assert_close(step(x), eager(x))
        assert bool(compiled.restrain_fired) and bool(eager.restrain_fired)  # the rule fired
    layer = build().eval()                      # eval never restrains: compiles whole
    torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), layer(x))


@pytest.mark.parametrize("cls,options", [(fastcur.CURLoRALinear, {"rank": 4}),
                                         (fastcur.SecuraLinear, {"rank": 4}),
                                         (fastcur.JumpLoRALinear, {"rank": 4, "f": 0.5}),
                                         (fastcur.JumpLoRALinear, {"rank": 4, "gate": "rank"})],
                         ids=["curlora", "secura", "jumplora-weight", "jumplora-rank"])
def test_compiled_autocast_step_equals_eager(cls, options):
    """The fused ops' autocast casts trace into the graph: bfloat16 outputs, float32 grads."""
    torch._dynamo.reset()
    layer = cls.from_linear(torch.nn.Linear(16, 12), **options)
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p.add_(torch.randn_like(p) * 0.3)
    params = [p for p in layer.parameters() if p.requires_grad]
    x = torch.randn(3, 5, 16)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        return y, y.float().square().mean()

    y_e, loss_e = step(x)
    g_e = torch.autograd.grad(loss_e, params)
    y_c, loss_c = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    g_c = torch.autograd.grad(loss_c, params)
    assert y_c.dtype == torch.bfloat16
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    for a, b in zip(g_c, g_e):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)
