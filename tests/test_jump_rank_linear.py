"""jump_rank_linear on every backend present: forward and every gradient against the float64
reference, the one-sided straight-through gradient against docs/methods.md, JumpLoRA, opcheck, gradcheck,
torch.compile, odd shapes, bad input."""
import pytest
import torch

import fastcur
from fastcur.ops import reference
from fastcur.testing import check_against_reference, check_as_given, check_double_backward_refused

from compile_check import assert_compiled_like_eager
from conftest import available_backends
from jump_inputs import rank_inputs, theta_as_op_takes, theta_off_the_half_grid

BACKENDS = available_backends("jump_rank_linear")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [((37,), 50, 45, 5), ((1,), 16, 16, 1), ((2, 3), 33, 70, 7), ((64,), 96, 80, 16)]
NAMES = "x W b A B log_theta".split()


def run_backend(backend, scale, bw):
    @theta_as_op_takes
    def fn(x, W, b, A, B, lt):
        with fastcur.use_backend(backend):
            return fastcur.ops.jump_rank_linear(x, W, b, A, B, lt, scale, bw)
    return fn


def ref_fn(scale, bw):
    return theta_as_op_takes(lambda x, W, b, A, B, lt: reference.jump_rank_linear(x, W, b, A, B, lt, scale, bw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_gate_at_the_float32_theta(backend, dtype):
    """Half x, A and float32 log θ_j the half dtype cannot hold: with W = 0, B = I (n = r) the
    layer returns s g, nonzero exactly where h_tj > the float32 θ_j (h = x A^T of the half x, A;
    each θ_j 2 unit roundoffs of the half dtype away from every h of its channel, rounded to
    the half dtype or not), although the θ_j rounded to the half dtype gate at least one entry
    of each channel otherwise. The gradient of log θ comes back in float32."""
    M, k, r = 200, 24, 3
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, k, generator=g, dtype=torch.float64).to(dtype)
    A = (0.01 / k ** 0.5 * torch.randn(r, k, generator=g, dtype=torch.float64)).to(dtype)  # h ~ 0.01
    h = x.double() @ A.double().T
    h_low = (x @ A.T).double()
    lts = torch.stack([theta_off_the_half_grid([h[:, j][h[:, j] > 0], h_low[:, j][h_low[:, j] > 0]], dtype,
                                               lo=0.3, hi=0.9)[0] for j in range(r)])
    lt = lts.float().requires_grad_()
    with fastcur.use_backend(backend):
        y = fastcur.ops.jump_rank_linear(x, torch.zeros(r, k, dtype=dtype), None, A,
                                         torch.eye(r, dtype=dtype), lt, 2.0, 1e-3)
    on = h > lts.exp()
    assert not torch.equal(on, h > lt.detach().to(dtype).double().exp())
    assert torch.equal(y != 0, on)
    dlt, = torch.autograd.grad(y.float().sum(), lt)
    assert dlt.dtype == torch.float32 and dlt.shape == (r,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_all_grads(backend, dtype, shape):
    lowp = dtype in (torch.bfloat16, torch.float16)
    inputs, bw = rank_inputs(*shape, gap=lowp, seed=sum(shape[1:]))
    check_against_reference(run_backend(backend, 1.5, bw), ref_fn(1.5, bw), inputs, dtype, names=NAMES)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("grads", ["all", "adapter"])
@pytest.mark.parametrize("rank", [6, 13])
def test_cpp_row_blocks(dtype, grads, rank):
    # n + k = 2100: the CPU kernel takes blocks of 124 rows, so 303 rows make three blocks
    # (the last one, 55 rows, ragged), split between the threads, each with its own partials
    # of dA, dB and the θ window sums. The row kernels work on tiles of 4 or 2 rows by 8 or 4
    # channels (x A^T, dy B) and of 8 rows by 4 channels (dh^T x), with tails of single rows
    # and channels: 55 rows and ranks 6 = 4 + 1 + 1 and 13 = 8 + 4 + 1 reach every tile.
    inputs, bw = rank_inputs((303,), 1000, 1100, rank, gap=False, grads=grads, seed=5)
    check_against_reference(run_backend("cpp", 1.5, bw), ref_fn(1.5, bw), inputs, dtype,
                            names=NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_straight_through_gradient_matches_spec(backend):
    (x, W, b, A, B, lt), bw = rank_inputs((41,), 30, 20, 4, gap=False, seed=3)
    s = 2.0
    y = run_backend(backend, s, bw)(x, W, b, A, B, lt)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dx, dA, dB, dlt = torch.autograd.grad(y, [x, A, B, lt], dy)
    h = (x @ A.T).detach()
    theta = lt.detach().exp()
    on = (h > theta).double()
    g = h * on
    dg = s * dy @ B.detach()
    dh = dg * on
    K = ((h - theta) / bw).abs() < 0.5
    assert K.sum() > 5
    torch.testing.assert_close(dlt, theta * (-(theta / bw) * (K.double() * dg).sum(0)), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dA, dh.T @ x.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dB, s * dy.T @ g, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dx, dy @ W.detach() + dh @ A.detach(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grads", ["adapter", "params"])
def test_adapter_only_grads(backend, grads):
    inputs, bw = rank_inputs((2, 19), 40, 24, 4, gap=False, grads=grads, bias=False, seed=9)
    check_against_reference(run_backend(backend, 2.0, bw), ref_fn(2.0, bw), inputs, torch.float32,
                            names=NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    (x, W, b, A, B, lt), bw = rank_inputs((0,), 12, 10, 3, gap=True)
    y = run_backend(backend, 1.0, bw)(x.float(), W.float(), b.float(), A.float(), B.float(), lt.float())
    assert y.shape == (0, 10)


def test_gradcheck_float64():
    for backend in BACKENDS:
        inputs, bw = rank_inputs((3, 5), 7, 6, 2, gap=True, seed=4)
        inputs[5].requires_grad_(False)   # a straight-through estimate, checked above
        assert torch.autograd.gradcheck(run_backend(backend, 0.5, bw), inputs)


def _op_args():
    (x, W, b, A, B, lt), bw = rank_inputs((9,), 12, 10, 3, gap=True, seed=1)
    return (x.float().requires_grad_(), W.float(), b.float(), A.float().requires_grad_(),
            B.float().requires_grad_(), lt.float().requires_grad_(), 1.5, bw)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_opcheck_cpp():
    torch.library.opcheck(torch.ops.fastcur.jump_rank_linear.default, _op_args())


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton interpreter not available")
def test_opcheck_triton():
    from fastcur.ops.jump_rank_linear import _triton_op
    torch.library.opcheck(_triton_op(), _op_args())


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_torch_compile_fullgraph():
    x, W, b, A, B, lt, *_ = _op_args()

    def step(x, A, B, lt):
        return fastcur.ops.jump_rank_linear(x, W, b, A, B, lt, 1.5).square().sum()

    assert_compiled_like_eager(step, (x, A, B, lt), [A, B])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_reference(backend, dtype):
    inputs, bw = rank_inputs((3, 130), 200, 150, 16, gap=True)
    check_against_reference(run_backend(backend, 1.5, bw), ref_fn(1.5, bw), inputs, dtype,
                            device="cuda", names=NAMES)


BAD = [
    (dict(x=torch.randn(4, 11)), "argument 'x' must have last dimension k = 12"),
    (dict(B=torch.randn(10, 4)), "argument 'B' must have shape (10, 3)"),
    (dict(log_theta=torch.zeros(())), "argument 'log_theta' must have shape (3,)"),
    (dict(log_theta=torch.zeros(3, dtype=torch.float16)),
     "argument 'log_theta' must be torch.float32 next to a torch.float32 'weight'"),
    (dict(bias=torch.randn(11)), "argument 'bias' must have shape (10,)"),
    (dict(bandwidth=-1.0), "argument 'bandwidth' must be a float > 0"),
    (dict(bandwidth=None), "argument 'bandwidth' must be a float > 0, got None"),
    (dict(scale=torch.tensor(2.0, requires_grad=True)), "argument 'scale' is a tensor that requires grad"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_errors(override, message):
    args = dict(x=torch.randn(4, 12), weight=torch.randn(10, 12), bias=torch.randn(10),
                A=torch.randn(3, 12), B=torch.randn(10, 3), log_theta=torch.zeros(3), scale=2.0,
                bandwidth=1e-3)
    args.update(override)
    with pytest.raises((ValueError, TypeError)) as info:
        fastcur.ops.jump_rank_linear(**args)
    assert message in str(info.value)
    assert "fastcur.jump_rank_linear" in str(info.value)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_cpp_kernel_checks_direct_calls():
    x, W, A, B = torch.randn(4, 12), torch.randn(10, 12), torch.randn(3, 12), torch.randn(10, 3)
    with pytest.raises(RuntimeError, match=r"log_theta must have shape \[3\]"):
        torch.ops.fastcur.jump_rank_linear(x, W, None, A, B, torch.zeros(2), 1.0, 1e-3)
    h = lambda t: t.bfloat16()  # noqa: E731
    with pytest.raises(RuntimeError, match="log_theta must be Float for a BFloat16 weight"):
        torch.ops.fastcur.jump_rank_linear(h(x), h(W), None, h(A), h(B), h(torch.zeros(3)), 1.0, 1e-3)


# -- hostile inputs (issue 19) ------------------------------------------------------------------
def _f64(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=requires_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["strided", "expanded"])
def test_log_theta_and_bias_as_views(backend, view):
    """log_theta [r] and bias [n] read by their strides: a strided view (every second entry)
    and an expanded one (stride 0, one stored value) give the reference's output and grads."""
    x, W, A, B = _f64(9, 12), _f64(10, 12), _f64(4, 12), _f64(10, 4)
    size_t, size_b = (8, 20) if view == "strided" else (1, 1)
    lt0 = torch.full((size_t,), -1.5, dtype=torch.float64) + 0.1 * torch.arange(size_t, dtype=torch.float64)
    lt0.requires_grad_(True)
    b0 = _f64(size_b, requires_grad=True)
    lt, b = (lt0[::2], b0[::2]) if view == "strided" else (lt0.expand(4), b0.expand(10))
    check_as_given(run_backend(backend, 0.5, 0.5), ref_fn(0.5, 0.5), [x, W, b, A, B, lt],
                   wrt=[lt0, b0], names=["log_theta", "bias"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,n", [(0, 6), (5, 0)], ids=["k=0", "n=0"])
def test_zero_size_k_or_n(backend, k, n):
    x, W, b = _f64(4, k, requires_grad=True), _f64(n, k), _f64(n, requires_grad=True)
    A, B = _f64(2, k, requires_grad=True), _f64(n, 2, requires_grad=True)
    lt = torch.full((2,), -3.0, dtype=torch.float64, requires_grad=True)
    check_as_given(run_backend(backend, 0.5, 1e-3), ref_fn(0.5, 1e-3), [x, W, b, A, B, lt],
                   wrt=[x, b, B], names=["x", "b", "B"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_rows_split(backend):
    """M = 2100 rows: the C++ gate (1024 rows per task) and its backward's per-thread window
    sums split over the two test threads."""
    assert torch.get_num_threads() == 2
    inputs, bw = rank_inputs((2100,), 24, 20, 3, gap=True, grads="all")
    check_against_reference(run_backend(backend, 1.5, bw), ref_fn(1.5, bw), inputs, torch.float32, names=NAMES)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_double_backward_is_refused_clearly(backend):
    """First-order gradients under create_graph=True are right; a gradient of them raises (the
    C++ backend returned a silently wrong second derivative)."""
    x, W, b = _f64(5, 12, requires_grad=True), _f64(10, 12), _f64(10)
    A, B = _f64(3, 12, requires_grad=True), _f64(10, 3, requires_grad=True)
    lt = torch.full((3,), -3.0, dtype=torch.float64)
    check_double_backward_refused(run_backend(backend, 0.5, 1e-3), ref_fn(0.5, 1e-3), [x, W, b, A, B, lt],
                                  x, A, "jump_rank_linear")
