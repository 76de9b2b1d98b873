// signorm_merge on the CPU (docs/methods.md, SECURA): W_new = (2 W + ΔW) / S_w with ΔW = s C U R.
//
// ΔW is recomputed one block of rows at a time (a [mb, r] x [r, k] GEMM into a per-thread
// buffer) and the ratios live only in that block's buffer, so the only n x k allocation is
// the output. scope="tensor" is two-phase: the row maxima of all blocks first (recomputing
// ΔW's blocks), then their max, then the output pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <string>

#include "signorm_cpu.h"

namespace fastcur {
namespace {

at::Tensor signorm_merge_cpu(const at::Tensor& weight_in, const at::Tensor& C, const at::Tensor& U,
                             const at::Tensor& R, double scale, double k, double eps,
                             c10::string_view scope) {
  const SignormMergeInputs p = prepare_signorm_merge(weight_in, C, U, R, scale, std::string(scope));
  const at::Tensor weight = weight_in.contiguous();
  const int64_t n = weight.size(0), kk = weight.size(1);
  const at::Tensor& CU = p.CU;
  const at::Tensor Ra = R.to(p.acc).contiguous();  // R [r, k] in the accumulation dtype (small)
  at::Tensor out = at::empty_like(weight);
  at::Tensor rowmax = at::empty({n}, weight.options().dtype(p.acc));
  if (weight.scalar_type() == at::kFloat) {   // fused, vectorized epilogue (ΔW rows on the fly)
    cpu::F32Delta d;
    d.zs = CU.data_ptr<float>();
    d.Ct = Ra.data_ptr<float>();
    d.r = CU.size(1);
    cpu::signorm_epilogue_f32(weight.data_ptr<float>(), nullptr, n, kk, float(k), float(eps),
                              /*raw=*/false, p.tensor_scope, d, out.data_ptr<float>(), nullptr,
                              rowmax.data_ptr<float>());
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "signorm_merge_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto fill = [&](int64_t m0, int64_t mb, acc_t* D) {
      at::Tensor blk = at::from_blob(D, {mb, kk}, Ra.options());
      at::mm_out(blk, CU.narrow(0, m0, mb), Ra);
    };
    cpu::signorm_epilogue<scalar_t, acc_t>(weight.data_ptr<scalar_t>(), nullptr, n, kk, acc_t(k),
                                           acc_t(eps), /*raw=*/false, p.tensor_scope, fill,
                                           out.data_ptr<scalar_t>(), nullptr,
                                           rowmax.data_ptr<acc_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CPU, m) {
  m.impl("signorm_merge", &signorm_merge_cpu);
}

}  // namespace fastcur
