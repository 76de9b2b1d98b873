"""jump_linear and ella_penalty (docs/methods.md, JumpLoRA) in Triton: the launchers behind
`torch.ops.fastcur.jump_linear_triton` and `torch.ops.fastcur.ella_penalty_triton`.

Shapes (2-D; the caller flattens leading dimensions into M):
    x [M, k], weight W [n, k], bias [n] or None, A [r, k], B [n, r], log_theta [] or [1]
    (float32, float64 for float64 inputs), W_past [n, k]; θ = exp(log_theta) is read on the
    device (no host sync) and the gate compares in the acc dtype.

Forward `jump_linear_fwd`:
    Weff = W + s (f J(Z) + (1 - f) Z)      `_jump_weff_kernel`: each [BN, BK] tile of Z = B A
                                           is a rank-r dot in registers, masked there; Z is
                                           never stored
    y = x Weff^T + b                       one GEMM (torch)
Fused ELLA `jump_linear_ella_fwd` / `jump_linear_bwd(..., W_past, grad_ella)`: the same kernels
    with ELLA=True also sum the tile's ‖D ⊙ W_past‖² (forward; ELLA's delta
    D = s (fe J(Z) + (1 - fe) Z), fe = f "interpolated" or 1 "masked") and add grad_ella times its
    dL/dZ into dZ before the contractions (backward): one pass for both terms.
Backward `jump_linear_bwd`:
    `_jump_grad_kernel`, one program per [BN, BK] tile of W:
        T  = dy[:, tile rows]^T x[:, tile cols]   accumulated over M in registers
        Z  = B[rows] A[:, cols]                    recomputed in registers
        dZ = s T (f 1[|Z| > θ] + 1 - f)
        partial dB[rows] = dZ A[:, cols]^T, partial dA[:, cols] = B[rows]^T dZ,
        partial Σ s T (−K((Z−θ)/ε) + K((−Z−θ)/ε))
    (partials per tile column / row / program, summed by torch: deterministic, no atomics);
    dx = dy Weff (Weff rebuilt by `_jump_weff_kernel`). No n x k gradient is ever stored.
ELLA `ella_penalty_fwd` / `ella_penalty_bwd`: `_ella_kernel`, the same tiling with the hard
mask, value partials and (backward) dZ = 2 s² e² Z W_past² (e = fe 1[|Z| > θ] + 1 - fe)
contracted with A and B.

Numerics: tiles accumulate in float32 (float64 for float64 inputs). Under the interpreter,
bfloat16 dots are wrong and bfloat16 stores truncate, so everything is upcast there and
bfloat16 outputs go through float32 buffers (see triton_kernels/cur_linear.py).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if _INTERPRET:   # few, large programs: each interpreted program is a handful of numpy calls
    _BN, _BK, _BM = 32, 64, 64
else:
    _BN, _BK, _BM = 64, 64, 64


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) or _INTERPRET else "tf32"


@triton.jit
def _z_tile(b_ptr, a_ptr, offs_n, offs_k, mask_n, mask_k, RANK, stride_bn, stride_br,
            stride_ar, stride_ak, acc_dtype: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_R: tl.constexpr):
    """Z[rows, cols] = B[rows, :] @ A[:, cols] in acc_dtype, rank padded to BLOCK_R."""
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < RANK
    b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(acc_dtype)
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(acc_dtype)
    return tl.dot(b, a, input_precision=PRECISION), b, a


@triton.jit
def _jump_weff_kernel(w_ptr, b_ptr, a_ptr, lt_ptr, out_ptr, prm_ptr, wp_ptr, val_ptr, N, K, RANK,
                      stride_wn, stride_wk, stride_bn, stride_br, stride_ar, stride_ak,
                      stride_on, stride_ok, stride_pn, stride_pk,
                      ELLA: tl.constexpr, ACC_FP64: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = W + scale (f J(Z) + (1 - f) Z), one [BLOCK_N, BLOCK_K] tile per program.
    prm_ptr: [scale, f, fe] in the acc dtype (Python float arguments would arrive as float32).
    ELLA: also val_ptr[pid] = the tile's Σ (scale e Z W_past)² (W_past at wp_ptr), ELLA's
    delta weight e = fe 1[|Z| > θ] + 1 - fe."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    scale = tl.load(prm_ptr)
    f = tl.load(prm_ptr + 1)
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K
    z, _b, _a = _z_tile(b_ptr, a_ptr, offs_n, offs_k, mask_n, mask_k, RANK, stride_bn, stride_br,
                        stride_ar, stride_ak, acc_dtype, PRECISION, BLOCK_R)
    theta = tl.exp(tl.load(lt_ptr).to(acc_dtype))
    gate = tl.where(tl.abs(z) > theta, 1.0, 1.0 - f).to(acc_dtype)
    mask = mask_n[:, None] & mask_k[None, :]
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=mask, other=0.0)
    out = w.to(acc_dtype) + scale * gate * z
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok,
             out.to(out_ptr.dtype.element_ty), mask=mask)
    if ELLA:
        wp = tl.load(wp_ptr + offs_n[:, None] * stride_pn + offs_k[None, :] * stride_pk, mask=mask,
                     other=0.0).to(acc_dtype)
        fe = tl.load(prm_ptr + 2)
        e = tl.where(tl.abs(z) > theta, 1.0, 1.0 - fe).to(acc_dtype)
        v = tl.where(mask, scale * e * z * wp, 0.0)
        tl.store(val_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
                 tl.sum(tl.sum(v * v, axis=1), axis=0))


@triton.jit
def _jump_grad_kernel(dy_ptr, x_ptr, b_ptr, a_ptr, lt_ptr, da_ptr, db_ptr, th_ptr, prm_ptr,
                      wp_ptr, coef_ptr, M, N, K, RANK,
                      stride_dm, stride_dn, stride_xm, stride_xk, stride_bn, stride_br,
                      stride_ar, stride_ak, stride_pn, stride_pk,
                      ELLA: tl.constexpr, ACC_FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """Per [BLOCK_N, BLOCK_K] tile of W: dL/dZ from dy^T x, contracted with A and B.

    Writes da_ptr[pid_n, :, cols] ([num_n_tiles, BLOCK_R, K], acc dtype), db_ptr[pid_k, rows, :]
    ([num_k_tiles, N, BLOCK_R]) and th_ptr[pid] (the tile's Σ G (−K(..) + K(..))).
    prm_ptr: [scale, f, 1/ε, fe] in the acc dtype.
    ELLA: dZ += c 2 scale² e² Z W_past² (W_past at wp_ptr, c = coef_ptr[0], the gradient of the
    ELLA output, e = fe m + 1 - fe) before the contractions; nothing joins the θ sum (hard mask).
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    scale = tl.load(prm_ptr)
    f = tl.load(prm_ptr + 1)
    inv_eps = tl.load(prm_ptr + 2)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K

    t = tl.zeros((BLOCK_N, BLOCK_K), dtype=acc_dtype)
    for m0 in range(0, M, BLOCK_M):
        mask_m = offs_m < M - m0
        dy = tl.load(dy_ptr + (m0 + offs_m)[:, None] * stride_dm + offs_n[None, :] * stride_dn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        xx = tl.load(x_ptr + (m0 + offs_m)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            dy = dy.to(acc_dtype)
            xx = xx.to(acc_dtype)
        t = tl.dot(tl.trans(dy), xx, t, input_precision=PRECISION)

    z, b, a = _z_tile(b_ptr, a_ptr, offs_n, offs_k, mask_n, mask_k, RANK, stride_bn, stride_br,
                      stride_ar, stride_ak, acc_dtype, PRECISION, BLOCK_R)
    theta = tl.exp(tl.load(lt_ptr).to(acc_dtype))
    g = scale * t
    dz = g * tl.where(tl.abs(z) > theta, 1.0, 1.0 - f).to(acc_dtype)
    u1 = tl.abs((z - theta) * inv_eps)
    u2 = tl.abs((-z - theta) * inv_eps)
    term = tl.where(u2 < 0.5, 1.0, 0.0).to(acc_dtype) - tl.where(u1 < 0.5, 1.0, 0.0).to(acc_dtype)
    valid = mask_n[:, None] & mask_k[None, :]
    th = tl.sum(tl.sum(tl.where(valid, g * term, 0.0), axis=1), axis=0)
    tl.store(th_ptr + pid_n * tl.num_programs(1) + pid_k, th)
    if ELLA:
        wp = tl.load(wp_ptr + offs_n[:, None] * stride_pn + offs_k[None, :] * stride_pk, mask=valid,
                     other=0.0).to(acc_dtype)
        c = tl.load(coef_ptr).to(acc_dtype)
        fe = tl.load(prm_ptr + 3)
        e = tl.where(tl.abs(z) > theta, 1.0, 1.0 - fe).to(acc_dtype)
        dz += 2.0 * scale * scale * c * e * e * z * wp * wp

    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    dz = tl.where(valid, dz, 0.0)
    db = tl.dot(dz, tl.trans(a), input_precision=PRECISION)           # [BLOCK_N, BLOCK_R]
    tl.store(db_ptr + pid_k * N * BLOCK_R + offs_n[:, None] * BLOCK_R + offs_r[None, :], db,
             mask=mask_n[:, None])
    da = tl.dot(tl.trans(b), dz, input_precision=PRECISION)           # [BLOCK_R, BLOCK_K]
    tl.store(da_ptr + pid_n * BLOCK_R * K + offs_r[:, None] * K + offs_k[None, :], da,
             mask=mask_k[None, :])


@triton.jit
def _ella_kernel(b_ptr, a_ptr, lt_ptr, wp_ptr, val_ptr, da_ptr, db_ptr, prm_ptr, N, K, RANK,
                 stride_bn, stride_br, stride_ar, stride_ak, stride_wn, stride_wk,
                 GRAD: tl.constexpr, ACC_FP64: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per tile: Σ (s e Z W_past)², and when GRAD the contractions of 2 s² e² Z W_past², ELLA's
    delta weight e = fe 1[|Z| > θ] + 1 - fe. prm_ptr: [scale, fe] in the acc dtype."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    scale = tl.load(prm_ptr)
    fe = tl.load(prm_ptr + 1)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K
    valid = mask_n[:, None] & mask_k[None, :]
    z, b, a = _z_tile(b_ptr, a_ptr, offs_n, offs_k, mask_n, mask_k, RANK, stride_bn, stride_br,
                      stride_ar, stride_ak, acc_dtype, PRECISION, BLOCK_R)
    theta = tl.exp(tl.load(lt_ptr).to(acc_dtype))
    e = tl.where(valid, tl.where(tl.abs(z) > theta, 1.0, 1.0 - fe), 0.0).to(acc_dtype)
    w = tl.load(wp_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=valid,
                other=0.0).to(acc_dtype)
    v = scale * e * z * w
    tl.store(val_ptr + pid_n * tl.num_programs(1) + pid_k, tl.sum(tl.sum(v * v, axis=1), axis=0))
    if GRAD:
        dz = 2.0 * scale * scale * e * e * z * w * w
        offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
        db = tl.dot(dz, tl.trans(a), input_precision=PRECISION)
        tl.store(db_ptr + pid_k * N * BLOCK_R + offs_n[:, None] * BLOCK_R + offs_r[None, :], db,
                 mask=mask_n[:, None])
        da = tl.dot(tl.trans(b), dz, input_precision=PRECISION)
        tl.store(da_ptr + pid_n * BLOCK_R * K + offs_r[:, None] * K + offs_k[None, :], da,
                 mask=mask_k[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _params(like: Tensor, *values: float) -> Tensor:
    """Scalars for a kernel as a small tensor in the acc dtype (a float argument is float32)."""
    return torch.tensor(values, dtype=_acc(like.dtype), device=like.device)


def _weff(weight: Tensor, A: Tensor, B: Tensor, log_theta: Tensor, scale: float, f: float,
          W_past: Optional[Tensor] = None, fe: float = 1.0) -> tuple[Tensor, Optional[Tensor]]:
    """(W + ΔW [n, k], and with W_past the ELLA value [] in the acc dtype, else None)."""
    n, k = weight.shape
    r = A.shape[0]
    dtype = weight.dtype
    store = torch.float32 if _INTERPRET and dtype == torch.bfloat16 else dtype
    out = torch.empty((n, k), device=weight.device, dtype=store)
    grid = (triton.cdiv(n, _BN), triton.cdiv(k, _BK))
    ella = W_past is not None
    val = torch.zeros((max(grid[0] * grid[1], 1),), device=weight.device, dtype=_acc(dtype))
    wp = W_past if ella else weight
    if out.numel():
        _jump_weff_kernel[grid](
            weight, B, A, log_theta, out, _params(weight, scale, f, fe), wp, val, n, k, r,
            weight.stride(0), weight.stride(1), B.stride(0), B.stride(1), A.stride(0), A.stride(1),
            out.stride(0), out.stride(1), wp.stride(0), wp.stride(1),
            ELLA=ella, ACC_FP64=dtype == torch.float64, PRECISION=_precision(dtype),
            BLOCK_R=_block_r(r), BLOCK_N=_BN, BLOCK_K=_BK)
    return out.to(dtype), (val.sum() if ella else None)


def jump_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                    log_theta: Tensor, scale: float, f: float) -> Tensor:
    """y [M, n] = x (W + ΔW)^T + b; x [M, k], weight [n, k], A [r, k], B [n, r]."""
    weff, _ = _weff(weight, A, B, log_theta, scale, f)
    if bias is not None:
        return torch.addmm(bias, x, weff.t())
    return x @ weff.t()


def jump_linear_ella_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                         log_theta: Tensor, scale: float, W_past: Tensor, f: float,
                         fe: float = 1.0) -> tuple[Tensor, Tensor]:
    """(y [M, n], ‖scale (fe J(Z) + (1 - fe) Z) ⊙ W_past‖² [] in weight's dtype), Z = B A, from
    the same Z tiles."""
    weff, ella = _weff(weight, A, B, log_theta, scale, f, W_past, fe)
    y = torch.addmm(bias, x, weff.t()) if bias is not None else x @ weff.t()
    return y, ella.to(weight.dtype)


def jump_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor,
                    log_theta: Tensor, scale: float, f: float, bandwidth: float, mean: bool,
                    need_dx: bool, need_adapter: bool, W_past: Optional[Tensor] = None,
                    grad_ella: Optional[Tensor] = None, fe: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx [M, k] or empty, dA [r, k], dB [n, r], dlog_theta like log_theta), docs/methods.md, JumpLoRA.
    With W_past [n, k] and grad_ella [] the ELLA gradient joins each tile's dL/dZ."""
    M, k = x.shape
    n, r = B.shape
    dtype = x.dtype
    acc = _acc(dtype)
    dx = grad_y @ _weff(weight, A, B, log_theta, scale, f)[0] if need_dx else x.new_empty(0)
    if not need_adapter:
        return dx, torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(log_theta)
    br = _block_r(r)
    tn, tk = triton.cdiv(n, _BN), triton.cdiv(k, _BK)
    da = torch.empty((tn, br, k), device=x.device, dtype=acc)
    db = torch.empty((tk, n, br), device=x.device, dtype=acc)
    th = torch.empty((tn * tk,), device=x.device, dtype=acc)
    ella = W_past is not None
    wp = W_past if ella else weight
    coef = grad_ella.reshape(()).to(acc) if ella else th
    if n and k:
        _jump_grad_kernel[(tn, tk)](
            grad_y, x, B, A, log_theta, da, db, th, _params(x, scale, f, 1.0 / float(bandwidth), fe),
            wp, coef, M, n, k, r,
            grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1), B.stride(0), B.stride(1),
            A.stride(0), A.stride(1), wp.stride(0), wp.stride(1),
            ELLA=ella, ACC_FP64=dtype == torch.float64, UPCAST=_INTERPRET, PRECISION=_precision(dtype),
            BLOCK_R=br, BLOCK_M=_BM, BLOCK_N=_BN, BLOCK_K=_BK)
    dA = da.sum(0)[:r].to(dtype)
    dB = db.sum(0)[:, :r].to(dtype)
    theta = log_theta.to(acc).exp().reshape(())
    denom = float(n) * float(k) if mean else 1.0
    dlog = (th.sum() * (f / float(bandwidth)) * theta * theta / denom).to(log_theta.dtype).reshape(log_theta.shape)
    return dx, dA, dB, dlog


def _ella(A: Tensor, B: Tensor, log_theta: Tensor, W_past: Tensor, scale: float, fe: float, grad: bool):
    n, k = W_past.shape
    r = A.shape[0]
    dtype = W_past.dtype
    acc = _acc(dtype)
    br = _block_r(r)
    tn, tk = triton.cdiv(n, _BN), triton.cdiv(k, _BK)
    val = torch.zeros((max(tn * tk, 1),), device=W_past.device, dtype=acc)
    da = torch.zeros((tn, br, k), device=W_past.device, dtype=acc) if grad else val
    db = torch.zeros((tk, n, br), device=W_past.device, dtype=acc) if grad else val
    if n and k:
        _ella_kernel[(tn, tk)](
            B, A, log_theta, W_past, val, da, db, _params(W_past, scale, fe), n, k, r,
            B.stride(0), B.stride(1), A.stride(0), A.stride(1), W_past.stride(0), W_past.stride(1),
            GRAD=grad, ACC_FP64=dtype == torch.float64, PRECISION=_precision(dtype), BLOCK_R=br,
            BLOCK_N=_BN, BLOCK_K=_BK)
    return val, da, db


def ella_penalty_fwd(A: Tensor, B: Tensor, log_theta: Tensor, W_past: Tensor, scale: float,
                     fe: float = 1.0) -> Tensor:
    """‖scale (fe J(Z) + (1 - fe) Z) ⊙ W_past‖², Z = B A -> [] in W_past's dtype."""
    val, _, _ = _ella(A, B, log_theta, W_past, scale, fe, False)
    return val.sum().to(W_past.dtype)


def ella_penalty_bwd(grad: Tensor, A: Tensor, B: Tensor, log_theta: Tensor, W_past: Tensor,
                     scale: float, fe: float = 1.0) -> tuple[Tensor, Tensor]:
    """(dA [r, k], dB [n, r]) of the penalty, times grad ([])."""
    r = A.shape[0]
    _, da, db = _ella(A, B, log_theta, W_past, scale, fe, True)
    g = grad.to(da.dtype)
    return (da.sum(0)[:r] * g).to(A.dtype), (db.sum(0)[:, :r] * g).to(B.dtype)
