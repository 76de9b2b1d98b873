"""Triton-specific cases of cur_linear that the backend-parametrized tests do not reach: the
tied fast path never reading the buffers it replaces, strided inputs, ranks wider than one
rank block, index range checks. The launchers are called directly, in float64, so results
must match the reference to rounding."""
import pytest
import torch

from fastcur.backend import triton_available, triton_interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not triton_available() or (DEVICE == "cpu" and not triton_interpreting()),
    reason="Triton needs a GPU or TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def kernels():
    from fastcur.triton_kernels import cur_linear
    return cur_linear


def make(M, k, n, r, *, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g, dtype=torch.float64)
    rows, cols = torch.randperm(n, generator=g)[:r], torch.randperm(k, generator=g)[:r]
    t = dict(x=torch.randn(M, k, generator=g, dtype=torch.float64), W=W,
             b=torch.randn(n, generator=g, dtype=torch.float64), C=W[:, cols].clone(),
             U=torch.randn(r, r, generator=g, dtype=torch.float64), R=W[rows].clone(),
             dy=torch.randn(M, n, generator=g, dtype=torch.float64))
    t = {key: v.to(DEVICE, dtype) for key, v in t.items()}
    return t, rows.to(DEVICE), cols.to(DEVICE)


def expected(t, s):
    x, W, b, C, U, R, dy = (t[key].double() for key in ("x", "W", "b", "C", "U", "R", "dy"))
    h = x @ R.T
    g = dy @ C
    return dict(y=x @ W.T + b + s * (h @ U.T) @ C.T, h=h, g=g, dU=s * g.T @ h,
                dx=dy @ W + s * (g @ U) @ R)


def close(actual, want):
    torch.testing.assert_close(actual.double(), want, rtol=1e-9, atol=1e-9)


def test_tied_path_does_not_read_replaced_buffers(kernels):
    """Forward with `rows` never reads R; backward with `cols` never reads C."""
    t, rows, cols = make(21, 40, 35, 6)
    want = expected(t, 0.5)
    nan_R, nan_C = torch.full_like(t["R"], float("nan")), torch.full_like(t["C"], float("nan"))
    y, h = kernels.cur_linear_fwd(t["x"], t["W"], t["b"], t["C"], t["U"], nan_R, 0.5, rows, cols)
    close(y, want["y"])
    close(h, want["h"])
    dx, dU, g = kernels.cur_linear_bwd(t["dy"], t["x"], t["W"], nan_C, t["U"], t["R"], h, 0.5,
                                       cols, True)
    close(dx, want["dx"])
    close(dU, want["dU"])
    close(g, want["g"])


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "explicit"])
def test_strided_inputs(kernels, tied):
    """Transposed storage and sliced views go through the strides, not a hidden copy."""
    t, rows, cols = make(13, 30, 27, 5, seed=1)
    want = expected(t, 1.5)
    x = torch.stack([t["x"], -t["x"]], 2)[:, :, 0]              # column stride 2
    W = t["W"].T.contiguous().T                                  # column-major [n, k]
    C, R = t["C"].T.contiguous().T, t["R"].T.contiguous().T
    dy = t["dy"].T.contiguous().T
    assert not (x.is_contiguous() or W.is_contiguous() or dy.is_contiguous())
    idx = (rows, cols) if tied else (None, None)
    y, h = kernels.cur_linear_fwd(x, W, t["b"], C, t["U"].T.contiguous().T, R, 1.5, *idx)
    close(y, want["y"])
    dx, dU, g = kernels.cur_linear_bwd(dy, x, W, C, t["U"], R, h, 1.5, idx[1], True)
    close(dx, want["dx"])
    close(dU, want["dU"])
    close(g, want["g"])


def test_rank_wider_than_one_block(kernels):
    """r = 130 spans two rank blocks of the projection and three of the up-projection."""
    t, rows, cols = make(9, 140, 150, 130, seed=2)
    want = expected(t, 0.25)
    y, h = kernels.cur_linear_fwd(t["x"], t["W"], None, t["C"], t["U"], t["R"], 0.25, rows, cols)
    close(y, want["y"] - t["b"].double())
    dx, dU, g = kernels.cur_linear_bwd(t["dy"], t["x"], t["W"], t["C"], t["U"], t["R"], h, 0.25,
                                       cols, True)
    close(dx, want["dx"])
    close(dU, want["dU"])


def test_empty_batch_and_no_dx(kernels):
    t, rows, cols = make(0, 12, 10, 3)
    y, h = kernels.cur_linear_fwd(t["x"], t["W"], t["b"], t["C"], t["U"], t["R"], 1.0, rows, cols)
    assert y.shape == (0, 10) and h.shape == (0, 3)
    dx, dU, g = kernels.cur_linear_bwd(t["dy"], t["x"], t["W"], t["C"], t["U"], t["R"], h, 1.0,
                                       cols, True)
    assert dx.shape == (0, 12) and g.shape == (0, 3)
    assert torch.equal(dU, torch.zeros_like(dU))
    t, rows, cols = make(5, 12, 10, 3)
    _, h = kernels.cur_linear_fwd(t["x"], t["W"], t["b"], t["C"], t["U"], t["R"], 1.0, rows, cols)
    dx, dU, g = kernels.cur_linear_bwd(t["dy"], t["x"], t["W"], t["C"], t["U"], t["R"], h, 1.0,
                                       None, False)
    assert dx.numel() == 0 and dx.dtype == t["x"].dtype
    close(dU, expected(t, 1.0)["dU"])


@pytest.mark.skipif(DEVICE != "cpu", reason="range checks run only where they cost no sync")
def test_index_out_of_range_is_an_error(kernels):
    t, rows, cols = make(4, 12, 10, 3)
    bad = torch.tensor([0, 1, 10])
    with pytest.raises(ValueError, match="'rows' has an index out of range"):
        kernels.cur_linear_fwd(t["x"], t["W"], t["b"], t["C"], t["U"], t["R"], 1.0, bad, None)
    with pytest.raises(ValueError, match="'cols' has an index out of range"):
        kernels.cur_linear_bwd(t["dy"], t["x"], t["W"], t["C"], t["U"], t["R"], t["x"][:, :3],
                               1.0, torch.tensor([0, -1, 2]), True)
