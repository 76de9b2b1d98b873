"""imsm_gate (docs/methods.md, IMSM) in Triton: IMSM's memory gate, one program per BLOCK_M token rows.

Shapes (the launchers flatten [B, T, d] to M = B T rows):
    h, h_tuned [M, d], c = q A1 + q' A4 [B, r] (per-sequence, computed once by the launcher),
    A2, A3 [d, r] (blocks of W_A), W_B [r, d], mask [M, r] or none
    -> out [M, d], z [M, r] (the masked hidden, float32/float64, saved for the backward)

Forward: pass 1 walks d in BLOCK_D tiles accumulating z = c + h A2 + h' A3 (two rank-r dots
per tile); pass 2 walks d again: a = z W_B, g = σ(a), out = h' + g (h − h').
Backward: pass 1 recomputes g tile by tile and accumulates dz = (dy (h − h') g (1 − g)) W_B^T;
pass 2 writes dh = dy g + dz A2^T, dh' = dy (1 − g) + dz A3^T and adds z^T da into dW_B
(atomics, float32/float64). dA2 = h^T dz and dA3 = h'^T dz are GEMMs in the launcher.
Under the interpreter every tile is upcast before tl.dot and bfloat16 outputs go through a
float32 buffer (see cur_linear.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .cur_linear import _INTERPRET, _acc_dtype, _dot_flags, _rank_block, _store_dtype

_BLOCK_M = 16
_BLOCK_D = 64 if _INTERPRET else 128


@triton.jit
def _hidden(h_ptr, t_ptr, c_ptr, a2_ptr, a3_ptr, offs_m, mask_m, seq, D, RANK,
            stride_hm, stride_cb, stride_ad,
            ACC_FP64: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """z = c[seq] + h A2 + h' A3 for the rows offs_m: [BLOCK_M, BLOCK_R] (0 past RANK)."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < RANK
    z = tl.load(c_ptr + seq[:, None] * stride_cb + offs_r[None, :],
                mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(acc_dtype)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        m2 = mask_m[:, None] & mask_d[None, :]
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_d[None, :], mask=m2, other=0.0)
        t = tl.load(t_ptr + offs_m[:, None] * stride_hm + offs_d[None, :], mask=m2, other=0.0)
        wm = mask_d[:, None] & mask_r[None, :]
        a2 = tl.load(a2_ptr + offs_d[:, None].to(tl.int64) * stride_ad + offs_r[None, :], mask=wm, other=0.0)
        a3 = tl.load(a3_ptr + offs_d[:, None].to(tl.int64) * stride_ad + offs_r[None, :], mask=wm, other=0.0)
        z = tl.dot(h.to(acc_dtype), a2.to(acc_dtype), z, input_precision=PRECISION)
        z = tl.dot(t.to(acc_dtype), a3.to(acc_dtype), z, input_precision=PRECISION)
    return z


