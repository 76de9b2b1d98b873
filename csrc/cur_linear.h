// cur_linear (docs/methods.md, CURLoRA): the device-generic schedule shared by the CPU and CUDA kernels.
//
// The base GEMMs go through ATen (MKL / oneDNN on the CPU, cuBLAS on CUDA). Each device
// supplies two primitives:
//   gather_columns(src [M, N], idx [r]) -> [M, r]          the tied fast path's gather
//   rank_update_(out [M, N], z [M, r], E [N, r], bias?, s)   out += s * z E^T (+ bias),
//                                                          one pass over out (on the CPU
//                                                          csrc/rank_update.h's addmm)
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "checks.h"

namespace fastcur {

// The CUR factors of weight [n, k]: U [r, r], C [n, r], R [r, k], with weight's dtype and device
// (shared with signorm_merge, which merges them into the weight).
inline void check_cur_factors(const at::Tensor& weight, const at::Tensor& C, const at::Tensor& U,
                              const at::Tensor& R) {
  const int64_t n = weight.size(0), k = weight.size(1);
  check_matrix(U, "U", -1, -1);
  const int64_t r = U.size(0);
  check_matrix(U, "U", r, r);
  check_matrix(C, "C", n, r);
  check_matrix(R, "R", r, k);
  check_like(U, "U", weight, "weight");
  check_like(C, "C", weight, "weight");
  check_like(R, "R", weight, "weight");
}

inline void check_cur_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, const at::Tensor& C,
                                  const at::Tensor& U, const at::Tensor& R,
                                  const c10::optional<at::Tensor>& rows,
                                  const c10::optional<at::Tensor>& cols) {
  check_linear_input(x, weight);
  check_cur_factors(weight, C, U, R);
  check_bias(bias, "bias", weight.size(0), weight);
  check_index(rows, "rows", U.size(0), weight);
  check_index(cols, "cols", U.size(0), weight);
}

template <typename Gather, typename RankUpdate>
std::tuple<at::Tensor, at::Tensor> cur_linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& C, const at::Tensor& U, const at::Tensor& R, double scale,
    const c10::optional<at::Tensor>& rows, const c10::optional<at::Tensor>& cols,
    Gather gather_columns, RankUpdate rank_update_) {
  check_cur_linear_args(x, weight, bias, C, U, R, rows, cols);
  // Base GEMM without the bias: the tied gather must read x W^T before b is added
  // (in bfloat16, subtracting a large bias from a rounded output destroys the projection).
  at::Tensor y = at::mm(x, weight.t());
  at::Tensor h = rows.has_value() ? gather_columns(y, *rows) : at::mm(x, R.t());
  at::Tensor z = at::mm(h, U.t());
  rank_update_(y, z, C, bias, scale);
  return {y, h};
}

template <typename Gather, typename RankUpdate>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cur_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& C,
    const at::Tensor& U, const at::Tensor& R, const at::Tensor& h, double scale,
    const c10::optional<at::Tensor>& cols, bool need_dx, Gather gather_columns,
    RankUpdate rank_update_) {
  check_cur_linear_args(x, weight, c10::nullopt, C, U, R, c10::nullopt, cols);
  const int64_t M = x.size(0), n = weight.size(0), r = U.size(0);
  check_matrix(grad_y, "grad_y", M, n);
  check_like(grad_y, "grad_y", weight, "weight");
  check_matrix(h, "h", M, r);
  check_like(h, "h", weight, "weight");

  at::Tensor dx, g;
  if (need_dx) {
    dx = at::mm(grad_y, weight);                     // dy W          [M, k]
    g = cols.has_value() ? gather_columns(dx, *cols)  // dy C = (dy W)[:, cols]
                         : at::mm(grad_y, C);
    // dx += s * (g U) R, accumulated into the GEMM output in one pass.
    rank_update_(dx, at::mm(g, U), R.t(), c10::nullopt, scale);
  } else {
    dx = at::empty({0}, x.options());
    g = at::mm(grad_y, C);
  }
  at::Tensor dU = at::mm(g.t(), h);  // s * (dy C)^T (x R^T)
  dU.mul_(scale);
  return {dx, dU, g};
}

}  // namespace fastcur
