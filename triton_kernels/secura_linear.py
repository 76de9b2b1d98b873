"""secura_linear (docs/methods.md, SECURA) in Triton: the launchers behind `torch.ops.fastcur.secura_linear_triton`.

Shapes (2-D): x [M, k], weight W [n, k], bias [n]?, C [n, r], A_c [a, r], B_c [r, a], R [r, k],
lora_bias [n]?, rows/cols int64 [r] or None (tied fast path, as cur_linear).

Forward `secura_linear_fwd` -> (y [M, n], S [M, n] float32/float64, h [M, r]):
    h = x R^T                      cur_linear's skinny projection kernel (tied: rows of W)
    z = (h B_c) A_c                torch, [M, r] x [r, a] x [a, r]; tiny
    pass 1 `_secura_gemm_kernel`   y0 = x W^T + b per tile, stored once (rounded to the
                                   output dtype); in the same tile Δ = s z C^T + lora_bias and
                                   the tile's row maxima of L = |Δ| / (|y0| + eps), written to
                                   a [n_tiles, M] buffer (no atomics: deterministic)
    rowmax = max over tiles        torch (device); scope "tensor": max of everything
    pass 2 `_signorm_rows_kernel`  y = (2 y0 + Δ) / S in place over y0, Δ recomputed per tile
                                   from z (r FLOPs per element), S stored for the backward
Backward `secura_linear_bwd` (S constant): dΔ = dy / S `_secura_grad_kernel`; dΔ C by the
projection kernel (tied: columns of W); the core in torch; dx = 2 dΔ W + dh R by cur_linear's
GEMM + rank-r kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .cur_linear import (_FWD_CONFIGS, _acc_dtype, _check_index, _dot_flags, _gemm_rank_update,
                         _project, _rank_block, _store_dtype, _vector)
from .signorm import _delta_tile, signorm_rows


@triton.autotune(configs=_FWD_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _secura_gemm_kernel(
    x_ptr, w_ptr, b_ptr, z_ptr, c_ptr, lb_ptr, y_ptr, part_ptr,
    M, N, K, RANK, scale, eps,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_zm, stride_cn, stride_cq, stride_ym,
    HAS_BIAS: tl.constexpr, HAS_LB: tl.constexpr, ACC_FP64: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y0 = x W^T + b (stored), and part[pid_n, m] = max over the tile's columns of L."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    a_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    b_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(acc_dtype)
            b = b.to(acc_dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(acc_dtype)[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y, mask=mask)
    # The ratios from the stored (rounded) y0, exactly what pass 2 reads back.
    d = _delta_tile(z_ptr, z_ptr, c_ptr, lb_ptr, offs_m, offs_n, mask_m, mask_n, RANK, scale,
                    0, stride_zm, stride_cq, stride_cn, True, HAS_LB, ACC_FP64, PRECISION,
                    BLOCK_R, BLOCK_M, BLOCK_N)
    L = tl.where(mask, tl.abs(d) / (tl.abs(y.to(acc_dtype)) + eps), 0.0)
    tl.store(part_ptr + pid_n * M + offs_m, tl.max(L, axis=1), mask=mask_m)


@triton.jit
def _secura_grad_kernel(g_ptr, s_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """out = dy / S (contiguous, flat)."""
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    s = tl.load(s_ptr + offs, mask=mask, other=1.0)
    tl.store(out_ptr + offs, (g.to(s.dtype) / s).to(out_ptr.dtype.element_ty), mask=mask)


def secura_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], C: Tensor, A_c: Tensor,
                      B_c: Tensor, R: Tensor, lora_bias: Optional[Tensor], scale: float, k: float,
                      eps: float, norm: str, scope: str,
                      rows: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """See the module docstring. Returns (y [M, n], S [M, n] acc dtype, h [M, r])."""
    M, (n, kk), r = x.shape[0], weight.shape, C.shape[1]
    dtype = x.dtype
    acc = _acc_dtype(dtype)
    rows = _check_index(rows, r, n, "rows", x.device)
    bias, lora_bias = _vector(bias), _vector(lora_bias)
    S = torch.empty((M, n), device=x.device, dtype=acc)
    if M == 0:
        return x.new_empty((0, n)), S, x.new_empty((0, r))
    h = _project(x, weight, 0, rows, r, acc) if rows is not None else _project(x, R, 0, None, r, acc)
    z = (h @ B_c.to(acc)) @ A_c.to(acc)  # [M, r]
    y = torch.empty((M, n), device=x.device, dtype=_store_dtype(dtype))
    if n == 0:
        return y.to(dtype), S, h.to(dtype)
    block_r = _rank_block(r, 64)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    # One partial max per (column tile, row); sized for the smallest BLOCK_N of the configs.
    part = torch.zeros((triton.cdiv(n, 16), M), device=x.device, dtype=acc)
    _secura_gemm_kernel[grid](
        x, weight, bias if bias is not None else y, z, C, lora_bias if lora_bias is not None else y,
        y, part, M, n, kk, r, float(scale), float(eps),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), z.stride(0),
        C.stride(0), C.stride(1), y.stride(0),
        HAS_BIAS=bias is not None, HAS_LB=lora_bias is not None, BLOCK_R=block_r, **_dot_flags(dtype),
    )
    rowmax = part.amax(0)  # L >= 0 and unused tiles hold 0, so they never win
    signorm_rows(y, y, z=z, E=C.t(), lora_bias=lora_bias, scale=scale, k=k, eps=eps,
                 raw=norm == "raw", tensor_scope=scope == "tensor", S=S, rowmax=rowmax)
    return y.to(dtype), S, h.to(dtype)


def secura_linear_bwd(grad_y: Tensor, S: Tensor, x: Tensor, weight: Tensor, C: Tensor, A_c: Tensor,
                      B_c: Tensor, R: Tensor, h: Tensor, scale: float, cols: Optional[Tensor],
                      need_dx: bool):
    """Returns (dx [M, k] or empty, dΔ [M, n], z [M, r], dA_c [a, r], dB_c [r, a], dh [M, r])."""
    M, (n, kk), r = x.shape[0], weight.shape, C.shape[1]
    dtype = x.dtype
    acc = _acc_dtype(dtype)
    cols = _check_index(cols, r, kk, "cols", x.device)
    g = grad_y.contiguous()
    dD = torch.empty((M, n), device=x.device, dtype=_store_dtype(dtype))
    if dD.numel():
        BLOCK = 1024
        _secura_grad_kernel[(triton.cdiv(dD.numel(), BLOCK),)](g, S.contiguous(), dD, dD.numel(), BLOCK=BLOCK)
    dD = dD.to(dtype)
    ha = h.to(acc)
    u = ha @ B_c.to(acc)
    z = u @ A_c.to(acc)
    dDC = _project(dD, weight, 1, cols, r, acc) if (cols is not None and need_dx) else _project(dD, C, 1, None, r, acc)
    dz = dDC * scale
    dA = u.t() @ dz
    du = dz @ A_c.to(acc).t()
    dB = ha.t() @ du
    dh = du @ B_c.to(acc).t()
    # dx = 2 dΔ W + dh R = (2 dΔ) W + dh R; doubling is exact in floating point.
    dx = _gemm_rank_update(dD * 2, weight, dh, R, None, 1.0) if need_dx else x.new_empty(0)
    return dx, dD, z.to(dtype), dA.to(dtype), dB.to(dtype), dh.to(dtype)
