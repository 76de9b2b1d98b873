// signorm_merge on CUDA: the SigNorm row kernel of signorm_cuda.cuh over the rows of W, with
// ΔW recomputed per element as (s C U)[i, :] R[:, j] (r multiply-adds; s C U is [n, r]), so
// neither ΔW nor the ratios are ever materialized; scope "tensor" runs two phases.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "signorm_cuda.cuh"

namespace fastcur {
namespace {

at::Tensor signorm_merge_cuda(const at::Tensor& weight_in, const at::Tensor& C, const at::Tensor& U,
                              const at::Tensor& R, double scale, double k, double eps,
                              c10::string_view scope) {
  const c10::cuda::CUDAGuard guard(weight_in.device());
  const SignormMergeInputs p = prepare_signorm_merge(weight_in, C, U, R, scale, std::string(scope));
  const at::Tensor weight = weight_in.contiguous();
  const int64_t n = weight.size(0), kk = weight.size(1);
  const at::Tensor& CU = p.CU;
  at::Tensor out = at::empty_like(weight);
  at::Tensor rowmax = at::empty({n}, weight.options().dtype(p.acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "signorm_merge_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::RowsArgs<scalar_t, acc_t> a;
    a.y0 = weight.data_ptr<scalar_t>();
    a.y0_s = kk;
    a.z = CU.data_ptr<acc_t>();
    a.rank = CU.size(1);
    a.E = R.data_ptr<scalar_t>();
    a.e_q = R.stride(0);
    a.e_n = R.stride(1);
    a.k = acc_t(k);
    a.eps = acc_t(eps);
    a.out = out.data_ptr<scalar_t>();
    a.out_s = kk;
    a.M = n;
    a.N = kk;
    cuda::launch_signorm_rows(a, p.tensor_scope, rowmax);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CUDA, m) {
  m.impl("signorm_merge", &signorm_merge_cuda);
}

}  // namespace fastcur
