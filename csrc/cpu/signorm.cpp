// signorm on the CPU (SPEC §3, §7): y = (2 y0 + Δ) / S, one pass per block of rows.
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

std::tuple<at::Tensor, at::Tensor> signorm_cpu(const at::Tensor& y0_in, const at::Tensor& delta_in,
                                               double k, double eps, c10::string_view norm,
                                               c10::string_view scope) {
  check_signorm_pair(y0_in, delta_in);
  const bool raw = parse_norm_raw(std::string(norm));
  const bool tensor_scope = parse_scope_tensor(std::string(scope), "token");
  const at::Tensor y0 = y0_in.contiguous(), delta = delta_in.contiguous();
  const int64_t M = y0.size(0), n = y0.size(1);
  at::Tensor y = at::empty_like(y0);
  at::Tensor rowmax = at::empty({M}, y0.options().dtype(signorm_acc_type(y0.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y0.scalar_type(), "signorm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dp = delta.data_ptr<scalar_t>();
    auto fill = [&](int64_t m0, int64_t mb, acc_t* D) { load_block(dp + m0 * n, mb, n, D); };
    cpu::signorm_epilogue<scalar_t, acc_t>(y0.data_ptr<scalar_t>(), nullptr, M, n, acc_t(k),
                                           acc_t(eps), raw, tensor_scope, fill,
                                           y.data_ptr<scalar_t>(), nullptr,
                                           rowmax.data_ptr<acc_t>());
  });
  return {y, rowmax};
}

// dy0 = 2 dy / S, dΔ = dy / S, S recomputed from y0, Δ and the forward's row maxima.
std::tuple<at::Tensor, at::Tensor> signorm_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& y0_in,
                                                   const at::Tensor& delta_in, const at::Tensor& rowmax,
                                                   double k, double eps, c10::string_view norm,
                                                   c10::string_view scope) {
  check_signorm_pair(y0_in, delta_in);
  check_matrix(grad_in, "grad_y", y0_in.size(0), y0_in.size(1));
  check_like(grad_in, "grad_y", y0_in, "y0");
  const bool raw = parse_norm_raw(std::string(norm));
  const bool tensor_scope = parse_scope_tensor(std::string(scope), "token");
  const int64_t M = y0_in.size(0), n = y0_in.size(1);
  check_vector(rowmax, "rowmax", M);
  TORCH_CHECK(rowmax.scalar_type() == signorm_acc_type(y0_in.scalar_type()),
              "fastcur: rowmax must be ", signorm_acc_type(y0_in.scalar_type()), ", got ",
              rowmax.scalar_type());
  const at::Tensor y0 = y0_in.contiguous(), delta = delta_in.contiguous(), g = grad_in.contiguous();
  const at::Tensor mxs = tensor_scope ? (M ? rowmax.amax().reshape({1}) : at::zeros({1}, rowmax.options()))
                                      : rowmax.contiguous();
  at::Tensor dy0 = at::empty_like(y0), dd = at::empty_like(y0);
  if (M == 0 || n == 0) return {dy0, dd};
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
        cpu::signorm_scales_inplace<acc_t>(L.data(), mb, n, tensor_scope ? mx : mx + m0,
                                           tensor_scope ? 0 : 1, acc_t(k), acc_t(eps), raw);
        for (int64_t i = 0; i < mb * n; ++i) {
          const acc_t q = static_cast<acc_t>(gp[m0 * n + i]) / L[i];
          o0[m0 * n + i] = static_cast<scalar_t>(q + q);
          od[m0 * n + i] = static_cast<scalar_t>(q);
        }
      }
    });
  });
  return {dy0, dd};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CPU, m) {
  m.impl("signorm", &signorm_cpu);
  m.impl("signorm_bwd", &signorm_bwd_cpu);
}

}  // namespace fastcur