@triton.jit
def _fwd_kernel(h_ptr, t_ptr, c_ptr, a2_ptr, a3_ptr, wb_ptr, mask_ptr, out_ptr, z_ptr,
                M, T, D, RANK, stride_hm, stride_cb, stride_ad, stride_wr, stride_om,
                HAS_MASK: tl.constexpr, ACC_FP64: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_R: tl.constexpr):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    offs_m = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < M
    seq = offs_m // T
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < RANK
    mr = mask_m[:, None] & mask_r[None, :]
    z = _hidden(h_ptr, t_ptr, c_ptr, a2_ptr, a3_ptr, offs_m, mask_m, seq, D, RANK,
                stride_hm, stride_cb, stride_ad, ACC_FP64, PRECISION, BLOCK_M, BLOCK_D, BLOCK_R)
    if HAS_MASK:
        z = z * tl.load(mask_ptr + offs_m[:, None] * RANK + offs_r[None, :], mask=mr, other=0.0).to(acc_dtype)
    tl.store(z_ptr + offs_m[:, None] * RANK + offs_r[None, :], z, mask=mr)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        m2 = mask_m[:, None] & mask_d[None, :]
        wb = tl.load(wb_ptr + offs_r[:, None] * stride_wr + offs_d[None, :],
                     mask=mask_r[:, None] & mask_d[None, :], other=0.0).to(acc_dtype)
        a = tl.dot(z, wb, input_precision=PRECISION)
        g = 1.0 / (1.0 + tl.exp(-a))
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_d[None, :], mask=m2, other=0.0).to(acc_dtype)
        t = tl.load(t_ptr + offs_m[:, None] * stride_hm + offs_d[None, :], mask=m2, other=0.0).to(acc_dtype)
        out = t + g * (h - t)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _bwd_kernel(g_ptr, h_ptr, t_ptr, wb_ptr, a2_ptr, a3_ptr, mask_ptr, z_ptr,
                dh_ptr, dt_ptr, dz_ptr, dwb_ptr,
                M, D, RANK, stride_hm, stride_ad, stride_wr, stride_om,
                HAS_MASK: tl.constexpr, NEED_H: tl.constexpr, NEED_T: tl.constexpr,
                ACC_FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    offs_m = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < RANK
    mr = mask_m[:, None] & mask_r[None, :]
    z = tl.load(z_ptr + offs_m[:, None] * RANK + offs_r[None, :], mask=mr, other=0.0).to(acc_dtype)
    dz = tl.zeros((BLOCK_M, BLOCK_R), dtype=acc_dtype)
    # Pass 1: dz = da W_B^T with da = dy (h - h') g (1 - g), g recomputed from z.
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        m2 = mask_m[:, None] & mask_d[None, :]
        wb = tl.load(wb_ptr + offs_r[:, None] * stride_wr + offs_d[None, :],
                     mask=mask_r[:, None] & mask_d[None, :], other=0.0).to(acc_dtype)
        g = 1.0 / (1.0 + tl.exp(-tl.dot(z, wb, input_precision=PRECISION)))
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_d[None, :], mask=m2, other=0.0).to(acc_dtype)
        t = tl.load(t_ptr + offs_m[:, None] * stride_hm + offs_d[None, :], mask=m2, other=0.0).to(acc_dtype)
        go = tl.load(g_ptr + offs_m[:, None] * stride_hm + offs_d[None, :], mask=m2, other=0.0).to(acc_dtype)
        da = go * (h - t) * g * (1.0 - g)
        dz = tl.dot(da, tl.trans(wb), dz, input_precision=PRECISION)
    if HAS_MASK:
        dz = dz * tl.load(mask_ptr + offs_m[:, None] * RANK + offs_r[None, :], mask=mr, other=0.0).to(acc_dtype)
    tl.store(dz_ptr + offs_m[:, None] * RANK + offs_r[None, :], dz, mask=mr)
    # Pass 2: dh, dh' and the block's share of dW_B = z^T da.
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        m2 = mask_m[:, None] & mask_d[None, :]
        wm = mask_r[:, None] & mask_d[None, :]
        wb = tl.load(wb_ptr + offs_r[:, None] * stride_wr + offs_d[None, :], mask=wm, other=0.0).to(acc_dtype)
        g = 1.0 / (1.0 + tl.exp(-tl.dot(z, wb, input_precision=PRECISION)))
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_d[None, :], mask=m2, other=0.0).to(acc_dtype)
        t = tl.load(t_ptr + offs_m[:, None] * stride_hm + offs_d[None, :], mask=m2, other=0.0).to(acc_dtype)
        go = tl.load(g_ptr + offs_m[:, None] * stride_hm + offs_d[None, :], mask=m2, other=0.0).to(acc_dtype)
        da = go * (h - t) * g * (1.0 - g)
        dwb = tl.dot(tl.trans(z), da, input_precision=PRECISION)
        tl.atomic_add(dwb_ptr + offs_r[:, None] * D + offs_d[None, :], dwb, mask=wm)
        am = mask_d[:, None] & mask_r[None, :]
        if NEED_H:
            a2 = tl.load(a2_ptr + offs_d[:, None].to(tl.int64) * stride_ad + offs_r[None, :], mask=am,
                         other=0.0).to(acc_dtype)
            dh = go * g + tl.dot(dz, tl.trans(a2), input_precision=PRECISION)
            tl.store(dh_ptr + offs_m[:, None] * stride_om + offs_d[None, :], dh.to(dh_ptr.dtype.element_ty), mask=m2)
        if NEED_T:
            a3 = tl.load(a3_ptr + offs_d[:, None].to(tl.int64) * stride_ad + offs_r[None, :], mask=am,
                         other=0.0).to(acc_dtype)
            dt = go * (1.0 - g) + tl.dot(dz, tl.trans(a3), input_precision=PRECISION)
            tl.store(dt_ptr + offs_m[:, None] * stride_om + offs_d[None, :], dt.to(dt_ptr.dtype.element_ty), mask=m2)


