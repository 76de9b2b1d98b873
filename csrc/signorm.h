// SigNorm (docs/methods.md, SECURA): the scalar math shared by the CPU and CUDA kernels of signorm,
// secura_linear and signorm_merge, the argument checks of the three ops, and signorm's
// forward and backward around each device's row passes.
//
//   L = |Δ| / (|y0| + eps)                      accumulated in float32 (float64 for float64)
//   N = k (L / (mx + eps) - 1/2)   norm "max"   mx = max L over the scope (row or tensor)
//   N = k L                        norm "raw"   the released code
//   S = 2 - σ(N); S = 2 where mx == 0           (every L of the scope is 0: y = y0 exactly)
//   y = (y0 + (y0 + Δ)) / S
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

#include "checks.h"
#include "cur_linear.h"

namespace fastcur {

// Parsed string options of the schemas (kept as str so the public names travel unchanged).
inline bool parse_norm_raw(const std::string& norm) {
  TORCH_CHECK(norm == "max" || norm == "raw", "fastcur: norm must be 'max' or 'raw', got '", norm, "'");
  return norm == "raw";
}

// True for the whole-tensor max; `row_name` is "token" (signorm) or "row" (signorm_merge).
inline bool parse_scope_tensor(const std::string& scope, const char* row_name) {
  TORCH_CHECK(scope == row_name || scope == "tensor", "fastcur: scope must be '", row_name,
              "' or 'tensor', got '", scope, "'");
  return scope == "tensor";
}

// N of docs/methods.md, SECURA (the logit of the sigmoid), given the ratio L and the scope's max mx.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t signorm_logit(acc_t L, acc_t mx, acc_t k, acc_t eps, bool raw) {
  return raw ? k * L : k * (L / (mx + eps) - acc_t(0.5));
}

// S from the sigmoid's value: 2 - σ(N), or exactly 2 where the scope's max is 0.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t signorm_scale_from_sigmoid(acc_t sig, acc_t mx) {
  return mx == acc_t(0) ? acc_t(2) : acc_t(2) - sig;
}

inline void check_signorm_pair(const at::Tensor& y0, const at::Tensor& delta) {
  check_floating(y0, "y0");
  check_matrix(y0, "y0", -1, -1);
  check_matrix(delta, "delta", y0.size(0), y0.size(1));
  check_like(delta, "delta", y0, "y0");
}

// The dtype ratios and S are kept in: float32 for 16-bit inputs and float32, float64 for float64.
inline at::ScalarType signorm_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// signorm's string options: norm "raw" (else "max"), scope "tensor" (else "token").
struct SignormOptions {
  bool raw, tensor_scope;
};

inline SignormOptions parse_signorm_options(const std::string& norm, const std::string& scope) {
  const bool raw = parse_norm_raw(norm);
  return {raw, parse_scope_tensor(scope, "token")};
}

// signorm's forward around a device's row pass
//   rows(y0, delta, k, eps, options, y, rowmax)
// over the contiguous y0, delta [M, n], writing y [M, n] and rowmax [M] (the row maxima of L,
// in the accumulation dtype, all the backward needs besides y0 and Δ). Returns (y, rowmax).
template <typename Rows>
std::tuple<at::Tensor, at::Tensor> signorm_forward(const at::Tensor& y0_in, const at::Tensor& delta_in,
                                                   double k, double eps, const std::string& norm,
                                                   const std::string& scope, Rows rows) {
  check_signorm_pair(y0_in, delta_in);
  const SignormOptions o = parse_signorm_options(norm, scope);
  const at::Tensor y0 = y0_in.contiguous(), delta = delta_in.contiguous();
  at::Tensor y = at::empty_like(y0);
  at::Tensor rowmax = at::empty({y0.size(0)}, y0.options().dtype(signorm_acc_type(y0.scalar_type())));
  rows(y0, delta, k, eps, o, y, rowmax);
  return {y, rowmax};
}

