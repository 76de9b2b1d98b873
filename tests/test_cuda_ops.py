"""Every op on a CUDA GPU: each backend (cpp = the CUDA C++ kernels, triton) x dtype (float32,
bfloat16, float16) x shapes that reach the kernels' tails (M = 1, sizes that are not multiples
of any block size, a large M), forward and every gradient against the float64 reference with
the repository's tolerance rule (`fastcur.testing`); then strided and expanded inputs.

Marked `cuda`: skipped without a GPU (conftest). float32 dots: the Triton kernels ask for IEEE
precision in float32 (their `PRECISION`), and torch's cuBLAS matmuls are not TF32 unless
`torch.backends.cuda.matmul.allow_tf32` is set (the fixture below keeps it off), so float32
is held to the same rule as on the CPU. The inputs come from the CPU tests' own builders.
"""
from __future__ import annotations

import pytest
import torch

import fastcur
from fastcur.ops import reference
from fastcur.testing import assert_close_to_reference, check_against_reference

import test_cur_linear as cur
import test_ella_penalty as ella
import test_imsm_gate as gate
import test_lalora as lal
import test_secura_linear as sec
import test_signorm as sig
import test_signorm_merge as merge
from jump_inputs import jump_inputs, rank_inputs, theta_as_op_takes

pytestmark = pytest.mark.cuda
DEVICE = "cuda"
BACKENDS = ["cpp", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOWP = (torch.bfloat16, torch.float16)
# Leading dims of an activation: one row, an odd 3-D batch (390 rows), a large odd M.
LEADS = [(1,), (3, 130), (4099,)]
# (k, n, r) per lead: 16 and r = 1; sizes past every power-of-two block; odd r.
SIZES = [(16, 16, 1), (200, 150, 16), (72, 136, 7)]
CASES = [(lead, *size) for lead, size in zip(LEADS, SIZES)]


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _check(fn, ref, inputs, dtype, names=None):
    check_against_reference(fn, ref, inputs, dtype, device=DEVICE, names=names)


def _dev(t):
    return None if t is None else t.to(DEVICE)


# -- layouts: the same values, laid out as a kernel may meet them ---------------------------------
def strided(t):
    """Column-major (transposed strides) for a matrix or more: same values, not contiguous."""
    return t if t is None or t.dim() < 2 else t.transpose(-1, -2).contiguous().transpose(-1, -2)


def expanded(t):
    """A leading dim of 1 broadcast to 3 (stride 0), as a batch built with `expand` would be."""
    return t if t is None or t.shape[0] != 1 else t.expand(3, *t.shape[1:])


LAYOUTS = {"strided": strided, "expanded": expanded}


def laid_out(fn, layout, which):
    """`fn` with the arguments at positions `which` passed through `layout` first."""
    def wrapped(*args):
        return fn(*[layout(a) if i in which else a for i, a in enumerate(args)])
    return wrapped


def ids(case):
    return "x".join(map(str, case[0])) + "-" + "-".join(map(str, case[1:]))


# -- cur_linear ---------------------------------------------------------------------------------------
def cur_case(case, tied):
    inputs, (rows, cols) = cur.make_inputs(*case, tied=tied, seed=sum(case[1:]))
    return cur.run_backend, (_dev(rows), _dev(cols), 0.75), cur.ref_fn(0.75), inputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=ids)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "explicit"])
def test_cur_linear(backend, dtype, case, tied):
    run, args, ref, inputs = cur_case(case, tied)
    _check(run(backend, *args), ref, inputs, dtype, names="x W b C U R".split())


# -- secura_linear --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=ids)
@pytest.mark.parametrize("scope", ["token", "tensor"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "explicit"])
def test_secura_linear(backend, dtype, case, scope, tied):
    lead, k, n, r = case
    inputs, (rows, cols) = sec.make_inputs(lead, k, n, r, 4 * r + 1, tied=tied, seed=k + n + r)
    _check(sec.run_backend(backend, _dev(rows), _dev(cols), 0.75, "max", scope), sec.ref_fn(0.75, "max", scope),
           inputs, dtype, names=sec.NAMES)


# -- signorm ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 16), (3, 130, 150), (4099, 136)], ids=str)
@pytest.mark.parametrize("norm,scope", sig.OPTIONS)
def test_signorm(backend, dtype, shape, norm, scope):
    inputs = sig.make_inputs(shape, seed=sum(shape))
    ref = lambda y0, d: reference.signorm(y0, d, 6.0, 1e-10, norm, scope)  # noqa: E731
    _check(sig.run(backend, norm, scope), ref, inputs, dtype, names=["y0", "delta"])


