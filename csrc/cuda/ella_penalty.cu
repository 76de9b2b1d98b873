// ella_penalty on CUDA (docs/methods.md, JumpLoRA): Z tiles by cuBLAS (csrc/jump_linear.h), one elementwise
// kernel per tile for the value (block sums + atomicAdd) and the gradient tile.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "jump_linear.h"
#include "jump_common.cuh"

namespace fastcur {
namespace {

using jump_cuda::kThreads;
constexpr int64_t kTileElems = int64_t{1} << 22;

template <typename scalar_t, typename acc_t>
__global__ void ella_tile_kernel(const acc_t* __restrict__ Z, const scalar_t* __restrict__ Wp,
                                 const acc_t* __restrict__ lt, acc_t s, acc_t fe,
                                 acc_t* __restrict__ val,
                                 acc_t* __restrict__ dZ, int64_t N) {
  const acc_t th = exp(lt[0]);   // log_theta in the acc dtype
  const acc_t two_s2 = acc_t(2) * s * s, soft = acc_t(1) - fe;
  acc_t local = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride) {
    const acc_t z = Z[i], w = static_cast<acc_t>(Wp[i]);
    const acc_t e = fabs(z) > th ? acc_t(1) : soft;   // fe 1[|Z| > θ] + 1 - fe
    const acc_t v = s * e * z * w;
    local += v * v;
    if (dZ != nullptr) dZ[i] = two_s2 * e * e * z * w * w;
  }
  const acc_t total = jump_cuda::block_sum(local);
  if (threadIdx.x == 0) atomicAdd(val, total);
}

void ella_tile_cuda(const at::Tensor& Z, const at::Tensor& Wp, const at::Tensor& log_theta,
                    double s, double fe, at::Tensor& val, at::Tensor& dZ) {
  const c10::cuda::CUDAGuard guard(Z.device());
  const int64_t N = Z.numel();
  if (N == 0) return;
  const at::Tensor lt = log_theta.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Wp.scalar_type(), "fastcur_ella_tile_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ella_tile_kernel<scalar_t, acc_t><<<jump_cuda::grid_for(N), kThreads, 0,
                                        at::cuda::getCurrentCUDAStream()>>>(
        Z.data_ptr<acc_t>(), Wp.data_ptr<scalar_t>(), lt.data_ptr<acc_t>(),
        static_cast<acc_t>(s), static_cast<acc_t>(fe), val.data_ptr<acc_t>(), dZ.defined() ? dZ.data_ptr<acc_t>() : nullptr,
        N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor ella_penalty_cuda(const at::Tensor& A, const at::Tensor& B, const at::Tensor& log_theta,
                             const at::Tensor& W_past, double scale, double f) {
  auto res = ella_schedule(A, B, log_theta, W_past, scale, f, false, kTileElems, ella_tile_cuda);
  return std::get<0>(res).to(W_past.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> ella_penalty_bwd_cuda(const at::Tensor& grad,
                                                         const at::Tensor& A, const at::Tensor& B,
                                                         const at::Tensor& log_theta,
                                                         const at::Tensor& W_past, double scale,
                                                         double f) {
  auto res = ella_schedule(A, B, log_theta, W_past, scale, f, true, kTileElems, ella_tile_cuda);
  const at::Tensor g = grad.to(std::get<1>(res).scalar_type());
  return {std::get<1>(res).mul_(g).to(A.scalar_type()), std::get<2>(res).mul_(g).to(B.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CUDA, m) {
  m.impl("ella_penalty", &ella_penalty_cuda);
  m.impl("ella_penalty_bwd", &ella_penalty_bwd_cuda);
}

}  // namespace fastcur
