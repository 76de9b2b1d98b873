"""secura_linear (the op) on every backend present: forward and every gradient against the
float64 reference, tied and explicit C/R, both norms and scopes, lora_bias, opcheck,
gradcheck, torch.compile, the documented properties, bad input. Module tests live in
tests/test_secura_linear_module.py."""
import pytest
import torch

import fastcur
from fastcur.ops import reference
from fastcur.testing import check_against_reference, check_as_given, check_double_backward_refused

from compile_check import assert_compiled_like_eager
from conftest import available_backends
from cpu_levels import cpu_levels
from cur_inputs import base_inputs, c_and_r

BACKENDS = available_backends("secura_linear")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (leading dims of x, k, n, r, a): odd sizes, r = 1, M = 1, 3-D inputs.
SHAPES = [((37,), 50, 45, 5, 20), ((1,), 16, 16, 1, 4), ((2, 3), 33, 70, 7, 9), ((24,), 40, 48, 4, 16)]
NAMES = "x W b C A_c B_c R lb".split()


def make_inputs(lead, k, n, r, a, *, tied, bias=True, lora_bias=True, grads="all", seed=0):
    g = torch.Generator().manual_seed(seed)
    W, rows, cols, x, b = base_inputs(g, lead, k, n, r, bias)
    A_c = torch.randn(a, r, generator=g, dtype=torch.float64) / r ** 0.5
    B_c = torch.randn(r, a, generator=g, dtype=torch.float64) / a ** 0.5
    lb = 0.1 * torch.randn(n, generator=g, dtype=torch.float64) if lora_bias else None
    C, R = c_and_r(g, W, rows, cols, tied=tied)
    wants = {"all": NAMES, "adapter": ["x", "A_c", "B_c"], "core": ["A_c", "B_c"]}[grads]
    inputs = [x, W, b, C, A_c, B_c, R, lb]
    for name, t in zip(NAMES, inputs):
        if t is not None and name in wants:
            t.requires_grad_(True)
    return inputs, ((rows, cols) if tied else (None, None))


def run_backend(backend, rows, cols, scale, norm="max", scope="token"):
    def fn(x, W, b, C, A_c, B_c, R, lb):
        with fastcur.use_backend(backend):
            return fastcur.ops.secura_linear(x, W, b, C, A_c, B_c, R, lb, scale, 6.0, 1e-10, norm, scope,
                                             rows=rows, cols=cols)
    return fn


def ref_fn(scale, norm="max", scope="token"):
    return lambda x, W, b, C, A_c, B_c, R, lb: reference.secura_linear(x, W, b, C, A_c, B_c, R, lb, scale, 6.0,
                                                                       1e-10, norm, scope)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "explicit"])
