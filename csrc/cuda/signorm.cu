// signorm on CUDA (docs/methods.md, SECURA): the row kernel of signorm_cuda.cuh with Δ loaded, and an
// elementwise backward that recomputes S from y0, Δ and the forward's row maxima.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "signorm_cuda.cuh"

namespace fastcur {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void signorm_bwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y0,
                                   const scalar_t* __restrict__ delta, const acc_t* __restrict__ mx,
                                   bool global_max, scalar_t* __restrict__ dy0,
                                   scalar_t* __restrict__ dd, int64_t M, int64_t N, acc_t k,
                                   acc_t eps, bool raw) {
  const int64_t total = M * N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const acc_t m = global_max ? mx[0] : mx[i / N];
    const acc_t L = abs(static_cast<acc_t>(delta[i])) / (abs(static_cast<acc_t>(y0[i])) + eps);
    const acc_t q = static_cast<acc_t>(g[i]) / cuda::signorm_S(L, m, k, eps, raw);
    dy0[i] = static_cast<scalar_t>(q + q);
    dd[i] = static_cast<scalar_t>(q);
  }
}

void signorm_rows_cuda(const at::Tensor& y0, const at::Tensor& delta, double k, double eps,
                       const SignormOptions& o, at::Tensor& y, at::Tensor& rowmax) {
  const int64_t M = y0.size(0), n = y0.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y0.scalar_type(), "signorm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::RowsArgs<scalar_t, acc_t> a;
    a.y0 = y0.data_ptr<scalar_t>();
    a.y0_s = n;
    a.delta = delta.data_ptr<scalar_t>();
    a.d_s = n;
    a.k = acc_t(k);
    a.eps = acc_t(eps);
    a.raw = o.raw;
    a.out = y.data_ptr<scalar_t>();
    a.out_s = n;
    a.M = M;
    a.N = n;
    cuda::launch_signorm_rows(a, o.tensor_scope, rowmax);
  });
}

void signorm_grads_cuda(const at::Tensor& g, const at::Tensor& y0, const at::Tensor& delta,
                        const at::Tensor& mx, double k, double eps, const SignormOptions& o,
                        at::Tensor& dy0, at::Tensor& dd) {
  const int64_t M = y0.size(0), n = y0.size(1);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((M * n + threads - 1) / threads,
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y0.scalar_type(), "signorm_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    signorm_bwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        g.data_ptr<scalar_t>(), y0.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(),
        mx.data_ptr<acc_t>(), o.tensor_scope, dy0.data_ptr<scalar_t>(), dd.data_ptr<scalar_t>(), M, n,
        acc_t(k), acc_t(eps), o.raw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> signorm_cuda(const at::Tensor& y0, const at::Tensor& delta,
                                                double k, double eps, c10::string_view norm,
                                                c10::string_view scope) {
  const c10::cuda::CUDAGuard guard(y0.device());
  return signorm_forward(y0, delta, k, eps, std::string(norm), std::string(scope), signorm_rows_cuda);
}

std::tuple<at::Tensor, at::Tensor> signorm_bwd_cuda(const at::Tensor& grad, const at::Tensor& y0,
                                                    const at::Tensor& delta, const at::Tensor& rowmax,
                                                    double k, double eps, c10::string_view norm,
                                                    c10::string_view scope) {
  const c10::cuda::CUDAGuard guard(y0.device());
  return signorm_backward(grad, y0, delta, rowmax, k, eps, std::string(norm), std::string(scope),
                          signorm_grads_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CUDA, m) {
  m.impl("signorm", &signorm_cuda);
  m.impl("signorm_bwd", &signorm_bwd_cuda);
}

}  // namespace fastcur
