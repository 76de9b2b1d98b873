"""Adapter precision (docs/methods.md, precision): on a bfloat16/float16 base, LoRA, CUR-LoRA and
SECURA keep their trainable tensors in float32, gradients land there in float32, and output and
gradients obey the tolerance rule against a float64 re-derivation of the layer's math."""
import pytest
import torch
from torch import nn

import fastcur
from fastcur.ops import reference
from fastcur.testing import assert_close_to_reference

HALF = [torch.bfloat16, torch.float16]


def lora_math(x, t, m):
    return x @ t["weight"].mT + t["bias"] + m.scaling * ((x @ t["lora_A.weight"].mT) @ t["lora_B.weight"].mT)


def cur_math(x, t, m):
    return reference.cur_linear(x, t["weight"], t["bias"], m.C.to(x.dtype), t["U"], m.R.to(x.dtype), m.scale)


def secura_math(x, t, m):
    return reference.secura_linear(x, t["weight"], t["bias"], m.C.to(x.dtype), t["A_c"], t["B_c"], m.R.to(x.dtype),
                                   t.get("lora_bias"), m.scale, m.k, m.eps, m.norm, m.scope)


def build(kind, dtype, **options):
    torch.manual_seed(0)
    lin = nn.Linear(48, 40).to(dtype)
    if kind == "lora":
        m = fastcur.LoRALinear.from_linear(lin, rank=4, alpha=8, **options)
        with torch.no_grad():
            m.lora_B.weight.normal_(std=0.2)
        return m, lora_math
    if kind == "curlora":
        m = fastcur.CURLoRALinear.from_linear(lin, rank=5, **options)
        with torch.no_grad():
            m.U.normal_(std=0.5)
        return m, cur_math
    m = fastcur.SecuraLinear.from_linear(lin, rank=4, inner_rank=8, lora_bias=True, **options)
    with torch.no_grad():
        m.B_c.normal_(std=0.3)
        m.lora_bias.normal_(std=0.05)
    return m, secura_math


def run(math, m, x, tensors, grad_y, names):
    """The layer's math on `tensors` and x: output and gradients of x and of the tensors `names`."""
    leaves = {k: v.detach().clone().requires_grad_(k not in ("weight", "bias")) for k, v in tensors.items()}
    xl = x.detach().clone().requires_grad_()
    y = math(xl, leaves, m)
    wants = [xl] + [leaves[k] for k in names]
    grads = torch.autograd.grad(y, wants, grad_y.to(y.dtype))
    return y, grads


CASES = [("lora", {}), ("curlora", {}), ("curlora", {"fast_path": "off"}), ("secura", {}),
         ("secura", {"fast_path": "off"}), ("secura", {"signorm": "off"})]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind,options", CASES, ids=lambda v: str(v))
def test_half_base_trains_float32_adapters_matching_float64(kind, options, dtype):
    m, math = build(kind, dtype, **options)
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert m.weight.dtype == dtype
    if kind == "secura" and options.get("signorm") == "off":
        math = lambda x, t, mod: reference.cur_linear(  # noqa: E731
            x, t["weight"], t["bias"] + t["lora_bias"], mod.C.to(x.dtype), t["A_c"].mT @ t["B_c"].mT,
            mod.R.to(x.dtype), mod.scale)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 48, generator=g).to(dtype).requires_grad_()
    grad_y = torch.randn(3, 7, 40, generator=g, dtype=torch.float64)
    y = m(x)
    assert y.dtype == dtype
    y.backward(grad_y.to(dtype))
    for n, p in trainable.items():
        assert p.grad is not None and p.grad.dtype == torch.float32, n
    tensors = {"weight": m.weight, "bias": m.bias, **trainable}
    truth_y, truth_g = run(math, m, x.double(), {k: v.double() for k, v in tensors.items()}, grad_y, list(trainable))
    low_y, low_g = run(math, m, x, {k: v.to(dtype) for k, v in tensors.items()}, grad_y, list(trainable))
    assert_close_to_reference(y, low_y, truth_y, "y")
    assert_close_to_reference(x.grad, low_g[0], truth_g[0], "grad x")
    for (n, p), lg, tg in zip(trainable.items(), low_g[1:], truth_g[1:]):
        assert_close_to_reference(p.grad, lg.float(), tg, f"grad {n}")


@pytest.mark.parametrize("kind", ["lora", "curlora", "secura"])
def test_small_adam_steps_move_float32_adapters_on_a_bf16_base(kind):
    """An update far below bfloat16's resolution still moves the float32 parameter (in bfloat16
    it would round back: the reason adapters are kept in float32)."""
    m, _ = build(kind, torch.bfloat16)
    params = [p for p in m.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-6)
    x = torch.randn(16, 48).to(torch.bfloat16)
    m(x).float().square().mean().backward()
    opt.step()
    moved = [(p - b).abs().max().item() for p, b in zip(params, before)]
    assert all(0 < d < 1e-5 for d in moved), moved
    # the same step on a bfloat16 copy of the largest parameter is rounded away
    big = max(before, key=lambda t: t.abs().max().item())
    assert torch.equal((big.to(torch.bfloat16) + 1e-6).float(), big.to(torch.bfloat16).float())


