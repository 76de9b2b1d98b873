"""ella_penalty on every backend present: value and gradients against the float64 reference,
for ELLA's interpolated (the released default) and masked deltas, the reference against a
float64 re-derivation of the released ELLA delta, the hard mask (no gradient to log_theta),
opcheck, gradcheck, bad input."""
import pytest
import torch

import fastcur
from fastcur.ops import reference
from fastcur.testing import check_against_reference

from conftest import available_backends
from jump_inputs import jump_inputs, theta_dtype

BACKENDS = available_backends("ella_penalty")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(50, 45, 5), (16, 16, 1), (33, 70, 7), (96, 80, 16)]
# (f, ella_delta): the released default mid-ramp, and the hard mask
MODES = [(0.35, "interpolated"), (0.6, "masked")]


def inputs_for(k, n, r, seed=0):
    (x, W, b, A, B, lt), _, _ = jump_inputs((1,), k, n, r, gap=True, seed=seed, grads="params")
    W_past = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
              .to(torch.bfloat16).double())
    return [A, B, lt.detach(), W_past]


def run_backend(backend, scale, f=1.0, ella_delta="interpolated"):
    def fn(A, B, lt, Wp):
        with fastcur.use_backend(backend):
            return fastcur.ops.ella_penalty(A, B, lt.to(theta_dtype(Wp.dtype)), Wp, scale, f, ella_delta)
    return fn


def ref_fn(scale, f, ella_delta):
    # log θ float32 next to half tensors, as the op takes it (check_against_reference casts it
    # to the test's dtype; its values are bfloat16-exact)
    return lambda A, B, lt, Wp: reference.ella_penalty(A, B, lt.to(theta_dtype(Wp.dtype)), Wp, scale, f,
                                                       ella_delta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("f,ella_delta", MODES, ids=str)
def test_matches_reference(backend, dtype, shape, f, ella_delta):
    inputs = inputs_for(*shape, seed=sum(shape))
    inputs[3].requires_grad_(True)
    check_against_reference(run_backend(backend, 1.5, f, ella_delta),
                            ref_fn(1.5, f, ella_delta), inputs,
                            dtype, names="A B log_theta W_past".split())


def _released_delta(A, B, log_theta, scale, f, mode):
    """ELLA's ΔW_t of a JumpLoRA layer as the released code (ella/lora_utils.py) writes it,
    re-derived in float64: the mask by comparison (no gradient), "interpolated" the forward's
    blend, "sparse" the legacy mode (masked once f > 0, raw before)."""
    raw = B @ A
    jump = raw * (raw.abs() > log_theta.detach().exp()).to(raw.dtype)
    if mode == "interpolated":
        return (f * jump + (1.0 - f) * raw) * scale
    return (jump if f > 0.0 else raw) * scale


@pytest.mark.parametrize("f", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("mode", ["interpolated", "sparse"])
def test_reference_matches_the_released_delta(f, mode):
    A, B, lt, Wp = inputs_for(40, 36, 4, seed=11)
    P = reference.ella_penalty(A, B, lt, Wp, 2.0, f, mode)
    expected = (_released_delta(A, B, lt, 2.0, f, mode) * Wp).square().sum()
    torch.testing.assert_close(P, expected, rtol=1e-12, atol=0)
    gA, gB = torch.autograd.grad(P, [A, B])
    eA, eB = torch.autograd.grad(expected, [A, B])
    torch.testing.assert_close(gA, eA, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gB, eB, rtol=1e-10, atol=1e-12)


def test_interpolated_and_masked_differ_before_the_ramp_ends():
    A, B, lt, Wp = inputs_for(40, 36, 4, seed=12)
    at0 = [reference.ella_penalty(A, B, lt, Wp, 2.0, 0.0, d) for d in ("interpolated", "masked")]
    at1 = [reference.ella_penalty(A, B, lt, Wp, 2.0, 1.0, d) for d in ("interpolated", "masked")]
    assert at0[0] > at0[1] * 1.01
    torch.testing.assert_close(at1[0], at1[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("f,ella_delta", [(1.0, "masked"), (0.3, "interpolated"), (0.0, "interpolated")],
                         ids=str)
def test_value_and_grads_match_formula_and_theta_gets_none(backend, f, ella_delta):
    A, B, lt, Wp = inputs_for(30, 24, 3, seed=5)
    lt = lt.clone().requires_grad_(True)
    s = 4.0
    P = run_backend(backend, s, f, ella_delta)(A, B, lt, Wp)
    Z = (B @ A).detach()
    m = (Z.abs() > lt.detach().exp()).double()
    assert 0 < m.sum() < m.numel()
    e = f * m + (1 - f)          # ELLA's delta is s Z e
    torch.testing.assert_close(P, (s * Z * e * Wp).square().sum(), rtol=1e-12, atol=1e-12)
    dA, dB, dlt = torch.autograd.grad(P, [A, B, lt], allow_unused=True)
    dZ = 2 * s * s * e * e * Z * Wp * Wp
    torch.testing.assert_close(dA, B.detach().T @ dZ, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dB, dZ @ A.detach().T, rtol=1e-10, atol=1e-10)
    assert dlt is None


def test_gradcheck_float64():
    for backend in BACKENDS:
        inputs = inputs_for(7, 6, 2, seed=4)
        inputs[3].requires_grad_(True)
        assert torch.autograd.gradcheck(run_backend(backend, 0.5, 0.4), inputs)


def _op_args():
    A, B, lt, Wp = inputs_for(12, 10, 3, seed=1)
    return (A.float().requires_grad_(), B.float().requires_grad_(), lt.float(), Wp.float(), 2.0, 0.4)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_opcheck_cpp():
    torch.library.opcheck(torch.ops.fastcur.ella_penalty.default, _op_args())


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton interpreter not available")
def test_opcheck_triton():
    from fastcur.ops.ella_penalty import _triton_op
    torch.library.opcheck(_triton_op(), _op_args())


BAD = [
    (dict(A=torch.randn(3, 13)), "argument 'A' must have shape ('*', 12)"),
    (dict(B=torch.randn(9, 3)), "argument 'B' must have shape (10, 3)"),
    (dict(log_theta=torch.zeros(3)), "argument 'log_theta' must be a scalar tensor"),
    (dict(A=torch.randn(3, 12, dtype=torch.float64)), "argument 'A' must have the dtype of 'W_past'"),
    (dict(A=torch.randn(3, 12).half(), B=torch.randn(10, 3).half(), W_past=torch.randn(10, 12).half(),
          log_theta=torch.zeros((), dtype=torch.float16)),
     "argument 'log_theta' must be torch.float32 next to a torch.float16 'W_past'"),
    (dict(W_past=torch.randn(10)), "argument 'W_past' must have shape ('*', '*')"),
    (dict(ella_delta="hard"), "argument 'ella_delta' must be one of 'interpolated', 'masked', 'sparse'"),
    (dict(f=1.5), "argument 'f' must be a float in [0, 1]"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_errors(override, message):
    args = dict(A=torch.randn(3, 12), B=torch.randn(10, 3), log_theta=torch.zeros(()),
                W_past=torch.randn(10, 12), scale=2.0)
    args.update(override)
    with pytest.raises((ValueError, TypeError)) as info:
        fastcur.ops.ella_penalty(**args)
    assert message in str(info.value)
    assert "fastcur.ella_penalty" in str(info.value)
