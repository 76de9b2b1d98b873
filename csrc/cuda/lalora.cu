// LaLoRA on CUDA: cuBLAS GEMMs through ATen (csrc/lalora.h) plus two kernels, the
// square-accumulate of lora_fisher_diag and the multi-tensor Laplace penalty (+ gradient):
// one launch over a device-side table of (tensor, chunk) work items.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "lalora.h"

namespace fastcur {
namespace {

constexpr int kThreads = 256;

int64_t grid_for(int64_t total) {
  const int64_t need = (total + kThreads - 1) / kThreads;
  const int64_t most = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return std::max<int64_t>(1, std::min(need, most));
}

// acc[i] += c * sum_e g[e, i]^2
template <typename scalar_t>
__global__ void square_accumulate_kernel(scalar_t* __restrict__ acc, const scalar_t* __restrict__ g, int64_t E,
                                         int64_t N, scalar_t c) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride) {
    scalar_t s = 0;
    for (int64_t e = 0; e < E; ++e) {
      const scalar_t v = g[e * N + i];
      s += v * v;
    }
    acc[i] += c * s;
  }
}

void square_accumulate_cuda(at::Tensor& acc, const at::Tensor& g_in, double c) {
  const at::Tensor g = g_in.contiguous();
  const int64_t E = g.size(0), N = g.size(1);
  if (N == 0) return;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "fastcur_square_accumulate_cuda", [&] {
    square_accumulate_kernel<scalar_t><<<grid_for(N), kThreads, 0, stream>>>(
        acc.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), E, N, static_cast<scalar_t>(c));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> lora_fisher_diag_cuda(const at::Tensor& x, const at::Tensor& grad_out,
                                                         const at::Tensor& A, const at::Tensor& B, double scale) {
  const c10::cuda::CUDAGuard guard(A.device());
  return lora_fisher_diag_impl(x, grad_out, A, B, scale, square_accumulate_cuda);
}

// One work item per block: elements [begin, end) of tensor t. The table holds, per item,
// t, begin, end; the pointer table holds, per tensor, p, a, q, grad (grad 0 when absent).
constexpr int64_t kChunk = 8192;

template <typename scalar_t>
__global__ void multi_tensor_penalty_kernel(const int64_t* __restrict__ items, const int64_t* __restrict__ ptrs,
                                            float* __restrict__ partial, double lam) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t w = blockIdx.x;
  const int64_t t = items[3 * w], begin = items[3 * w + 1], end = items[3 * w + 2];
  const scalar_t* p = reinterpret_cast<const scalar_t*>(ptrs[4 * t]);
  const scalar_t* a = reinterpret_cast<const scalar_t*>(ptrs[4 * t + 1]);
  const scalar_t* q = reinterpret_cast<const scalar_t*>(ptrs[4 * t + 2]);
  scalar_t* grad = reinterpret_cast<scalar_t*>(ptrs[4 * t + 3]);
  const acc_t l = static_cast<acc_t>(lam);
  acc_t s = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const acc_t d = static_cast<acc_t>(p[i]) - static_cast<acc_t>(a[i]);
    const acc_t qd = static_cast<acc_t>(q[i]) * d;
    s += qd * d;
    if (grad) grad[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) + l * qd);
  }
  __shared__ acc_t buf[kThreads];
  buf[threadIdx.x] = s;
  __syncthreads();
  for (int o = kThreads / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) buf[threadIdx.x] += buf[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[w] = static_cast<float>(buf[0]);
}

at::Tensor multi_tensor_penalty_cuda(const at::TensorList* grads, at::TensorList params, at::TensorList anchors,
                                     at::TensorList precisions, double lam) {
  check_penalty_lists(params, anchors, precisions, grads);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const size_t L = params.size();
  std::vector<at::Tensor> keep;
  std::vector<int64_t> ptrs(4 * L, 0), items;
  for (size_t t = 0; t < L; ++t) {
    at::Tensor p = params[t].contiguous(), a = anchors[t].contiguous(), q = precisions[t].contiguous();
    ptrs[4 * t] = reinterpret_cast<int64_t>(p.data_ptr());
    ptrs[4 * t + 1] = reinterpret_cast<int64_t>(a.data_ptr());
    ptrs[4 * t + 2] = reinterpret_cast<int64_t>(q.data_ptr());
    if (grads) ptrs[4 * t + 3] = reinterpret_cast<int64_t>((*grads)[t].data_ptr());
    keep.push_back(p);
    keep.push_back(a);
    keep.push_back(q);
    const int64_t N = p.numel();
    for (int64_t b = 0; b < N; b += kChunk) {
      items.push_back(int64_t(t));
      items.push_back(b);
      items.push_back(std::min(N, b + kChunk));
    }
  }
  const int64_t W = int64_t(items.size() / 3);
  const auto dev = params[0].device();
  if (W == 0) return at::zeros({}, params[0].options());
  const auto cpu_long = at::TensorOptions().dtype(at::kLong);
  at::Tensor items_d = at::from_blob(items.data(), {int64_t(items.size())}, cpu_long).to(dev);
  at::Tensor ptrs_d = at::from_blob(ptrs.data(), {int64_t(ptrs.size())}, cpu_long).to(dev);
  at::Tensor partial = at::empty({W}, params[0].options().dtype(at::kFloat));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "fastcur_laplace_penalty_cuda", [&] {
    multi_tensor_penalty_kernel<scalar_t><<<static_cast<unsigned>(W), kThreads, 0, stream>>>(
        items_d.data_ptr<int64_t>(), ptrs_d.data_ptr<int64_t>(), partial.data_ptr<float>(), lam);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial.sum().mul_(0.5 * lam).to(params[0].scalar_type());
}

at::Tensor laplace_diag_penalty_cuda(at::TensorList params, at::TensorList anchors, at::TensorList precisions,
                                    double lam) {
  return multi_tensor_penalty_cuda(nullptr, params, anchors, precisions, lam);
}

at::Tensor laplace_diag_penalty_grad_cuda(at::TensorList grads, at::TensorList params, at::TensorList anchors,
                                          at::TensorList precisions, double lam) {
  return multi_tensor_penalty_cuda(&grads, params, anchors, precisions, lam);
}

at::Tensor kfac_factor_cuda(const at::Tensor& x, bool diagonal) {
  const c10::cuda::CUDAGuard guard(x.device());
  return kfac_factor_impl(x, diagonal);
}

at::Tensor kfac_penalty_cuda(const at::Tensor& delta, const at::Tensor& S, const at::Tensor& G) {
  const c10::cuda::CUDAGuard guard(delta.device());
  return kfac_penalty_impl(delta, S, G);
}

at::Tensor kfac_penalty_bwd_cuda(const at::Tensor& grad, const at::Tensor& delta, const at::Tensor& S,
                                 const at::Tensor& G) {
  const c10::cuda::CUDAGuard guard(delta.device());
  return kfac_penalty_bwd_impl(grad, delta, S, G);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CUDA, m) {
  m.impl("lora_fisher_diag", &lora_fisher_diag_cuda);
  m.impl("laplace_diag_penalty", &laplace_diag_penalty_cuda);
  m.impl("laplace_diag_penalty_grad_", &laplace_diag_penalty_grad_cuda);
  m.impl("kfac_factor", &kfac_factor_cuda);
  m.impl("kfac_penalty", &kfac_penalty_cuda);
  m.impl("kfac_penalty_bwd", &kfac_penalty_bwd_cuda);
}

}  // namespace fastcur
