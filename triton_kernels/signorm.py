"""signorm (docs/methods.md, SECURA) in Triton, and the row kernel that secura_linear and signorm_merge share.

Shapes (2-D; the caller flattens leading dimensions into M):
    y0 [M, n], delta [M, n]  ->  y [M, n], rowmax [M] (row maxima of L, float32/float64)

`_signorm_rows_kernel` handles BLOCK_M rows per program and walks n in BLOCK_N tiles:
    MODE 0  pass 1: row max of L; pass 2: write y (scope "token", one launch)
    MODE 1  pass 1 only: store the row maxima (phase 1 of scope "tensor")
    MODE 2  pass 2 only, with the global max read from a device tensor (phase 2 of "tensor":
            the max of the row maxima is a torch reduction on the device, no host sync)
    MODE 3  pass 2 only, with per-row maxima read from `rowmax` (secura_linear's second pass)
Δ is either loaded (FROM_Z false) or recomputed per tile as `scale * z E + lb` from z [M, r]
(accumulation dtype) and E [r, n] given by strides (secura_linear: E = C^T; signorm_merge:
E = R), so Δ never exists as an M x n tensor on those paths.

Numerics: ratios and S in float32 (float64 for float64). Under the interpreter, bfloat16
outputs go through a float32 buffer (its bf16 stores truncate), see cur_linear.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .cur_linear import _INTERPRET, _acc_dtype, _dot_flags, _rank_block, _store_dtype, _vector

_BLOCK_M = 16
_BLOCK_N = 64 if _INTERPRET else 128


@triton.jit
def _delta_tile(d_ptr, z_ptr, e_ptr, lb_ptr, offs_m, offs_n, mask_m, mask_n, RANK, scale,
                stride_dm, stride_zm, stride_eq, stride_en,
                FROM_Z: tl.constexpr, HAS_LB: tl.constexpr, ACC_FP64: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Δ[offs_m, offs_n] in the accumulation dtype (0 outside the masks)."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    mask = mask_m[:, None] & mask_n[None, :]
    if FROM_Z:
        d = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, RANK, BLOCK_R):
            q = r0 + offs_r
            mask_q = q < RANK
            z = tl.load(z_ptr + offs_m[:, None] * stride_zm + q[None, :],
                        mask=mask_m[:, None] & mask_q[None, :], other=0.0)
            e = tl.load(e_ptr + q[:, None].to(tl.int64) * stride_eq + offs_n[None, :] * stride_en,
                        mask=mask_q[:, None] & mask_n[None, :], other=0.0)
            d = tl.dot(z.to(acc_dtype), e.to(acc_dtype), d, input_precision=PRECISION)
        d = d * scale
        if HAS_LB:
            lb = tl.load(lb_ptr + offs_n, mask=mask_n, other=0.0)
            d += lb.to(acc_dtype)[None, :]
    else:
        d = tl.load(d_ptr + offs_m[:, None] * stride_dm + offs_n[None, :], mask=mask, other=0.0)
        d = d.to(acc_dtype)
    return tl.where(mask, d, 0.0)


@triton.jit
def _signorm_rows_kernel(
    y0_ptr, b_ptr, d_ptr, z_ptr, e_ptr, lb_ptr, out_ptr, s_ptr, rowmax_ptr, gmax_ptr,
    M, N, RANK, scale, k, eps,
    stride_ym, stride_dm, stride_zm, stride_eq, stride_en, stride_om, stride_sm,
    HAS_BIAS: tl.constexpr, FROM_Z: tl.constexpr, HAS_LB: tl.constexpr, RAW: tl.constexpr,
    MODE: tl.constexpr, WRITE_S: tl.constexpr, ACC_FP64: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    offs_m = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < M
    mx = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    if MODE == 2:
        mx += tl.load(gmax_ptr).to(acc_dtype)
    if MODE == 3:
        mx = tl.load(rowmax_ptr + offs_m, mask=mask_m, other=0.0).to(acc_dtype)
    if MODE <= 1:
        for n0 in range(0, N, BLOCK_N):
            offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            mask_n = offs_n < N
            mask = mask_m[:, None] & mask_n[None, :]
            y = tl.load(y0_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], mask=mask, other=0.0).to(acc_dtype)
            if HAS_BIAS:
                y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(acc_dtype)[None, :]
            d = _delta_tile(d_ptr, z_ptr, e_ptr, lb_ptr, offs_m, offs_n, mask_m, mask_n, RANK, scale,
                            stride_dm, stride_zm, stride_eq, stride_en, FROM_Z, HAS_LB, ACC_FP64,
                            PRECISION, BLOCK_R, BLOCK_M, BLOCK_N)
            L = tl.where(mask, tl.abs(d) / (tl.abs(y) + eps), 0.0)
            mx = tl.maximum(mx, tl.max(L, axis=1))
        tl.store(rowmax_ptr + offs_m, mx, mask=mask_m)
    if MODE != 1:
        for n0 in range(0, N, BLOCK_N):
            offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            mask_n = offs_n < N
            mask = mask_m[:, None] & mask_n[None, :]
            y = tl.load(y0_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], mask=mask, other=0.0).to(acc_dtype)
            if HAS_BIAS:
                y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(acc_dtype)[None, :]
            d = _delta_tile(d_ptr, z_ptr, e_ptr, lb_ptr, offs_m, offs_n, mask_m, mask_n, RANK, scale,
                            stride_dm, stride_zm, stride_eq, stride_en, FROM_Z, HAS_LB, ACC_FP64,
                            PRECISION, BLOCK_R, BLOCK_M, BLOCK_N)
            L = tl.abs(d) / (tl.abs(y) + eps)
            if RAW:
                logit = k * L
            else:
                logit = k * (L / (mx[:, None] + eps) - 0.5)
            S = 2.0 - 1.0 / (1.0 + tl.exp(-logit))
            S = tl.where(mx[:, None] == 0.0, 2.0, S)
            out = (y + y + d) / S
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=mask)
            if WRITE_S:
                tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_n[None, :], S, mask=mask)


@triton.jit
def _signorm_bwd_kernel(
    g_ptr, y0_ptr, d_ptr, mx_ptr, dy0_ptr, dd_ptr, M, N, k, eps,
    RAW: tl.constexpr, GLOBAL_MAX: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dy0 = 2 dy / S, ddelta = dy / S with S recomputed from y0, Δ and the maxima (all
    operands contiguous [M, N])."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_n < N)[None, :]
    if GLOBAL_MAX:
        mx = tl.zeros((BLOCK_M,), dtype=acc_dtype) + tl.load(mx_ptr).to(acc_dtype)
    else:
        mx = tl.load(mx_ptr + offs_m, mask=mask_m, other=0.0).to(acc_dtype)
    idx = offs_m[:, None] * N + offs_n[None, :]
    y = tl.load(y0_ptr + idx, mask=mask, other=0.0).to(acc_dtype)
    d = tl.load(d_ptr + idx, mask=mask, other=0.0).to(acc_dtype)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(acc_dtype)
    L = tl.abs(d) / (tl.abs(y) + eps)
    if RAW:
        logit = k * L
    else:
        logit = k * (L / (mx[:, None] + eps) - 0.5)
    S = 2.0 - 1.0 / (1.0 + tl.exp(-logit))
    S = tl.where(mx[:, None] == 0.0, 2.0, S)
    q = g / S
    tl.store(dy0_ptr + idx, (q + q).to(dy0_ptr.dtype.element_ty), mask=mask)
    tl.store(dd_ptr + idx, q.to(dd_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def signorm_rows(y0: Tensor, out: Tensor, *, bias: Optional[Tensor] = None, delta: Optional[Tensor] = None,
                 z: Optional[Tensor] = None, E: Optional[Tensor] = None, lora_bias: Optional[Tensor] = None,
                 scale: float = 1.0, k: float, eps: float, raw: bool, tensor_scope: bool,
                 S: Optional[Tensor] = None, rowmax: Optional[Tensor] = None) -> Tensor:
    """out = signorm(y0 + bias, Δ) with Δ = delta, or scale z E + lora_bias (z [M, r] in the
    accumulation dtype, E any [r, n] view). y0 and out are [M, n] with unit column stride (out
    may be y0). With `rowmax` given, those per-row maxima are used (one pass); otherwise they are
    computed (scope "token" one launch; "tensor" two launches around a device max).
    Returns the row maxima [M] (acc dtype)."""
    M, N = y0.shape
    acc = _acc_dtype(y0.dtype)
    flags = _dot_flags(y0.dtype)
    bias, lora_bias = _vector(bias), _vector(lora_bias)
    from_z = z is not None
    r = z.shape[1] if from_z else 0
    dummy = y0
    own_max = rowmax is None
    if own_max:
        rowmax = torch.empty(M, device=y0.device, dtype=acc)
    if M == 0 or N == 0:
        return rowmax.zero_() if own_max else rowmax
    common = dict(
        y0_ptr=y0, b_ptr=bias if bias is not None else dummy, d_ptr=delta if delta is not None else dummy,
        z_ptr=z if from_z else rowmax, e_ptr=E if from_z else dummy,
        lb_ptr=lora_bias if lora_bias is not None else dummy, out_ptr=out,
        s_ptr=S if S is not None else rowmax, rowmax_ptr=rowmax,
        M=M, N=N, RANK=r, scale=float(scale), k=float(k), eps=float(eps),
        stride_ym=y0.stride(0), stride_dm=delta.stride(0) if delta is not None else 0,
        stride_zm=z.stride(0) if from_z else 0, stride_eq=E.stride(0) if from_z else 0,
        stride_en=E.stride(1) if from_z else 0, stride_om=out.stride(0),
        stride_sm=S.stride(0) if S is not None else 0,
        HAS_BIAS=bias is not None, FROM_Z=from_z, HAS_LB=lora_bias is not None, RAW=raw,
        WRITE_S=S is not None, BLOCK_R=_rank_block(max(r, 1), 64), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
        **flags,
    )
    grid = (triton.cdiv(M, _BLOCK_M),)
    if not own_max:
        mode = 3 if not tensor_scope else 2
        gmax = rowmax.amax().reshape(1) if tensor_scope else rowmax
        _signorm_rows_kernel[grid](gmax_ptr=gmax, MODE=mode, **common)
    elif tensor_scope:
        _signorm_rows_kernel[grid](gmax_ptr=rowmax, MODE=1, **common)
        gmax = rowmax.amax().reshape(1)
        _signorm_rows_kernel[grid](gmax_ptr=gmax, MODE=2, **common)
    else:
        _signorm_rows_kernel[grid](gmax_ptr=rowmax, MODE=0, **common)
    return rowmax


def signorm_fwd(y0: Tensor, delta: Tensor, k: float, eps: float, norm: str,
                scope: str) -> tuple[Tensor, Tensor]:
    """y0, delta [M, n] -> (y [M, n], rowmax [M] float32/float64)."""
    y0, delta = y0.contiguous(), delta.contiguous()
    out = torch.empty(y0.shape, device=y0.device, dtype=_store_dtype(y0.dtype))
    rowmax = signorm_rows(y0, out, delta=delta, k=k, eps=eps, raw=norm == "raw",
                          tensor_scope=scope == "tensor")
    return out.to(y0.dtype), rowmax


def signorm_bwd(grad_y: Tensor, y0: Tensor, delta: Tensor, rowmax: Tensor, k: float, eps: float,
                norm: str, scope: str) -> tuple[Tensor, Tensor]:
    """(dy0, ddelta) = (2 dy / S, dy / S), [M, n] each, S recomputed."""
    M, N = y0.shape
    g, y0, delta = grad_y.contiguous(), y0.contiguous(), delta.contiguous()
    sd = _store_dtype(y0.dtype)
    dy0 = torch.empty((M, N), device=y0.device, dtype=sd)
    dd = torch.empty((M, N), device=y0.device, dtype=sd)
    if M and N:
        tensor_scope = scope == "tensor"
        mx = rowmax.amax().reshape(1) if tensor_scope else rowmax.contiguous()
        grid = (triton.cdiv(M, _BLOCK_M), triton.cdiv(N, _BLOCK_N))
        _signorm_bwd_kernel[grid](g, y0, delta, mx, dy0, dd, M, N, float(k), float(eps),
                                  RAW=norm == "raw", GLOBAL_MAX=tensor_scope,
                                  ACC_FP64=y0.dtype == torch.float64, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N)
    return dy0.to(y0.dtype), dd.to(y0.dtype)
