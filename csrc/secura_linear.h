// secura_linear (docs/methods.md, SECURA): the device-generic schedule shared by the CPU and CUDA kernels.
//
//   y0 = x W^T                       ATen GEMM, bias NOT added yet
//   h  = x R^T                       tied fast path: gathered from y0 (columns `rows`), else a GEMM
//                                    (16-bit dtypes with a bias: b goes into the GEMM, see below)
//   z  = (h B_c) A_c                 the r x a x r core, [M, r]
//   y  = signorm(y0 + b, s z C^T + lora_bias)    the device's fused epilogue, in place over y0:
//                                    Δ exists only per row block (CPU) / per tile (CUDA)
// The epilogue also writes S [M, n] (float32; float64 for float64 inputs), the detached
// scales the backward needs: saving S (one M x n tensor) is cheaper than keeping y0 and Δ
// (two) or recomputing the base GEMM.
//
// Backward with S constant (docs/methods.md, SECURA): dΔ = dy / S, dy0 = 2 dΔ, so
//   dx   = 2 dΔ W + dh R             one GEMM plus a rank-r update (beta = 2)
//   dΔ C = (dΔ W)[:, cols]           tied fast path, else a GEMM
//   dz = s dΔ C, dA_c = u^T dz, du = dz A_c^T, dB_c = h^T du, dh = du B_c^T
// dW, db, dC, dR and d lora_bias are formed in Python from the returned dΔ, z and dh, only
// when asked for.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "signorm.h"

namespace fastcur {

// Epilogue(y0 [M, n] in/out, bias?, z [M, r], C [n, r], lora_bias?, scale, k, eps, raw,
//          tensor_scope, S [M, n]): y0 := signorm(y0 + b, scale z C^T + lora_bias), S filled.
template <typename Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor> secura_linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& C, const at::Tensor& A_c, const at::Tensor& B_c, const at::Tensor& R,
    const c10::optional<at::Tensor>& lora_bias, double scale, double k, double eps,
    c10::string_view norm, c10::string_view scope, const c10::optional<at::Tensor>& rows,
    const c10::optional<at::Tensor>& cols, Epilogue epilogue) {
  check_secura_linear_args(x, weight, bias, C, A_c, B_c, R, lora_bias);
  check_index(rows, "rows", C.size(1), weight);
  check_index(cols, "cols", C.size(1), weight);
  const bool raw = parse_norm_raw(std::string(norm));
  const bool tensor_scope = parse_scope_tensor(std::string(scope), "token");
  // SigNorm's ratio |Δ| / |y0| is most sensitive where y0 = x W^T + b is near 0, i.e. where
  // x W^T and b cancel. In 16-bit dtypes, rounding x W^T before adding b (what the tied gather
  // needs: it must read x W^T without b, docs/methods.md, CURLoRA) loses exactly those elements' precision and
  // moves the scope's max L. So with a bias and a 16-bit dtype the bias rides in the GEMM
  // (one rounding, as nn.Linear) and x R^T is the skinny GEMM (r / n of the base GEMM's work);
  // float32 / float64 keep the tied gather and add b in the epilogue.
  const bool low_precision = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const bool bias_in_gemm = bias.has_value() && low_precision;
  at::Tensor y = bias_in_gemm ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  at::Tensor h = (rows.has_value() && !bias_in_gemm) ? y.index_select(1, *rows) : at::mm(x, R.t());
  at::Tensor z = at::mm(at::mm(h, B_c), A_c);
  at::Tensor S = at::empty(y.sizes(), y.options().dtype(signorm_acc_type(y.scalar_type())));
  const c10::optional<at::Tensor> epilogue_bias = bias_in_gemm ? c10::optional<at::Tensor>() : bias;
  epilogue(y, epilogue_bias, z, C, lora_bias, scale, k, eps, raw,
           tensor_scope, S);
  return {y, S, h};
}

// Returns (dx [M, k] or empty when !need_dx, dΔ [M, n], z [M, r], dA_c [a, r], dB_c [r, a],
// dh [M, r]).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
secura_linear_backward(const at::Tensor& grad_y, const at::Tensor& S, const at::Tensor& x,
                       const at::Tensor& weight, const at::Tensor& C, const at::Tensor& A_c,
                       const at::Tensor& B_c, const at::Tensor& R, const at::Tensor& h,
                       double scale, const c10::optional<at::Tensor>& cols, bool need_dx) {
  check_secura_linear_args(x, weight, c10::nullopt, C, A_c, B_c, R, c10::nullopt);
  const int64_t M = x.size(0), n = weight.size(0), r = C.size(1);
  check_index(cols, "cols", r, weight);
  check_matrix(grad_y, "grad_y", M, n);
  check_like(grad_y, "grad_y", weight, "weight");
  check_matrix(S, "S", M, n);
  TORCH_CHECK(S.scalar_type() == signorm_acc_type(weight.scalar_type()), "fastcur: S must be ",
              signorm_acc_type(weight.scalar_type()), ", got ", S.scalar_type());
  check_matrix(h, "h", M, r);
  check_like(h, "h", weight, "weight");

  // dΔ = dy / S in one pass (computed in S's precision, rounded to the input dtype).
  at::Tensor dD = at::div(grad_y, S).to(grad_y.scalar_type());
  at::Tensor u = at::mm(h, B_c);
  at::Tensor z = at::mm(u, A_c);
  at::Tensor dx, dDC;
  if (need_dx) {
    dx = at::mm(dD, weight);                                   // dΔ W  [M, k]
    dDC = cols.has_value() ? dx.index_select(1, *cols) : at::mm(dD, C);
  } else {
    dx = at::empty({0}, x.options());
    dDC = at::mm(dD, C);
  }
  at::Tensor dz = dDC.mul(scale);
  at::Tensor dA = at::mm(u.t(), dz);
  at::Tensor du = at::mm(dz, A_c.t());
  at::Tensor dB = at::mm(h.t(), du);
  at::Tensor dh = at::mm(du, B_c.t());
  if (need_dx) dx.addmm_(dh, R, /*beta=*/2.0, /*alpha=*/1.0);  // 2 dΔ W + dh R
  return {dx, dD, z, dA, dB, dh};
}

}  // namespace fastcur
