// IMSM's memory gate (SPEC §6): shape checks and the split of W_A shared by the CPU and CUDA
// kernels. h, h_tuned [B, T, d]; q, q_tuned [B, d]; W_A [4d, r] (blocks A1..A4, [d, r] each,
// for q, h, h', q'); W_B [r, d]; hidden_mask [B, T, r] or none (gate dropout, pre-scaled).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "checks.h"

namespace fastcur {

struct ImsmDims {
  int64_t B, T, d, r;
};

inline at::ScalarType imsm_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline ImsmDims check_imsm_inputs(const at::Tensor& h, const at::Tensor& h_tuned, const at::Tensor& q,
                                  const at::Tensor& q_tuned, const at::Tensor& W_A, const at::Tensor& W_B,
                                  const c10::optional<at::Tensor>& hidden_mask) {
  check_floating(h, "h");
  TORCH_CHECK(h.dim() == 3, "fastcur: h must be 3-D [B, T, d], got shape ", shape_str(h));
  const int64_t B = h.size(0), T = h.size(1), d = h.size(2);
  TORCH_CHECK(h_tuned.sizes() == h.sizes(), "fastcur: h_tuned must have the shape of h ",
              shape_str(h), ", got ", shape_str(h_tuned));
  check_like(h_tuned, "h_tuned", h, "h");
  check_matrix(q, "q", B, d);
  check_like(q, "q", h, "h");
  check_matrix(q_tuned, "q_tuned", B, d);
  check_like(q_tuned, "q_tuned", h, "h");
  check_matrix(W_A, "W_A", 4 * d, -1);
  check_like(W_A, "W_A", h, "h");
  const int64_t r = W_A.size(1);
  check_matrix(W_B, "W_B", r, d);
  check_like(W_B, "W_B", h, "h");
  if (hidden_mask.has_value()) {
    const at::Tensor& m = *hidden_mask;
    TORCH_CHECK(m.dim() == 3 && m.size(0) == B && m.size(1) == T && m.size(2) == r,
                "fastcur: hidden_mask must have shape [", B, ", ", T, ", ", r, "], got ", shape_str(m));
    check_like(m, "hidden_mask", h, "h");
  }
  return {B, T, d, r};
}

// The per-sequence query term c = q A1 + q' A4 [B, r] and the three weights the row kernels
// read, all in the accumulation dtype: A2, A3 [d, r] (row-major, views into W_A), W_B [r, d].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> imsm_prepare(
    const at::Tensor& q, const at::Tensor& q_tuned, const at::Tensor& W_A, const at::Tensor& W_B,
    int64_t d) {
  const auto acc = imsm_acc_type(q.scalar_type());
  const at::Tensor A = W_A.to(acc).contiguous();
  const at::Tensor c = at::matmul(q.to(acc), A.narrow(0, 0, d)) +
                       at::matmul(q_tuned.to(acc), A.narrow(0, 3 * d, d));
  return {c.contiguous(), A.narrow(0, d, d).contiguous(), A.narrow(0, 2 * d, d).contiguous(),
          W_B.to(acc).contiguous()};
}

// The gradients that follow from dzp = dL/dz (before the mask), [B*T, r] in the accumulation
// dtype: (dq, dq_tuned, dA1, dA4), the query terms reduced over T first.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> imsm_query_grads(
    const at::Tensor& dzp, const at::Tensor& q, const at::Tensor& q_tuned, const at::Tensor& W_A,
    const ImsmDims& s) {
  const auto acc = imsm_acc_type(q.scalar_type());
  const at::Tensor dc = dzp.view({s.B, s.T, s.r}).sum(1);  // [B, r]
  const at::Tensor A = W_A.to(acc);
  const at::Tensor dq = at::matmul(dc, A.narrow(0, 0, s.d).t());
  const at::Tensor dqt = at::matmul(dc, A.narrow(0, 3 * s.d, s.d).t());
  const at::Tensor dA1 = at::matmul(q.to(acc).t(), dc);
  const at::Tensor dA4 = at::matmul(q_tuned.to(acc).t(), dc);
  return {dq, dqt, dA1, dA4};
}

}  // namespace fastcur