// signorm's backward around a device's elementwise pass
//   grads(grad_y, y0, delta, mx, k, eps, options, dy0, ddelta)
// dy0 = 2 dy / S, dΔ = dy / S, S recomputed from y0, Δ and mx: the forward's row maxima [M],
// or their max [1] for scope "tensor". Called only for a non-empty [M, n]. Returns (dy0, dΔ).
template <typename Grads>
std::tuple<at::Tensor, at::Tensor> signorm_backward(const at::Tensor& grad_in, const at::Tensor& y0_in,
                                                    const at::Tensor& delta_in, const at::Tensor& rowmax,
                                                    double k, double eps, const std::string& norm,
                                                    const std::string& scope, Grads grads) {
  check_signorm_pair(y0_in, delta_in);
  check_matrix(grad_in, "grad_y", y0_in.size(0), y0_in.size(1));
  check_like(grad_in, "grad_y", y0_in, "y0");
  const SignormOptions o = parse_signorm_options(norm, scope);
  const int64_t M = y0_in.size(0), n = y0_in.size(1);
  check_vector(rowmax, "rowmax", M);
  TORCH_CHECK(rowmax.scalar_type() == signorm_acc_type(y0_in.scalar_type()),
              "fastcur: rowmax must be ", signorm_acc_type(y0_in.scalar_type()), ", got ",
              rowmax.scalar_type());
  const at::Tensor y0 = y0_in.contiguous(), delta = delta_in.contiguous(), g = grad_in.contiguous();
  at::Tensor dy0 = at::empty_like(y0), dd = at::empty_like(y0);
  if (M == 0 || n == 0) return {dy0, dd};
  const at::Tensor mx = o.tensor_scope ? rowmax.amax().reshape({1}) : rowmax.contiguous();
  grads(g, y0, delta, mx, k, eps, o, dy0, dd);
  return {dy0, dd};
}

inline void check_secura_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, const at::Tensor& C,
                                     const at::Tensor& A_c, const at::Tensor& B_c,
                                     const at::Tensor& R,
                                     const c10::optional<at::Tensor>& lora_bias) {
  check_linear_input(x, weight);
  const int64_t n = weight.size(0), k = weight.size(1);
  check_matrix(C, "C", n, -1);
  const int64_t r = C.size(1);
  check_matrix(R, "R", r, k);
  check_matrix(B_c, "B_c", r, -1);
  const int64_t a = B_c.size(1);
  check_matrix(A_c, "A_c", a, r);
  check_like(C, "C", weight, "weight");
  check_like(R, "R", weight, "weight");
  check_like(A_c, "A_c", weight, "weight");
  check_like(B_c, "B_c", weight, "weight");
  check_bias(bias, "bias", n, weight);
  check_bias(lora_bias, "lora_bias", n, weight);
}

inline void check_signorm_merge_args(const at::Tensor& weight, const at::Tensor& C,
                                     const at::Tensor& U, const at::Tensor& R) {
  check_floating(weight, "weight");
  check_matrix(weight, "weight", -1, -1);
  check_cur_factors(weight, C, U, R);
}

// signorm_merge's inputs for either device: the checks, the scope ("row" or "tensor") and
// s C U [n, r] in the accumulation dtype, the left factor of ΔW = (s C U) R.
struct SignormMergeInputs {
  bool tensor_scope;
  at::ScalarType acc;
  at::Tensor CU;
};

inline SignormMergeInputs prepare_signorm_merge(const at::Tensor& weight, const at::Tensor& C,
                                                const at::Tensor& U, const at::Tensor& R,
                                                double scale, const std::string& scope) {
  check_signorm_merge_args(weight, C, U, R);
  const bool tensor_scope = parse_scope_tensor(scope, "row");
  const at::ScalarType acc = signorm_acc_type(weight.scalar_type());
  return {tensor_scope, acc, at::mm(C.to(acc), U.to(acc)).mul_(scale).contiguous()};
}

}  // namespace fastcur
