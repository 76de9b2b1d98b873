"""jump_rank_linear (docs/methods.md, JumpLoRA, rank-gated) in Triton: the launchers behind
`torch.ops.fastcur.jump_rank_linear_triton`.

Forward  (x [M, k], W [n, k], A [r, k], B [n, r], log_theta [r] float32, float64 for float64 x):
    h = x A^T                    the skinny projection kernel of cur_linear
    g = h 1[h > θ_j]             `_rank_gate_kernel` (one pass over [M, r], θ read on device)
    y = x W^T + b + s g B^T      cur_linear's GEMM with the rank-r term in its accumulator
Backward:
    dg = s dy B                  skinny projection
    g, dh = dg 1[h > θ], and per-row-block window sums Σ K((h − θ)/ε) dg   `_rank_gate_bwd_kernel`
    dx = dy W + dh A             cur_linear's GEMM + rank-r accumulator
    dA = dh^T x, dB = s dy^T g   torch (rank-r outputs)
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .cur_linear import _acc_dtype, _gemm_rank_update, _project, _vector

_BLOCK_M = 64


@triton.jit
def _rank_gate_kernel(h_ptr, lt_ptr, g_ptr, M, RANK, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask = (offs_m < M)[:, None] & (offs_r < RANK)[None, :]
    h = tl.load(h_ptr + offs_m[:, None] * RANK + offs_r[None, :], mask=mask, other=0.0)
    lt = tl.load(lt_ptr + offs_r, mask=offs_r < RANK, other=0.0)
    theta = tl.exp(lt.to(h.dtype))
    g = tl.where(h > theta[None, :], h, 0.0)
    tl.store(g_ptr + offs_m[:, None] * RANK + offs_r[None, :], g, mask=mask)


@triton.jit
def _rank_gate_bwd_kernel(h_ptr, dg_ptr, lt_ptr, g_ptr, dh_ptr, win_ptr, M, RANK, inv_eps,
                          BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask = (offs_m < M)[:, None] & (offs_r < RANK)[None, :]
    h = tl.load(h_ptr + offs_m[:, None] * RANK + offs_r[None, :], mask=mask, other=0.0)
    dg = tl.load(dg_ptr + offs_m[:, None] * RANK + offs_r[None, :], mask=mask, other=0.0)
    lt = tl.load(lt_ptr + offs_r, mask=offs_r < RANK, other=0.0)
    theta = tl.exp(lt.to(h.dtype))[None, :]
    on = h > theta
    tl.store(g_ptr + offs_m[:, None] * RANK + offs_r[None, :], tl.where(on, h, 0.0), mask=mask)
    tl.store(dh_ptr + offs_m[:, None] * RANK + offs_r[None, :], tl.where(on, dg, 0.0), mask=mask)
    win = tl.where(mask & (tl.abs((h - theta) * inv_eps) < 0.5), dg, 0.0)
    tl.store(win_ptr + pid * BLOCK_R + offs_r, tl.sum(win, axis=0), mask=offs_r < RANK)


def _rb(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))


def jump_rank_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                         log_theta: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(y [M, n], h [M, r]) of the rank-gated layer."""
    M, r = x.shape[0], A.shape[0]
    dtype = x.dtype
    acc = _acc_dtype(dtype)
    log_theta = _vector(log_theta)
    if M == 0:
        return x.new_empty((0, weight.shape[0])), x.new_empty((0, r))
    h = _project(x, A, 0, None, r, acc).contiguous()
    g = torch.empty_like(h)
    _rank_gate_kernel[(triton.cdiv(M, _BLOCK_M),)](h, log_theta, g, M, r, BLOCK_M=_BLOCK_M, BLOCK_R=_rb(r))
    y = _gemm_rank_update(x, weight.t(), g, B.t(), bias, scale)
    return y, h.to(dtype)


def jump_rank_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor,
                         log_theta: Tensor, h: Tensor, scale: float, bandwidth: float,
                         need_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx or empty, dA [r, k], dB [n, r], dlog_theta [r])."""
    M, r = x.shape[0], A.shape[0]
    dtype = x.dtype
    acc = _acc_dtype(dtype)
    log_theta = _vector(log_theta)
    dg = (_project(grad_y, B, 1, None, r, acc) * scale).contiguous()
    hh = h.to(acc).contiguous()
    g, dh = torch.empty_like(hh), torch.empty_like(hh)
    blocks = triton.cdiv(M, _BLOCK_M)
    win = torch.zeros((max(blocks, 1), _rb(r)), device=x.device, dtype=acc)
    if M:
        _rank_gate_bwd_kernel[(blocks,)](hh, dg, log_theta, g, dh, win, M, r, 1.0 / float(bandwidth),
                                         BLOCK_M=_BLOCK_M, BLOCK_R=_rb(r))
    theta = log_theta.to(acc).exp()
    dlog = (-(theta * theta) / float(bandwidth) * win.sum(0)[:r]).to(log_theta.dtype)
    dA = (dh.t() @ x.to(acc)).to(dtype)
    dB = (grad_y.to(acc).t() @ g).mul_(scale).to(dtype)
    dx = _gemm_rank_update(grad_y, weight, dh, A, None, 1.0) if need_dx else x.new_empty(0)
    return dx, dA, dB, dlog
