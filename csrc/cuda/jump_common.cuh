// Small helpers of the JumpLoRA CUDA kernels: a block-wide sum and grid sizing.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>

namespace fastcur {
namespace jump_cuda {

constexpr int kThreads = 256;

// Sum of `v` over the block (kThreads threads); the result is valid in thread 0.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t buf[kThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  return buf[0];
}

inline unsigned grid_for(int64_t n) {
  const int64_t need = (n + kThreads - 1) / kThreads;
  const int64_t cap =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(need, cap)));
}

}  // namespace jump_cuda
}  // namespace fastcur
