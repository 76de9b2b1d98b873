// secura_linear on CUDA: cuBLAS GEMMs through ATen (csrc/secura_linear.h) plus the SigNorm row
// kernel of signorm_cuda.cuh, which recomputes Δ = s z C^T + lora_bias per element from the
// row's z (r multiply-adds) and writes y in place over the GEMM output and S beside it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "secura_linear.h"
#include "signorm_cuda.cuh"

namespace fastcur {
namespace {

void secura_epilogue_cuda(at::Tensor& y, const c10::optional<at::Tensor>& bias, const at::Tensor& z,
                          const at::Tensor& C, const c10::optional<at::Tensor>& lora_bias,
                          double scale, double k, double eps, bool raw, bool tensor_scope,
                          at::Tensor& S) {
  const int64_t M = y.size(0), n = y.size(1), r = z.size(1);
  const at::Tensor za = z.to(S.scalar_type()).contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor lb = lora_bias.has_value() ? lora_bias->contiguous() : at::Tensor();
  at::Tensor rowmax = at::empty({M}, S.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "secura_epilogue_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::RowsArgs<scalar_t, acc_t> a;
    a.y0 = y.data_ptr<scalar_t>();
    a.y0_s = y.stride(0);
    a.bias = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    a.z = za.data_ptr<acc_t>();
    a.rank = r;
    a.E = C.data_ptr<scalar_t>();  // E[q, j] = C[j, q]
    a.e_q = C.stride(1);
    a.e_n = C.stride(0);
    a.lb = lb.defined() ? lb.data_ptr<scalar_t>() : nullptr;
    a.scale = acc_t(scale);
    a.k = acc_t(k);
    a.eps = acc_t(eps);
    a.raw = raw;
    a.out = y.data_ptr<scalar_t>();
    a.out_s = y.stride(0);
    a.S = S.data_ptr<acc_t>();
    a.S_s = S.stride(0);
    a.M = M;
    a.N = n;
    cuda::launch_signorm_rows(a, tensor_scope, rowmax);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> secura_linear_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& C, const at::Tensor& A_c, const at::Tensor& B_c, const at::Tensor& R,
    const c10::optional<at::Tensor>& lora_bias, double scale, double k, double eps,
    c10::string_view norm, c10::string_view scope, const c10::optional<at::Tensor>& rows,
    const c10::optional<at::Tensor>& cols) {
  const c10::cuda::CUDAGuard guard(x.device());
  return secura_linear_forward(x, weight, bias, C, A_c, B_c, R, lora_bias, scale, k, eps, norm,
                               scope, rows, cols, secura_epilogue_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
secura_linear_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& S, const at::Tensor& x,
                       const at::Tensor& weight, const at::Tensor& C, const at::Tensor& A_c,
                       const at::Tensor& B_c, const at::Tensor& R, const at::Tensor& h,
                       double scale, const c10::optional<at::Tensor>& cols, bool need_dx) {
  const c10::cuda::CUDAGuard guard(x.device());
  return secura_linear_backward(grad_y, S, x, weight, C, A_c, B_c, R, h, scale, cols, need_dx);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CUDA, m) {
  m.impl("secura_linear", &secura_linear_cuda);
  m.impl("secura_linear_bwd", &secura_linear_bwd_cuda);
}

}  // namespace fastcur
