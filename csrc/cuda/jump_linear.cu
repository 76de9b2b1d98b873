// jump_linear on CUDA (docs/methods.md, JumpLoRA): the row-block schedule of csrc/jump_linear.h with cuBLAS
// GEMMs through ATen and two elementwise tile kernels; θ = exp(log_theta) is read on the
// device (no host sync; log_theta in the acc dtype, float32 for half inputs), the θ gradient is a block reduction plus one atomicAdd per block.
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

// Tile of Z / dy^T x per block of W's rows: 4 Mi elements, enough rows for cuBLAS to fill
// the GPU while bounding the tile to 16 MB in float32.
constexpr int64_t kTileElems = int64_t{1} << 22;

// Wp / val are null without ELLA (uniform over the grid, so the block sum is safe to skip).
template <typename scalar_t, typename acc_t>
__global__ void build_weff_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ W,
                                  const acc_t* __restrict__ Z, const acc_t* __restrict__ lt,
                                  acc_t s, acc_t f, const scalar_t* __restrict__ Wp,
                                  acc_t* __restrict__ val, acc_t fe, int64_t N) {
  const acc_t th = exp(lt[0]);
  const acc_t soft = s * (acc_t(1) - f);
  const acc_t ella_soft = s * (acc_t(1) - fe);   // ELLA's delta s Z (fe m + 1 - fe)
  acc_t local = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride) {
    const acc_t z = Z[i];
    const bool on = fabs(z) > th;
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(W[i]) + (on ? s : soft) * z);
    if (Wp != nullptr) {
      const acc_t v = (on ? s : ella_soft) * z * static_cast<acc_t>(Wp[i]);
      local += v * v;
    }
  }
  if (val == nullptr) return;
  const acc_t total = jump_cuda::block_sum(local);
  if (threadIdx.x == 0) atomicAdd(val, total);
}

template <typename scalar_t, typename acc_t>
__global__ void grad_tile_kernel(acc_t* __restrict__ dZ, const scalar_t* __restrict__ T,
                                 const acc_t* __restrict__ Z, const acc_t* __restrict__ lt,
                                 acc_t s, acc_t f, acc_t inv_eps, acc_t* __restrict__ th_acc,
                                 const scalar_t* __restrict__ Wp, const acc_t* __restrict__ coef,
                                 acc_t fe, int64_t N) {
  const acc_t th = exp(lt[0]);
  const acc_t soft = acc_t(1) - f;
  // ELLA (Wp, coef non-null): dZ += c 2 s² e² Z Wp², e = fe m + 1 - fe, c read on the device
  // (no host sync).
  const acc_t ella_c = Wp != nullptr ? acc_t(2) * s * s * coef[0] : acc_t(0);
  const acc_t ella_soft2 = (acc_t(1) - fe) * (acc_t(1) - fe);
  acc_t local = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride) {
    const acc_t z = Z[i];
    const acc_t g = s * static_cast<acc_t>(T[i]);
    const bool on = fabs(z) > th;
    acc_t d = on ? g : g * soft;
    if (Wp != nullptr) {
      const acc_t w = static_cast<acc_t>(Wp[i]);
      d += (on ? ella_c : ella_c * ella_soft2) * z * w * w;
    }
    dZ[i] = d;
    const acc_t u1 = fabs((z - th) * inv_eps), u2 = fabs((-z - th) * inv_eps);
    local += g * (acc_t(u2 < acc_t(0.5)) - acc_t(u1 < acc_t(0.5)));
  }
  const acc_t total = jump_cuda::block_sum(local);
  // th_acc += f (θ/ε) Σ ...
  if (threadIdx.x == 0) atomicAdd(th_acc, total * f * th * inv_eps);
}

