"""cur_linear (docs/methods.md, CURLoRA) in Triton: the launchers behind `torch.ops.fastcur.cur_linear_triton`.

Shapes (2-D only; the caller flattens leading dimensions into M):
    x [M, k], weight W [n, k], bias b [n] or None, C [n, r], U [r, r], R [r, k],
    rows, cols: None or int64 [r], the tied fast path's promise R == W[rows], C == W[:, cols].

Forward  `cur_linear_fwd` -> (y [M, n], h [M, r]):
    h = x R^T                                   `_cur_linear_proj_kernel` (skinny GEMM)
    z = h U^T                                   torch, [M, r] x [r, r]
    y = x W^T + b + scale * z C^T               `_cur_linear_fwd_kernel`, one store of y
Backward `cur_linear_bwd` -> (dx [M, k] or empty, dU [r, r], g [M, r]):
    g  = dy C                                   `_cur_linear_proj_kernel`
    dU = scale * g^T h                          torch, [r, M] x [M, r]
    dx = dy W + scale * (g U) R                 `_cur_linear_fwd_kernel` again (strides)

The tied fast path (same contract as the C++ kernels, csrc/cur_linear.h): the forward uses
`rows` and the backward `cols`. The projection kernel reads its rank-r operand through an
optional index vector, so with the indices it gathers R[q, :] = W[rows[q], :] and
C[:, q] = W[:, cols[q]] straight from W and never reads the R (forward) or C (backward)
buffer. The up-projection reads C (forward) and R (backward) as given, like the C++ kernels:
the forward's output is then differentiable in C as an independent input even when `cols` is
passed (gradcheck perturbs C), and on a GPU W[:, cols] would be a strided gather of r columns
(one element per cache line) where C is a contiguous [n, r] buffer, so gathering buys nothing.

Why not gather h from y0 = x W^T like the CPU kernel: the up-projection z C^T must be added
before y is stored (that is the point of the fused epilogue), and z needs h, so h has to exist
before the main GEMM starts. Gathering it from y0 would mean storing y0 first and making a
second read-modify-write pass over the M x n output (2 M n elements of traffic, plus a second
launch). The skinny GEMM x W[rows]^T costs one more read of x (M k) plus r rows of W: less
whenever k < 2n (square and up-projections; for down-projections with k ~ 3-4 n the two are
within 2x). The same holds for g = dy C = (dy W)[:, cols] in the backward.

Numerics: tiles are loaded in the input dtype and accumulated in float32 (float64 for float64
inputs); h, g and z are kept in the accumulation dtype between kernels and rounded to the
input dtype only where they are returned. Float32 dots ask for IEEE precision (a GPU would
otherwise use TF32). Under the Triton interpreter (TRITON_INTERPRET=1, the CPU test path)
bfloat16 `tl.dot` is wrong and bfloat16 stores truncate instead of rounding, so there every
tile is upcast before the dot and bfloat16 outputs go through a float32 buffer.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# Read once: TRITON_INTERPRET must be set before this module is imported anyway.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(gpu: list[dict], interpret: dict) -> list[triton.Config]:
    """Autotune configs: `gpu` entries carry num_warps / num_stages besides the block sizes.

    The interpreter cannot autotune over several configs, and large tiles are cheapest there
    (fewer programs, each one a handful of numpy calls), so it gets a single config.
    """
    if _INTERPRET:
        return [triton.Config(interpret)]
    return [triton.Config({key: v for key, v in c.items() if key.isupper()},
                          num_warps=c["warps"], num_stages=c["stages"]) for c in gpu]


def _tile(m: int, k: int, n: Optional[int] = None, warps: int = 4, stages: int = 3) -> dict:
    c = {"BLOCK_M": m, "BLOCK_K": k, "warps": warps, "stages": stages}
    if n is not None:
        c.update(BLOCK_N=n, GROUP_M=8)
    return c


_FWD_CONFIGS = _configs(
    [_tile(128, 32, 128, 4, 4), _tile(128, 32, 64, 4, 4), _tile(64, 32, 128, 4, 4),
     _tile(64, 64, 64, 4, 3), _tile(128, 64, 256, 8, 3)],
    interpret={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8})
# The projection's output is only r wide (BLOCK_R is set by the launcher), so its tiles are
# tall; smaller BLOCK_M gives more programs when M is modest.
_PROJ_CONFIGS = _configs(
    [_tile(64, 64, stages=4), _tile(64, 128), _tile(128, 64, stages=4), _tile(32, 128, stages=4)],
    interpret={"BLOCK_M": 64, "BLOCK_K": 64})


@triton.jit
def _indexed_offsets(idx_ptr, offs_q, mask_q, stride_q, limit, GATHER: tl.constexpr):
    """(offsets, mask) of rank positions `offs_q` along the indexed operand's rank axis:
    `idx[q] * stride_q` when gathering from W (tied fast path), else `q * stride_q`.

    An index outside [0, limit) is masked (reads zeros) rather than read out of bounds: the
    launcher range-checks on the CPU, but on a GPU that check would cost a host sync.
    """
    if GATHER:
        q = tl.load(idx_ptr + offs_q, mask=mask_q, other=0).to(tl.int64)
        in_range = (q >= 0) & (q < limit)
        tl.device_assert(in_range | ~mask_q, "fastcur.cur_linear: index out of range")
        mask_q = mask_q & in_range
    else:
        q = offs_q.to(tl.int64)
    return q * stride_q, mask_q


@triton.jit
def _cur_linear_fwd_kernel(
    a_ptr, b_ptr, z_ptr, e_ptr, bias_ptr, out_ptr,
    M, N, K, RANK, scale,
    stride_am, stride_ak, stride_bk, stride_bn, stride_zm, stride_zr,
    stride_eq, stride_en, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, ACC_FP64: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, N] = A[M, K] @ B[K, N] + scale * Z[M, RANK] @ E[RANK, N] (+ bias[N]).

    All operands by strides (the forward passes B = W^T, E = C^T as views; the backward
    B = W, E = R); Z is in the accumulation dtype. The rank-r term goes into the same
    accumulator as A @ B, so `out` is written once and never read.
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    # Grouped tile order: GROUP_M consecutive row tiles share a column of B tiles in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    # int64 offsets: M * k and n * k can exceed 2^31 elements for large activations/weights.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(acc_dtype)
            b = b.to(acc_dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Rank-r up-projection, K = RANK padded to BLOCK_R (a power of two >= 16) by masks.
    # Z arrives in the accumulation dtype, so E is upcast to match (a tiny K, cheap either way).
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, RANK, BLOCK_R):
        q = r0 + offs_r
        mask_q = q < RANK
        z = tl.load(z_ptr + offs_m[:, None] * stride_zm + q[None, :] * stride_zr,
                    mask=mask_m[:, None] & mask_q[None, :], other=0.0)
        e = tl.load(e_ptr + q[:, None].to(tl.int64) * stride_eq + offs_n[None, :] * stride_en,
                    mask=mask_q[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(z * scale, e.to(acc_dtype), acc, input_precision=PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(acc_dtype)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _cur_linear_proj_kernel(
    a_ptr, f_ptr, f_idx_ptr, out_ptr,
    M, K, RANK, IDX_LIMIT,
    stride_am, stride_ak, stride_fq, stride_fk, stride_om, stride_or,
    GATHER_F: tl.constexpr, ACC_FP64: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[M, RANK] = A[M, K] @ F[K, RANK], the skinny rank-r projection (h = x R^T, g = dy C).

    F[kk, q] is read at `f_ptr + off(q) + kk * stride_fk`, off(q) from `_indexed_offsets`
    (gather rows / columns of W by index when GATHER_F; indices must lie in [0, IDX_LIMIT)).
    One program owns BLOCK_M rows and BLOCK_R rank columns and walks the whole K; the
    gathered offsets are loaded once.
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_q = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < M
    mask_q = offs_q < RANK

    f_cols, mask_f = _indexed_offsets(f_idx_ptr, offs_q, mask_q, stride_fq, IDX_LIMIT, GATHER_F)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    f_ptrs = f_ptr + offs_k[:, None] * stride_fk + f_cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        f = tl.load(f_ptrs, mask=mask_k[:, None] & mask_f[None, :], other=0.0)
        if UPCAST:
            a = a.to(acc_dtype)
            f = f.to(acc_dtype)
        acc = tl.dot(a, f, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        f_ptrs += BLOCK_K * stride_fk

    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_q[None, :] * stride_or,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_q[None, :])


_fwd_kernel = triton.autotune(configs=_FWD_CONFIGS, key=["M", "N", "K", "RANK"])(
    _cur_linear_fwd_kernel)
_proj_kernel = triton.autotune(configs=_PROJ_CONFIGS, key=["M", "K", "RANK"])(
    _cur_linear_proj_kernel)


# ---------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_flags(dtype: torch.dtype) -> dict:
    """Constexprs shared by both kernels for inputs of `dtype`."""
    return dict(
        ACC_FP64=dtype == torch.float64,
        # bf16/fp16 tiles feed the tensor cores directly on a GPU; the interpreter's bf16 dot
        # is wrong, so there everything is upcast first (float32 / float64 tiles are no-ops).
        UPCAST=_INTERPRET,
        # Applies to float32 operands: the main dot for float32 inputs (IEEE, or a GPU would
        # use TF32 and miss float32 tolerances; IEEE runs on FMA units, not tensor cores, and
        # "tf32x3" is the faster near-float32 option if that ever matters) and the rank-r dot,
        # whose z is float32; for half-precision inputs TF32 there keeps more bits than the
        # inputs had.
        PRECISION="ieee" if dtype in (torch.float32, torch.float64) or _INTERPRET else "tf32",
    )


def _rank_block(r: int, cap: int) -> int:
    return min(max(16, triton.next_power_of_2(max(r, 1))), cap)


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    # The interpreter truncates float32 -> bfloat16 on store instead of rounding to nearest.
    return torch.float32 if _INTERPRET and dtype == torch.bfloat16 else dtype


def _vector(t: Optional[Tensor]) -> Optional[Tensor]:
    """A 1-D argument (bias, lora_bias, log_theta) as the kernels read it: contiguous (they index
    it as `ptr + offs`). Free for a contiguous tensor; a strided or expanded view is copied, so
    it is never read with the wrong stride or past its storage."""
    return None if t is None else t.contiguous()


def _check_index(idx: Optional[Tensor], r: int, limit: int, name: str,
                 device: torch.device) -> Optional[Tensor]:
    """The index vector, contiguous; a readable error instead of an out-of-bounds read."""
    if idx is None:
        return None
    if idx.dtype != torch.int64 or idx.shape != (r,) or idx.device != device:
        raise ValueError(f"fastcur.cur_linear (triton): '{name}' must be an int64 tensor of shape "
                         f"({r},) on {device}, got {idx.dtype} {tuple(idx.shape)} on {idx.device}")
    # Values are checked only where that costs no device sync (the kernel masks the rest).
    if idx.device.type == "cpu" and r and not bool(((idx >= 0) & (idx < limit)).all()):
        raise ValueError(f"fastcur.cur_linear (triton): '{name}' has an index out of range for a "
                         f"dimension of size {limit}")
    return idx.contiguous()


def _project(a: Tensor, src: Tensor, q_dim: int, idx: Optional[Tensor], r: int,
             out_dtype: torch.dtype) -> Tensor:
    """out[m, q] = sum_kk a[m, kk] * F[kk, q]  ->  [M, r] in `out_dtype`.

    `src` is 2-D with its rank axis `q_dim` (the other axis is the K axis): F[kk, q] is
    src[q, kk] (q_dim = 0) or src[kk, q] (q_dim = 1), with q replaced by idx[q] when `idx`
    is given, i.e. gathered rows (q_dim = 0) or columns (q_dim = 1) of `src`.
    """
    M, K = a.shape
    out = torch.empty((M, r), device=a.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    if K == 0:
        return out.zero_()
    block_r = _rank_block(r, 128)
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(r, block_r))

    _proj_kernel[grid](
        a, src, idx if idx is not None else src, out,
        M, K, r, src.shape[q_dim],
        a.stride(0), a.stride(1), src.stride(q_dim), src.stride(1 - q_dim),
        out.stride(0), out.stride(1),
        GATHER_F=idx is not None, BLOCK_R=block_r, **_dot_flags(a.dtype),
    )
    return out


def _gemm_rank_update(a: Tensor, b: Tensor, z: Tensor, e: Tensor, bias: Optional[Tensor],
                      scale: float) -> Tensor:
    """a [M, K] @ b [K, N] + scale * z [M, r] @ E [r, N] (+ bias) in a's dtype, one pass.

    `b` and `e` are any [K, N] and [r, N] views (strides are passed through).
    """
    M, K = a.shape
    N = b.shape[1]
    r = z.shape[1]
    dtype = a.dtype
    bias = _vector(bias)
    out = torch.empty((M, N), device=a.device, dtype=_store_dtype(dtype))
    if out.numel() == 0:
        return out.to(dtype)
    block_r = _rank_block(r, 64)
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _fwd_kernel[grid](
        a, b, z, e, bias if bias is not None else out, out,
        M, N, K, r, float(scale),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), z.stride(0), z.stride(1),
        e.stride(0), e.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, BLOCK_R=block_r,
        **_dot_flags(dtype),
    )
    return out.to(dtype)


# ---------------------------------------------------------------------------------------------
# Launchers (semantics of csrc/cur_linear.h)
# ---------------------------------------------------------------------------------------------

def cur_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], C: Tensor, U: Tensor,
                   R: Tensor, scale: float, rows: Optional[Tensor],
                   cols: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """y = x W^T + b + scale * ((x R^T) U^T) C^T and h = x R^T.

    Args:
        x: [M, k]; weight: [n, k]; bias: [n] or None; C: [n, r]; U: [r, r]; R: [r, k]
            (all one floating dtype and device, any strides).
        scale: the scale s of ΔW = s C U R.
        rows: None or int64 [r]. When given, R is read as weight[rows] (the tied fast
            path) and the R buffer is not read.
        cols: accepted for the op's signature (as in C++); the forward reads C itself.
    Returns:
        y [M, n] and h [M, r] (saved for the backward), both in x's dtype.
    """
    M, (n, k), r = x.shape[0], weight.shape, U.shape[0]
    dtype = x.dtype
    acc = _acc_dtype(dtype)
    rows = _check_index(rows, r, n, "rows", x.device)
    _check_index(cols, r, k, "cols", x.device)
    if M == 0:
        return x.new_empty((0, n)), x.new_empty((0, r))

    # h = x R^T, with R = weight[rows] gathered row by row when tied.
    if rows is not None:
        h = _project(x, weight, 0, rows, r, acc)
    else:
        h = _project(x, R, 0, None, r, acc)
    z = h @ U.to(acc).t()  # [M, r]; tiny
    y = _gemm_rank_update(x, weight.t(), z, C.t(), bias, scale)  # x W^T + s z C^T + b
    return y, h.to(dtype)


def cur_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, C: Tensor, U: Tensor, R: Tensor,
                   h: Tensor, scale: float, cols: Optional[Tensor],
                   need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `cur_linear_fwd` w.r.t. x and U (docs/methods.md, CURLoRA), plus g for dR.

    Args:
        grad_y: [M, n]; x: [M, k]; weight: [n, k]; C: [n, r]; U: [r, r]; R: [r, k];
        h: [M, r] from the forward; scale: s; cols: None or int64 [r] (tied: C read as
        weight[:, cols], the C buffer is not read); need_dx: whether to compute dx.
    Returns:
        dx = dy W + s (g U) R [M, k] (an empty tensor when not need_dx),
        dU = s g^T h [r, r], g = dy C [M, r]; all in x's dtype.
    """
    k, r = weight.shape[1], U.shape[0]
    dtype = x.dtype
    acc = _acc_dtype(dtype)
    cols = _check_index(cols, r, k, "cols", x.device)

    # g = dy C, with C = weight[:, cols] gathered column by column when tied.
    if cols is not None:
        g = _project(grad_y, weight, 1, cols, r, acc)
    else:
        g = _project(grad_y, C, 1, None, r, acc)
    dU = (g.t() @ h.to(acc)).mul_(scale).to(dtype)  # [r, r]; zeros when M == 0
    if need_dx:
        # dx = dy W + s (g U) R: the forward kernel with A = dy, B = W, E = R.
        dx = _gemm_rank_update(grad_y, weight, g @ U.to(acc), R, None, scale)
    else:
        dx = x.new_empty(0)
    return dx, dU, g.to(dtype)
