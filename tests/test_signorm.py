"""signorm on every backend present: forward and gradients against the float64 reference,
both norms and scopes, opcheck, gradcheck, torch.compile, the documented properties, bad input."""
import pytest
import torch

import fastcur
from fastcur.ops import reference
from fastcur.testing import check_against_reference, check_as_given

from compile_check import assert_compiled_like_eager
from conftest import available_backends
from cpu_levels import cpu_levels

BACKENDS = available_backends("signorm")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(37, 45), (1, 16), (2, 3, 70), (5, 1)]
OPTIONS = [("max", "token"), ("raw", "token"), ("max", "tensor"), ("raw", "tensor")]


def make_inputs(shape, seed=0, zero_rows=()):
    g = torch.Generator().manual_seed(seed)
    y0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    # Δ of mixed magnitude, so that L spans a range and max L matters.
    delta = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.rand(*shape, generator=g, dtype=torch.float64)
    for i in zero_rows:
        delta.view(-1, shape[-1])[i] = 0
    return [y0.requires_grad_(), delta.requires_grad_()]


def run(backend, norm, scope, k=6.0):
    def fn(y0, delta):
        with fastcur.use_backend(backend):
            return fastcur.ops.signorm(y0, delta, k, 1e-10, norm, scope)
    return fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("norm,scope", OPTIONS)
