// signorm on the CPU (docs/methods.md, SECURA): y = (2 y0 + Δ) / S, one pass per block of rows.
//
// Forward returns (y [M, n], rowmax [M]); rowmax holds the row maxima of L (float32, float64
// for float64 inputs) and is all the backward needs besides y0 and Δ, which the caller keeps
// alive anyway (they are this op's inputs): the backward recomputes S per row block instead
// of saving an M x n tensor of scales.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "signorm_cpu.h"

namespace fastcur {
namespace {

template <typename scalar_t, typename acc_t>
void load_block(const scalar_t* src, int64_t mb, int64_t n, acc_t* dst) {
  for (int64_t i = 0; i < mb * n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

void signorm_rows_cpu(const at::Tensor& y0, const at::Tensor& delta, double k, double eps,
                      const SignormOptions& o, at::Tensor& y, at::Tensor& rowmax) {
  const int64_t M = y0.size(0), n = y0.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y0.scalar_type(), "signorm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dp = delta.data_ptr<scalar_t>();
    auto fill = [&](int64_t m0, int64_t mb, acc_t* D) { load_block(dp + m0 * n, mb, n, D); };
    cpu::signorm_epilogue<scalar_t, acc_t>(y0.data_ptr<scalar_t>(), nullptr, M, n, acc_t(k),
                                           acc_t(eps), o.raw, o.tensor_scope, fill,
                                           y.data_ptr<scalar_t>(), nullptr,
                                           rowmax.data_ptr<acc_t>());
  });
}

// Per block of rows: S recomputed into a buffer (ratios, then scales), then dy0 and dΔ.
void signorm_grads_cpu(const at::Tensor& g, const at::Tensor& y0, const at::Tensor& delta,
                       const at::Tensor& mxs, double k, double eps, const SignormOptions& o,
                       at::Tensor& dy0, at::Tensor& dd) {
  const int64_t M = y0.size(0), n = y0.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y0.scalar_type(), "signorm_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *yp = y0.data_ptr<scalar_t>(), *dp = delta.data_ptr<scalar_t>(),
                   *gp = g.data_ptr<scalar_t>();
    scalar_t *o0 = dy0.data_ptr<scalar_t>(), *od = dd.data_ptr<scalar_t>();
    const acc_t* mx = mxs.data_ptr<acc_t>();
    const int64_t mb_max = cpu::signorm_rows_per_block(n);
    at::parallel_for(0, M, mb_max, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> D(mb_max * n), L(mb_max * n), unused(mb_max);
      for (int64_t m0 = begin; m0 < end; m0 += mb_max) {
        const int64_t mb = std::min(mb_max, end - m0);
        load_block(dp + m0 * n, mb, n, D.data());
        cpu::signorm_ratios<scalar_t, acc_t>(yp + m0 * n, nullptr, D.data(), mb, n, acc_t(eps),
                                             L.data(), unused.data());
        cpu::signorm_scales_inplace<acc_t>(L.data(), mb, n, o.tensor_scope ? mx : mx + m0,
                                           o.tensor_scope ? 0 : 1, acc_t(k), acc_t(eps), o.raw);
        for (int64_t i = 0; i < mb * n; ++i) {
          const acc_t q = static_cast<acc_t>(gp[m0 * n + i]) / L[i];
          o0[m0 * n + i] = static_cast<scalar_t>(q + q);
          od[m0 * n + i] = static_cast<scalar_t>(q);
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> signorm_cpu(const at::Tensor& y0, const at::Tensor& delta,
                                               double k, double eps, c10::string_view norm,
                                               c10::string_view scope) {
  return signorm_forward(y0, delta, k, eps, std::string(norm), std::string(scope), signorm_rows_cpu);
}

std::tuple<at::Tensor, at::Tensor> signorm_bwd_cpu(const at::Tensor& grad, const at::Tensor& y0,
                                                   const at::Tensor& delta, const at::Tensor& rowmax,
                                                   double k, double eps, c10::string_view norm,
                                                   c10::string_view scope) {
  return signorm_backward(grad, y0, delta, rowmax, k, eps, std::string(norm), std::string(scope),
                          signorm_grads_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CPU, m) {
  m.impl("signorm", &signorm_cpu);
  m.impl("signorm_bwd", &signorm_bwd_cpu);
}

}  // namespace fastcur