def test_float32_and_float64_bases_keep_their_dtype():
    for dtype in (torch.float32, torch.float64):
        m = fastcur.SecuraLinear.from_linear(nn.Linear(12, 10).to(dtype), rank=2)
        assert m.adapter_dtype == dtype and m.A_c.dtype == dtype
        assert fastcur.LoRALinear(12, 10, dtype=dtype).lora_A.weight.dtype == dtype


@pytest.mark.parametrize("config", [fastcur.LoRAConfig(rank=4, alpha=8), fastcur.CURLoRAConfig(rank=4),
                                    fastcur.SecuraConfig(rank=4, lora_bias=True)], ids=lambda c: c.method)
def test_bf16_tiny_llama_trains_float32_adapters(config):
    from tiny_models import adamw_losses, tiny_llama
    model = fastcur.inject(tiny_llama(dtype=torch.bfloat16), config).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    ids = torch.randint(0, 61, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = adamw_losses(model, ids, steps=12, lr=2e-2)
    assert losses[-1] < losses[0], losses  # (CUR-LoRA moves slowly on a random base: C, R are small)


# -- JumpLoRA (weight gate): float32 A, B, θ on a half base, the C++ path at M = 1 -----------------
def _jump_layer(dtype):
    """A JumpLoRA layer on a half base with float32 adapters and a float32 log θ that is not
    representable in `dtype` (rounded to it, θ would move past at least one |Z|: the layer
    gates with the float32 θ). θ sits in a gap of |Z| judged against the float32 θ, over every
    Z a path may gate (from the float32 A, B of the truth, from the half A, B the layer passes
    to the op, and that product rounded to `dtype` as the reference computes it), and the
    straight-through window's edges θ ± ε/2 in gaps too: so what is compared is the arithmetic
    (the kernels accumulate Z in float32 for half inputs and compare it with the float32 θ)."""
    from jump_inputs import theta_off_the_half_grid
    torch.manual_seed(0)
    m = fastcur.JumpLoRALinear.from_linear(nn.Linear(24, 20).to(dtype), rank=2, alpha=4, f=0.5)
    with torch.no_grad():
        m.lora_A.weight.normal_(std=0.1)
        m.lora_B.weight.normal_(std=0.1)
        A, B = m.lora_A.weight, m.lora_B.weight
        zs = [(B.double() @ A.double()).abs(), (B.to(dtype).double() @ A.to(dtype).double()).abs(),
              (B.to(dtype) @ A.to(dtype)).double().abs()]
        lt, _, flips = theta_off_the_half_grid(zs, dtype, lo=0.6, edges=(m.bandwidth, 1e-3))
        assert flips >= 1
        m.threshold.log_theta.fill_(lt.item())
        assert m.threshold.log_theta.to(dtype).float() != m.threshold.log_theta
    return m


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("lead", [(1,), (3, 7)], ids=str)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_jumplora_half_base_float32_adapters_match_float64(backend, lead, dtype):
    from fastcur import _extension
    if backend == "cpp" and not _extension.has_kernel("jump_linear", "CPU"):
        pytest.skip("C++ extension not built")
    m = _jump_layer(dtype)
    assert m.lora_A.weight.dtype == torch.float32 and m.weight.dtype == dtype
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, 24, generator=g).to(dtype).requires_grad_()
    grad_y = torch.randn(*lead, 20, generator=g, dtype=torch.float64)
    with fastcur.use_backend(backend):
        y = m(x)
        y.backward(grad_y.to(dtype))
    names = ["lora_A.weight", "lora_B.weight", "log_theta"]
    trainable = {"lora_A.weight": m.lora_A.weight, "lora_B.weight": m.lora_B.weight,
                 "log_theta": m.threshold.log_theta}
    assert all(p.grad.dtype == torch.float32 for p in trainable.values())

    def math(xx, t, mod):
        return reference.jump_linear(xx, t["weight"], t["bias"], t["lora_A.weight"], t["lora_B.weight"],
                                     t["log_theta"], mod.scaling, mod.f, mod.bandwidth, mod.reduction)
    tensors = {"weight": m.weight, "bias": m.bias, **{k: v.detach() for k, v in trainable.items()}}
    truth_y, truth_g = run(math, m, x.double(), {k: v.double() for k, v in tensors.items()}, grad_y, names)
    # the reference at the layer's own precision: half tensors, log θ float32 (the ops' contract)
    low = {k: (v if k == "log_theta" else v.to(dtype)) for k, v in tensors.items()}
    low_y, low_g = run(math, m, x, low, grad_y, names)
    assert_close_to_reference(y, low_y, truth_y, "y")
    assert_close_to_reference(x.grad, low_g[0], truth_g[0], "grad x")
    for (n, p), lg, tg in zip(trainable.items(), low_g[1:], truth_g[1:]):
        assert_close_to_reference(p.grad, lg.float(), tg, f"grad {n}")
