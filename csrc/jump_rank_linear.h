// jump_rank_linear (docs/methods.md, JumpLoRA, rank-gated): the device-generic schedule shared by the CPU and
// CUDA kernels. The base GEMMs go through ATen; each device supplies the gate epilogues on
// the skinny [M, r] projection:
//   rank_gate(h [M, r], log_theta [r]) -> g = h 1[h > θ_j]
//   rank_gate_bwd(h, dg [M, r], log_theta, eps) -> (g, dh = dg 1[h > θ], dlog_theta [r])
//       dlog_theta_j = θ_j · (−θ_j/ε) Σ_t K((h_tj − θ_j)/ε) dg_tj
// and rank_update_(out [M, N], z [M, r], E [N, r], bias?, s): out += s z E^T (+ bias).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "jump_linear.h"

namespace fastcur {

inline void check_jump_rank_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        const at::Tensor& A, const at::Tensor& B,
                                        const at::Tensor& log_theta) {
  check_linear_input(x, weight);
  check_matrix(A, "A", -1, weight.size(1));
  check_jump_factors(weight, weight.size(0), weight.size(1), A, B, log_theta, A.size(0));
  check_bias(bias, "bias", weight.size(0), weight);
}

inline void check_jump_rank_bwd_args(const at::Tensor& grad_y, const at::Tensor& x,
                                     const at::Tensor& weight, const at::Tensor& A,
                                     const at::Tensor& h, double bandwidth) {
  check_matrix(grad_y, "grad_y", x.size(0), weight.size(0));
  check_like(grad_y, "grad_y", weight, "weight");
  check_matrix(h, "h", x.size(0), A.size(0));
  check_like(h, "h", weight, "weight");
  TORCH_CHECK(bandwidth > 0, "fastcur: bandwidth must be > 0, got ", bandwidth);
}

// Returns (y, h = x A^T) ; h is saved for the backward.
template <typename Gate, typename RankUpdate>
std::tuple<at::Tensor, at::Tensor> jump_rank_linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& log_theta, double scale,
    Gate rank_gate, RankUpdate rank_update_) {
  check_jump_rank_linear_args(x, weight, bias, A, B, log_theta);
  at::Tensor y = at::mm(x, weight.t());
  at::Tensor h = at::mm(x, A.t());
  at::Tensor g = rank_gate(h, log_theta);
  rank_update_(y, g, B, bias, scale);   // y += s g B^T + b, one pass over y
  return {y, h};
}

// Returns (dx or an empty tensor, dA, dB, dlog_theta).
template <typename GateBwd, typename RankUpdate>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jump_rank_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& log_theta, const at::Tensor& h, double scale,
    double bandwidth, bool need_dx, GateBwd rank_gate_bwd, RankUpdate rank_update_) {
  check_jump_rank_linear_args(x, weight, c10::nullopt, A, B, log_theta);
  check_jump_rank_bwd_args(grad_y, x, weight, A, h, bandwidth);
  at::Tensor dg = at::mm(grad_y, B);
  dg.mul_(scale);                                            // dg = s dy B   [M, r]
  at::Tensor g, dh, dlog;
  std::tie(g, dh, dlog) = rank_gate_bwd(h, dg, log_theta, bandwidth);
  at::Tensor dA = at::mm(dh.t(), x);                         // [r, k]
  at::Tensor dB = at::mm(grad_y.t(), g);                     // [n, r]
  dB.mul_(scale);
  at::Tensor dx;
  if (need_dx) {
    dx = at::mm(grad_y, weight);                             // dy W
    rank_update_(dx, dh, A.t(), c10::nullopt, 1.0);          // += dh A
  } else {
    dx = at::empty({0}, x.options());
  }
  return {dx, dA, dB, dlog};
}

}  // namespace fastcur
