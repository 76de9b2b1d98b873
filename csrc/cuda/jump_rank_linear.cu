// jump_rank_linear on CUDA (docs/methods.md, JumpLoRA, rank-gated): cuBLAS GEMMs through ATen
// (csrc/jump_rank_linear.h) plus the gate epilogues on the skinny [M, r] projection; θ_j is
// read on the device (log_theta in the acc dtype), the window sums go through one atomicAdd per block and channel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "jump_rank_linear.h"
#include "rank_update.h"
#include "jump_common.cuh"

namespace fastcur {
namespace {

using jump_cuda::kThreads;

template <typename scalar_t, typename acc_t>
__global__ void rank_gate_kernel(const scalar_t* __restrict__ h, const acc_t* __restrict__ lt,
                                 scalar_t* __restrict__ g, int64_t M, int64_t r) {
  const int64_t N = M * r;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride) {
    const acc_t th = exp(lt[i % r]);
    g[i] = static_cast<acc_t>(h[i]) > th ? h[i] : scalar_t(0);
  }
}

// One thread per (row, channel); the window sums are added to win [r] with atomics (only
// entries inside the narrow kernel window contribute, so contention is low).
template <typename scalar_t, typename acc_t>
__global__ void rank_gate_bwd_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ dg,
                                     const acc_t* __restrict__ lt, scalar_t* __restrict__ g,
                                     scalar_t* __restrict__ dh, acc_t* __restrict__ win,
                                     acc_t inv_eps, int64_t M, int64_t r) {
  const int64_t N = M * r;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride) {
    const int64_t j = i % r;
    const acc_t th = exp(lt[j]);
    const acc_t hv = static_cast<acc_t>(h[i]);
    const bool on = hv > th;
    g[i] = on ? h[i] : scalar_t(0);
    dh[i] = on ? dg[i] : scalar_t(0);
    if (fabs((hv - th) * inv_eps) < acc_t(0.5)) atomicAdd(win + j, static_cast<acc_t>(dg[i]));
  }
}

at::Tensor rank_gate_cuda(const at::Tensor& h_in, const at::Tensor& log_theta) {
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous(), lt = log_theta.contiguous();
  at::Tensor g = at::empty_like(h);
  const int64_t M = h.size(0), r = h.size(1);
  if (M * r == 0) return g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "fastcur_rank_gate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rank_gate_kernel<scalar_t, acc_t><<<jump_cuda::grid_for(M * r), kThreads, 0,
                                        at::cuda::getCurrentCUDAStream()>>>(
        h.data_ptr<scalar_t>(), lt.data_ptr<acc_t>(), g.data_ptr<scalar_t>(), M, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rank_gate_bwd_cuda(const at::Tensor& h_in,
                                                                  const at::Tensor& dg_in,
                                                                  const at::Tensor& log_theta,
                                                                  double eps) {
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous(), dg = dg_in.contiguous(), lt = log_theta.contiguous();
  const int64_t M = h.size(0), r = h.size(1);
  at::Tensor g = at::empty_like(h), dh = at::empty_like(h);
  const auto acc = jump_acc_type(h.scalar_type());
  at::Tensor win = at::zeros({r}, h.options().dtype(acc));
  if (M * r > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "fastcur_rank_gate_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      rank_gate_bwd_kernel<scalar_t, acc_t><<<jump_cuda::grid_for(M * r), kThreads, 0,
                                              at::cuda::getCurrentCUDAStream()>>>(
          h.data_ptr<scalar_t>(), dg.data_ptr<scalar_t>(), lt.data_ptr<acc_t>(),
          g.data_ptr<scalar_t>(), dh.data_ptr<scalar_t>(), win.data_ptr<acc_t>(),
          static_cast<acc_t>(1.0 / eps), M, r);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const at::Tensor theta = lt.exp();
  at::Tensor dlog = (-(theta * theta) / eps * win).to(log_theta.scalar_type());
  return {g, dh, dlog};
}

std::tuple<at::Tensor, at::Tensor> jump_rank_linear_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& log_theta, double scale,
    double /*bandwidth*/) {
  return jump_rank_linear_forward(x, weight, bias, A, B, log_theta, scale, rank_gate_cuda,
                                  rank_update_addmm);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jump_rank_linear_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& log_theta, const at::Tensor& h, double scale,
    double bandwidth, bool need_dx) {
  return jump_rank_linear_backward(grad_y, x, weight, A, B, log_theta, h, scale, bandwidth,
                                   need_dx, rank_gate_bwd_cuda, rank_update_addmm);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CUDA, m) {
  m.impl("jump_rank_linear", &jump_rank_linear_cuda);
  m.impl("jump_rank_linear_bwd", &jump_rank_linear_bwd_cuda);
}

}  // namespace fastcur
