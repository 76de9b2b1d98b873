"""LaLoRA (docs/methods.md, LaLoRA) in Triton: the launchers behind `torch.ops.fastcur.<op>_triton`.

lora_fisher_diag(x [E, T, k], grad_out [E, T, n], A [r, k], B [n, r], scale):
    H = x A^T, P = grad_out B                 `_mm_kernel` (skinny projections, [E T, r])
    F_B[i, j] = s^2 sum_e (sum_t G[e,t,i] H[e,t,j])^2     `_fisher_sq_kernel`
    F_A[i, j] = s^2 sum_e (sum_t P[e,t,i] X[e,t,j])^2     `_fisher_sq_kernel`
    Each program owns one output tile and walks the examples: one tile of one example's
    gradient lives in registers at a time, squared into the tile's accumulator (no example's
    full gradient is ever stored).
laplace_diag_penalty(grads?, params, anchors, precisions, lam):
    `_penalty_kernel`, one launch per tensor (Triton has no portable pointer table; the CUDA C++
    kernel is the one-launch path on a GPU, and `auto` prefers it); per-program partial sums
    land in one buffer, summed once.
kfac_factor(x [M, d], diagonal): `_mm_kernel` on (x^T, x) by strides, or `_sumsq_kernel`.
kfac_penalty(delta [a, b], S, G): L = G delta (`_mm_kernel`, or a row scaling for a diagonal
    G), then `_kfac_dot_kernel` fuses the second GEMM with the dot against delta.
kfac_penalty_bwd: grad * (G delta S + G^T delta S^T) with `_mm_kernel` (transposes by strides).

Numerics: every tile is loaded and upcast to the accumulation dtype (float32, float64 for
float64 inputs) and dots ask for IEEE precision; outputs are written in the accumulation
dtype (the interpreter mishandles bfloat16 dots and stores, see triton_kernels/cur_linear.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton.jit
def _mm_kernel(a_ptr, b_ptr, out_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
               stride_om, stride_on, ACC_FP64: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[M, N] = A[M, K] @ B[K, N] (operands by strides, out in the accumulation dtype)."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(acc_dtype)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(acc_dtype)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc,
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _fisher_sq_kernel(l_ptr, r_ptr, out_ptr, E, T, I, J, stride_le, stride_lt, stride_li,
                      stride_re, stride_rt, stride_rj, c, ACC_FP64: tl.constexpr,
                      BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr):
    """out[I, J] = c * sum_e (L_e^T R_e)^2 with L [E, T, I], R [E, T, J] by strides."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = (pid_i * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
    offs_j = (pid_j * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T).to(tl.int64)
    mask_i = offs_i < I
    mask_j = offs_j < J
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=acc_dtype)
    for e in range(0, E):
        tile = tl.zeros((BLOCK_I, BLOCK_J), dtype=acc_dtype)
        for t0 in range(0, T, BLOCK_T):
            tt = t0 + offs_t
            mask_t = tt < T
            lt = tl.load(l_ptr + e * stride_le + offs_i[:, None] * stride_li + tt[None, :] * stride_lt,
                         mask=mask_i[:, None] & mask_t[None, :], other=0.0).to(acc_dtype)
            rt = tl.load(r_ptr + e * stride_re + tt[:, None] * stride_rt + offs_j[None, :] * stride_rj,
                         mask=mask_t[:, None] & mask_j[None, :], other=0.0).to(acc_dtype)
            tile = tl.dot(lt, rt, tile, input_precision="ieee")
        acc += tile * tile
    tl.store(out_ptr + offs_i[:, None] * J + offs_j[None, :], acc * c, mask=mask_i[:, None] & mask_j[None, :])


