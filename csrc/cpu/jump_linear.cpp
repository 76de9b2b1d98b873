// jump_linear on the CPU (SPEC §4): the row-block schedule of csrc/jump_linear.h with ATen
// GEMMs (MKL / oneDNN) and the elementwise tile primitives below (at::parallel_for).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "jump_linear.h"

namespace fastcur {
namespace {

// Tile of Z / dy^T x per block: 64 Ki elements (256 KB in float32), about the L2 share of one
// core here, so the tile is still cached when the elementwise pass and the rank-r contractions
// read it right after the GEMM that wrote it.
constexpr int64_t kTileElems = int64_t{1} << 16;
constexpr int64_t kGrain = 4096;

double theta_of(const at::Tensor& log_theta) { return std::exp(log_theta.item<double>()); }

void build_weff_cpu(at::Tensor& out, const at::Tensor& W, const at::Tensor& Z,
                    const at::Tensor& log_theta, double s, double f) {
  const double th = theta_of(log_theta);
  const int64_t N = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "jump_build_weff", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* wp = W.data_ptr<scalar_t>();
    const acc_t* zp = Z.data_ptr<acc_t>();
    const acc_t ths = static_cast<acc_t>(th), sa = static_cast<acc_t>(s);
    const acc_t keep = sa, soft = static_cast<acc_t>(s * (1.0 - f));
    at::parallel_for(0, N, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const acc_t z = zp[i];
        op[i] = static_cast<scalar_t>(static_cast<acc_t>(wp[i]) + (std::abs(z) > ths ? keep : soft) * z);
      }
    });
  });
}

void grad_tile_cpu(at::Tensor& dZ, const at::Tensor& T, const at::Tensor& Z,
                   const at::Tensor& log_theta, double s, double f, double eps,
                   at::Tensor& th_acc) {
  const double th = theta_of(log_theta);
  const int64_t N = Z.numel();
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, T.scalar_type(), "jump_grad_tile", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* tp = T.data_ptr<scalar_t>();
    const acc_t* zp = Z.data_ptr<acc_t>();
    acc_t* dp = dZ.data_ptr<acc_t>();
    const acc_t ths = static_cast<acc_t>(th), sa = static_cast<acc_t>(s);
    const acc_t soft = static_cast<acc_t>(1.0 - f), inv_eps = static_cast<acc_t>(1.0 / eps);
    const bool want_theta = f != 0.0;
    total = at::parallel_reduce(0, N, kGrain, 0.0, [&](int64_t b, int64_t e, double part) {
      acc_t local = 0;
      for (int64_t i = b; i < e; ++i) {
        const acc_t z = zp[i];
        const acc_t g = sa * static_cast<acc_t>(tp[i]);
        dp[i] = std::abs(z) > ths ? g : g * soft;   // G (f 1[|Z|>θ] + 1 - f)
        if (want_theta) {
          const acc_t u1 = (z - ths) * inv_eps, u2 = (-z - ths) * inv_eps;
          const acc_t term = acc_t(std::abs(u2) < acc_t(0.5)) - acc_t(std::abs(u1) < acc_t(0.5));
          local += g * term;
        }
      }
      return part + static_cast<double>(local);
    }, std::plus<double>());
  });
  if (f != 0.0) th_acc.add_(total * f * th / eps);
}

at::Tensor finish_theta(const at::Tensor& th_acc, const at::Tensor& log_theta, double denom) {
  return (th_acc * log_theta.to(th_acc.scalar_type()).reshape({}).exp() / denom)
      .to(log_theta.scalar_type())
      .reshape(log_theta.sizes());
}

at::Tensor jump_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                           const at::Tensor& B, const at::Tensor& log_theta, double scale,
                           double f, double /*bandwidth*/, bool /*mean*/) {
  return jump_linear_forward(x, weight, bias, A, B, log_theta, scale, f, kTileElems,
                             build_weff_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jump_linear_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& log_theta, double scale, double f, double bandwidth,
    bool mean, bool need_dx, bool need_adapter) {
  return jump_linear_backward(grad_y, x, weight, A, B, log_theta, scale, f, bandwidth, mean,
                              need_dx, need_adapter, kTileElems, build_weff_cpu, grad_tile_cpu, finish_theta);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CPU, m) {
  m.impl("jump_linear", &jump_linear_cpu);
  m.impl("jump_linear_bwd", &jump_linear_bwd_cpu);
}

}  // namespace fastcur
