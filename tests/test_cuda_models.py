"""Every adapter module, and a tiny Llama injected with each method, on a CUDA GPU against the
same computation on the CPU, with the repository's tolerance rule (`fastcur.testing`): the truth
is the CPU run in float64 on the reference backend, the CPU run at the tested dtype on the
reference backend measures that dtype's own error, and the CUDA run (each backend) may be at most
twice as far from the truth plus the dtype's floor.

- one adapter layer (from_linear over a biased nn.Linear): output and the gradients of x and of
  every trainable tensor, at M = 1 and a 3-D batch, float32, bfloat16 and float16;
- a tiny LlamaForCausalLM (tests/tiny_models.py) with every projection adapted, trained a few
  SGD steps (float32; one step on a bfloat16 base): the loss of every step and every
  trainable tensor at the end. LaLoRA (LoRA + the
  diagonal Laplace penalty, fitted on the batch) and IMSM (around the LoRA model, gate dropout
  off so both devices draw nothing) included.
Base tensors are cast to the tested dtype, trainable ones kept in float32 on a half base (the
adapters' own convention). Marked `cuda`: skipped without a GPU (conftest).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastcur
from fastcur.testing import assert_close_to_reference
from tiny_models import batch, inject_method, method_config, perturb_adapters, tiny_causal_lm

pytestmark = pytest.mark.cuda
DEVICE = "cuda"
BACKENDS = ["cpp", "triton"]
LOWP = (torch.bfloat16, torch.float16)
LAYER_METHODS = ("lora", "curlora", "secura", "jumplora", "jumplora-rank")
MODEL_METHODS = LAYER_METHODS + ("lalora", "imsm")
# float32: three SGD steps; a half base: one step (its loss and update), as the rounding of a
# half-precision forward moves a multi-step trajectory more than the rule's "twice the CPU's
# own error" allows (measured: JumpLoRA's gates after three bfloat16 steps).
STEPS = {torch.float32: 3, torch.bfloat16: 1}
LR = 0.05


def cast_for_training(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Frozen parameters and floating buffers to `dtype`; trainable parameters to float32 on a half
    base (else `dtype`), as the adapters keep them."""
    trained = torch.float32 if dtype in LOWP else dtype
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                p.data = p.data.to(trained if p.requires_grad else dtype)
        for name, b in m._buffers.items():
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.to(dtype)
    return module


def three_runs(build, run, dtype, backend):
    """`run(build(dtype, device))` -> {name: tensor}: float64 and `dtype` on the CPU (reference
    backend), `dtype` on CUDA (`backend`); every named tensor checked with the rule."""
    with fastcur.use_backend("reference"):
        truth = run(build(torch.float64, "cpu"))
        ref = run(build(dtype, "cpu"))
    with fastcur.use_backend(backend):
        got = run(build(dtype, DEVICE))
    assert set(got) == set(truth)
    for name, t in truth.items():
        assert_close_to_reference(got[name].detach().cpu(), ref[name].detach().cpu(), t.detach().double(), name)


# -- one layer ------------------------------------------------------------------------------------------
def _layer_factory(method: str):
    torch.manual_seed(0)
    base = nn.Linear(72, 136, bias=True, dtype=torch.float64)
    holder = nn.Module()
    holder.q_proj = base                      # a name the method configs target
    layer = fastcur.inject(holder, method_config(method)).q_proj
    perturb_adapters(layer, seed=5, std=0.1)
    return lambda dtype, device: cast_for_training(copy.deepcopy(layer), dtype).to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lead", [(1,), (3, 37)], ids=str)
@pytest.mark.parametrize("method", LAYER_METHODS)
def test_layer_matches_cpu(method, lead, dtype, backend):
    build = _layer_factory(method)
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(*lead, 72, generator=g, dtype=torch.float64)
    dy0 = torch.randn(*lead, 136, generator=g, dtype=torch.float64)

    def run(layer):
        w = next(layer.parameters())
        x = x0.to(device=w.device, dtype=layer.weight.dtype, copy=True).requires_grad_(True)
        y = layer(x)
        y.backward(dy0.to(device=y.device, dtype=y.dtype))
        out = {"output": y, "grad of x": x.grad}
        out.update({f"grad of {n}": p.grad for n, p in layer.named_parameters() if p.requires_grad
                    and not (dtype in LOWP and n.endswith("log_theta"))})
        return out
    three_runs(build, run, dtype, backend)


# -- a tiny Llama, trained a few steps --------------------------------------------------------------------
def _model_factory(method: str):
    adapter = "lora" if method in ("lalora", "imsm") else method
    model = inject_method(tiny_causal_lm("llama", dtype=torch.float64), adapter)
    perturb_adapters(model, seed=3, std=0.1)
    if method == "imsm":
        model = fastcur.IMSM(model, gate_dropout=0.0)
        with torch.no_grad():
            model.W_B.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(4))
    return lambda dtype, device: cast_for_training(copy.deepcopy(model), dtype).to(device).train()


def _train(method: str, model: nn.Module, steps: int) -> dict:
    device = next(model.parameters()).device
    ids = batch(4, 12).to(device)
    if method == "imsm":
        prompt = torch.full((ids.shape[0],), 5, device=device)
        labels = ids.clone()
        labels[:, :5] = -100
        loss_fn = lambda: model(ids, prompt_lengths=prompt, labels=labels).loss  # noqa: E731
    else:
        loss_fn = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    reg = None
    if method == "lalora":
        reg = fastcur.LaplaceRegularizer(model, kind="diag", lam=1.0)
        reg.fit([ids], lambda m, b: m(input_ids=b, labels=b).loss, progress=False)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=LR)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        if reg is not None:
            loss = loss + reg.penalty()
        loss.backward()
        opt.step()
        losses.append(loss.detach().cpu())
    out = {"losses": torch.stack(losses)}
    out.update({f"trained {n}": p.detach() for n, p in params.items()})
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", MODEL_METHODS)
def test_tiny_llama_training_matches_cpu(method, dtype, backend):
    three_runs(_model_factory(method), lambda model: _train(method, model, STEPS[dtype]), dtype, backend)
