// SigNorm (SPEC §3): the scalar math shared by the CPU and CUDA kernels of signorm,
// secura_linear and signorm_merge, and the argument checks of the three ops.
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

#include "checks.h"

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

// N of SPEC §3 (the logit of the sigmoid), given the ratio L and the scope's max mx.
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

inline void check_secura_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, const at::Tensor& C,
                                     const at::Tensor& A_c, const at::Tensor& B_c,
                                     const at::Tensor& R,
                                     const c10::optional<at::Tensor>& lora_bias) {
  check_floating(weight, "weight");
  check_matrix(weight, "weight", -1, -1);
  const int64_t n = weight.size(0), k = weight.size(1);
  check_matrix(x, "x", -1, k);
  check_like(x, "x", weight, "weight");
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
  if (bias.has_value()) {
    check_vector(*bias, "bias", n);
    check_like(*bias, "bias", weight, "weight");
  }
  if (lora_bias.has_value()) {
    check_vector(*lora_bias, "lora_bias", n);
    check_like(*lora_bias, "lora_bias", weight, "weight");
  }
}

inline void check_signorm_merge_args(const at::Tensor& weight, const at::Tensor& C,
                                     const at::Tensor& U, const at::Tensor& R) {
  check_floating(weight, "weight");
  check_matrix(weight, "weight", -1, -1);
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

}  // namespace fastcur