# -- signorm_merge (no gradient: a weight-space fold) ----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 16, 1), (300, 260, 16), (1030, 520, 7)], ids=str)
@pytest.mark.parametrize("scope", ["row", "tensor"])
def test_signorm_merge(backend, dtype, shape, scope):
    W, C, U, R = merge.make_inputs(*shape, seed=sum(shape))
    truth = reference.signorm_merge(W, C, U, R, 0.7, 6.0, 1e-10, scope)
    low = [t.to(dtype) for t in (W, C, U, R)]
    out = merge.merge(backend, *[_dev(t) for t in low], 0.7, 6.0, 1e-10, scope)
    assert_close_to_reference(out.cpu(), reference.signorm_merge(*low, 0.7, 6.0, 1e-10, scope), truth)


# -- jump_linear and jump_rank_linear ------------------------------------------------------------------------
def jump_case(case, dtype):
    """Half precisions: θ in a gap (no dtype can flip a gate); float32: θ at the median with a wide
    kernel window, so the θ gradient is exercised (as the CPU tests do)."""
    inputs, bw, _ = jump_inputs(*case, gap=dtype in LOWP, seed=sum(case[1:]))
    run = lambda backend: _jump_run(backend, bw)  # noqa: E731
    return run, theta_as_op_takes(lambda *a: reference.jump_linear(*a, 1.5, 0.6, bw)), inputs


def _jump_run(backend, bw):
    @theta_as_op_takes
    def fn(x, W, b, A, B, lt):
        with fastcur.use_backend(backend):
            return fastcur.ops.jump_linear(x, W, b, A, B, lt, 1.5, 0.6, bw)
    return fn


def rank_case(case, dtype):
    inputs, bw = rank_inputs(*case, gap=dtype in LOWP, seed=sum(case[1:]))

    def run(backend):
        @theta_as_op_takes
        def fn(x, W, b, A, B, lt):
            with fastcur.use_backend(backend):
                return fastcur.ops.jump_rank_linear(x, W, b, A, B, lt, 1.5, bw)
        return fn
    return run, theta_as_op_takes(lambda *a: reference.jump_rank_linear(*a, 1.5, bw)), inputs