def test_matches_reference_all_grads(backend, dtype, shape, tied):
    inputs, (rows, cols) = make_inputs(*shape, tied=tied, seed=hash((shape, tied)) % 1000)
    check_against_reference(run_backend(backend, rows, cols, 0.75), ref_fn(0.75), inputs, dtype, names=NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm,scope", [("raw", "token"), ("max", "tensor"), ("raw", "tensor")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norms_and_scopes(backend, norm, scope, dtype):
    inputs, (rows, cols) = make_inputs((3, 11), 30, 26, 3, 12, tied=True, seed=7)
    check_against_reference(run_backend(backend, rows, cols, 1.5, norm, scope), ref_fn(1.5, norm, scope),
                            inputs, dtype, names=NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grads", ["adapter", "core"])
@pytest.mark.parametrize("bias", [True, False])
def test_adapter_only_grads(backend, grads, bias):
    """The training case: frozen W, b, C, R; only A_c, B_c (and maybe x) need gradients."""
    inputs, (rows, cols) = make_inputs((2, 19), 40, 24, 4, 16, tied=True, bias=bias, lora_bias=False,
                                       grads=grads)
    check_against_reference(run_backend(backend, rows, cols, 2.0), ref_fn(2.0), inputs, torch.float32,
                            names=NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_adapter_gives_base_output_exactly(backend):
    """B_c = 0 (init): Δ = 0, S = 2, y = x W^T + b exactly (as the backend's own base GEMM)."""
    inputs, (rows, cols) = make_inputs((9,), 20, 14, 3, 12, tied=True, lora_bias=False)
    x, W, b, C, A_c, B_c, R, _ = [t.detach().float() if t is not None else None for t in inputs]
    y = run_backend(backend, rows, cols, 1.0)(x, W, b, C, A_c, torch.zeros_like(B_c), R, None)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, W, b), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_scope_rows_independent(backend):
    inputs, (rows, cols) = make_inputs((10,), 24, 18, 2, 8, tied=True)
    x, W, b, C, A_c, B_c, R, lb = [t.detach().float() if t is not None else None for t in inputs]
    fn = run_backend(backend, rows, cols, 1.0)
    full = fn(x, W, b, C, A_c, B_c, R, lb)
    other = x.clone()
    other[1:] *= 7
    torch.testing.assert_close(fn(other, W, b, C, A_c, B_c, R, lb)[0], full[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fn(x[3:4], W, b, C, A_c, B_c, R, lb), full[3:4], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    inputs, (rows, cols) = make_inputs((0,), 12, 10, 3, 6, tied=True)
    y = run_backend(backend, rows, cols, 1.0)(*[t.float() if t is not None else None for t in inputs])
    assert y.shape == (0, 10)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "explicit"])
def test_gradcheck_float64(tied):
    """S is detached, so finite differences match only where S cannot move: norm="raw" with a
    huge eps keeps S = 1.5 to double precision (see tests/test_signorm.py)."""
    for backend in BACKENDS:
        inputs, (rows, cols) = make_inputs((3, 5), 7, 6, 2, 3, tied=tied)
        if tied:  # perturbing W or R would break the promise R == W[rows]
            inputs[1].requires_grad_(False)
            inputs[6].requires_grad_(False)

        def fn(x, W, b, C, A_c, B_c, R, lb):
            with fastcur.use_backend(backend):
                return fastcur.ops.secura_linear(x, W, b, C, A_c, B_c, R, lb, 0.5, 6.0, 1e30, "raw", "token",
                                                 rows=rows, cols=cols)
        assert torch.autograd.gradcheck(fn, inputs)


def _op_args(tied, norm="max", scope="token"):
    inputs, (rows, cols) = make_inputs((9,), 12, 10, 3, 5, tied=tied)
    x, W, b, C, A_c, B_c, R, lb = inputs
    return (x.detach().float().requires_grad_(), W.detach().float(), b.detach().float(), C.detach().float(),
            A_c.detach().float().requires_grad_(), B_c.detach().float().requires_grad_(), R.detach().float(),
            lb.detach().float().requires_grad_(), 1.5, 6.0, 1e-10, norm, scope, rows, cols)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "explicit"])
@pytest.mark.parametrize("scope", ["token", "tensor"])
def test_opcheck_cpp(tied, scope):
    torch.library.opcheck(torch.ops.fastcur.secura_linear.default, _op_args(tied, scope=scope))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton interpreter not available")
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "explicit"])
def test_opcheck_triton(tied):
    from fastcur.ops.secura_linear import _triton_op
    torch.library.opcheck(_triton_op(), _op_args(tied, "raw", "tensor"))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_torch_compile_fullgraph():
    inputs, (rows, cols) = make_inputs((4, 8), 16, 12, 3, 6, tied=True)
    x, W, b, C, A_c, B_c, R, lb = [t.detach().float() for t in inputs]
    B_c.requires_grad_()

    def step(x, B_c):
        return fastcur.ops.secura_linear(x, W, b, C, A_c, B_c, R, lb, 0.5, rows=rows, cols=cols).square().sum()

    assert_compiled_like_eager(step, (x, B_c), [B_c])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scope", ["token", "tensor"])
def test_cuda_matches_reference(backend, dtype, scope):
    inputs, (rows, cols) = make_inputs((3, 130), 200, 150, 16, 64, tied=True)
    check_against_reference(run_backend(backend, rows.cuda(), cols.cuda(), 0.75, "max", scope),
                            ref_fn(0.75, "max", scope), inputs, dtype, device="cuda", names=NAMES)


