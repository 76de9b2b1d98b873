// ella_penalty on the CPU (docs/methods.md, JumpLoRA): ‖s (fe J(Z) + (1 - fe) Z) ⊙ W_past‖²,
// Z = B A, hard mask, and its gradients w.r.t. A and B, Z tiles recomputed block by block
// (csrc/jump_linear.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "jump_linear.h"

namespace fastcur {
namespace {

constexpr int64_t kTileElems = int64_t{1} << 16;
constexpr int64_t kGrain = 4096;

void ella_tile_cpu(const at::Tensor& Z, const at::Tensor& Wp, const at::Tensor& log_theta,
                   double s, double fe, at::Tensor& val, at::Tensor& dZ) {
  const double th = std::exp(log_theta.item<double>());
  const int64_t N = Z.numel();
  const bool want_grad = dZ.defined();
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, Wp.scalar_type(), "ella_tile", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* zp = Z.data_ptr<acc_t>();
    const scalar_t* wp = Wp.data_ptr<scalar_t>();
    acc_t* dp = want_grad ? dZ.data_ptr<acc_t>() : nullptr;
    const acc_t ths = static_cast<acc_t>(th), sa = static_cast<acc_t>(s);
    const acc_t two_s2 = static_cast<acc_t>(2.0 * s * s), soft = static_cast<acc_t>(1.0 - fe);
    total = at::parallel_reduce(0, N, kGrain, 0.0, [&](int64_t b, int64_t e, double part) {
      acc_t local = 0;
      for (int64_t i = b; i < e; ++i) {
        const acc_t z = zp[i], w = static_cast<acc_t>(wp[i]);
        const acc_t e = std::abs(z) > ths ? acc_t(1) : soft;   // fe 1[|Z| > θ] + 1 - fe
        const acc_t v = sa * e * z * w;
        local += v * v;
        if (want_grad) dp[i] = two_s2 * e * e * z * w * w;
      }
      return part + static_cast<double>(local);
    }, std::plus<double>());
  });
  val.add_(total);
}

at::Tensor ella_penalty_cpu(const at::Tensor& A, const at::Tensor& B, const at::Tensor& log_theta,
                            const at::Tensor& W_past, double scale, double f) {
  auto res = ella_schedule(A, B, log_theta, W_past, scale, f, false, kTileElems, ella_tile_cpu);
  return std::get<0>(res).to(W_past.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> ella_penalty_bwd_cpu(const at::Tensor& grad,
                                                        const at::Tensor& A, const at::Tensor& B,
                                                        const at::Tensor& log_theta,
                                                        const at::Tensor& W_past, double scale,
                                                        double f) {
  auto res = ella_schedule(A, B, log_theta, W_past, scale, f, true, kTileElems, ella_tile_cpu);
  const at::Tensor g = grad.to(std::get<1>(res).scalar_type());
  return {std::get<1>(res).mul_(g).to(A.scalar_type()), std::get<2>(res).mul_(g).to(B.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CPU, m) {
  m.impl("ella_penalty", &ella_penalty_cpu);
  m.impl("ella_penalty_bwd", &ella_penalty_bwd_cpu);
}

}  // namespace fastcur
