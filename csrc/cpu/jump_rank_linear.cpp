// jump_rank_linear on the CPU (docs/methods.md, JumpLoRA, rank-gated): ATen GEMMs plus the gate epilogues on
// the skinny [M, r] projection (csrc/jump_rank_linear.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "cpu/cpu_choice.h"
#include "jump_rank_linear.h"
#include "rank_update.h"
#include "skinny_rows.h"

namespace fastcur {
namespace {

std::vector<double> thetas(const at::Tensor& log_theta) {
  const at::Tensor t = log_theta.to(at::kDouble).contiguous();
  std::vector<double> out(t.numel());
  const double* p = t.data_ptr<double>();
  for (int64_t j = 0; j < t.numel(); ++j) out[j] = std::exp(p[j]);
  return out;
}

// The gate's elementwise terms, one definition for both schedules (compared in the acc type;
// `scale` 1 in the generic schedule, which scales after its GEMMs).
// Forward, rows of h [mb, r] into rows of stride `ld` (the fused forward's buffer carries the
// bias's column of ones after the r gate columns): gs = s h 1[h > θ].
template <typename scalar_t>
void gate_rows(const scalar_t* hp, int64_t mb, int64_t r, const std::vector<double>& th,
               double scale, scalar_t* gsp, int64_t ld) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t s = static_cast<acc_t>(scale);
  for (int64_t m = 0; m < mb; ++m)
    for (int64_t j = 0; j < r; ++j) {
      const acc_t hv = static_cast<acc_t>(hp[m * r + j]);
      gsp[m * ld + j] = hv > static_cast<acc_t>(th[j]) ? static_cast<scalar_t>(hv * s) : scalar_t(0);
    }
}

// Backward, `count` entries of h and dg [*, r]: gs = s h 1[h > θ], dh = s dg 1[h > θ], and the
// straight-through window sums Σ s dg over |h − θ_j| < ε/2 into sums[j].
template <typename scalar_t>
void gate_bwd_elems(const scalar_t* hp, const scalar_t* dgp, int64_t count, int64_t r,
                    const std::vector<double>& th, double scale, double eps, scalar_t* gsp,
                    scalar_t* dhp, double* sums) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t s = static_cast<acc_t>(scale), e = static_cast<acc_t>(eps);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t j = i % r;
    const acc_t t = static_cast<acc_t>(th[j]), hv = static_cast<acc_t>(hp[i]);
    const acc_t d = static_cast<acc_t>(dgp[i]) * s;
    const bool on = hv > t;
    gsp[i] = on ? static_cast<scalar_t>(hv * s) : scalar_t(0);
    dhp[i] = on ? static_cast<scalar_t>(d) : scalar_t(0);
    if (std::abs((hv - t) / e) < acc_t(0.5)) sums[j] += d;
  }
}

// dlog_theta_j = θ_j · (−θ_j/ε) Σ_window s dg, in log_theta's dtype.
at::Tensor dlog_theta(const std::vector<double>& th, const std::vector<double>& sums, double eps,
                      const at::Tensor& log_theta) {
  const int64_t r = static_cast<int64_t>(th.size());
  at::Tensor dlog = at::empty({r}, log_theta.options().dtype(at::kDouble));
  double* dp = dlog.data_ptr<double>();
  for (int64_t j = 0; j < r; ++j) dp[j] = -th[j] * th[j] / eps * sums[j];
  return dlog.to(log_theta.scalar_type());
}

at::Tensor rank_gate_cpu(const at::Tensor& h_in, const at::Tensor& log_theta) {
  const at::Tensor h = h_in.contiguous();
  const std::vector<double> th = thetas(log_theta);
  const int64_t M = h.size(0), r = h.size(1);
  at::Tensor g = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "jump_rank_gate", [&] {
    const scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* gp = g.data_ptr<scalar_t>();
    at::parallel_for(0, M, 1024, [&](int64_t b, int64_t e) {
      gate_rows<scalar_t>(hp + b * r, e - b, r, th, 1.0, gp + b * r, r);
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
    // One pass over [M, r]; the window sums are per rank channel, reduced over threads.
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M));
    std::vector<std::vector<double>> part(chunks, std::vector<double>(r, 0.0));
    const int64_t per = (M + chunks - 1) / chunks;
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t m0 = std::min(M, c * per), m1 = std::min(M, m0 + per);
        gate_bwd_elems<scalar_t>(h.data_ptr<scalar_t>() + m0 * r, dg.data_ptr<scalar_t>() + m0 * r,
                                 (m1 - m0) * r, r, th, 1.0, eps, g.data_ptr<scalar_t>() + m0 * r,
                                 dh.data_ptr<scalar_t>() + m0 * r, part[c].data());
      }
    });
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t j = 0; j < r; ++j) sums[j] += part[c][j];
  });
  return {g, dh, dlog_theta(th, sums, eps, log_theta)};
}

