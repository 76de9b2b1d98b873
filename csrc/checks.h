// Input checks with readable messages: every message names the argument and gives the
// expected and the actual shape, dtype or device.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <sstream>
#include <string>

namespace fastcur {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// A matrix of the given shape; -1 accepts any size along that dimension.
inline void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2, "fastcur: ", name, " must be 2-D, got shape ", shape_str(t));
  TORCH_CHECK((rows < 0 || t.size(0) == rows) && (cols < 0 || t.size(1) == cols),
              "fastcur: ", name, " must have shape [", rows < 0 ? std::string("*") : std::to_string(rows),
              ", ", cols < 0 ? std::string("*") : std::to_string(cols), "], got ", shape_str(t));
}

inline void check_vector(const at::Tensor& t, const char* name, int64_t len) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len, "fastcur: ", name, " must have shape [", len,
              "], got ", shape_str(t));
}

// Same dtype and device as the reference tensor.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastcur: ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "fastcur: ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fastcur: ", name,
              " must be a floating tensor (float32, bfloat16, float16 or float64), got ",
              t.scalar_type());
}

// A linear layer's weight [n, k] (floating) and its input x [*, k] of weight's dtype and device.
inline void check_linear_input(const at::Tensor& x, const at::Tensor& weight) {
  check_floating(weight, "weight");
  check_matrix(weight, "weight", -1, -1);
  check_matrix(x, "x", -1, weight.size(1));
  check_like(x, "x", weight, "weight");
}

// An optional vector [len] (a bias) of weight's dtype and device.
inline void check_bias(const c10::optional<at::Tensor>& bias, const char* name, int64_t len,
                       const at::Tensor& weight) {
  if (!bias.has_value()) return;
  check_vector(*bias, name, len);
  check_like(*bias, name, weight, "weight");
}

inline void check_index(const c10::optional<at::Tensor>& idx, const char* name, int64_t len,
                        const at::Tensor& ref) {
  if (!idx.has_value()) return;
  const at::Tensor& t = *idx;
  TORCH_CHECK(t.scalar_type() == at::kLong, "fastcur: ", name, " must be int64, got ",
              t.scalar_type());
  check_vector(t, name, len);
  TORCH_CHECK(t.device() == ref.device(), "fastcur: ", name, " must be on ", ref.device(),
              ", got ", t.device());
}

}  // namespace fastcur