def _rows(x: Tensor) -> Tensor:
    """[B, T, w] -> [B T, w] contiguous (also for w = 0, where reshape(-1, w) cannot infer B T)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()


def imsm_gate_fwd(h: Tensor, h_tuned: Tensor, q: Tensor, q_tuned: Tensor, W_A: Tensor, W_B: Tensor,
                  hidden_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(out [B, T, d] in h's dtype, z [B, T, r] float32/float64); semantics of the C++ op."""
    B, T, d = h.shape
    r = W_A.shape[1]
    dtype, acc = h.dtype, _acc_dtype(h.dtype)
    M = B * T
    z = torch.zeros((B, T, r), device=h.device, dtype=acc)
    if M == 0 or d == 0:
        return torch.empty_like(h), z
    A = W_A.to(acc)
    c = (q.to(acc) @ A[:d] + q_tuned.to(acc) @ A[3 * d:]).contiguous()  # [B, r], once per sequence
    A2, A3 = A[d:2 * d].contiguous(), A[2 * d:3 * d].contiguous()
    Wb = W_B.to(acc).contiguous()
    hr, tr = _rows(h), _rows(h_tuned)
    mask = _rows(hidden_mask.to(acc)) if hidden_mask is not None else z
    out = torch.empty((M, d), device=h.device, dtype=_store_dtype(dtype))
    _fwd_kernel[(triton.cdiv(M, _BLOCK_M),)](
        hr, tr, c, A2, A3, Wb, mask, out, z,
        M, T, d, r, hr.stride(0), c.stride(0), A2.stride(0), Wb.stride(0), out.stride(0),
        HAS_MASK=hidden_mask is not None, BLOCK_M=_BLOCK_M, BLOCK_D=_BLOCK_D,
        BLOCK_R=_rank_block(r, 128), **_dot_flags(dtype),
    )
    return out.to(dtype).view(B, T, d), z


def imsm_gate_bwd(grad: Tensor, h: Tensor, h_tuned: Tensor, q: Tensor, q_tuned: Tensor, W_A: Tensor,
                  W_B: Tensor, hidden_mask: Optional[Tensor], z: Tensor, need_h: bool,
                  need_h_tuned: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dh or empty, dh_tuned or empty, dq, dq_tuned, dW_A, dW_B); semantics of the C++ op."""
    B, T, d = h.shape
    r = W_A.shape[1]
    dtype, acc = h.dtype, _acc_dtype(h.dtype)
    M = B * T
    A = W_A.to(acc)
    A2, A3 = A[d:2 * d].contiguous(), A[2 * d:3 * d].contiguous()
    Wb = W_B.to(acc).contiguous()
    hr, tr, gr = _rows(h), _rows(h_tuned), _rows(grad)
    sdt = _store_dtype(dtype)
    dh = torch.empty((M, d), device=h.device, dtype=sdt) if need_h else None
    dt = torch.empty((M, d), device=h.device, dtype=sdt) if need_h_tuned else None
    dz = torch.zeros((M, r), device=h.device, dtype=acc)
    dwb = torch.zeros((r, d), device=h.device, dtype=acc)
    if M > 0 and d > 0:
        zr = _rows(z)
        mask = _rows(hidden_mask.to(acc)) if hidden_mask is not None else zr
        _bwd_kernel[(triton.cdiv(M, _BLOCK_M),)](
            gr, hr, tr, Wb, A2, A3, mask, zr,
            dh if dh is not None else dz, dt if dt is not None else dz, dz, dwb,
            M, d, r, hr.stride(0), A2.stride(0), Wb.stride(0), d,
            HAS_MASK=hidden_mask is not None, NEED_H=need_h, NEED_T=need_h_tuned,
            BLOCK_M=_BLOCK_M, BLOCK_D=_BLOCK_D, BLOCK_R=_rank_block(r, 128), **_dot_flags(dtype),
        )
    dA2 = hr.to(acc).t() @ dz  # [d, r]
    dA3 = tr.to(acc).t() @ dz
    dc = dz.view(B, T, r).sum(1)  # [B, r]
    dq, dqt = dc @ A[:d].t(), dc @ A[3 * d:].t()
    dA1, dA4 = q.to(acc).t() @ dc, q_tuned.to(acc).t() @ dc
    dW_A = torch.cat([dA1, dA2, dA3, dA4], 0)
    # Two distinct empty tensors: a custom op's outputs must not alias each other.
    return ((dh.to(dtype).view(B, T, d) if need_h else h.new_empty(0)),
            (dt.to(dtype).view(B, T, d) if need_h_tuned else h.new_empty(0)),
            dq.to(dtype), dqt.to(dtype), dW_A.to(dtype), dwb.to(dtype))
