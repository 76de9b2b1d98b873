"""LaLoRA ops on every backend present: lora_fisher_diag, laplace_diag_penalty (+ the in-place
multi-tensor gradient), kfac_factor, kfac_penalty. Against the float64 reference, against
independent formulas (torch.func per-example gradients, explicit outer products, the explicit
Kronecker quadratic form), opcheck, gradcheck, odd shapes, bad input."""
import pytest
import torch
from torch.func import grad, vmap

import fastcur
from fastcur.ops import reference
from fastcur.testing import assert_close_to_reference, check_against_reference

from conftest import available_backends

BACKENDS = available_backends("lora_fisher_diag")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (E, T, k, n, r): odd sizes, r = 1, T = 1, E = 1; the last three reach every tile and tail of
# the CPU row kernels:
#   rows_dot: T = 11 rows (8 + 2 + 1), r = 13 channels (8 + 4 + 1);
#   narrow_rows / narrow_pass: r = 32 (two vector groups in float32, four in float64), T = 37
#   (16-row tiles, 8-row tiles, or 6- and 2-row ones without AVX-512, then single rows);
#   the column strips: r = 21 (16 + 4 + 1) and 13 (8 + 4 + 1);
#   k, n past whole vectors.
FISHER_SHAPES = [(3, 5, 13, 11, 3), (1, 1, 16, 16, 1), (4, 2, 33, 20, 7), (2, 37, 9, 5, 2),
                 (3, 11, 40, 37, 13), (2, 37, 35, 41, 32), (2, 19, 20, 18, 21)]