BAD = [
    (dict(x=torch.randn(4, 11)), "argument 'x' must have last dimension k = 12"),
    (dict(C=torch.randn(9, 3)), "argument 'C' must have shape (10, '*')"),
    (dict(R=torch.randn(3, 13)), "argument 'R' must have shape (3, 12)"),
    (dict(B_c=torch.randn(4, 5)), "argument 'B_c' must have shape (3, '*')"),
    (dict(A_c=torch.randn(5, 4)), "argument 'A_c' must have shape (5, 3)"),
    (dict(bias=torch.randn(11)), "argument 'bias' must have shape (10,)"),
    (dict(lora_bias=torch.randn(11)), "argument 'lora_bias' must have shape (10,)"),
    (dict(x=torch.randn(4, 12, dtype=torch.float64)), "argument 'x' must have the dtype of 'weight'"),
    (dict(weight=torch.randint(0, 3, (10, 12))), "argument 'weight' must be float32"),
    (dict(x=torch.randn(4, 12, device="meta")), "argument 'x' must be on the device of 'weight'"),
    (dict(norm="l2"), "argument 'norm' must be 'max' or 'raw'"),
    (dict(scope="row"), "argument 'scope' must be 'token' or 'tensor'"),
    (dict(scope=None), "argument 'scope' must be 'token' or 'tensor', got None"),
    (dict(norm=None), "argument 'norm' must be 'max' or 'raw', got None"),
    (dict(scale=torch.tensor(2.0, requires_grad=True)), "argument 'scale' is a tensor that requires grad"),
    (dict(scale="2"), "argument 'scale' must be a real number, got str"),
    (dict(rows=torch.tensor([0, 1, 2], dtype=torch.int32)), "argument 'rows' must be an int64 tensor"),
    (dict(cols=torch.tensor([0, 1])), "argument 'cols' must have shape (3,)"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_errors(override, message):
    args = dict(x=torch.randn(4, 12), weight=torch.randn(10, 12), bias=torch.randn(10), C=torch.randn(10, 3),
                A_c=torch.randn(5, 3), B_c=torch.randn(3, 5), R=torch.randn(3, 12), lora_bias=None, scale=1.0,
                k=6.0, eps=1e-10, norm="max", scope="token", rows=None, cols=None)
    args.update(override)
    with pytest.raises((ValueError, TypeError)) as info:
        fastcur.ops.secura_linear(**args)
    assert message in str(info.value) and "fastcur.secura_linear" in str(info.value)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_cpp_kernel_checks_direct_calls():
    x, W, C, A, B, R = (torch.randn(4, 12), torch.randn(10, 12), torch.randn(10, 3), torch.randn(5, 3),
                        torch.randn(3, 5), torch.randn(3, 12))
    with pytest.raises(RuntimeError, match=r"A_c must have shape \[5, 3\]"):
        torch.ops.fastcur.secura_linear(x, W, None, C, torch.randn(4, 3), B, R, None, 1.0, 6.0, 1e-10, "max",
                                        "token", None, None)
    with pytest.raises(RuntimeError, match="out of range|out of DATA bounds"):
        torch.ops.fastcur.secura_linear(x, W, None, C, A, B, R, None, 1.0, 6.0, 1e-10, "max", "token",
                                        torch.tensor([0, 1, 10]), None)


# -- hostile inputs (issue 19) ------------------------------------------------------------------
def _f64(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=requires_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["strided", "expanded"])
def test_bias_and_lora_bias_as_views(backend, view):
    """bias and lora_bias read by their strides (a strided view), never past their storage
    (an expanded one)."""
    x, W, C, A_c, B_c, R = _f64(9, 12), _f64(10, 12), _f64(10, 3), _f64(5, 3), _f64(3, 5), _f64(3, 12)
    size = 20 if view == "strided" else 1
    b0, lb0 = _f64(size, requires_grad=True), _f64(size, requires_grad=True)
    b, lb = (b0[::2], lb0[::2]) if view == "strided" else (b0.expand(10), lb0.expand(10))
    check_as_given(run_backend(backend, None, None, 0.5), ref_fn(0.5), [x, W, b, C, A_c, B_c, R, lb],
                   wrt=[b0, lb0], names=["bias", "lora_bias"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,n", [(0, 6), (5, 0)], ids=["k=0", "n=0"])
def test_zero_size_k_or_n(backend, k, n):
    x, W, b = _f64(4, k, requires_grad=True), _f64(n, k), _f64(n, requires_grad=True)
    C, A_c, B_c, R = _f64(n, 2), _f64(3, 2), _f64(2, 3, requires_grad=True), _f64(2, k)
    check_as_given(run_backend(backend, None, None, 0.5), ref_fn(0.5), [x, W, b, C, A_c, B_c, R, None],
                   wrt=[x, b, B_c], names=["x", "b", "B_c"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_base_output_above_half_range_at_init(backend):
    """At init (B_c = 0) the layer returns the base output exactly, also in float16 where 2 y0
    is past the format's range (65504): y0 = 40000 used to come back inf on the reference."""
    x = torch.ones(2, 4, dtype=torch.float16)
    W = torch.full((3, 4), 10000.0, dtype=torch.float16)
    C, A_c, R = torch.ones(3, 2, dtype=torch.float16), torch.ones(4, 2, dtype=torch.float16), torch.ones(2, 4, dtype=torch.float16)
    B_c = torch.zeros(2, 4, dtype=torch.float16)
    with fastcur.use_backend(backend):
        y = fastcur.ops.secura_linear(x, W, None, C, A_c, B_c, R)
    assert torch.equal(y, torch.full((2, 3), 40000.0, dtype=torch.float16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["token", "tensor"])
def test_two_threads_rank_one(backend, scope):
    """M = 512 rows at rank 1 with C requiring grad: the C++ SigNorm epilogue splits its row
    blocks (64 rows) over the two test threads, and C^T, a view of C, reached the workers' ATen
    calls with autograd on (`mm(): functions with out=...`)."""
    assert torch.get_num_threads() == 2
    inputs, _ = make_inputs((512,), 40, 48, 1, 4, tied=False)
    check_against_reference(run_backend(backend, None, None, 0.75, "max", scope), ref_fn(0.75, "max", scope),
                            inputs, torch.float32, names=NAMES)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_double_backward_is_refused_clearly(backend):
    inputs, _ = make_inputs((5,), 12, 10, 3, 4, tied=False, grads="adapter")
    check_double_backward_refused(run_backend(backend, None, None, 0.5), ref_fn(0.5), inputs, inputs[0],
                                  inputs[5], "secura_linear")


# -- the float32 fused epilogue (Δ's row formed on the fly, cpu::signorm_epilogue_f32) ------------
# (leading dims, k, n, r, a): M = 1, n off every vector width, r past the inline limit (32: then
# Δ's row block is one GEMM), M = 300 rows that split over the two test threads.
FUSED_SHAPES = [((1,), 9, 1, 1, 2), ((1,), 20, 17, 3, 5), ((4, 5), 23, 33, 5, 7), ((300,), 18, 47, 4, 9),
                ((70,), 50, 41, 40, 6)]


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("cpu_level", cpu_levels(), indirect=True)
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=str)
@pytest.mark.parametrize("norm,scope", [("max", "token"), ("raw", "token"), ("max", "tensor"), ("raw", "tensor")])
def test_float32_fused_epilogue_every_level(cpu_level, shape, norm, scope):
    for tied, bias, lora_bias in [(True, True, True), (False, False, False), (True, False, True)]:
        inputs, (rows, cols) = make_inputs(*shape, tied=tied, bias=bias, lora_bias=lora_bias,
                                           seed=sum(shape[1:]) + tied)
        check_against_reference(run_backend("cpp", rows, cols, 0.75, norm, scope), ref_fn(0.75, norm, scope),
                                inputs, torch.float32, names=NAMES)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("broken", ["rows", "cols", "both"])
def test_cpp_kernel_checks_the_tied_indices(dtype, broken):
    """rows / cols that do not index C and R in W: the C++ CPU kernel checks R == W[rows] and
    C == W[:, cols] itself and runs the explicit path, so the result is still the layer's."""
    inputs, (rows, cols) = make_inputs((2, 13), 30, 26, 3, 12, tied=True, seed=11)
    if broken in ("rows", "both"):
        inputs[6] = (inputs[6].detach() + 1e-3).requires_grad_()     # R no longer W[rows]
    if broken in ("cols", "both"):
        C = inputs[3].detach().clone()
        C[5, 1] += 1e-3                                                # one entry of C off
        inputs[3] = C.requires_grad_()
    check_against_reference(run_backend("cpp", rows, cols, 1.5), ref_fn(1.5), inputs, dtype, names=NAMES)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_cpp_kernel_refuses_out_of_range_cols():
    x, W, C, A, B, R = (torch.randn(4, 12), torch.randn(10, 12), torch.randn(10, 3), torch.randn(5, 3),
                        torch.randn(3, 5), torch.randn(3, 12))
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.fastcur.secura_linear(x, W, None, C, A, B, R, None, 1.0, 6.0, 1e-10, "max", "token",
                                        None, torch.tensor([0, 1, 12]))
