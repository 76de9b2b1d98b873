"""cur_linear on every backend present: forward and every gradient against the float64
reference, opcheck, gradcheck, torch.compile, odd shapes, bad input."""
import pytest
import torch

import fastcur
from fastcur.ops import reference
from fastcur.testing import (assert_close_to_reference, check_against_reference, check_as_given,
                             check_double_backward_refused)

from compile_check import assert_compiled_like_eager
from conftest import available_backends
from cur_inputs import base_inputs, c_and_r

BACKENDS = available_backends("cur_linear")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (leading dims of x, k, n, r): odd sizes, r = 1, M = 1, 3-D inputs.
SHAPES = [((37,), 50, 45, 5), ((1,), 16, 16, 1), ((2, 3), 33, 70, 7), ((64,), 96, 80, 16)]


def make_inputs(lead, k, n, r, *, tied, bias=True, grads="all", seed=0):
    g = torch.Generator().manual_seed(seed)
    W, rows, cols, x, b = base_inputs(g, lead, k, n, r, bias)
    U = torch.randn(r, r, generator=g, dtype=torch.float64) / r ** 0.5
    C, R = c_and_r(g, W, rows, cols, tied=tied)
    wants = {"all": "x W b C U R", "adapter": "x U", "U": "U"}[grads].split()
    named = {"x": x, "W": W, "b": b, "C": C, "U": U, "R": R}
    for name, t in named.items():
        if t is not None and name in wants:
            t.requires_grad_(True)
    idx = (rows, cols) if tied else (None, None)
    return [x, W, b, C, U, R], idx


def run_backend(backend, rows, cols, scale):
    def fn(x, W, b, C, U, R):
        with fastcur.use_backend(backend):
            return fastcur.ops.cur_linear(x, W, b, C, U, R, scale, rows=rows, cols=cols)
    return fn


def ref_fn(scale):
    return lambda x, W, b, C, U, R: reference.cur_linear(x, W, b, C, U, R, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "explicit"])
def test_matches_reference_all_grads(backend, dtype, shape, tied):
    inputs, (rows, cols) = make_inputs(*shape, tied=tied, seed=hash((shape, tied)) % 1000)
    check_against_reference(run_backend(backend, rows, cols, 0.75), ref_fn(0.75), inputs, dtype,
                            names="x W b C U R".split())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grads", ["adapter", "U"])
@pytest.mark.parametrize("bias", [True, False])
def test_adapter_only_grads(backend, grads, bias):
    """The training case: frozen W, b, C, R; x may or may not need a gradient."""
    inputs, (rows, cols) = make_inputs((2, 19), 40, 24, 4, tied=True, bias=bias, grads=grads)
    check_against_reference(run_backend(backend, rows, cols, 2.0), ref_fn(2.0), inputs,
                            torch.float32, names="x W b C U R".split())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    inputs, (rows, cols) = make_inputs((0,), 12, 10, 3, tied=True)
    y = run_backend(backend, rows, cols, 1.0)(*[t.float() if t is not None else None for t in inputs])
    assert y.shape == (0, 10)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "explicit"])
def test_gradcheck_float64(tied):
    for backend in BACKENDS:
        inputs, (rows, cols) = make_inputs((3, 5), 7, 6, 2, tied=tied)
        if tied:  # perturbing W or R would break the promise R == W[rows]; C stays free
            inputs[1].requires_grad_(False)
            inputs[5].requires_grad_(False)
        assert torch.autograd.gradcheck(run_backend(backend, rows, cols, 0.5), inputs)


def _cpp_args(tied):
    inputs, (rows, cols) = make_inputs((9,), 12, 10, 3, tied=tied)
    x, W, b, C, U, R = inputs
    return (x.float().requires_grad_(), W.float(), b.float(), C.float(), U.float().requires_grad_(),
            R.float(), 1.5, rows, cols)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "explicit"])