// The float32/float64 schedule: one pass over blocks of rows (about 1 MB of the two
// [rows, features] matrices a pass reads, so a block stays in the thread's L2 cache) doing
// the skinny products while the block is hot, then the big GEMM accumulating onto what that
// pass wrote (beta = 1: no extra pass over y or dx).
//   forward:  h = x_blk A^T, g, y_blk = s g B^T + b;        then y += x W^T
//   backward: dg = dy_blk B, the gate terms, per-thread partials of s g^T dy and dh^T x,
//             dx_blk = dh A;                                 then dx += dy W
// The products that read a block from memory (x A^T, dy B, dh^T x) and the writers into y
// and dx are the row kernels of cpu/skinny_rows.h, which stream the rows in order; s g^T dy,
// whose dy block is by then in L2, is a single-threaded ATen GEMM (MKL runs sequentially
// inside a parallel region). Measured at M = n = k = 2048, r = 8, 2 threads: the backward
// pass without dx takes 2.4 ms, against 1.6 ms for only reading x and dy (the row kernels'
// own figures are in cpu/skinny_rows.cpp); with dx, the pass and the GEMM take 3.3 ms more
// than the GEMM alone, the forward 0.9 ms more. The generic schedule
// (csrc/jump_rank_linear.h) runs each skinny product as a whole-matrix multi-threaded GEMM,
// reading x, dy and dx once more each: 7.8 ms over nn.Linear of a 95 ms step.
int64_t rows_per_block(int64_t a, int64_t b) {
  return std::max<int64_t>(8, (int64_t{1} << 18) / std::max<int64_t>(a + b, 1));
}

std::tuple<at::Tensor, at::Tensor> jump_rank_linear_fwd_fused(
    const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& log_theta, double scale) {
  const int64_t M = x_in.size(0), n = weight.size(0), k = weight.size(1), r = A.size(0);
  const at::Tensor x = x_in.contiguous(), Ac = A.contiguous();
  // [s B^T; b]: the bias rides along the up projection as a rank-1 term (a column of ones in
  // the gate buffer).
  const int64_t rb = r + (bias.has_value() ? 1 : 0);
  const at::Tensor Bt = (bias.has_value() ? at::cat({B.t(), bias->unsqueeze(0)}, 0) : B.t())
                            .contiguous();
  const std::vector<double> th = thetas(log_theta);
  at::Tensor y = at::empty({M, n}, x.options()), h = at::empty({M, r}, x.options());
  const int64_t rows = rows_per_block(n, k), blocks = (M + rows - 1) / rows;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "jump_rank_linear_fwd_fused", [&] {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;   // workers skip autograd
      std::vector<scalar_t> gs(rows * rb, scalar_t(1));
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t m0 = blk * rows, mb = std::min(rows, M - m0);
        scalar_t* hp = h.data_ptr<scalar_t>() + m0 * r;
        cpu::rows_dot(hp, x.data_ptr<scalar_t>() + m0 * k, k, Ac.data_ptr<scalar_t>(), mb, r,
                      k);                                                     // x A^T
        gate_rows<scalar_t>(hp, mb, r, th, scale, gs.data(), rb);
        cpu::small_k_rows(y.data_ptr<scalar_t>() + m0 * n, n, gs.data(),
                          Bt.data_ptr<scalar_t>(), mb, rb, n);                  // s g B^T + b
      }
    });
  });
  y.addmm_(x, weight.t());                                           // += x W^T
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jump_rank_linear_bwd_fused(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& log_theta, const at::Tensor& h_in, double scale,
    double eps, bool need_dx) {
  const int64_t M = x_in.size(0), n = weight.size(0), k = weight.size(1), r = A.size(0);
  const at::Tensor dy = grad_y.contiguous(), x = x_in.contiguous(), h = h_in.contiguous();
  const at::Tensor Bt = B.t().contiguous(), Ac = A.contiguous();
  const std::vector<double> th = thetas(log_theta);
  const int64_t rows = rows_per_block(n, k), blocks = (M + rows - 1) / rows;
  at::Tensor dh = at::empty_like(h);
  at::Tensor dx = need_dx ? at::empty({M, k}, x.options()) : at::empty({0}, x.options());
  // Per-thread partials, created by the thread that owns the range starting at that block.
  std::vector<at::Tensor> dBt_parts(blocks), dA_parts(blocks);
  std::vector<std::vector<double>> win(blocks);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "jump_rank_linear_bwd_fused", [&] {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;   // workers skip autograd
      at::Tensor dg_buf = at::empty({rows, r}, h.options());
      at::Tensor gs_buf = at::empty({rows, r}, h.options());
      at::Tensor dBt = at::zeros({r, n}, h.options()), dA = at::zeros({r, k}, h.options());
      std::vector<double> sums(r, 0.0);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t m0 = blk * rows, mb = std::min(rows, M - m0);
        const at::Tensor dy_blk = dy.narrow(0, m0, mb);
        at::Tensor dg = dg_buf.narrow(0, 0, mb), gs = gs_buf.narrow(0, 0, mb);
        at::Tensor dh_blk = dh.narrow(0, m0, mb);
        cpu::rows_dot(dg.data_ptr<scalar_t>(), dy_blk.data_ptr<scalar_t>(), n,
                      Bt.data_ptr<scalar_t>(), mb, r, n);              // dy B       [mb, r]
        gate_bwd_elems<scalar_t>(h.data_ptr<scalar_t>() + m0 * r, dg.data_ptr<scalar_t>(), mb * r, r,
                             th, scale, eps, gs.data_ptr<scalar_t>(), dh_blk.data_ptr<scalar_t>(),
                             sums.data());
        dBt.addmm_(gs.t(), dy_blk);                                  // += s g^T dy [r, n]
        cpu::outer_acc(dA.data_ptr<scalar_t>(), dh_blk.data_ptr<scalar_t>(),
                       x.data_ptr<scalar_t>() + m0 * k, k, mb, r, k);  // += dh^T x   [r, k]
        if (need_dx)                                                 // dh A       [mb, k]
          cpu::small_k_rows(dx.data_ptr<scalar_t>() + m0 * k, k, dh_blk.data_ptr<scalar_t>(),
                            Ac.data_ptr<scalar_t>(), mb, r, k);
      }
      dBt_parts[b0] = dBt;
      dA_parts[b0] = dA;
      win[b0] = std::move(sums);
    });
  });
  at::Tensor dBt = at::zeros({r, n}, h.options()), dA = at::zeros({r, k}, h.options());
  std::vector<double> total(r, 0.0);
  for (int64_t b = 0; b < blocks; ++b) {   // fixed order: deterministic for a thread count
    if (!dBt_parts[b].defined()) continue;
    dBt.add_(dBt_parts[b]);
    dA.add_(dA_parts[b]);
    for (int64_t j = 0; j < r; ++j) total[j] += win[b][j];
  }
  if (need_dx) dx.addmm_(dy, weight);                                // += dy W
  return {dx, dA, dBt.t().contiguous(), dlog_theta(th, total, eps, log_theta)};
}

