"""jump_linear on every backend present: forward and every gradient against the float64
reference, the straight-through gradients against docs/methods.md, JumpLoRA's formulas, f = 0 and f = 1,
opcheck, gradcheck, torch.compile, odd shapes, bad input."""
import pytest
import torch

import fastcur
from fastcur.ops import reference
from fastcur.testing import check_against_reference

from compile_check import assert_compiled_like_eager
from conftest import available_backends
from cpu_levels import cpu_levels
from jump_inputs import jump_inputs, reset_inputs, theta_as_op_takes, theta_off_the_half_grid

BACKENDS = available_backends("jump_linear")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (leading dims of x, k, n, r): odd sizes, r = 1, M = 1, 3-D inputs.
SHAPES = [((37,), 50, 45, 5), ((1,), 16, 16, 1), ((2, 3), 33, 70, 7), ((64,), 96, 80, 16)]
NAMES = "x W b A B log_theta".split()


def run_backend(backend, scale, f, bw, reduction="mean"):
    @theta_as_op_takes
    def fn(x, W, b, A, B, lt):
        with fastcur.use_backend(backend):
            return fastcur.ops.jump_linear(x, W, b, A, B, lt, scale, f, bw, reduction)
    return fn


def ref_fn(scale, f, bw, reduction="mean"):
    return theta_as_op_takes(
        lambda x, W, b, A, B, lt: reference.jump_linear(x, W, b, A, B, lt, scale, f, bw, reduction))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_all_grads(backend, dtype, shape):
    # Half precisions: θ in a gap of |Z| (no dtype can flip a gate) and an empty kernel window;
    # float32/64: θ at the median with a wide window, so the θ gradient is exercised.
    lowp = dtype in (torch.bfloat16, torch.float16)
    inputs, bw, _ = jump_inputs(*shape, gap=lowp, seed=sum(shape[1:]))
    check_against_reference(run_backend(backend, 1.5, 0.6, bw), ref_fn(1.5, 0.6, bw), inputs, dtype,
                            names=NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("f", [1.0, 0.35])
def test_straight_through_gradients_match_spec_formulas(backend, reduction, f):
    """dA, dB, d log_theta written out from docs/methods.md, JumpLoRA (not through the reference's autograd),
    on inputs where many |Z| fall inside the kernel window."""
    (x, W, b, A, B, lt), bw, _ = jump_inputs((29,), 40, 36, 4, gap=False, seed=3, grads="params")
    s = 2.0
    y = run_backend(backend, s, f, bw, reduction)(x, W, b, A, B, lt)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dA, dB, dlt = torch.autograd.grad(y, [A, B, lt], dy)

    Z, theta = (B @ A).detach(), lt.detach().exp()
    G = s * dy.T @ x                                    # dL/dZ_eff
    on = (Z.abs() > theta).double()
    dZ = G * (f * on + (1 - f))
    K = lambda u: (u.abs() < 0.5).double()
    window = -K((Z - theta) / bw) + K((-Z - theta) / bw)
    assert (window != 0).sum() > 20                     # the test exercises the window
    red = (G * window).mean() if reduction == "mean" else (G * window).sum()
    dtheta = f * (theta / bw) * red
    torch.testing.assert_close(dA, B.detach().T @ dZ, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dB, dZ @ A.detach().T, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dlt, theta * dtheta, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_gate_at_the_float32_theta(backend, dtype):
    """Half x, W, A, B and a float32 log θ the half dtype cannot hold: with x = I, W = 0 and
    f = 1 the layer returns s J(Z)^T, nonzero exactly where |Z| > the float32 θ (Z of the half
    A, B; θ 2 unit roundoffs of the half dtype away from every |Z|, the reference's half-rounded
    Z included), although the θ rounded to the half dtype gates at least one entry otherwise.
    The gradient of log θ comes back in float32."""
    k, n = 40, 36
    (_, _, _, A, B, _), _, _ = jump_inputs((1,), k, n, 4, gap=False, seed=11, grads="params")
    # |Z| about 0.01 (θ's init e^-4.7): log θ in [-8, -4), where the half grids are coarsest
    Ah, Bh = A.detach().to(dtype), (0.05 * B.detach()).to(dtype)
    Z = Bh.double() @ Ah.double()
    lt64, _, flips = theta_off_the_half_grid([Z.abs(), (Bh @ Ah).double().abs()], dtype)
    lt = lt64.float().requires_grad_()
    with fastcur.use_backend(backend):
        y = fastcur.ops.jump_linear(torch.eye(k, dtype=dtype), torch.zeros(n, k, dtype=dtype), None,
                                    Ah, Bh, lt, 2.0, 1.0, 1e-3)
    on = Z.abs() > lt64.exp()
    assert flips >= 1 and not torch.equal(on, Z.abs() > lt.detach().to(dtype).double().exp())
    assert torch.equal(y.T != 0, on)
    dlt, = torch.autograd.grad(y.float().sum(), lt)
    assert dlt.dtype == torch.float32 and dlt.shape == ()


@pytest.mark.parametrize("backend", BACKENDS)
def test_f0_is_plain_lora(backend):
    (x, W, b, A, B, lt), bw, _ = jump_inputs((2, 11), 24, 20, 3, gap=False, seed=5)
    y = run_backend(backend, 4.0, 0.0, bw)(x, W, b, A, B, lt)
    want = x @ W.T + b + 4.0 * (x @ A.T) @ B.T
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    (dlt,) = torch.autograd.grad(y.sum(), [lt])
    assert dlt.item() == 0.0                            # f = 0: θ has no effect


@pytest.mark.parametrize("backend", BACKENDS)
def test_f1_is_exactly_sparse(backend):
    """With x = I the layer returns (W + ΔW)^T: ΔW is exactly 0 wherever |Z| <= θ."""
    (_, W, _, A, B, lt), bw, _ = jump_inputs((1,), 30, 26, 4, gap=True, seed=7)
    k = W.shape[1]
    with torch.no_grad():
        y = run_backend(backend, 2.0, 1.0, bw)(torch.eye(k, dtype=torch.float64), W, None, A, B, lt)
    dW = y.T - W
    Z = B.detach() @ A.detach()
    off = Z.abs() <= lt.exp()
    assert off.any() and (~off).any()
    assert torch.equal(dW[off], torch.zeros_like(dW[off]))
    torch.testing.assert_close(dW[~off], 2.0 * Z[~off], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grads", ["adapter", "params"])
@pytest.mark.parametrize("bias", [True, False])
def test_adapter_only_grads(backend, grads, bias):
    """The training case: frozen W, b; x may or may not need a gradient."""
    inputs, bw, _ = jump_inputs((2, 19), 40, 24, 4, gap=False, bias=bias, grads=grads, seed=9)
    check_against_reference(run_backend(backend, 2.0, 0.5, bw), ref_fn(2.0, 0.5, bw), inputs,
                            torch.float32, names=NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_x_only_grad(backend):
    """A frozen adapter: only x needs a gradient (the adapter contraction is skipped)."""
    inputs, bw, _ = jump_inputs((7,), 20, 18, 3, gap=True, seed=2, grads="params")
    for t in inputs[3:]:
        t.requires_grad_(False)
    inputs[0].requires_grad_(True)
    check_against_reference(run_backend(backend, 2.0, 0.5, bw), ref_fn(2.0, 0.5, bw), inputs,
                            torch.float64, names=NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("wants", ["x", "W", "b", "A", "B", "log_theta", "x b B", "W A log_theta"])
def test_each_subset_of_gradients(backend, bias, wants):
    """Any subset of the inputs needing a gradient, with and without a bias: the eager C++
    autograd node (csrc/jump_linear_eager.cpp) maps its gradients to inputs by position, and
    the bias shifts the tensor inputs after it."""
    if "b" in wants.split() and not bias:
        pytest.skip("no bias to differentiate")
    inputs, bw, _ = jump_inputs((6,), 19, 17, 3, gap=False, seed=5, bias=bias)
    for name, t in zip(NAMES, inputs):
        if t is not None:
            t.requires_grad_(name in wants.split())
    check_against_reference(run_backend(backend, 1.5, 0.5, bw), ref_fn(1.5, 0.5, bw), inputs,
                            torch.float64, names=NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    (x, W, b, A, B, lt), bw, _ = jump_inputs((0,), 12, 10, 3, gap=True)
    y = run_backend(backend, 1.0, 1.0, bw)(x.float(), W.float(), b.float(), A.float(), B.float(), lt.float())
    assert y.shape == (0, 10)


def test_gradcheck_float64():
    """θ in a gap of |Z| (finite differences never cross the gate); log_theta's gradient is a
    straight-through estimate, not a derivative, so it is checked against the formula above instead."""
    for backend in BACKENDS:
        inputs, bw, _ = jump_inputs((3, 5), 7, 6, 2, gap=True, seed=4)
        inputs[5].requires_grad_(False)
        assert torch.autograd.gradcheck(run_backend(backend, 0.5, 0.7, bw), inputs)


def _op_args():
    (x, W, b, A, B, lt), bw, _ = jump_inputs((9,), 12, 10, 3, gap=True, seed=1)
    return (x.float().requires_grad_(), W.float(), b.float(), A.float().requires_grad_(),
            B.float().requires_grad_(), lt.float().requires_grad_(), 1.5, 0.5, bw, True)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_opcheck_cpp():
    torch.library.opcheck(torch.ops.fastcur.jump_linear.default, _op_args())


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton interpreter not available")
def test_opcheck_triton():
    from fastcur.ops.jump_linear import _triton_op
    torch.library.opcheck(_triton_op(), _op_args())


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_torch_compile_fullgraph():
    x, W, b, A, B, lt, *_ = _op_args()

    def step(x, A, B, lt):
        return fastcur.ops.jump_linear(x, W, b, A, B, lt, 1.5, 0.5).square().sum()

    assert_compiled_like_eager(step, (x, A, B, lt), [A, B, lt], same_loss=True)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_reference(backend, dtype):
    inputs, bw, _ = jump_inputs((3, 130), 200, 150, 16, gap=True)
    check_against_reference(run_backend(backend, 1.5, 0.6, bw), ref_fn(1.5, 0.6, bw), inputs, dtype,
                            device="cuda", names=NAMES)


BAD = [
    (dict(x=torch.randn(4, 11)), "argument 'x' must have last dimension k = 12"),
    (dict(A=torch.randn(3, 13)), "argument 'A' must have shape ('*', 12)"),
    (dict(B=torch.randn(10, 4)), "argument 'B' must have shape (10, 3)"),
    (dict(log_theta=torch.zeros(2)), "argument 'log_theta' must be a scalar tensor"),
    (dict(bias=torch.randn(11)), "argument 'bias' must have shape (10,)"),
    (dict(x=torch.randn(4, 12, dtype=torch.float64)), "argument 'x' must have the dtype of 'weight'"),
    (dict(log_theta=torch.zeros((), dtype=torch.float64)),
     "argument 'log_theta' must be torch.float32 next to a torch.float32 'weight'"),
    (dict(x=torch.randn(4, 12).bfloat16(), weight=torch.randn(10, 12).bfloat16(), bias=None,
          A=torch.randn(3, 12).bfloat16(), B=torch.randn(10, 3).bfloat16(),
          log_theta=torch.zeros((), dtype=torch.bfloat16)),
     "argument 'log_theta' must be torch.float32 next to a torch.bfloat16 'weight'"),
    (dict(log_theta=torch.zeros((), dtype=torch.float32, device="meta")),
     "argument 'log_theta' must be on the device of 'weight'"),
    (dict(weight=torch.randint(0, 3, (10, 12))), "argument 'weight' must be float32"),
    (dict(x=torch.randn(4, 12, device="meta")), "argument 'x' must be on the device of 'weight'"),
    (dict(f=1.5), "argument 'f' must be a float in [0, 1]"),
    (dict(bandwidth=0.0), "argument 'bandwidth' must be a float > 0"),
    (dict(reduction="max"), "argument 'reduction' must be 'mean' or 'sum'"),
    (dict(reduction=None), "argument 'reduction' must be 'mean' or 'sum', got None"),
    (dict(f=None), "argument 'f' must be a float in [0, 1], got None"),
    (dict(scale=torch.tensor(2.0, requires_grad=True)), "argument 'scale' is a tensor that requires grad"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_errors(override, message):
    args = dict(x=torch.randn(4, 12), weight=torch.randn(10, 12), bias=torch.randn(10),
                A=torch.randn(3, 12), B=torch.randn(10, 3), log_theta=torch.zeros(()), scale=2.0,
                f=1.0, bandwidth=1e-3, reduction="mean")
    args.update(override)
    with pytest.raises((ValueError, TypeError)) as info:
        fastcur.ops.jump_linear(**args)
    assert message in str(info.value)
    assert "fastcur.jump_linear" in str(info.value)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_cpp_kernel_checks_direct_calls():
    """Calling the dispatcher op directly still gets a readable error, never a crash."""
    x, W, A, lt = torch.randn(4, 12), torch.randn(10, 12), torch.randn(3, 12), torch.zeros(())
    with pytest.raises(RuntimeError, match=r"B must have shape \[10, 3\]"):
        torch.ops.fastcur.jump_linear(x, W, None, A, torch.randn(9, 3), lt, 1.0, 1.0, 1e-3, True)
    with pytest.raises(RuntimeError, match="log_theta must be a scalar"):
        torch.ops.fastcur.jump_linear(x, W, None, A, torch.randn(10, 3), torch.zeros(3), 1.0, 1.0, 1e-3, True)
    h = lambda t: t.bfloat16()  # noqa: E731
    with pytest.raises(RuntimeError, match="log_theta must be Float for a BFloat16 weight"):
        torch.ops.fastcur.jump_linear(h(x), h(W), None, h(A), h(torch.randn(10, 3)), h(lt), 1.0, 1.0, 1e-3, True)
    with pytest.raises(RuntimeError, match="log_theta must be Float for a BFloat16 W_past"):
        torch.ops.fastcur.ella_penalty(h(A), h(torch.randn(10, 3)), h(lt), h(W), 1.0, 1.0)


# -- jump_linear_ella: the layer and ELLA's penalty in one pass ---------------------------------
def _w_past(n, k, seed):
    # bf16-exact, so every dtype sees the same W_past
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            .to(torch.bfloat16).double())


def run_ella(backend, scale, f, bw, W_past, ella_delta="interpolated"):
    @theta_as_op_takes
    def fn(x, W, b, A, B, lt):
        with fastcur.use_backend(backend):
            y, p = fastcur.ops.jump_linear_ella(x, W, b, A, B, lt, scale, W_past.to(W.dtype), f, bw,
                                                ella_delta=ella_delta)
        return torch.cat([y.flatten(), 3.0 * p.reshape(1)])   # one output: grads through both
    return fn


def ref_ella(scale, f, bw, W_past, ella_delta="interpolated"):
    @theta_as_op_takes
    def fn(x, W, b, A, B, lt):
        y, p = reference.jump_linear_ella(x, W, b, A, B, lt, scale, W_past.to(W.dtype), f, bw,
                                          ella_delta=ella_delta)
        return torch.cat([y.flatten(), 3.0 * p.reshape(1)])
    return fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
@pytest.mark.parametrize("ella_delta", ["interpolated", "masked"])
def test_ella_fused_matches_reference_all_grads(backend, dtype, shape, ella_delta):
    lowp = dtype in (torch.bfloat16, torch.float16)
    inputs, bw, _ = jump_inputs(*shape, gap=lowp, seed=sum(shape[1:]) + 1)
    Wp = _w_past(shape[2], shape[1], seed=len(shape[0]))
    check_against_reference(run_ella(backend, 1.5, 0.6, bw, Wp, ella_delta),
                            ref_ella(1.5, 0.6, bw, Wp, ella_delta), inputs, dtype, names=NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ella_delta", ["interpolated", "masked"])
def test_ella_fused_equals_the_two_separate_ops(backend, ella_delta):
    """(y, p) and the gradients of y·dy + c p equal jump_linear and ella_penalty run apart."""
    (x, W, b, A, B, lt), bw, _ = jump_inputs((13,), 30, 26, 4, gap=False, seed=7)
    Wp = _w_past(26, 30, seed=2)
    dy = torch.randn(13, 26, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with fastcur.use_backend(backend):
        y, p = fastcur.ops.jump_linear_ella(x, W, b, A, B, lt, 2.0, Wp, 0.7, bw, ella_delta=ella_delta)
        fused = torch.autograd.grad((y * dy).sum() + 0.37 * p, [x, A, B, lt])
        y2 = fastcur.ops.jump_linear(x, W, b, A, B, lt, 2.0, 0.7, bw)
        p2 = fastcur.ops.ella_penalty(A, B, lt, Wp, 2.0, 0.7, ella_delta)
        apart = torch.autograd.grad((y2 * dy).sum() + 0.37 * p2, [x, A, B, lt])
    assert p.item() > 0
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p, p2, rtol=1e-12, atol=1e-12)
    for a, e in zip(fused, apart):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_ella_fused_opcheck_and_gradcheck():
    (x, W, b, A, B, lt), bw, _ = jump_inputs((5,), 9, 8, 2, gap=True, seed=4)
    Wp = _w_past(8, 9, seed=1)
    args = (x.float().requires_grad_(), W.float(), b.float(), A.float().requires_grad_(),
            B.float().requires_grad_(), lt.float().requires_grad_(), 1.5, Wp.float(), 0.5, bw, True, 0.5)
    torch.library.opcheck(torch.ops.fastcur.jump_linear_ella.default, args)
    lt.requires_grad_(False)   # straight-through, not a derivative (checked against the formula above)
    assert torch.autograd.gradcheck(run_ella("cpp", 0.5, 0.7, bw, Wp), (x, W, b, A, B, lt))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton interpreter not available")
def test_ella_fused_opcheck_triton():
    from fastcur.ops.jump_linear import _triton_ella_op
    (x, W, b, A, B, lt), bw, _ = jump_inputs((5,), 9, 8, 2, gap=True, seed=4)
    args = (x.float().requires_grad_(), W.float(), b.float(), A.float().requires_grad_(),
            B.float().requires_grad_(), lt.float().requires_grad_(), 1.5, _w_past(8, 9, 1).float(),
            0.5, bw, True, 0.5)
    torch.library.opcheck(_triton_ella_op(), args)


def test_ella_fused_bad_input():
    (x, W, b, A, B, lt), bw, _ = jump_inputs((5,), 9, 8, 2, gap=True, seed=4)
    with pytest.raises(ValueError, match=r"jump_linear_ella: argument 'W_past' must have shape \(8, 9\)"):
        fastcur.ops.jump_linear_ella(x, W, b, A, B, lt, 1.0, torch.zeros(9, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="W_past' must have the dtype of 'weight'"):
        fastcur.ops.jump_linear_ella(x, W, b, A, B, lt, 1.0, torch.zeros(8, 9))


# -- hostile inputs (issue 19) ------------------------------------------------------------------
def _f64(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=requires_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,n", [(0, 6), (5, 0)], ids=["k=0", "n=0"])
def test_zero_size_k_or_n(backend, k, n):
    """k = 0: y = b; n = 0: an empty output; gradients as the reference's (zeros, empty)."""
    from fastcur.testing import check_as_given
    x, W, b = _f64(4, k, requires_grad=True), _f64(n, k), _f64(n, requires_grad=True)
    A, B = _f64(2, k, requires_grad=True), _f64(n, 2, requires_grad=True)
    lt = torch.tensor(-3.0, dtype=torch.float64)
    check_as_given(run_backend(backend, 0.5, 0.5, 1e-3), ref_fn(0.5, 0.5, 1e-3), [x, W, b, A, B, lt],
                   wrt=[x, b, B], names=["x", "b", "B"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_row_blocks_split(backend):
    """n = 512 rows of W at k = 512: several blocks of W's rows, split over the two test threads
    in the C++ forward and backward."""
    assert torch.get_num_threads() == 2
    inputs, bw, _ = jump_inputs((6,), 512, 512, 2, gap=False, grads="params")
    check_against_reference(run_backend(backend, 1.5, 0.6, bw), ref_fn(1.5, 0.6, bw), inputs, torch.float64,
                            names=NAMES)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_double_backward_is_refused_clearly(backend):
    """First-order gradients under create_graph=True are right; a gradient of them raises (the
    C++ backend returned a silently wrong second derivative: 5,223,236 against 2,758,464)."""
    from fastcur.testing import check_double_backward_refused
    x, W, b = _f64(5, 12, requires_grad=True), _f64(10, 12), _f64(10)
    A, B = _f64(3, 12, requires_grad=True), _f64(10, 3, requires_grad=True)
    lt = torch.tensor(-3.0, dtype=torch.float64)
    check_double_backward_refused(run_backend(backend, 0.5, 1.0, 1e-3), ref_fn(0.5, 1.0, 1e-3), [x, W, b, A, B, lt],
                                  x, A, "jump_linear")


def test_double_backward_reference_backend():
    x, W, b = _f64(5, 12, requires_grad=True), _f64(10, 12), _f64(10)
    A, B = _f64(3, 12, requires_grad=True), _f64(10, 3, requires_grad=True)
    with fastcur.use_backend("reference"):
        y = fastcur.ops.jump_linear(x, W, b, A, B, torch.tensor(-3.0, dtype=torch.float64), 0.5)
    gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert torch.autograd.grad(gx.square().sum(), A)[0].abs().sum() > 0


# -- the C++ backward's sampled path (csrc/cpu/jump_linear.cpp, jump_linear_bwd_sampled) -------
# After the threshold reset the mask keeps about r (n + k) of the n k entries: the C++ backward
# then computes G = s dy^T x only at kept entries and inside the θ kernel's window (a sampled
# product), the (1 - f) G part the LoRA way, and each block of W's rows with too many such
# entries runs the dense G tile. FASTCUR_JUMP_BWD forces one side (auto | sparse | dense).
CPP = pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
# (lead, k, n, r): M = 1; sizes that are no multiple of any vector width; n split over the two
# test threads (one block each), and k = 600, n = 1000 (several blocks per thread).
SAMPLED_SHAPES = [((37,), 50, 45, 5), ((1,), 40, 33, 3), ((2, 3), 33, 70, 7), ((300,), 257, 131, 8)]


def _grads(monkeypatch, mode, inputs, f, bw, dtype=torch.float32, scale=1.5):
    monkeypatch.setenv("FASTCUR_JUMP_BWD", mode)
    leaves = [t.detach().to(dtype).requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    y = run_backend("cpp", scale, f, bw)(*leaves)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    wants = [t for t in leaves if t is not None and t.requires_grad]
    return torch.autograd.grad(y, wants, dy)


@CPP
@pytest.mark.parametrize("mode", ["auto", "sparse", "dense"])
@pytest.mark.parametrize("f", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SAMPLED_SHAPES, ids=str)
def test_sampled_backward_matches_reference(monkeypatch, mode, f, dtype, shape):
    """Forward and every gradient (x, W, b, A, B, log_theta) against the float64 reference, on
    post-reset inputs with entries inside the θ kernel's window, on each side of the choice."""
    monkeypatch.setenv("FASTCUR_JUMP_BWD", mode)
    inputs, bw, counts = reset_inputs(*shape, seed=sum(shape[1:]))
    assert counts["kept"] > 0 and counts["band"] > 0
    check_against_reference(run_backend("cpp", 1.5, f, bw), ref_fn(1.5, f, bw), inputs, dtype, names=NAMES)


@CPP
@pytest.mark.parametrize("cpu_level", cpu_levels(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SAMPLED_SHAPES, ids=str)
def test_sampled_backward_each_level(monkeypatch, cpu_level, dtype, shape):
    """The hand-written pieces of the sampled backward (the candidate scan, the sampled product,
    W + ΔW, the dy^T and x^T transposes: M and k of no multiple of 8 reach its tails) at each
    x86-64 level this CPU runs, against the float64 reference. Other inputs at each level: the
    kernels' scratch buffers persist, so a piece that skipped an entry could otherwise read the
    previous level's right value."""
    monkeypatch.setenv("FASTCUR_JUMP_BWD", "sparse")
    inputs, bw, counts = reset_inputs(*shape, seed=sum(shape[1:]) + cpu_levels().index(cpu_level))
    assert counts["kept"] > 0 and counts["band"] > 0
    check_against_reference(run_backend("cpp", 1.5, 0.3, bw), ref_fn(1.5, 0.3, bw), inputs, dtype, names=NAMES)


@CPP
@pytest.mark.parametrize("mode", ["auto", "sparse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sampled_backward_several_blocks_per_thread(monkeypatch, mode, reduction):
    """n = 1000 at k = 600: three blocks of W's rows over the two test threads."""
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("FASTCUR_JUMP_BWD", mode)
    inputs, bw, counts = reset_inputs((40,), 600, 1000, 4, seed=3, grads="adapter")
    assert counts["band"] > 100
    check_against_reference(run_backend("cpp", 2.0, 0.6, bw, reduction), ref_fn(2.0, 0.6, bw, reduction),
                            inputs, torch.float32, names=NAMES)


@CPP
@pytest.mark.parametrize("f", [0.3, 1.0])
def test_sampled_and_dense_blocks_in_one_call(monkeypatch, f):
    """B's first rows 20x larger: the first thread's block keeps most of its entries (dense
    tile), the second almost none (sampled); both in one call, against the reference."""
    monkeypatch.setenv("FASTCUR_JUMP_BWD", "auto")
    n = 90
    scale_rows = [20.0] * (n // 2) + [1.0] * (n - n // 2)
    inputs, bw, _ = reset_inputs((50,), 64, n, 4, seed=2, keep=0.3, row_scale=scale_rows)
    Z = (inputs[4] @ inputs[3]).detach().abs()
    theta = inputs[5].detach().exp()
    assert (Z[: n // 2] > theta).double().mean() > 0.5 and (Z[n // 2:] > theta).double().mean() < 0.05
    check_against_reference(run_backend("cpp", 1.5, f, bw), ref_fn(1.5, f, bw), inputs, torch.float32,
                            names=NAMES)
    dense = _grads(monkeypatch, "dense", inputs, f, bw)
    auto = _grads(monkeypatch, "auto", inputs, f, bw)
    sparse = _grads(monkeypatch, "sparse", inputs, f, bw)
    if f < 1.0:   # (at f = 1 a block without kept entries adds exact zeros either way)
        assert any(not torch.equal(a, d) for a, d in zip(auto, dense))    # not all dense
    assert any(not torch.equal(a, s) for a, s in zip(auto, sparse))   # not all sampled


@CPP
def test_auto_choice_follows_the_mask_density(monkeypatch):
    """The automatic choice, seen through the gradients' bits: on post-reset inputs (about 10 %
    kept) exactly the forced-sampled ones, at θ = the median of |Z| (half kept) not those (the
    dense tiles ran; in auto mode they leave the (1 - f) part to the LoRA-way products, so they
    are not the forced-dense bits either)."""
    sparse_inputs, bw, _ = reset_inputs((300,), 257, 131, 8, seed=1)
    auto = _grads(monkeypatch, "auto", sparse_inputs, 0.3, bw)
    assert all(torch.equal(a, b) for a, b in zip(auto, _grads(monkeypatch, "sparse", sparse_inputs, 0.3, bw)))
    assert not all(torch.equal(a, b) for a, b in zip(auto, _grads(monkeypatch, "dense", sparse_inputs, 0.3, bw)))
    dense_inputs, bw, _ = jump_inputs((300,), 257, 131, 8, gap=False, seed=1)
    auto = _grads(monkeypatch, "auto", dense_inputs, 0.3, bw)
    assert not all(torch.equal(a, b) for a, b in zip(auto, _grads(monkeypatch, "sparse", dense_inputs, 0.3, bw)))


@CPP
@pytest.mark.parametrize("mode", ["auto", "sparse", "dense"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sampled_backward_half_precision(monkeypatch, mode, dtype):
    """Half inputs: θ in a gap of |Z| above its 90th percentile (sparse mask, no dtype flips a
    gate); the sampled product and the LoRA-way part accumulate in float32."""
    monkeypatch.setenv("FASTCUR_JUMP_BWD", mode)
    inputs, bw, _ = jump_inputs((3, 70), 90, 77, 6, gap=True, seed=4, lo=0.9)
    check_against_reference(run_backend("cpp", 1.5, 0.6, bw), ref_fn(1.5, 0.6, bw), inputs, dtype, names=NAMES)


@CPP
def test_bad_backward_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTCUR_JUMP_BWD", "fast")
    (x, W, b, A, B, lt), bw, _ = jump_inputs((5,), 9, 8, 2, gap=True, seed=4)
    y = run_backend("cpp", 1.0, 0.5, bw)(x, W, b, A, B, lt)
    with pytest.raises(RuntimeError, match="FASTCUR_JUMP_BWD must be auto, sparse or dense"):
        y.sum().backward()
