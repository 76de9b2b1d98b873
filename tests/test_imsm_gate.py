"""imsm_gate on every backend present: forward and every gradient against the float64 reference
(which forms the concatenation as the paper does), with and without the dropout mask, odd shapes,
opcheck, gradcheck, torch.compile, the gate at init, bad input."""
import pytest
import torch

import fastcur
from fastcur.ops import reference
from fastcur.testing import check_against_reference

from compile_check import assert_compiled_like_eager
from conftest import available_backends

BACKENDS = available_backends("imsm_gate")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (B, T, d, r_g): r_g = 8 (the paper's), odd d and r, T = 1 (a decoding step), B = 1.
SHAPES = [(2, 5, 37, 8), (1, 1, 16, 1), (3, 4, 70, 3)]
NAMES = ["h", "h_tuned", "q", "q_tuned", "W_A", "W_B"]


def make_inputs(B, T, d, r, seed=0, mask=False, grads=(True,) * 6):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    h_tuned = h + 0.5 * torch.randn(B, T, d, generator=g, dtype=torch.float64)
    q, q_tuned = h.mean(1), h_tuned.mean(1)
    W_A = torch.randn(4 * d, r, generator=g, dtype=torch.float64) / (4 * d) ** 0.5
    W_B = torch.randn(r, d, generator=g, dtype=torch.float64) / r ** 0.5
    tensors = [t.detach().clone().requires_grad_(need) for t, need in zip((h, h_tuned, q, q_tuned, W_A, W_B), grads)]
    hidden_mask = None
    if mask:
        hidden_mask = (torch.rand(B, T, r, generator=g, dtype=torch.float64) > 0.3).double() / 0.7
    return tensors + [hidden_mask]


def run(backend):
    def fn(h, ht, q, qt, W_A, W_B, mask):
        with fastcur.use_backend(backend):
            return fastcur.ops.imsm_gate(h, ht, q, qt, W_A, W_B, mask)
    return fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_matches_reference(backend, dtype, shape, mask):
    inputs = make_inputs(*shape, seed=hash((shape, mask)) % 1000, mask=mask)
    check_against_reference(run(backend), reference.imsm_gate, inputs, dtype, names=NAMES + ["mask"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_without_grad(backend):
    """h and q detached (IMSM's frozen stream): the other gradients are unchanged, none is dropped."""
    inputs = make_inputs(2, 3, 19, 8, seed=3, grads=(False, True, False, True, True, True))
    check_against_reference(run(backend), reference.imsm_gate, inputs, torch.float32, names=NAMES + ["mask"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_is_half_when_W_B_is_zero(backend):
    h, ht, q, qt, W_A, W_B, _ = [t.detach() if t is not None else None for t in make_inputs(2, 4, 24, 8, seed=5)]
    out = run(backend)(h, ht, q, qt, W_A, torch.zeros_like(W_B), None)
    torch.testing.assert_close(out, 0.5 * (h + ht), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequence(backend):
    """T = 0: an empty output and zero weight gradients."""
    h, ht, q, qt, W_A, W_B, _ = make_inputs(2, 0, 12, 4, seed=1)
    q, qt = torch.randn(2, 12, dtype=torch.float64, requires_grad=True), torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    out = run(backend)(h, ht, q, qt, W_A, W_B, None)
    assert out.shape == (2, 0, 12)
    gA, gB, gq = torch.autograd.grad(out.sum(), [W_A, W_B, q], allow_unused=True)
    for g in (gA, gB, gq):
        assert g is not None and torch.count_nonzero(g) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    # The interpreter is slow: Triton gets the masked variant only (it runs every code path).
    for mask in ((True,) if backend == "triton" else (False, True)):
        *tensors, hidden_mask = make_inputs(2, 2, 4, 2, seed=7, mask=mask)
        fn = lambda *t: run(backend)(*t, hidden_mask)  # noqa: E731
        assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("mask", [False, True])
def test_opcheck_cpp(mask):
    args = [t.detach().float().requires_grad_() if t is not None else None for t in make_inputs(2, 3, 20, 8, mask=mask)]
    if mask:
        args[-1].requires_grad_(False)
    torch.library.opcheck(torch.ops.fastcur.imsm_gate.default, tuple(args))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton interpreter not available")
def test_opcheck_triton():
    from fastcur.ops.imsm_gate import _triton_op
    args = [t.detach().float().requires_grad_() for t in make_inputs(2, 3, 20, 8)[:6]] + [None]
    torch.library.opcheck(_triton_op(), tuple(args))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_torch_compile_fullgraph():
    h, ht, q, qt, W_A, W_B, _ = [t.detach().float() for t in make_inputs(2, 3, 16, 8)[:6]] + [None]
    W_B.requires_grad_()

    def step(W_B):
        return fastcur.ops.imsm_gate(h, ht, q, qt, W_A, W_B).square().sum()

    assert_compiled_like_eager(step, (W_B,), [W_B])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("mask", [False, True])
def test_cuda_matches_reference(backend, mask):
    check_against_reference(run(backend), reference.imsm_gate, make_inputs(3, 130, 200, 8, mask=mask),
                            torch.float32, device="cuda", names=NAMES + ["mask"])


def _args(**override):
    args = dict(h=torch.randn(2, 3, 8), h_tuned=torch.randn(2, 3, 8), q=torch.randn(2, 8),
                q_tuned=torch.randn(2, 8), W_A=torch.randn(32, 4), W_B=torch.randn(4, 8), hidden_mask=None)
    args.update(override)
    return args


BAD = [
    (dict(h=torch.randn(6, 8)), "argument 'h' must be 3-D (B, T, d), got shape (6, 8)"),
    (dict(h_tuned=torch.randn(2, 4, 8)), "argument 'h_tuned' must have shape (2, 3, 8)"),
    (dict(q=torch.randn(3, 8)), "argument 'q' must have shape (2, 8) = (B, d), got (3, 8)"),
    (dict(q_tuned=torch.randn(2, 7)), "argument 'q_tuned' must have shape (2, 8)"),
    (dict(W_A=torch.randn(24, 4)), "argument 'W_A' must have shape (32, '*') = (4d, r_g), got (24, 4)"),
    (dict(W_B=torch.randn(3, 8)), "argument 'W_B' must have shape (4, 8) = (r_g, d), got (3, 8)"),
    (dict(hidden_mask=torch.ones(2, 3, 5)), "argument 'hidden_mask' must have shape (2, 3, 4)"),
    (dict(hidden_mask=torch.ones(2, 3, 4, requires_grad=True)), "argument 'hidden_mask' is a dropout mask"),
    (dict(W_B=torch.randn(4, 8, dtype=torch.float64)), "argument 'W_B' must have the dtype of 'W_A'"),
    (dict(q=torch.randn(2, 8, dtype=torch.float64)), "argument 'q' must have the dtype of 'h'"),
    (dict(gate_mask=torch.ones(2, 3, 5)), "argument 'gate_mask' must have shape (2, 3, 8) = (B, T, d)"),
    (dict(W_A=torch.randn(32, 4, device="meta")), "argument 'W_A' must be on the device of 'h' (cpu)"),
    (dict(h=torch.randint(0, 3, (2, 3, 8))), "argument 'h' must be float32"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_errors(override, message):
    with pytest.raises((ValueError, TypeError)) as info:
        fastcur.ops.imsm_gate(**_args(**override))
    assert message in str(info.value) and "fastcur.imsm_gate" in str(info.value)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_cpp_kernel_checks_direct_calls():
    a = _args()
    with pytest.raises(RuntimeError, match=r"W_B must have shape \[4, 8\]"):
        torch.ops.fastcur.imsm_gate(a["h"], a["h_tuned"], a["q"], a["q_tuned"], a["W_A"], torch.randn(3, 8), None)
    with pytest.raises(RuntimeError, match="h must be 3-D"):
        torch.ops.fastcur.imsm_gate(a["h"][0], a["h_tuned"], a["q"], a["q_tuned"], a["W_A"], a["W_B"], None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_float32_gate_on_half_memories(backend, dtype, mask):
    """The released precision: h, h', q, q' in bfloat16/float16, W_A, W_B (and the mask) float32.
    The result comes back in h's dtype; h's gradients in h's dtype, the gate's in float32, each
    within the tolerance rule of its dtype against the float64 reference, the dtype's own error
    measured by the reference run on the memories' values with a float32 gate."""
    from fastcur.testing import assert_close_to_reference

    master = make_inputs(2, 5, 37, 8, seed=11, mask=mask)
    half = [t.detach().to(dtype) for t in master[:4]]
    gate = [t.detach().float() for t in master[4:6]] + [None if master[6] is None else master[6].float()]

    def leaves(ts, dt):
        return [t.detach().to(dt).requires_grad_() for t in ts]

    grad_out = torch.randn(2, 5, 37, generator=torch.Generator().manual_seed(5)).to(dtype)
    mem, W = leaves(half, dtype), leaves(gate[:2], torch.float32)
    out = run(backend)(*mem, *W, gate[2])
    grads = torch.autograd.grad(out, mem + W, grad_out)
    assert out.dtype == dtype and [g.dtype for g in grads] == [dtype] * 4 + [torch.float32] * 2

    def reference_run(dt):  # h's values, computed in dt, the output rounded to h's dtype
        ins = leaves(half + gate[:2], dt)
        m = None if gate[2] is None else gate[2].to(dt)
        o = reference.imsm_gate(*ins, m)
        return o, torch.autograd.grad(o, ins, grad_out.to(dt))

    truth, truth_grads = reference_run(torch.float64)
    low, low_grads = reference_run(torch.float32)
    assert_close_to_reference(out, low.to(dtype), truth, "forward")
    for name, g, lg, tg in zip(NAMES, grads, low_grads, truth_grads):
        assert_close_to_reference(g, lg.to(g.dtype), tg, f"grad of {name}")


def released_gate_float64(h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask, gate_mask):
    """The released gate written out: Linear(4d, r_g) -> Dropout -> Linear(r_g, d) -> Dropout ->
    sigmoid on the concatenation [q, h, h', q'] (the masks stand for the two Dropouts)."""
    B, T, d = h.shape
    x = torch.cat([q.unsqueeze(1).expand(B, T, d), h, h_tuned, q_tuned.unsqueeze(1).expand(B, T, d)], dim=2)
    g = torch.sigmoid(torch.nn.functional.linear(torch.nn.functional.linear(x, W_A.T) * hidden_mask, W_B.T)
                      * gate_mask)
    return g * h + (1 - g) * h_tuned


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gate_mask_after_both_projections(backend, dtype):
    """gate_mask: the dropout after W_B (the released gate's second): forward and every gradient
    against the released gate written out in float64."""
    *tensors, hidden_mask = make_inputs(3, 4, 19, 8, seed=9, mask=True)
    g = torch.Generator().manual_seed(10)
    gate_mask = (torch.rand(3, 4, 19, generator=g, dtype=torch.float64) > 0.3).double() / 0.7

    def fn(*ts):
        with fastcur.use_backend(backend):
            return fastcur.ops.imsm_gate(*ts[:6], ts[6], gate_mask=ts[7])

    check_against_reference(fn, released_gate_float64, tensors + [hidden_mask, gate_mask], dtype,
                            names=NAMES + ["hidden_mask", "gate_mask"])


# -- hostile inputs (issue 19) ------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_gate_requires_grad(backend):
    """Neither memory requires grad (a gate trained on fixed memories): the Triton backward
    returned one empty tensor for both, which a custom op may not (outputs must not alias)."""
    inputs = make_inputs(2, 3, 19, 8, seed=4, grads=(False, False, False, False, True, True))
    check_against_reference(run(backend), reference.imsm_gate, inputs, torch.float32, names=NAMES + ["mask"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_row_chunks_split(backend):
    """B T = 4 x 80 rows: the C++ row chunks (64 rows) split over the two test threads, forward
    and backward (per-chunk weight gradients summed)."""
    assert torch.get_num_threads() == 2
    inputs = make_inputs(4, 80, 24, 8, seed=6, mask=True)
    check_against_reference(run(backend), reference.imsm_gate, inputs, torch.float32, names=NAMES + ["mask"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,r", [(0, 2), (4, 0)], ids=["d=0", "r_g=0"])
def test_zero_size_width_or_gate_rank(backend, d, r):
    """Zero-size d or r_g: the reference's result (an empty output; the gate at 0.5) and
    gradients on every backend, not a reshape error."""
    from fastcur.testing import check_as_given
    g = torch.Generator().manual_seed(8)
    h, ht = (torch.randn(2, 3, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    q, qt = (torch.randn(2, d, generator=g, dtype=torch.float64) for _ in range(2))
    W_A = torch.randn(4 * d, r, generator=g, dtype=torch.float64, requires_grad=True)
    W_B = torch.randn(r, d, generator=g, dtype=torch.float64, requires_grad=True)
    check_as_given(run(backend), reference.imsm_gate, [h, ht, q, qt, W_A, W_B, None],
                   wrt=[h, ht, W_A, W_B], names=["h", "h_tuned", "W_A", "W_B"])
