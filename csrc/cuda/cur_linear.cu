// cur_linear on CUDA: cuBLAS GEMMs through ATen (csrc/cur_linear.h) plus two kernels, the
// tied fast path's column gather and the rank-r epilogue that adds the adapter to a GEMM
// output in one read-modify-write pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cur_linear.h"

namespace fastcur {
namespace {

// ---------------------------------------------------------------------------------------------
// gather_columns: out[m, q] = src[m, idx[q]]

constexpr int kGatherThreads = 256;

template <typename scalar_t>
__global__ void gather_columns_kernel(const scalar_t* __restrict__ src, int64_t src_s0,
                                      int64_t src_s1, const int64_t* __restrict__ idx,
                                      int64_t idx_s0, scalar_t* __restrict__ out, int64_t M,
                                      int64_t N, int64_t r) {
  const int64_t total = M * r;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t m = i / r, q = i - m * r;
    const int64_t j = idx[q * idx_s0];
    CUDA_KERNEL_ASSERT(j >= 0 && j < N && "fastcur: gather index out of range");
    out[i] = src[m * src_s0 + j * src_s1];
  }
}

at::Tensor gather_columns_cuda(const at::Tensor& src, const at::Tensor& idx) {
  const c10::cuda::CUDAGuard device_guard(src.device());
  const int64_t M = src.size(0), N = src.size(1), r = idx.size(0);
  at::Tensor out = at::empty({M, r}, src.options());
  const int64_t total = M * r;
  if (total == 0) return out;
  const int64_t blocks_needed = (total + kGatherThreads - 1) / kGatherThreads;
  // A grid-stride loop: enough blocks to fill the GPU several times, no more.
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  const dim3 grid(static_cast<unsigned>(std::min(blocks_needed, max_blocks)));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(),
                                  "fastcur_gather_columns_cuda", [&] {
    gather_columns_kernel<scalar_t><<<grid, kGatherThreads, 0, stream>>>(
        src.data_ptr<scalar_t>(), src.stride(0), src.stride(1), idx.data_ptr<int64_t>(),
        idx.stride(0), out.data_ptr<scalar_t>(), M, N, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// rank_update_: out[m, c] += scale * sum_q z[m, q] E[c, q] (+ bias[c])
//
// Block tile kBM x kBN of `out`; a 32 x 8 thread block where each thread owns kTM rows and
// kTN columns (columns tx + 32 j, so every warp load/store of `out` is contiguous). The
// rank dimension is walked in chunks of kRC: z[tile rows, chunk] and E[tile cols, chunk] are
// staged in shared memory in the accumulation type (converted once, reused kBN resp. kBM
// times), so any r works with fixed shared memory. `out` is read and written exactly once,
// rounded once from the float32 (float64) accumulator.

constexpr int kTX = 32, kTY = 8;
constexpr int kTM = 8, kTN = 4;
constexpr int kBM = kTY * kTM;  // 64 rows
constexpr int kBN = kTX * kTN;  // 128 columns
constexpr int kRC = 16;         // rank chunk
constexpr int kThreads = kTX * kTY;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
rank_update_kernel(scalar_t* __restrict__ out, int64_t out_s0, int64_t out_s1,
                   const scalar_t* __restrict__ z, int64_t z_s0, int64_t z_s1,
                   const scalar_t* __restrict__ E, int64_t E_s0, int64_t E_s1,
                   const scalar_t* __restrict__ bias, int64_t bias_s0, acc_t scale, int64_t M,
                   int64_t N, int64_t r) {
  // +1 padding: the staging stores walk the rank index fastest, which would otherwise hit
  // one bank 16 times; the compute loop reads along rows, conflict-free either way.
  __shared__ acc_t zs[kRC][kBM + 1];
  __shared__ acc_t es[kRC][kBN + 1];

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kTX + tx;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kBN;

  acc_t acc[kTM][kTN];
#pragma unroll
  for (int i = 0; i < kTM; ++i)
#pragma unroll
    for (int j = 0; j < kTN; ++j) acc[i][j] = acc_t(0);

  for (int64_t q0 = 0; q0 < r; q0 += kRC) {
    // Out-of-range rows, columns and rank positions stage as zeros, so the compute loop
    // below needs no bounds checks.
    for (int e = tid; e < kRC * kBM; e += kThreads) {
      const int qq = e % kRC, mm = e / kRC;
      const int64_t m = m0 + mm, q = q0 + qq;
      zs[qq][mm] = (m < M && q < r) ? static_cast<acc_t>(z[m * z_s0 + q * z_s1]) : acc_t(0);
    }
    // E arrives either as C [n, r] (rank index contiguous) or as R^T, a view of R [r, k]
    // (column index contiguous): walk the contiguous index fastest to keep loads coalesced.
    if (E_s1 == 1) {
      for (int e = tid; e < kRC * kBN; e += kThreads) {
        const int qq = e % kRC, cc = e / kRC;
        const int64_t c = c0 + cc, q = q0 + qq;
        es[qq][cc] = (c < N && q < r) ? static_cast<acc_t>(E[c * E_s0 + q]) : acc_t(0);
      }
    } else {
      for (int e = tid; e < kRC * kBN; e += kThreads) {
        const int cc = e % kBN, qq = e / kBN;
        const int64_t c = c0 + cc, q = q0 + qq;
        es[qq][cc] = (c < N && q < r) ? static_cast<acc_t>(E[c * E_s0 + q * E_s1]) : acc_t(0);
      }
    }
    __syncthreads();

#pragma unroll
    for (int qq = 0; qq < kRC; ++qq) {
      acc_t zv[kTM], ev[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) zv[i] = zs[qq][ty * kTM + i];
#pragma unroll
      for (int j = 0; j < kTN; ++j) ev[j] = es[qq][tx + kTX * j];
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] += zv[i] * ev[j];
    }
    __syncthreads();
  }

  acc_t bv[kTN];
#pragma unroll
  for (int j = 0; j < kTN; ++j) {
    const int64_t c = c0 + tx + kTX * j;
    bv[j] = (bias != nullptr && c < N) ? static_cast<acc_t>(bias[c * bias_s0]) : acc_t(0);
  }
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const int64_t m = m0 + ty * kTM + i;
    if (m >= M) break;
    scalar_t* row = out + m * out_s0;
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t c = c0 + tx + kTX * j;
      if (c < N) {
        scalar_t& o = row[c * out_s1];
        o = static_cast<scalar_t>(static_cast<acc_t>(o) + scale * acc[i][j] + bv[j]);
      }
    }
  }
}

void rank_update_cuda(at::Tensor& out, const at::Tensor& z, const at::Tensor& E,
                      const c10::optional<at::Tensor>& bias, double scale) {
  const c10::cuda::CUDAGuard device_guard(out.device());
  const int64_t M = out.size(0), N = out.size(1), r = z.size(1);
  TORCH_INTERNAL_ASSERT(z.size(0) == M && E.size(0) == N && E.size(1) == r);
  if (M == 0 || N == 0 || (r == 0 && !bias.has_value())) return;
  const int64_t row_tiles = (M + kBM - 1) / kBM, col_tiles = (N + kBN - 1) / kBN;
  TORCH_CHECK(col_tiles <= std::numeric_limits<uint16_t>::max(),
              "fastcur: rank_update supports at most ", int64_t{65535} * kBN,
              " output columns, got ", N);
  TORCH_CHECK(row_tiles <= std::numeric_limits<int32_t>::max(),
              "fastcur: rank_update: too many rows (", M, ")");
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
  const dim3 block(kTX, kTY);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(),
                                  "fastcur_rank_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* bp = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    const int64_t bs = bias.has_value() ? bias->stride(0) : 0;
    rank_update_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
        out.data_ptr<scalar_t>(), out.stride(0), out.stride(1), z.data_ptr<scalar_t>(),
        z.stride(0), z.stride(1), E.data_ptr<scalar_t>(), E.stride(0), E.stride(1), bp, bs,
        static_cast<acc_t>(scale), M, N, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> cur_linear_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& C, const at::Tensor& U, const at::Tensor& R, double scale,
    const c10::optional<at::Tensor>& rows, const c10::optional<at::Tensor>& cols) {
  return cur_linear_forward(x, weight, bias, C, U, R, scale, rows, cols, gather_columns_cuda,
                            rank_update_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cur_linear_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& C,
    const at::Tensor& U, const at::Tensor& R, const at::Tensor& h, double scale,
    const c10::optional<at::Tensor>& cols, bool need_dx) {
  return cur_linear_backward(grad_y, x, weight, C, U, R, h, scale, cols, need_dx,
                             gather_columns_cuda, rank_update_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CUDA, m) {
  m.impl("cur_linear", &cur_linear_cuda);
  m.impl("cur_linear_bwd", &cur_linear_bwd_cuda);
}

}  // namespace fastcur