bool fused_dtype(const at::Tensor& weight) {
  return weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble;
}

// The cache key of the fused / generic choice (cpu/cpu_choice.h): M, n, k, r, the flag (bias
// in the forward, need_dx in the backward), dtype.
std::string shape_key(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A, bool flag) {
  return std::to_string(x.size(0)) + "," + std::to_string(weight.size(0)) + "," +
         std::to_string(weight.size(1)) + "," + std::to_string(A.size(0)) + "," +
         (flag ? "1," : "0,") + c10::toString(weight.scalar_type());
}

// float32 / float64: the fused schedule or the generic one (whole-matrix ATen GEMMs), per
// shape, whichever measured faster at the active x86-64 level (cpu/cpu_choice.h).
// Reduced precision takes the generic schedule, whose whole-matrix GEMMs accumulate in float
// inside BLAS (the per-block partials above would round at every block).
std::tuple<at::Tensor, at::Tensor> jump_rank_linear_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& log_theta, double scale,
    double /*bandwidth*/) {
  if (!fused_dtype(weight))
    return jump_rank_linear_forward(x, weight, bias, A, B, log_theta, scale, rank_gate_cpu,
                                    rank_update_addmm);
  check_jump_rank_linear_args(x, weight, bias, A, B, log_theta);
  using Out = std::tuple<at::Tensor, at::Tensor>;
  return cpu::choose<Out>(
      "jump_rank_linear", shape_key(x, weight, A, bias.has_value()),
      [&] { return jump_rank_linear_fwd_fused(x, weight, bias, A, B, log_theta, scale); },
      [&] {
        return jump_rank_linear_forward(x, weight, bias, A, B, log_theta, scale, rank_gate_cpu,
                                        rank_update_addmm);
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jump_rank_linear_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& log_theta, const at::Tensor& h, double scale,
    double bandwidth, bool need_dx) {
  if (!fused_dtype(weight))
    return jump_rank_linear_backward(grad_y, x, weight, A, B, log_theta, h, scale, bandwidth,
                                     need_dx, rank_gate_bwd_cpu, rank_update_addmm);
  check_jump_rank_linear_args(x, weight, c10::nullopt, A, B, log_theta);
  check_jump_rank_bwd_args(grad_y, x, weight, A, h, bandwidth);
  using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  return cpu::choose<Out>(
      "jump_rank_linear_bwd", shape_key(x, weight, A, need_dx),
      [&] {
        return jump_rank_linear_bwd_fused(grad_y, x, weight, A, B, log_theta, h, scale, bandwidth,
                                          need_dx);
      },
      [&] {
        return jump_rank_linear_backward(grad_y, x, weight, A, B, log_theta, h, scale, bandwidth,
                                         need_dx, rank_gate_bwd_cpu, rank_update_addmm);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CPU, m) {
  m.impl("jump_rank_linear", &jump_rank_linear_cpu);
  m.impl("jump_rank_linear_bwd", &jump_rank_linear_bwd_cpu);
}

}  // namespace fastcur