JUMP_NAMES = "x W b A B log_theta".split()
# The rank gate's thresholds must sit in gaps of every token's h for the half precisions: the
# large M here is 1031 tokens (the gap search of rank_inputs finds none among 4099).
RANK_CASES = [CASES[0], CASES[1], ((1031,), 72, 136, 7)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_jump_linear(backend, dtype, case):
    run, ref, inputs = jump_case(case, dtype)
    _check(run(backend), ref, inputs, dtype, names=JUMP_NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", RANK_CASES, ids=ids)
def test_jump_rank_linear(backend, dtype, case):
    run, ref, inputs = rank_case(case, dtype)
    _check(run(backend), ref, inputs, dtype, names=JUMP_NAMES)


# -- ella_penalty -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(16, 16, 1), (200, 150, 16), (520, 1030, 7)], ids=str)
@pytest.mark.parametrize("f,ella_delta", ella.MODES, ids=str)
def test_ella_penalty(backend, dtype, shape, f, ella_delta):
    inputs = ella.inputs_for(*shape, seed=sum(shape))
    inputs[3].requires_grad_(True)
    _check(ella.run_backend(backend, 1.5, f, ella_delta), ella.ref_fn(1.5, f, ella_delta),
           inputs, dtype, names="A B log_theta W_past".split())


# -- LaLoRA: lora_fisher_diag, laplace_diag_penalty(+_grad_), kfac_factor, kfac_penalty ----------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 16, 16, 1), (3, 130, 200, 150, 16), (64, 67, 72, 136, 7)], ids=str)
def test_lora_fisher_diag(backend, dtype, shape):
    inputs = lal.fisher_inputs(*shape, seed=sum(shape))
    with torch.no_grad():
        _check(lal.flat_fisher(backend, 0.5), lal.flat_fisher_ref(0.5), inputs, dtype)


PENALTY_SHAPES = lal.PENALTY_SHAPES + [(4099, 17), (130, 200)]


def _penalty(backend, L):
    def fn(*t):
        with fastcur.use_backend(backend):
            return fastcur.ops.laplace_diag_penalty(list(t[:L]), list(t[L:2 * L]), list(t[2 * L:]), 0.7)
    return fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_laplace_diag_penalty(backend, dtype):
    params, anchors, precisions = lal.penalty_inputs(PENALTY_SHAPES, seed=3)
    L = len(params)
    _check(_penalty(backend, L), lambda *t: reference.laplace_diag_penalty(t[:L], t[L:2 * L], t[2 * L:], 0.7),
           params + anchors + precisions, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_laplace_diag_penalty_grad_(backend, dtype):
    """grads[i] += lam q (p - a) in place on the GPU, the value returned: against autograd of the
    float64 penalty (as the CPU test)."""
    params, anchors, precisions = lal.penalty_inputs(PENALTY_SHAPES, seed=4, grads=False)
    gen = torch.Generator().manual_seed(9)
    start = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    leaves = [p.clone().requires_grad_(True) for p in params]
    truth_v = reference.laplace_diag_penalty(leaves, anchors, precisions, 0.4)
    truth_g = torch.autograd.grad(truth_v, leaves)
    cast = lambda ts, dev="cpu": [t.to(device=dev, dtype=dtype) for t in ts]  # noqa: E731
    ref_grads = cast(start)
    ref_v = reference.laplace_diag_penalty_grad_(ref_grads, cast(params), cast(anchors), cast(precisions), 0.4)
    grads = cast(start, DEVICE)
    with fastcur.use_backend(backend):
        v = fastcur.ops.laplace_diag_penalty_grad_(grads, cast(params, DEVICE), cast(anchors, DEVICE),
                                                   cast(precisions, DEVICE), 0.4)
    assert_close_to_reference(v.cpu(), ref_v, truth_v.detach(), "value")
    for i, (g, rg, s, tg) in enumerate(zip(grads, ref_grads, start, truth_g)):
        assert_close_to_reference(g.cpu(), rg, s + tg, f"grads[{i}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (37, 13), (2, 5, 17), (4099, 130)], ids=str)
def test_kfac_factor(backend, dtype, shape):
    x = lal.rand(*shape, gen=torch.Generator().manual_seed(len(shape)))
    rows = x.reshape(-1, shape[-1])
    truth = rows.mT @ rows
    with fastcur.use_backend(backend):
        got = fastcur.ops.kfac_factor(_dev(x.to(dtype)))
        diag = fastcur.ops.kfac_factor(_dev(x.to(dtype)), diagonal=True)
    assert got.dtype == torch.float32
    assert_close_to_reference(got.cpu(), reference.kfac_factor(x.to(dtype)), truth, "factor")
    assert_close_to_reference(diag.cpu(), reference.kfac_factor(x.to(dtype), True), truth.diagonal(), "diagonal")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(1, 1, False, False), (16, 33, True, False), (5, 4, False, True),
                                  (40, 67, False, False)], ids=str)
def test_kfac_penalty(backend, dtype, case):
    a, b, ds, dg = case
    inputs = lal.kfac_inputs(a, b, seed=a * b, diag_s=ds, diag_g=dg)

    def fn(d, S, G):
        with fastcur.use_backend(backend):
            return fastcur.ops.kfac_penalty(d, S, G)
    _check(fn, reference.kfac_penalty, inputs, dtype)


# -- imsm_gate -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 16, 1), (3, 130, 70, 8), (4, 1030, 136, 8)], ids=str)
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_imsm_gate(backend, dtype, shape, mask):
    inputs = gate.make_inputs(*shape, seed=sum(shape), mask=mask)
    _check(gate.run(backend), reference.imsm_gate, inputs, dtype, names=gate.NAMES + ["mask"])


# -- strided and expanded inputs ---------------------------------------------------------------------------
# (op, builder(dtype) -> (run(backend), reference, float64 inputs), positions of the activations)
def _layout_cases():
    lead, k, n, r = (1, 37), 72, 136, 7

    def cur_linear(dtype):
        run, args, ref, inputs = cur_case((lead, k, n, r), tied=False)
        return (lambda b: run(b, *args)), ref, inputs

    def secura_linear(dtype):
        inputs, _ = sec.make_inputs(lead, k, n, r, 4 * r + 1, tied=False, seed=5)
        return (lambda b: sec.run_backend(b, None, None, 0.75)), sec.ref_fn(0.75), inputs

    def signorm(dtype):
        return (lambda b: sig.run(b, "max", "token"),
                lambda y0, d: reference.signorm(y0, d, 6.0, 1e-10, "max", "token"), sig.make_inputs((1, 37, n)))

    def imsm_gate(dtype):
        return (gate.run, reference.imsm_gate, gate.make_inputs(1, 37, 70, 8, seed=6, mask=True))

    def lora_fisher_diag(dtype):
        return (lambda b: lal.flat_fisher(b, 0.5), lal.flat_fisher_ref(0.5), list(lal.fisher_inputs(1, 37, k, n, r)))

    return {
        "cur_linear": (cur_linear, (0, 1, 3, 5)),
        "secura_linear": (secura_linear, (0, 1, 3, 6)),
        "jump_linear": (lambda dtype: jump_case((lead, k, n, r), dtype), (0, 1, 3, 4)),
        "jump_rank_linear": (lambda dtype: rank_case((lead, k, n, r), dtype), (0, 1, 3, 4)),
        "signorm": (signorm, (0, 1)),
        "imsm_gate": (imsm_gate, (0, 1, 2, 3, 4, 5, 6)),
        "lora_fisher_diag": (lora_fisher_diag, (0, 1, 2, 3)),
    }


LAYOUT_CASES = _layout_cases()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op", list(LAYOUT_CASES))
def test_strided_and_expanded_inputs(backend, dtype, layout, op):
    build, which = LAYOUT_CASES[op]
    run, ref, inputs = build(dtype)
    fn, ref = laid_out(run(backend), LAYOUTS[layout], which), laid_out(ref, LAYOUTS[layout], which)
    with torch.set_grad_enabled(op != "lora_fisher_diag"):
        _check(fn, ref, inputs, dtype)