def test_opcheck_cpp(tied):
    torch.library.opcheck(torch.ops.fastcur.cur_linear.default, _cpp_args(tied))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton interpreter not available")
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "explicit"])
def test_opcheck_triton(tied):
    from fastcur.ops.cur_linear import _triton_op
    torch.library.opcheck(_triton_op(), _cpp_args(tied))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_torch_compile_fullgraph():
    inputs, (rows, cols) = make_inputs((4, 8), 16, 12, 3, tied=True)
    x, W, b, C, U, R = [t.float() if t is not None else None for t in inputs]
    U = U.detach().requires_grad_()

    def step(x, U):
        return fastcur.ops.cur_linear(x, W, b, C, U, R, 0.5, rows=rows, cols=cols).square().sum()

    assert_compiled_like_eager(step, (x, U), [U], same_loss=True)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_reference(backend, dtype):
    inputs, (rows, cols) = make_inputs((3, 130), 200, 150, 16, tied=True)
    check_against_reference(run_backend(backend, rows.cuda(), cols.cuda(), 0.75), ref_fn(0.75),
                            inputs, dtype, device="cuda", names="x W b C U R".split())


BAD = [
    (dict(x=torch.randn(4, 11)), "argument 'x' must have last dimension k = 12"),
    (dict(C=torch.randn(10, 4)), "argument 'C' must have shape (10, 3)"),
    (dict(R=torch.randn(3, 13)), "argument 'R' must have shape (3, 12)"),
    (dict(U=torch.randn(3, 4)), "argument 'U' must have shape (3, 3)"),
    (dict(bias=torch.randn(11)), "argument 'bias' must have shape (10,)"),
    (dict(x=torch.randn(4, 12, dtype=torch.float64)), "argument 'x' must have the dtype of 'weight'"),
    (dict(weight=torch.randint(0, 3, (10, 12))), "argument 'weight' must be float32"),
    (dict(x=torch.randn(4, 12, device="meta")), "argument 'x' must be on the device of 'weight'"),
    (dict(rows=torch.tensor([0, 1, 2], dtype=torch.int32)), "argument 'rows' must be an int64 tensor"),
    (dict(cols=torch.tensor([0, 1])), "argument 'cols' must have shape (3,)"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_errors(override, message):
    args = dict(x=torch.randn(4, 12), weight=torch.randn(10, 12), bias=torch.randn(10),
                C=torch.randn(10, 3), U=torch.randn(3, 3), R=torch.randn(3, 12), rows=None, cols=None)
    args.update(override)
    rows, cols = args.pop("rows"), args.pop("cols")
    with pytest.raises((ValueError, TypeError)) as info:
        fastcur.ops.cur_linear(*args.values(), rows=rows, cols=cols)
    assert message in str(info.value)
    assert "fastcur.cur_linear" in str(info.value)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_cpp_kernel_checks_direct_calls():
    """Calling the dispatcher op directly still gets a readable error, never a crash."""
    x, W, b, C, U, R = torch.randn(4, 12), torch.randn(10, 12), None, torch.randn(10, 3), torch.randn(3, 3), torch.randn(3, 12)
    with pytest.raises(RuntimeError, match=r"C must have shape \[10, 3\]"):
        torch.ops.fastcur.cur_linear(x, W, b, torch.randn(9, 3), U, R, 1.0, None, None)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.fastcur.cur_linear(x, W, b, C, U, R, 1.0, torch.tensor([0, 1, 10]), None)


def test_unknown_backend_and_unavailable_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        fastcur.set_backend("cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        with fastcur.use_backend("fast"):
            pass


# -- hostile inputs (issue 19) ------------------------------------------------------------------
def _f64(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=requires_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["strided", "expanded"])
def test_bias_as_strided_or_expanded_view(backend, view):
    """A 1-D argument is read by its strides: a strided view is not read as contiguous, an
    expanded one (stride 0) never past its one-element storage."""
    x, W, C, U, R = _f64(9, 12), _f64(10, 12), _f64(10, 3), _f64(3, 3), _f64(3, 12)
    base = _f64(20 if view == "strided" else 1, requires_grad=True)
    bias = base[::2] if view == "strided" else base.expand(10)
    check_as_given(run_backend(backend, None, None, 0.5), ref_fn(0.5), [x, W, bias, C, U, R],
                   wrt=[base], names=["bias"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,n", [(0, 6), (5, 0)], ids=["k=0", "n=0"])
def test_zero_size_k_or_n(backend, k, n):
    """k = 0: y = b (and U's gradient 0); n = 0: an empty [M, 0] output."""
    x, W, b = _f64(4, k, requires_grad=True), _f64(n, k), _f64(n, requires_grad=True)
    C, U, R = _f64(n, 2), _f64(2, 2, requires_grad=True), _f64(2, k)
    check_as_given(run_backend(backend, None, None, 0.5), ref_fn(0.5), [x, W, b, C, U, R],
                   wrt=[x, b, U], names=["x", "b", "U"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_tied_rows_split(backend):
    """M = 600 rows: the C++ gather of the tied path (256 rows per task) and the GEMMs split
    over the two test threads; C at rank 1 requires grad (C^T is then a view of C)."""
    assert torch.get_num_threads() == 2
    inputs, (rows, cols) = make_inputs((600,), 40, 48, 1, tied=True)
    check_against_reference(run_backend(backend, rows, cols, 0.75), ref_fn(0.75), inputs,
                            torch.float32, names="x W b C U R".split())


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_cpu(backend):
    """Under CPU autocast the op runs in bfloat16 (as F.linear would) on every backend; the
    Triton launchers keep their float32 side products (they used to mix dtypes in tl.dot)."""
    inputs, _ = make_inputs((5,), 16, 12, 3, tied=False, grads="U")
    f32 = [t.detach().float().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    with fastcur.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastcur.ops.cur_linear(*f32, 0.75)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert f32[4].grad is not None and f32[4].grad.dtype == torch.float32
    bf = [t.detach().bfloat16() for t in inputs]
    truth = reference.cur_linear(*[t.detach() for t in inputs], 0.75)
    assert_close_to_reference(y.detach(), reference.cur_linear(*bf, 0.75), truth)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_double_backward_is_refused_clearly(backend):
    """The fused backward has no derivative of its own: create_graph=True still gives the right
    first-order gradients, and differentiating them again raises (it was silently wrong on C++)."""
    x, W, b, C, R = _f64(5, 12, requires_grad=True), _f64(10, 12), _f64(10), _f64(10, 3), _f64(3, 12)
    U = _f64(3, 3, requires_grad=True)
    check_double_backward_refused(run_backend(backend, None, None, 0.5), ref_fn(0.5), [x, W, b, C, U, R],
                                  x, U, "cur_linear")


def test_double_backward_reference_backend():
    x, W, b, C, R = _f64(5, 12, requires_grad=True), _f64(10, 12), _f64(10), _f64(10, 3), _f64(3, 12)
    U = _f64(3, 3, requires_grad=True)
    with fastcur.use_backend("reference"):
        y = fastcur.ops.cur_linear(x, W, b, C, U, R, 0.5)
    gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert torch.autograd.grad(gx.square().sum(), U)[0].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_tensor(backend):
    """A tensor scale that requires grad would get no gradient: refused, naming 'scale'. One
    that does not is read as a number; a string is refused in one line."""
    x, W, b, C, U, R = torch.randn(4, 12), torch.randn(10, 12), None, torch.randn(10, 3), torch.randn(3, 3), torch.randn(3, 12)
    with fastcur.use_backend(backend):
        with pytest.raises(TypeError, match="fastcur.cur_linear: argument 'scale' is a tensor that requires grad"):
            fastcur.ops.cur_linear(x, W, b, C, U, R, torch.tensor(0.5, requires_grad=True))
        with pytest.raises(TypeError, match="fastcur.cur_linear: argument 'scale' must be a real number, got str"):
            fastcur.ops.cur_linear(x, W, b, C, U, R, "0.5")
        y = fastcur.ops.cur_linear(x, W, b, C, U, R, torch.tensor(0.5))
    torch.testing.assert_close(y, reference.cur_linear(x, W, b, C, U, R, 0.5), rtol=1e-5, atol=1e-5)