def rand(*shape, gen, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def fisher_inputs(E, T, k, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return rand(E, T, k, gen=g), rand(E, T, n, gen=g), rand(r, k, gen=g, scale=k ** -0.5), rand(n, r, gen=g)


def flat_fisher(backend, scale):
    def fn(x, go, A, B):
        with fastcur.use_backend(backend):
            FA, FB = fastcur.ops.lora_fisher_diag(x, go, A, B, scale)
        return torch.cat([FA.flatten(), FB.flatten()])
    return fn


def flat_fisher_ref(scale):
    return lambda x, go, A, B: torch.cat([t.flatten() for t in reference.lora_fisher_diag(x, go, A, B, scale)])


# -- lora_fisher_diag ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FISHER_SHAPES, ids=str)
def test_fisher_matches_reference(backend, dtype, shape):
    inputs = fisher_inputs(*shape, seed=sum(shape))
    with torch.no_grad():
        check_against_reference(flat_fisher(backend, 0.5), flat_fisher_ref(0.5), inputs, dtype)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # not under the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("r", [16, 13])
def test_fisher_examples_in_row_blocks(backend, dtype, r):
    """Examples bigger than one of the CPU schedule's row blocks (512 KB of x and grad_out rows:
    128 + 22 rows in float32, 64 + 64 + 22 in float64), whose gradients are summed over the
    blocks before squaring; on and off the narrow path."""
    inputs = fisher_inputs(2, 150, 520, 490, r, seed=7)
    with torch.no_grad():
        check_against_reference(flat_fisher(backend, 0.5), flat_fisher_ref(0.5), inputs, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fisher_equals_torch_func_per_example_gradients(backend):
    """Independent ground truth: vmap over grad of each example's own loss term."""
    x, go, A, B = fisher_inputs(4, 6, 10, 7, 3, seed=5)
    s = 1.7

    def example_loss(A, B, xe, ge):  # <G_e, s (X_e A^T) B^T>: its gradient is g_A,e, g_B,e
        return (ge * (s * (xe @ A.mT) @ B.mT)).sum()

    gA, gB = vmap(grad(example_loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(A, B, x, go)
    with fastcur.use_backend(backend):
        FA, FB = fastcur.ops.lora_fisher_diag(x, go, A, B, s)
    torch.testing.assert_close(FA, gA.square().sum(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(FB, gB.square().sum(0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fisher_of_A_is_zero_while_B_is_zero(backend):
    x, go, A, B = (t.float() for t in fisher_inputs(3, 4, 12, 9, 2))
    with fastcur.use_backend(backend):
        FA, FB = fastcur.ops.lora_fisher_diag(x, go, A, torch.zeros_like(B), 1.0)
    assert torch.equal(FA, torch.zeros_like(FA))
    assert FB.abs().max() > 0


def test_fisher_many_groups_and_2d_input():
    """Per-example gradients bigger than one group's budget (one example per group), and the
    [E, k] input form (T = 1)."""
    backends = [b for b in BACKENDS if b != "triton"]  # large shapes: not under the interpreter
    x, go, A, B = (t.float() for t in fisher_inputs(3, 2, 300, 300, 500, seed=2))
    truth = reference.lora_fisher_diag(x.double(), go.double(), A.double(), B.double(), 0.3)
    for backend in backends:
        with fastcur.use_backend(backend):
            got = fastcur.ops.lora_fisher_diag(x, go, A, B, 0.3)
        for t, u in zip(got, truth):
            torch.testing.assert_close(t.double(), u, rtol=1e-4, atol=1e-4 * u.abs().max().item())
    x2, go2 = x[:, 0], go[:, 0]
    for backend in BACKENDS:
        with fastcur.use_backend(backend):
            got = fastcur.ops.lora_fisher_diag(x2[:, :16], go2[:, :16], A[:, :16], B[:16], 1.0)
        want = reference.lora_fisher_diag(x2[:, None, :16], go2[:, None, :16], A[:, :16], B[:16], 1.0)
        for t, u in zip(got, want):
            torch.testing.assert_close(t, u, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fisher_empty_batch(backend):
    x, go, A, B = (t.float() for t in fisher_inputs(0, 3, 8, 6, 2))
    with fastcur.use_backend(backend):
        FA, FB = fastcur.ops.lora_fisher_diag(x, go, A, B, 1.0)
    assert FA.shape == (2, 8) and FB.shape == (6, 2) and not FA.any() and not FB.any()


# -- laplace_diag_penalty ----------------------------------------------------------------------------
PENALTY_SHAPES = [(7, 3), (1,), (33, 17), (2, 3, 5), (20000,)]


def penalty_inputs(shapes, seed=0, grads=True):
    g = torch.Generator().manual_seed(seed)
    params = [rand(*s, gen=g).requires_grad_(grads) for s in shapes]
    anchors = [rand(*s, gen=g).requires_grad_(grads) for s in shapes]
    precisions = [rand(*s, gen=g).abs().requires_grad_(grads) for s in shapes]
    return params, anchors, precisions


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_penalty_matches_reference_all_grads(backend, dtype):
    params, anchors, precisions = penalty_inputs(PENALTY_SHAPES, seed=3)
    L = len(params)

    def fn(*t):
        with fastcur.use_backend(backend):
            return fastcur.ops.laplace_diag_penalty(list(t[:L]), list(t[L:2 * L]), list(t[2 * L:]), 0.7)

    def ref(*t):
        return reference.laplace_diag_penalty(t[:L], t[L:2 * L], t[2 * L:], 0.7)

    check_against_reference(fn, ref, params + anchors + precisions, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_penalty_grad_inplace_equals_autograd(backend, dtype):
    """grads[i] += lam * q * (p - a) for the whole list, and the same value as the penalty."""
    params, anchors, precisions = penalty_inputs(PENALTY_SHAPES, seed=4, grads=False)
    gen = torch.Generator().manual_seed(9)
    start = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    leaves = [p.clone().requires_grad_(True) for p in params]
    truth_v = reference.laplace_diag_penalty(leaves, anchors, precisions, 0.4)
    truth_g = torch.autograd.grad(truth_v, leaves)
    cast = lambda ts: [t.to(dtype) for t in ts]  # noqa: E731
    ref_grads = cast(start)
    ref_v = reference.laplace_diag_penalty_grad_(ref_grads, cast(params), cast(anchors), cast(precisions), 0.4)
    grads = cast(start)
    with fastcur.use_backend(backend):
        v = fastcur.ops.laplace_diag_penalty_grad_(grads, cast(params), cast(anchors), cast(precisions), 0.4)
    assert_close_to_reference(v, ref_v, truth_v.detach(), "value")
    for i, (g, rg, s, tg) in enumerate(zip(grads, ref_grads, start, truth_g)):
        assert_close_to_reference(g, rg, s + tg, f"grads[{i}]")


def test_penalty_gradcheck_float64():
    for backend in BACKENDS:
        params, anchors, precisions = penalty_inputs([(3, 4), (5,)], seed=1)
        with fastcur.use_backend(backend):
            assert torch.autograd.gradcheck(
                lambda p0, p1, a0, a1, q0, q1: fastcur.ops.laplace_diag_penalty([p0, p1], [a0, a1], [q0, q1], 0.3),
                (*params, *anchors, *precisions))


def test_penalty_opcheck():
    if "cpp" not in BACKENDS:
        pytest.skip("C++ extension not built")
    params, anchors, precisions = penalty_inputs([(3, 4), (5,)], seed=1)
    torch.library.opcheck(torch.ops.fastcur.laplace_diag_penalty.default, (params, anchors, precisions, 0.3))
    grads = [torch.randn_like(p) for p in params]
    d = lambda ts: [t.detach() for t in ts]  # noqa: E731
    torch.library.opcheck(torch.ops.fastcur.laplace_diag_penalty_grad_.default,
                          (grads, d(params), d(anchors), d(precisions), 0.3))


def test_penalty_bad_input():
    p = [torch.randn(3, 4)]
    with pytest.raises(ValueError, match="'params' must be a non-empty list"):
        fastcur.ops.laplace_diag_penalty([], [], [], 1.0)
    with pytest.raises(ValueError, match="'anchors' must have 1 tensors"):
        fastcur.ops.laplace_diag_penalty(p, [], [torch.ones(3, 4)], 1.0)
    with pytest.raises(ValueError, match=r"'precisions\[0\]' must have shape \(3, 4\), got \(4, 3\)"):
        fastcur.ops.laplace_diag_penalty(p, [torch.zeros(3, 4)], [torch.ones(4, 3)], 1.0)
    with pytest.raises(TypeError, match=r"'anchors\[0\]' must have the dtype of 'params\[0\]'"):
        fastcur.ops.laplace_diag_penalty(p, [torch.zeros(3, 4, dtype=torch.float64)], [torch.ones(3, 4)], 1.0)
    with pytest.raises(TypeError, match="'grads' must be a list of tensors, got NoneType"):
        fastcur.ops.laplace_diag_penalty_grad_(None, p, [torch.zeros(3, 4)], [torch.ones(3, 4)], 1.0)
    for lam in (torch.tensor(1.0, requires_grad=True), "1", None):
        with pytest.raises(TypeError, match="fastcur.laplace_diag_penalty: argument 'lam'"):
            fastcur.ops.laplace_diag_penalty(p, [torch.zeros(3, 4)], [torch.ones(3, 4)], lam)
    with pytest.raises(TypeError, match="'params' must be a list"):
        fastcur.ops.laplace_diag_penalty(p[0], p, p, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_grads", [False, True], ids=["penalty", "penalty_grad_"])
def test_penalty_bad_input_worded_and_nothing_written(backend, with_grads):
    # On the C++ backend the lists are checked by the kernel first; the worded error must be
    # the same on every backend, and no gradient may have been touched.
    p = [torch.randn(3, 4), torch.randn(5)]
    grads = [torch.zeros(3, 4), torch.zeros(5)]
    cases = [
        (dict(anchors=[torch.zeros(3, 4)]), ValueError, "'anchors' must have 2 tensors"),
        (dict(precisions=[torch.ones(3, 4), torch.ones(6)]), ValueError,
         r"'precisions\[1\]' must have shape \(5,\), got \(6,\)"),
        (dict(anchors=[torch.zeros(3, 4), torch.zeros(5, dtype=torch.float64)]), TypeError,
         r"'anchors\[1\]' must have the dtype of 'params\[0\]'"),
        (dict(anchors=[torch.zeros(3, 4), "x"]), TypeError, r"'anchors\[1\]' must be a torch.Tensor"),
        (dict(params=[]), ValueError, "'params' must be a non-empty list"),
    ]
    for override, exc, message in cases:
        args = dict(grads=grads, params=p, anchors=[q + 1 for q in p], precisions=[torch.ones_like(q) for q in p])
        args.update(override)
        with fastcur.use_backend(backend), pytest.raises(exc, match=message):
            if with_grads:
                fastcur.ops.laplace_diag_penalty_grad_(args["grads"], args["params"], args["anchors"],
                                                       args["precisions"], 1.0)
            else:
                fastcur.ops.laplace_diag_penalty(args["params"], args["anchors"], args["precisions"], 1.0)
        assert all(int(g.count_nonzero()) == 0 for g in grads)


# -- kfac_factor ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 13), (1, 1), (2, 5, 17)], ids=str)
def test_kfac_factor_equals_outer_products(backend, dtype, shape):
    g = torch.Generator().manual_seed(len(shape))
    x = rand(*shape, gen=g)
    rows = x.reshape(-1, shape[-1])
    truth = sum(torch.outer(v, v) for v in rows)  # explicit sum of outer products, float64
    ref = reference.kfac_factor(x.to(dtype))
    with fastcur.use_backend(backend):
        got = fastcur.ops.kfac_factor(x.to(dtype))
        diag = fastcur.ops.kfac_factor(x.to(dtype), diagonal=True)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_reference(got, ref, truth, "factor")
    assert_close_to_reference(diag, reference.kfac_factor(x.to(dtype), True), truth.diagonal(), "diagonal")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kfac_factor_symmetric_rank_k_path(dtype):
    """d >= 2048 takes the C++ blocked lower-triangle schedule (odd d: a partial last block),
    mirrored to the upper triangle: exactly symmetric and equal to the outer products."""
    if "cpp" not in BACKENDS:
        pytest.skip("C++ extension not built")
    g = torch.Generator().manual_seed(5)
    x = rand(300, 2050, gen=g)
    truth = x.mT @ x
    with fastcur.use_backend("cpp"):
        got = fastcur.ops.kfac_factor(x.to(dtype))
    assert torch.equal(got, got.mT)
    assert_close_to_reference(got, reference.kfac_factor(x.to(dtype)), truth, "factor")


# -- kfac_penalty --------------------------------------------------------------------------------------
def kfac_inputs(a, b, seed=0, diag_s=False, diag_g=False):
    g = torch.Generator().manual_seed(seed)
    delta = rand(a, b, gen=g)
    Xs, Xg = rand(b + 3, b, gen=g), rand(a + 3, a, gen=g)
    S = (Xs.mT @ Xs).diagonal().clone() if diag_s else Xs.mT @ Xs
    G = (Xg.mT @ Xg).diagonal().clone() if diag_g else Xg.mT @ Xg
    return [t.requires_grad_(True) for t in (delta, S, G)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(3, 7, False, False), (1, 1, False, False), (16, 33, True, False),
                                  (5, 4, False, True)], ids=str)
def test_kfac_penalty_matches_reference_all_grads(backend, dtype, case):
    a, b, ds, dg = case
    inputs = kfac_inputs(a, b, seed=a * b, diag_s=ds, diag_g=dg)

    def fn(d, S, G):
        with fastcur.use_backend(backend):
            return fastcur.ops.kfac_penalty(d, S, G)

    check_against_reference(fn, reference.kfac_penalty, inputs, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kfac_penalty_equals_kronecker_quadratic_form(backend):
    """vec(Δ)^T (G ⊗ S^T) vec(Δ) (row-major vec) with the Kronecker product formed explicitly;
    S and G not symmetric, so a transposition slip shows."""
    g = torch.Generator().manual_seed(11)
    delta, S, G = rand(4, 6, gen=g), rand(6, 6, gen=g), rand(4, 4, gen=g)
    v = delta.reshape(-1)
    want = v @ torch.kron(G, S.mT.contiguous()) @ v
    with fastcur.use_backend(backend):
        got = fastcur.ops.kfac_penalty(delta, S, G)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_kfac_penalty_gradcheck_and_opcheck():
    for backend in BACKENDS:
        for ds, dg in ((False, False), (True, False), (False, True)):
            inputs = kfac_inputs(3, 5, seed=2, diag_s=ds, diag_g=dg)
            with fastcur.use_backend(backend):
                assert torch.autograd.gradcheck(fastcur.ops.kfac_penalty, inputs)
    if "cpp" in BACKENDS:
        d, S, G = (t.detach() for t in kfac_inputs(3, 5))
        torch.library.opcheck(torch.ops.fastcur.kfac_penalty.default, (d, S, G))
        torch.library.opcheck(torch.ops.fastcur.kfac_factor.default, (torch.randn(7, 3), False))
        x, go, A, B = fisher_inputs(2, 3, 5, 4, 2)
        torch.library.opcheck(torch.ops.fastcur.lora_fisher_diag.default, (x, go, A, B, 0.5))


def test_kfac_and_fisher_bad_input():
    with pytest.raises(ValueError, match=r"'S' must have shape \(5, 5\)"):
        fastcur.ops.kfac_penalty(torch.randn(3, 5), torch.randn(4, 4), torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"'G' must have shape \(3,\)"):
        fastcur.ops.kfac_penalty(torch.randn(3, 5), torch.randn(5), torch.randn(4))
    with pytest.raises(ValueError, match=r"'delta' must have shape"):
        fastcur.ops.kfac_penalty(torch.randn(3), torch.randn(3), torch.randn(3))
    with pytest.raises(TypeError, match="'x' must be float32"):
        fastcur.ops.kfac_factor(torch.ones(3, 3, dtype=torch.int64))
    x, go, A, B = (t.float() for t in fisher_inputs(2, 3, 5, 4, 2))
    with pytest.raises(ValueError, match=r"'grad_out' must have shape \(2, 3, 4\)"):
        fastcur.ops.lora_fisher_diag(x, go[:, :2], A, B)
    with pytest.raises(ValueError, match=r"'B' must have shape \('\*', 2\)"):
        fastcur.ops.lora_fisher_diag(x, go, A, B.mT)
    with pytest.raises(ValueError, match=r"'x' must have shape \('\*', '\*', 5\)"):
        fastcur.ops.lora_fisher_diag(x[..., :4], go, A, B)
    with pytest.raises(TypeError, match="'x' must have the dtype of 'A'"):
        fastcur.ops.lora_fisher_diag(x.double(), go, A, B)


# -- hostile inputs (issue 19) ------------------------------------------------------------------
def _transposed_penalty_inputs():
    """A parameter stored transposed ([6, 4] viewed as [4, 6]) among contiguous ones."""
    g = torch.Generator().manual_seed(5)
    params = [rand(6, 4, gen=g).t().requires_grad_(True), rand(3, 5, gen=g).requires_grad_(True)]
    anchors = [rand(4, 6, gen=g), rand(5, 3, gen=g).t()]
    precisions = [rand(6, 4, gen=g).abs().t(), rand(3, 5, gen=g).abs()]
    return params, anchors, precisions


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_transposed_parameters(backend):
    """The gradient of a transposed parameter comes back in its own layout (Triton wrote it
    flat into transposed strides; C++ refused a 'grads[0]' the user never passed)."""
    params, anchors, precisions = _transposed_penalty_inputs()
    with fastcur.use_backend(backend):
        v = fastcur.ops.laplace_diag_penalty(params, anchors, precisions, 0.7)
    got = torch.autograd.grad(v, params)
    truth = reference.laplace_diag_penalty(params, anchors, precisions, 0.7)
    want = torch.autograd.grad(truth, params)
    assert_close_to_reference(v.detach(), truth.detach(), truth.detach(), "value")
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_to_reference(g, w, w, f"grad of params[{i}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_grad_inplace_non_contiguous_grads(backend):
    """`.grad` of a transposed parameter is transposed too: it is accumulated into in place."""
    params, anchors, precisions = (list(t.detach() for t in ts) for ts in _transposed_penalty_inputs())
    grads = [torch.ones(6, 4, dtype=torch.float64).t(), torch.ones(3, 5, dtype=torch.float64)]
    with fastcur.use_backend(backend):
        fastcur.ops.laplace_diag_penalty_grad_(grads, params, anchors, precisions, 0.7)
    assert not grads[0].is_contiguous()
    for i, (g, p, a, q) in enumerate(zip(grads, params, anchors, precisions)):
        want = 1.0 + 0.7 * q * (p - a)
        assert_close_to_reference(g, want, want, f"grads[{i}]")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_penalty_and_kfac_double_backward_refused_clearly(backend):
    params, anchors, precisions = penalty_inputs([(3, 4)], seed=2)
    with fastcur.use_backend(backend):
        v = fastcur.ops.laplace_diag_penalty(params, anchors, precisions, 0.5)
        g, = torch.autograd.grad(v, params[0], create_graph=True)
        with pytest.raises(RuntimeError, match="fastcur.laplace_diag_penalty: double backward"):
            torch.autograd.grad(g.sum(), params[0])
        delta = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        p = fastcur.ops.kfac_penalty(delta, torch.eye(4, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
        g, = torch.autograd.grad(p, delta, create_graph=True)
        with pytest.raises(RuntimeError, match="fastcur.kfac_penalty: double backward"):
            torch.autograd.grad(g.sum(), delta)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_penalty_and_fisher_split(backend):
    """Sizes that split over the two test threads: the penalty's flattened work list (16K
    elements per item, 4 items per task) and the Fisher's examples (one per task)."""
    assert torch.get_num_threads() == 2
    params, anchors, precisions = penalty_inputs([(300, 500), (7,)], seed=6, grads=False)
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    f32 = lambda ts: [t.float() for t in ts]  # noqa: E731
    with fastcur.use_backend(backend):
        v = fastcur.ops.laplace_diag_penalty_grad_(grads, f32(params), f32(anchors), f32(precisions), 0.3)
    ref_grads = [torch.zeros_like(g) for g in grads]
    ref_v = reference.laplace_diag_penalty_grad_(ref_grads, f32(params), f32(anchors), f32(precisions), 0.3)
    truth_v = reference.laplace_diag_penalty(params, anchors, precisions, 0.3)
    assert_close_to_reference(v, ref_v, truth_v, "value")
    for i, (g, rg, p, a, q) in enumerate(zip(grads, ref_grads, params, anchors, precisions)):
        assert_close_to_reference(g, rg, 0.3 * q * (p - a), f"grads[{i}]")
    x, grad_out, A, B = fisher_inputs(6, 5, 13, 11, 3, seed=2)
    check_against_reference(flat_fisher(backend, 0.5), flat_fisher_ref(0.5), [x, grad_out, A, B], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kfac_factor_zero_width(backend):
    with fastcur.use_backend(backend):
        assert fastcur.ops.kfac_factor(torch.randn(3, 0)).shape == (0, 0)
        assert fastcur.ops.kfac_factor(torch.randn(2, 3, 0), diagonal=True).shape == (0,)


def test_kfac_penalty_grad_checks_its_arguments():
    """kfac_penalty_grad checks grad, S and G as kfac_penalty does (it used to check delta only
    and fail inside the kernel or on a None)."""
    from fastcur.ops.lalora import kfac_penalty_grad
    delta, S, G = torch.randn(3, 4), torch.randn(4), torch.randn(3)
    with pytest.raises(TypeError, match="fastcur.kfac_penalty_grad: argument 'grad' is required"):
        kfac_penalty_grad(None, delta, S, G)
    with pytest.raises(ValueError, match=r"fastcur.kfac_penalty_grad: argument 'S' must have shape \(4,\)"):
        kfac_penalty_grad(torch.tensor(1.0), delta, torch.randn(5), G)
    with pytest.raises(ValueError, match="fastcur.kfac_penalty_grad: argument 'grad' must have shape ()"):
        kfac_penalty_grad(torch.ones(2), delta, S, G)
