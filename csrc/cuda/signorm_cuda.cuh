// The CUDA row kernel of the SigNorm epilogue (docs/methods.md, SECURA), shared by signorm, secura_linear and
// signorm_merge: one thread block per row, two sweeps over the row (the row max of L, then the
// output), Δ either loaded or recomputed per element from the row's z (kept in shared memory)
// and E [r, n] by strides, so Δ never exists as an M x n tensor on the fused paths.
//   mode 0: row max + output (scope "token")       mode 1: row max only (phase 1 of "tensor")
//   mode 2: output with the max read from gmax[0]  mode 3: output with rowmax[m] given
// The scope "tensor" max between phases is a device reduction (no host sync).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>

#include <algorithm>

#include "signorm.h"

namespace fastcur {
namespace cuda {

constexpr int kRowThreads = 256;

template <typename scalar_t, typename acc_t>
struct RowsArgs {
  const scalar_t* y0 = nullptr;
  int64_t y0_s = 0;
  const scalar_t* bias = nullptr;
  const scalar_t* delta = nullptr;  // loaded Δ [M, N] (row stride d_s) ...
  int64_t d_s = 0;
  const acc_t* z = nullptr;         // ... or Δ = scale z E + lb, z [M, rank] contiguous
  int64_t rank = 0;
  const scalar_t* E = nullptr;      // E[q, j] = E[q * e_q + j * e_n]
  int64_t e_q = 0, e_n = 0;
  const scalar_t* lb = nullptr;
  acc_t scale = 1, k = 6, eps = 1e-10;
  bool raw = false;
  scalar_t* out = nullptr;
  int64_t out_s = 0;
  acc_t* S = nullptr;               // optional [M, N] (row stride S_s)
  int64_t S_s = 0;
  acc_t* rowmax = nullptr;
  const acc_t* gmax = nullptr;
  int64_t M = 0, N = 0;
  int mode = 0;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t row_delta(const RowsArgs<scalar_t, acc_t>& a, const acc_t* zs,
                                           int64_t m, int64_t j) {
  if (a.z == nullptr) return static_cast<acc_t>(a.delta[m * a.d_s + j]);
  acc_t d = 0;
  for (int64_t q = 0; q < a.rank; ++q) d += zs[q] * static_cast<acc_t>(a.E[q * a.e_q + j * a.e_n]);
  d *= a.scale;
  if (a.lb != nullptr) d += static_cast<acc_t>(a.lb[j]);
  return d;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t row_y0(const RowsArgs<scalar_t, acc_t>& a, int64_t m, int64_t j) {
  acc_t y = static_cast<acc_t>(a.y0[m * a.y0_s + j]);
  if (a.bias != nullptr) y += static_cast<acc_t>(a.bias[j]);
  return y;
}

template <typename acc_t>
__device__ __forceinline__ acc_t signorm_S(acc_t L, acc_t mx, acc_t k, acc_t eps, bool raw) {
  const acc_t n = signorm_logit(L, mx, k, eps, raw);
  const acc_t sig = acc_t(1) / (acc_t(1) + exp(-n));
  return signorm_scale_from_sigmoid(sig, mx);
}

template <typename scalar_t, typename acc_t>
__global__ void signorm_rows_kernel(RowsArgs<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* zs = reinterpret_cast<acc_t*>(smem_raw);            // [rank]
  __shared__ acc_t red[kRowThreads];
  for (int64_t m = blockIdx.x; m < a.M; m += gridDim.x) {
    if (a.z != nullptr) {
      for (int64_t q = threadIdx.x; q < a.rank; q += blockDim.x) zs[q] = a.z[m * a.rank + q];
    }
    __syncthreads();
    acc_t mx = 0;
    if (a.mode <= 1) {
      acc_t local = 0;
      for (int64_t j = threadIdx.x; j < a.N; j += blockDim.x) {
        const acc_t L = abs(row_delta(a, zs, m, j)) / (abs(row_y0(a, m, j)) + a.eps);
        local = L > local ? L : local;
      }
      red[threadIdx.x] = local;
      __syncthreads();
      for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] = red[threadIdx.x] > red[threadIdx.x + s] ? red[threadIdx.x] : red[threadIdx.x + s];
        __syncthreads();
      }
      mx = red[0];
      if (threadIdx.x == 0) a.rowmax[m] = mx;
      __syncthreads();
    } else {
      mx = a.mode == 2 ? a.gmax[0] : a.rowmax[m];
    }
    if (a.mode != 1) {
      for (int64_t j = threadIdx.x; j < a.N; j += blockDim.x) {
        const acc_t d = row_delta(a, zs, m, j);
        const acc_t y = row_y0(a, m, j);
        const acc_t S = signorm_S(abs(d) / (abs(y) + a.eps), mx, a.k, a.eps, a.raw);
        a.out[m * a.out_s + j] = static_cast<scalar_t>((y + y + d) / S);
        if (a.S != nullptr) a.S[m * a.S_s + j] = S;
      }
    }
    __syncthreads();
  }
}

// Runs the epilogue over all rows: scope "token" one launch; "tensor" two around a device max.
// `rowmax` [M] (acc dtype, on the device) receives the row maxima of L.
template <typename scalar_t, typename acc_t>
void launch_signorm_rows(RowsArgs<scalar_t, acc_t> a, bool tensor_scope, at::Tensor& rowmax) {
  if (a.M == 0 || a.N == 0) {
    rowmax.zero_();
    return;
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(a.M, max_blocks)));
  const size_t smem = a.z != nullptr ? static_cast<size_t>(a.rank) * sizeof(acc_t) : 0;
  a.rowmax = rowmax.data_ptr<acc_t>();
  if (!tensor_scope) {
    a.mode = 0;
    signorm_rows_kernel<scalar_t, acc_t><<<grid, kRowThreads, smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  a.mode = 1;
  signorm_rows_kernel<scalar_t, acc_t><<<grid, kRowThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor gmax = rowmax.amax().reshape({1});
  a.gmax = gmax.data_ptr<acc_t>();
  a.mode = 2;
  signorm_rows_kernel<scalar_t, acc_t><<<grid, kRowThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fastcur