@triton.jit
def _penalty_kernel(p_ptr, a_ptr, q_ptr, g_ptr, partial_ptr, N, lam, HAS_GRAD: tl.constexpr,
                    ACC_FP64: tl.constexpr, BLOCK: tl.constexpr):
    """partial[pid] = sum q (p - a)^2 over the block; g += lam * q * (p - a) when HAS_GRAD."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    offs = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = offs < N
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
    d = p - a
    qd = q * d
    tl.store(partial_ptr + pid, tl.sum(qd * d, axis=0))
    if HAS_GRAD:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
        tl.store(g_ptr + offs, (g + lam * qd).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sumsq_kernel(x_ptr, out_ptr, M, D, stride_m, stride_d, ACC_FP64: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[D] = sum_m x[m, :]^2."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    offs_d = (pid * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=acc_dtype)
    for m0 in range(0, M, BLOCK_M):
        mm = m0 + offs_m
        x = tl.load(x_ptr + mm[:, None] * stride_m + offs_d[None, :] * stride_d,
                    mask=(mm < M)[:, None] & mask_d[None, :], other=0.0).to(acc_dtype)
        acc += tl.sum(x * x, axis=0)
    tl.store(out_ptr + offs_d, acc, mask=mask_d)


@triton.jit
def _kfac_dot_kernel(l_ptr, s_ptr, d_ptr, partial_ptr, A, B, stride_la, stride_lb, stride_sa, stride_sb,
                     stride_da, stride_db, S_DIAG: tl.constexpr, ACC_FP64: tl.constexpr,
                     BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """partial[pid] = sum over the tile of (L S) ⊙ D, L [A, B] (= G D), S [B, B] or diag [B]."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_a = (pid_a * BLOCK_A + tl.arange(0, BLOCK_A)).to(tl.int64)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    mask_a = offs_a < A
    mask_b = offs_b < B
    mask = mask_a[:, None] & mask_b[None, :]
    if S_DIAG:
        lt = tl.load(l_ptr + offs_a[:, None] * stride_la + offs_b[None, :] * stride_lb, mask=mask,
                     other=0.0).to(acc_dtype)
        sv = tl.load(s_ptr + offs_b * stride_sa, mask=mask_b, other=0.0).to(acc_dtype)
        tile = lt * sv[None, :]
    else:
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        tile = tl.zeros((BLOCK_A, BLOCK_B), dtype=acc_dtype)
        for k0 in range(0, B, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < B
            lt = tl.load(l_ptr + offs_a[:, None] * stride_la + kk[None, :] * stride_lb,
                         mask=mask_a[:, None] & mask_k[None, :], other=0.0).to(acc_dtype)
            st = tl.load(s_ptr + kk[:, None] * stride_sa + offs_b[None, :] * stride_sb,
                         mask=mask_k[:, None] & mask_b[None, :], other=0.0).to(acc_dtype)
            tile = tl.dot(lt, st, tile, input_precision="ieee")
    dt = tl.load(d_ptr + offs_a[:, None] * stride_da + offs_b[None, :] * stride_db, mask=mask,
                 other=0.0).to(acc_dtype)
    tl.store(partial_ptr + pid_a * tl.num_programs(1) + pid_b, tl.sum(tl.sum(tile * dt, axis=1), axis=0))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
_BM, _BN, _BK = 32, 32, 32


def _mm(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """a [M, K] @ b [K, N] in `acc` (any strides)."""
    M, K = a.shape
    N = b.shape[1]
    out = torch.empty(M, N, device=a.device, dtype=acc)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    grid = (triton.cdiv(M, _BM), triton.cdiv(N, _BN))
    _mm_kernel[grid](a, b, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                     out.stride(0), out.stride(1), ACC_FP64=acc == torch.float64,
                     BLOCK_M=_BM, BLOCK_N=_BN, BLOCK_K=_BK)
    return out


def _fisher_sq(L: Tensor, R: Tensor, c: float, acc: torch.dtype) -> Tensor:
    E, T, I = L.shape
    J = R.shape[2]
    out = torch.zeros(I, J, device=L.device, dtype=acc)
    if E == 0 or T == 0 or I == 0 or J == 0:
        return out
    bi = min(64, max(16, triton.next_power_of_2(I)))
    bj = min(64, max(16, triton.next_power_of_2(J)))
    grid = (triton.cdiv(I, bi), triton.cdiv(J, bj))
    _fisher_sq_kernel[grid](L, R, out, E, T, I, J, L.stride(0), L.stride(1), L.stride(2),
                            R.stride(0), R.stride(1), R.stride(2), c, ACC_FP64=acc == torch.float64,
                            BLOCK_I=bi, BLOCK_J=bj, BLOCK_T=32)
    return out


def lora_fisher_diag(x: Tensor, grad_out: Tensor, A: Tensor, B: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(F_A [r, k], F_B [n, r]) of docs/methods.md, LaLoRA; x [E, T, k], grad_out [E, T, n]."""
    E, T, k = x.shape
    n, r = B.shape
    acc = _acc_dtype(A.dtype)
    H = _mm(x.reshape(E * T, k), A.t(), acc).reshape(E, T, r)          # X_e A^T
    P = _mm(grad_out.reshape(E * T, n), B, acc).reshape(E, T, r)       # G_e B
    c = float(scale) ** 2
    return _fisher_sq(P, x, c, acc), _fisher_sq(grad_out, H, c, acc)


_PEN_BLOCK = 1024


def laplace_diag_penalty(grads, params, anchors, precisions, lam: float) -> Tensor:
    """The penalty value (0-dim, params' dtype); adds lam * q * (p - a) into grads if given."""
    acc = _acc_dtype(params[0].dtype)
    counts = [triton.cdiv(p.numel(), _PEN_BLOCK) for p in params]
    partial = torch.zeros(max(1, sum(counts)), device=params[0].device, dtype=acc)
    start = 0
    for i, (p, a, q) in enumerate(zip(params, anchors, precisions)):
        if counts[i]:
            g = grads[i] if grads is not None else p
            _penalty_kernel[(counts[i],)](p.contiguous(), a.contiguous(), q.contiguous(), g,
                                          partial[start:], p.numel(), float(lam),
                                          HAS_GRAD=grads is not None, ACC_FP64=acc == torch.float64,
                                          BLOCK=_PEN_BLOCK)
        start += counts[i]
    return (partial.sum() * (0.5 * lam)).to(params[0].dtype)


def kfac_factor(x: Tensor, diagonal: bool) -> Tensor:
    """x [M, d] -> x^T x [d, d] or its diagonal [d], in the accumulation dtype."""
    M, d = x.shape
    acc = _acc_dtype(x.dtype)
    if not diagonal:
        return _mm(x.t(), x, acc)
    out = torch.zeros(d, device=x.device, dtype=acc)
    if M and d:
        _sumsq_kernel[(triton.cdiv(d, 64),)](x, out, M, d, x.stride(0), x.stride(1),
                                             ACC_FP64=acc == torch.float64, BLOCK_M=32, BLOCK_D=64)
    return out


def _left(G: Tensor, D: Tensor, acc: torch.dtype, transpose: bool = False) -> Tensor:
    if G.dim() == 1:
        return D * G.to(acc).unsqueeze(1)
    return _mm(G.t() if transpose else G, D, acc)


def kfac_penalty(delta: Tensor, S: Tensor, G: Tensor) -> Tensor:
    """tr(G delta S delta^T) as a 0-dim tensor of delta's dtype."""
    a, b = delta.shape
    acc = _acc_dtype(delta.dtype)
    D = delta.to(acc)
    L = _left(G, D, acc)
    grid = (triton.cdiv(a, 32), triton.cdiv(b, 32))
    partial = torch.zeros(max(1, grid[0] * grid[1]), device=delta.device, dtype=acc)
    if a and b:
        s = S.to(acc)
        _kfac_dot_kernel[grid](L, s, D, partial, a, b, L.stride(0), L.stride(1), s.stride(0),
                               s.stride(1) if s.dim() == 2 else 0, D.stride(0), D.stride(1),
                               S_DIAG=S.dim() == 1, ACC_FP64=acc == torch.float64,
                               BLOCK_A=32, BLOCK_B=32, BLOCK_K=32)
    return partial.sum().to(delta.dtype)


def kfac_penalty_bwd(grad: Tensor, delta: Tensor, S: Tensor, G: Tensor) -> Tensor:
    """grad * (G delta S + G^T delta S^T) [a, b] in delta's dtype."""
    acc = _acc_dtype(delta.dtype)
    D = delta.to(acc)
    out = None
    for transpose in (False, True):
        L = _left(G, D, acc, transpose)
        term = L * S.to(acc).unsqueeze(0) if S.dim() == 1 else _mm(L, S.t() if transpose else S, acc)
        out = term if out is None else out + term
    return (out * grad.to(acc)).to(delta.dtype)