void build_weff_cuda(at::Tensor& out, const at::Tensor& W, const at::Tensor& Z,
                     const at::Tensor& log_theta, double s, double f, const at::Tensor& Wp,
                     at::Tensor& val, double fe) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t N = out.numel();
  if (N == 0) return;
  const at::Tensor lt = log_theta.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fastcur_jump_weff_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    build_weff_kernel<scalar_t, acc_t><<<jump_cuda::grid_for(N), kThreads, 0,
                                         at::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), Z.data_ptr<acc_t>(),
        lt.data_ptr<acc_t>(), static_cast<acc_t>(s), static_cast<acc_t>(f),
        Wp.defined() ? Wp.data_ptr<scalar_t>() : nullptr,
        (Wp.defined() && val.defined()) ? val.data_ptr<acc_t>() : nullptr, static_cast<acc_t>(fe), N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void grad_tile_cuda(at::Tensor& dZ, const at::Tensor& T, const at::Tensor& Z,
                    const at::Tensor& log_theta, double s, double f, double eps,
                    at::Tensor& th_acc, const at::Tensor& Wp, const at::Tensor& coef, double fe) {
  const c10::cuda::CUDAGuard guard(T.device());
  const int64_t N = T.numel();
  if (N == 0) return;
  const at::Tensor lt = log_theta.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T.scalar_type(), "fastcur_jump_grad_tile_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    grad_tile_kernel<scalar_t, acc_t><<<jump_cuda::grid_for(N), kThreads, 0,
                                        at::cuda::getCurrentCUDAStream()>>>(
        dZ.data_ptr<acc_t>(), T.data_ptr<scalar_t>(), Z.data_ptr<acc_t>(), lt.data_ptr<acc_t>(),
        static_cast<acc_t>(s), static_cast<acc_t>(f), static_cast<acc_t>(1.0 / eps),
        th_acc.data_ptr<acc_t>(), Wp.defined() ? Wp.data_ptr<scalar_t>() : nullptr,
        Wp.defined() ? coef.data_ptr<acc_t>() : nullptr, static_cast<acc_t>(fe), N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor finish_theta(const at::Tensor& th_acc, const at::Tensor& log_theta, double denom) {
  return (th_acc * log_theta.to(th_acc.scalar_type()).reshape({}).exp() / denom)
      .to(log_theta.scalar_type())
      .reshape(log_theta.sizes());
}

at::Tensor jump_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& log_theta, double scale,
                            double f, double /*bandwidth*/, bool /*mean*/) {
  return jump_linear_forward(x, weight, bias, A, B, log_theta, scale, f, kTileElems,
                             build_weff_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jump_linear_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& log_theta, double scale, double f, double bandwidth,
    bool mean, bool need_dx, bool need_adapter) {
  return jump_linear_backward(grad_y, x, weight, A, B, log_theta, scale, f, bandwidth, mean,
                              need_dx, need_adapter, kTileElems, build_weff_cuda, grad_tile_cuda,
                              finish_theta);
}

std::tuple<at::Tensor, at::Tensor> jump_linear_ella_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& log_theta, double scale,
    const at::Tensor& W_past, double f, double /*bandwidth*/, bool /*mean*/, double ella_f) {
  check_w_past(W_past, weight);
  at::Tensor ella;
  at::Tensor y = jump_linear_forward(x, weight, bias, A, B, log_theta, scale, f, kTileElems,
                                     build_weff_cuda, W_past.contiguous(), &ella, ella_f);
  return {y, ella.to(weight.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jump_linear_ella_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& grad_ella, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B, const at::Tensor& log_theta,
    double scale, const at::Tensor& W_past, double f, double bandwidth, bool mean, bool need_dx,
    bool need_adapter, double ella_f) {
  check_w_past(W_past, weight);
  TORCH_CHECK(grad_ella.numel() == 1, "fastcur: grad_ella must have one element, got ", shape_str(grad_ella));
  const at::Tensor coef = grad_ella.reshape({}).to(jump_acc_type(weight.scalar_type())).contiguous();
  return jump_linear_backward(grad_y, x, weight, A, B, log_theta, scale, f, bandwidth, mean,
                              need_dx, need_adapter, kTileElems, build_weff_cuda, grad_tile_cuda,
                              finish_theta, W_past.contiguous(), coef, ella_f);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CUDA, m) {
  m.impl("jump_linear", &jump_linear_cuda);
  m.impl("jump_linear_bwd", &jump_linear_bwd_cuda);
  m.impl("jump_linear_ella", &jump_linear_ella_cuda);
  m.impl("jump_linear_ella_bwd", &jump_linear_ella_bwd_cuda);
}

}  // namespace fastcur