def test_matches_reference(backend, dtype, shape, norm, scope):
    inputs = make_inputs(shape, seed=hash((shape, norm, scope)) % 1000)
    ref = lambda y0, d: reference.signorm(y0, d, 6.0, 1e-10, norm, scope)  # noqa: E731
    check_against_reference(run(backend, norm, scope), ref, inputs, dtype, names=["y0", "delta"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["token", "tensor"])
def test_zero_delta_gives_y0_exactly(backend, scope):
    """At init Δ = 0: S = 2 and y = y0 bit for bit (token scope: per row)."""
    y0 = torch.randn(6, 19)
    delta = torch.randn(6, 19)
    delta[2] = 0
    y = run(backend, "max", scope)(y0, torch.zeros_like(delta))
    assert torch.equal(y, y0)
    if scope == "token":
        y = run(backend, "max", scope)(y0, delta)
        assert torch.equal(y[2], y0[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_scope_rows_independent(backend):
    y0, delta = [t.detach().float() for t in make_inputs((8, 33))]
    full = run(backend, "max", "token")(y0, delta)
    for i in (0, 5):
        alone = run(backend, "max", "token")(y0[i:i + 1], delta[i:i + 1])
        assert torch.equal(full[i:i + 1], alone)
    other = delta.clone()
    other[1:] *= 10
    assert torch.equal(run(backend, "max", "token")(y0, other)[0], full[0])
    assert not torch.equal(run(backend, "max", "tensor")(y0, other)[0], run(backend, "max", "tensor")(y0, delta)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_through_S(backend):
    """dy0 = 2 dy / S and ddelta = dy / S exactly, with S taken from the forward."""
    y0, delta = [t.detach().double().requires_grad_() for t in make_inputs((4, 9))]
    y = run(backend, "max", "token")(y0, delta)
    S = reference.signorm_scales(y0, delta)
    dy = torch.randn_like(y)
    gy0, gd = torch.autograd.grad(y, [y0, delta], dy)
    torch.testing.assert_close(gy0, 2 * dy / S, rtol=1e-12, atol=0)
    torch.testing.assert_close(gd, dy / S, rtol=1e-12, atol=0)


def test_raw_norm_is_the_released_formula():
    """norm="raw" reproduces the released code: S = 2 - σ(6 L), no normalization by max L."""
    y0 = torch.tensor([[1.0, -2.0, 4.0]], dtype=torch.float64)
    delta = torch.tensor([[0.5, 1.0, 0.0]], dtype=torch.float64)
    L = delta.abs() / (y0.abs() + 1e-10)  # [0.5, 0.5, 0] up to eps
    S = 2 - torch.sigmoid(6 * L)
    for backend in BACKENDS:
        y = run(backend, "raw", "token")(y0, delta)
        torch.testing.assert_close(y, (2 * y0 + delta) / S, rtol=1e-12, atol=0)
        ym = run(backend, "max", "token")(y0, delta)
        Sm = 2 - torch.sigmoid(6 * (L / (L.max() + 1e-10) - 0.5))
        torch.testing.assert_close(ym, (2 * y0 + delta) / Sm, rtol=1e-12, atol=0)


def test_gradcheck_float64():
    """S is detached by definition, so finite differences only agree with the documented gradient
    where S does not move under perturbation: norm="raw" with a huge eps makes L ~ 1e-30, so
    S = 1.5 to double precision while the forward and backward paths are fully exercised."""
    for backend in BACKENDS:
        for scope in ("token", "tensor"):
            inputs = [t.detach().requires_grad_() for t in make_inputs((3, 2, 5))]

            def fn(y0, d):
                with fastcur.use_backend(backend):
                    return fastcur.ops.signorm(y0, d, 6.0, 1e30, "raw", scope)
            assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("norm,scope", OPTIONS)
def test_opcheck_cpp(norm, scope):
    y0, d = [t.detach().float().requires_grad_() for t in make_inputs((9, 12))]
    torch.library.opcheck(torch.ops.fastcur.signorm.default, (y0, d, 6.0, 1e-10, norm, scope))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton interpreter not available")
@pytest.mark.parametrize("norm,scope", [("max", "token"), ("raw", "tensor")])
def test_opcheck_triton(norm, scope):
    from fastcur.ops.signorm import _triton_op
    y0, d = [t.detach().float().requires_grad_() for t in make_inputs((9, 12))]
    torch.library.opcheck(_triton_op(), (y0, d, 6.0, 1e-10, norm, scope))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_torch_compile_fullgraph():
    y0, d = [t.detach().float() for t in make_inputs((4, 12))]
    d.requires_grad_()

    def step(y0, d):
        return fastcur.ops.signorm(y0, d, scope="tensor").square().sum()

    assert_compiled_like_eager(step, (y0, d), [d])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("norm,scope", OPTIONS)
def test_cuda_matches_reference(backend, norm, scope):
    ref = lambda y0, d: reference.signorm(y0, d, 6.0, 1e-10, norm, scope)  # noqa: E731
    check_against_reference(run(backend, norm, scope), ref, make_inputs((3, 130, 200)), torch.float32,
                            device="cuda", names=["y0", "delta"])


BAD = [
    (dict(delta=torch.randn(4, 11)), "argument 'delta' must have shape (4, 12)"),
    (dict(delta=torch.randn(4, 12, dtype=torch.float64)), "argument 'delta' must have the dtype of 'y0'"),
    (dict(y0=torch.randint(0, 3, (4, 12))), "argument 'y0' must be float32"),
    (dict(norm="sum"), "argument 'norm' must be 'max' or 'raw'"),
    (dict(scope="row"), "argument 'scope' must be 'token' or 'tensor'"),
    (dict(eps=-1.0), "argument 'eps' must be a finite number >= 0"),
    (dict(k="6"), "argument 'k' must be a finite number"),
    (dict(scope=None), "argument 'scope' must be 'token' or 'tensor', got None"),
    (dict(norm=None), "argument 'norm' must be 'max' or 'raw', got None"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_errors(override, message):
    args = dict(y0=torch.randn(4, 12), delta=torch.randn(4, 12), k=6.0, eps=1e-10, norm="max", scope="token")
    args.update(override)
    with pytest.raises((ValueError, TypeError)) as info:
        fastcur.ops.signorm(**args)
    assert message in str(info.value) and "fastcur.signorm" in str(info.value)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_cpp_kernel_checks_direct_calls():
    with pytest.raises(RuntimeError, match=r"delta must have shape \[4, 12\]"):
        torch.ops.fastcur.signorm(torch.randn(4, 12), torch.randn(4, 11), 6.0, 1e-10, "max", "token")
    with pytest.raises(RuntimeError, match="norm must be 'max' or 'raw'"):
        torch.ops.fastcur.signorm(torch.randn(4, 12), torch.randn(4, 12), 6.0, 1e-10, "x", "token")


# -- hostile inputs (issue 19) ------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["token", "tensor"])
def test_float16_past_half_range(backend, scope):
    """2 y0 + Δ is formed in float32: y0 = 40000 in float16 with Δ = 0 returns 40000 (it was inf
    on the reference backend), and with a small Δ a finite value close to y0 (2 y0 / S)."""
    y0 = torch.tensor([[40000.0, -30000.0, 1.0]], dtype=torch.float16)
    with fastcur.use_backend(backend):
        assert torch.equal(fastcur.ops.signorm(y0, torch.zeros_like(y0), scope=scope), y0)
        y = fastcur.ops.signorm(y0, torch.tensor([[100.0, 0.0, 0.5]], dtype=torch.float16), scope=scope)
    want = reference.signorm(y0.double(), torch.tensor([[100.0, 0.0, 0.5]], dtype=torch.float64), scope=scope)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), want, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_n(backend):
    y0 = torch.randn(4, 0, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(4, 0, dtype=torch.float64, requires_grad=True)
    check_as_given(run(backend, "max", "token"), lambda a, b: reference.signorm(a, b), [y0, delta],
                   wrt=[y0, delta], names=["y0", "delta"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm,scope", OPTIONS)
def test_two_threads_row_blocks_split(backend, norm, scope):
    """M = 512 rows of n = 48: the C++ row blocks (64 rows) split over the two test threads."""
    assert torch.get_num_threads() == 2
    check_against_reference(run(backend, norm, scope), lambda y0, d: reference.signorm(y0, d, 6.0, 1e-10, norm, scope),
                            make_inputs((512, 48)), torch.float32, names=["y0", "delta"])


# -- the float32 fast path of the C++ epilogue (cpu::signorm_epilogue_f32) at every x86-64 level --
@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("cpu_level", cpu_levels(), indirect=True)
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (3, 16), (2, 17), (1, 31), (130, 33), (300, 70), (5, 100)],
                         ids=str)
@pytest.mark.parametrize("norm,scope", OPTIONS)
def test_float32_fast_path_every_level(cpu_level, shape, norm, scope):
    """Row lengths below, at and off every vector width (4 / 8 / 16 floats: the tail vector
    overlaps the row's last whole one, or is partial in a row shorter than a vector), M = 1, and
    M = 130 / 300 that split over the two test threads; forward and both gradients."""
    inputs = make_inputs(shape, seed=sum(shape))
    ref = lambda y0, d: reference.signorm(y0, d, 6.0, 1e-10, norm, scope)  # noqa: E731
    check_against_reference(run("cpp", norm, scope), ref, inputs, torch.float32, names=["y0", "delta"])


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("cpu_level", cpu_levels(), indirect=True)
@pytest.mark.parametrize("norm", ["max", "raw"])
def test_float32_fast_path_extreme_ratios(cpu_level, norm):
    """Ratios from 0 to ~1e12 (y0 near 0, zero Δ entries): the sigmoid's exp saturates at both
    ends (raw: k L up to ~1e13), zero rows give S = 2; against the float64 reference."""
    g = torch.Generator().manual_seed(3)
    y0 = torch.randn(40, 37, generator=g, dtype=torch.float64)
    y0[::3, ::4] = 1e-12
    delta = torch.randn(40, 37, generator=g, dtype=torch.float64)
    delta[::5, 1::3] = 0
    delta[7] = 0
    delta[8] *= 1e-6
    fn = run("cpp", norm, "token")
    y = fn(y0.float(), delta.float())
    truth = reference.signorm(y0, delta, 6.0, 1e-10, norm, "token")
    torch.testing.assert_close(y.double(), truth, rtol=2e-6, atol=1e-6)
    assert torch.equal(y[7], y0[7].float())
