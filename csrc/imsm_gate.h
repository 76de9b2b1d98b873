// IMSM's memory gate (docs/methods.md, IMSM): shape checks, the split of W_A and the schedule around the
// per-row passes, shared by the CPU and CUDA kernels. h, h_tuned [B, T, d]; q, q_tuned [B, d];
// W_A [4d, r] (blocks A1..A4, [d, r] each, for q, h, h', q'); W_B [r, d]; hidden_mask
// [B, T, r] or none (gate dropout, pre-scaled).
//
// Each device supplies the two row passes (M = B T rows, called only when M > 0 and d > 0):
//   fwd_rows(h, h_tuned, mask?, c, A2, A3, W_B, s, out, z)
//       z = (c + h A2 + h' A3) * mask [M, r], out = h' + σ(z W_B) (h - h') [M, d]
//   bwd_rows(grad, h, h_tuned, mask?, z, A2, A3, W_B, s, dh?, dh_tuned?, dzp) -> (dA2, dA3, dW_B)
//       writes dzp = dL/dz before the mask [M, r] and dh, dh_tuned where defined
// mask, dh and dh_tuned are undefined tensors where absent or not needed; c, A2, A3, W_B, z,
// dzp and the returned gradients are in the accumulation dtype.
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

// The backward's inputs: those of the forward, grad like h, and z the forward's saved
// [B, T, r] hidden terms in the accumulation dtype.
inline ImsmDims check_imsm_bwd_inputs(const at::Tensor& grad, const at::Tensor& h,
                                      const at::Tensor& h_tuned, const at::Tensor& q,
                                      const at::Tensor& q_tuned, const at::Tensor& W_A,
                                      const at::Tensor& W_B,
                                      const c10::optional<at::Tensor>& hidden_mask,
                                      const at::Tensor& z) {
  const ImsmDims s = check_imsm_inputs(h, h_tuned, q, q_tuned, W_A, W_B, hidden_mask);
  TORCH_CHECK(grad.sizes() == h.sizes(), "fastcur: grad must have the shape of h ",
              shape_str(h), ", got ", shape_str(grad));
  check_like(grad, "grad", h, "h");
  const auto acc = imsm_acc_type(h.scalar_type());
  TORCH_CHECK(z.dim() == 3 && z.size(0) == s.B && z.size(1) == s.T && z.size(2) == s.r &&
                  z.scalar_type() == acc,
              "fastcur: z must be ", acc, " of shape [", s.B, ", ", s.T, ", ", s.r, "], got ",
              z.scalar_type(), " ", shape_str(z));
  return s;
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

// Returns (out [B, T, d], z [B, T, r] in the accumulation dtype, saved for the backward).
template <typename FwdRows>
std::tuple<at::Tensor, at::Tensor> imsm_gate_forward(const at::Tensor& h_in, const at::Tensor& ht_in,
                                                     const at::Tensor& q, const at::Tensor& qt,
                                                     const at::Tensor& W_A, const at::Tensor& W_B,
                                                     const c10::optional<at::Tensor>& mask_in,
                                                     FwdRows fwd_rows) {
  const ImsmDims s = check_imsm_inputs(h_in, ht_in, q, qt, W_A, W_B, mask_in);
  const at::Tensor h = h_in.contiguous(), ht = ht_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(h);
  at::Tensor z = at::empty({s.B, s.T, s.r}, h.options().dtype(imsm_acc_type(h.scalar_type())));
  if (s.B * s.T == 0 || s.d == 0) {
    z.zero_();
    return {out, z};
  }
  at::Tensor c, A2, A3, Wb;
  std::tie(c, A2, A3, Wb) = imsm_prepare(q, qt, W_A, W_B, s.d);
  fwd_rows(h, ht, mask, c, A2, A3, Wb, s, out, z);
  return {out, z};
}

// Returns (dh [B, T, d] or empty, dh_tuned or empty, dq [B, d], dq_tuned, dW_A [4d, r], dW_B [r, d]).
template <typename BwdRows>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> imsm_gate_backward(
    const at::Tensor& grad_in, const at::Tensor& h_in, const at::Tensor& ht_in, const at::Tensor& q,
    const at::Tensor& qt, const at::Tensor& W_A, const at::Tensor& W_B,
    const c10::optional<at::Tensor>& mask_in, const at::Tensor& z_in, bool need_h, bool need_ht,
    BwdRows bwd_rows) {
  const ImsmDims s = check_imsm_bwd_inputs(grad_in, h_in, ht_in, q, qt, W_A, W_B, mask_in, z_in);
  const auto acc = imsm_acc_type(h_in.scalar_type());
  const int64_t M = s.B * s.T, d = s.d, r = s.r;
  const at::Tensor h = h_in.contiguous(), ht = ht_in.contiguous(), g_out = grad_in.contiguous(),
                   z = z_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  at::Tensor dh = need_h ? at::empty_like(h) : at::empty({0}, h.options());
  at::Tensor dht = need_ht ? at::empty_like(h) : at::empty({0}, h.options());
  at::Tensor dzp = at::zeros({M, r}, h.options().dtype(acc));
  at::Tensor dA2, dA3, dWb;
  if (M > 0 && d > 0) {
    const at::Tensor A = W_A.to(acc).contiguous();
    std::tie(dA2, dA3, dWb) =
        bwd_rows(g_out, h, ht, mask, z, A.narrow(0, d, d), A.narrow(0, 2 * d, d),
                 W_B.to(acc).contiguous(), s, need_h ? dh : at::Tensor(),
                 need_ht ? dht : at::Tensor(), dzp);
  } else {
    dA2 = at::zeros({d, r}, dzp.options());
    dA3 = at::zeros({d, r}, dzp.options());
    dWb = at::zeros({r, d}, dzp.options());
  }
  at::Tensor dq, dqt, dA1, dA4;
  std::tie(dq, dqt, dA1, dA4) = imsm_query_grads(dzp, q, qt, W_A, s);
  const at::Tensor dWA = at::cat({dA1, dA2, dA3, dA4}, 0);
  const auto dt = h.scalar_type();
  return {dh, dht, dq.to(dt), dqt.to(dt), dWA.to(dt), dWb.to(dt)};
}

}  // namespace fastcur
