// jump_rank_linear on the CPU (SPEC §4, rank-gated): ATen GEMMs plus the gate epilogues on
// the skinny [M, r] projection (csrc/jump_rank_linear.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "jump_rank_linear.h"

namespace fastcur {
namespace {

std::vector<double> thetas(const at::Tensor& log_theta) {
  const at::Tensor t = log_theta.to(at::kDouble).contiguous();
  std::vector<double> out(t.numel());
  const double* p = t.data_ptr<double>();
  for (int64_t j = 0; j < t.numel(); ++j) out[j] = std::exp(p[j]);
  return out;
}

at::Tensor rank_gate_cpu(const at::Tensor& h_in, const at::Tensor& log_theta) {
  const at::Tensor h = h_in.contiguous();
  const std::vector<double> th = thetas(log_theta);
  const int64_t M = h.size(0), r = h.size(1);
  at::Tensor g = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "jump_rank_gate", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* gp = g.data_ptr<scalar_t>();
    at::parallel_for(0, M, 1024, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m)
        for (int64_t j = 0; j < r; ++j) {
          const scalar_t v = hp[m * r + j];
          gp[m * r + j] = static_cast<acc_t>(v) > static_cast<acc_t>(th[j]) ? v : scalar_t(0);
        }
    });
  });
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rank_gate_bwd_cpu(const at::Tensor& h_in,
                                                                 const at::Tensor& dg_in,
                                                                 const at::Tensor& log_theta,
                                                                 double eps) {
  const at::Tensor h = h_in.contiguous(), dg = dg_in.contiguous();
  const std::vector<double> th = thetas(log_theta);
  const int64_t M = h.size(0), r = h.size(1);
  at::Tensor g = at::empty_like(h), dh = at::empty_like(h);
  std::vector<double> sums(r, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "jump_rank_gate_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* dgp = dg.data_ptr<scalar_t>();
    scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* dhp = dh.data_ptr<scalar_t>();
    // One pass over [M, r]; the window sums are per rank channel, reduced over threads.
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M));
    std::vector<std::vector<double>> part(chunks, std::vector<double>(r, 0.0));
    const int64_t per = (M + chunks - 1) / chunks;
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t m0 = c * per, m1 = std::min(M, m0 + per);
        for (int64_t m = m0; m < m1; ++m)
          for (int64_t j = 0; j < r; ++j) {
            const int64_t i = m * r + j;
            const acc_t hv = static_cast<acc_t>(hp[i]), dv = static_cast<acc_t>(dgp[i]);
            const acc_t t = static_cast<acc_t>(th[j]);
            const bool on = hv > t;
            gp[i] = on ? hp[i] : scalar_t(0);
            dhp[i] = on ? dgp[i] : scalar_t(0);
            if (std::abs((hv - t) / static_cast<acc_t>(eps)) < acc_t(0.5)) part[c][j] += dv;
          }
      }
    });
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t j = 0; j < r; ++j) sums[j] += part[c][j];
  });
  at::Tensor dlog = at::empty({r}, log_theta.options().dtype(at::kDouble));
  double* dp = dlog.data_ptr<double>();
  for (int64_t j = 0; j < r; ++j) dp[j] = -th[j] * th[j] / eps * sums[j];
  return {g, dh, dlog.to(log_theta.scalar_type())};
}

// out += s z E^T (+ bias) as one BLAS call (the bias rides along as a rank-1 term), as in
// csrc/cpu/cur_linear.cpp.
void rank_update_cpu(at::Tensor& out, const at::Tensor& z, const at::Tensor& E,
                     const c10::optional<at::Tensor>& bias, double scale) {
  at::Tensor lhs = z, rhs = E.t().mul(scale);
  if (bias.has_value()) {
    lhs = at::cat({z, at::ones({z.size(0), 1}, z.options())}, 1);
    rhs = at::cat({rhs, bias->unsqueeze(0)}, 0);
  }
  out.addmm_(lhs, rhs);
}

std::tuple<at::Tensor, at::Tensor> jump_rank_linear_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& log_theta, double scale,
    double /*bandwidth*/) {
  return jump_rank_linear_forward(x, weight, bias, A, B, log_theta, scale, rank_gate_cpu,
                                  rank_update_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jump_rank_linear_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& log_theta, const at::Tensor& h, double scale,
    double bandwidth, bool need_dx) {
  return jump_rank_linear_backward(grad_y, x, weight, A, B, log_theta, h, scale, bandwidth,
                                   need_dx, rank_gate_bwd_cpu, rank_update_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CPU, m) {
  m.impl("jump_rank_linear", &jump_rank_linear_cpu);
  m.impl("jump_rank_linear_bwd", &jump_rank_linear_bwd_cpu);
}

}  // namespace fastcur
