// LaLoRA (docs/methods.md, LaLoRA): the device-generic schedules shared by the CPU and CUDA kernels.
//
// GEMMs go through ATen (MKL / oneDNN on the CPU, cuBLAS on CUDA). Each device supplies:
//   square_accumulate_(acc [N], g [E_g, N], c)      acc += c * sum_e g[e]^2, one pass over g
//   multi_tensor_penalty(grads?, params, anchors, precisions, lam) -> double-accumulated value
//                                                   (the fused penalty, one launch)
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"

namespace fastcur {

// float32 accumulation for float32 / bfloat16 / float16 inputs, float64 for float64.
inline at::ScalarType lalora_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Examples per group in lora_fisher_diag: the group's per-example gradients
// (E_g x (n r + r k) accumulator-typed values) stay within this many elements, so memory does
// not grow with E (docs/methods.md, LaLoRA: never hold all examples' gradients at once).
constexpr int64_t kFisherGroupElements = int64_t(1) << 18;

inline void check_lora_fisher_args(const at::Tensor& x, const at::Tensor& grad_out,
                                   const at::Tensor& A, const at::Tensor& B) {
  check_floating(A, "A");
  check_matrix(A, "A", -1, -1);
  const int64_t r = A.size(0), k = A.size(1);
  check_matrix(B, "B", -1, r);
  const int64_t n = B.size(0);
  TORCH_CHECK(x.dim() == 3 && x.size(2) == k, "fastcur: x must have shape [E, T, ", k, "], got ",
              shape_str(x));
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == x.size(0) && grad_out.size(1) == x.size(1) &&
                  grad_out.size(2) == n,
              "fastcur: grad_out must have shape [", x.size(0), ", ", x.size(1), ", ", n, "], got ",
              shape_str(grad_out));
  check_like(x, "x", A, "A");
  check_like(grad_out, "grad_out", A, "A");
  check_like(B, "B", A, "A");
}

// F_A = sum_e (s (G_e B)^T X_e)^2 [r, k], F_B = sum_e (s G_e^T (X_e A^T))^2 [n, r], in the
// accumulation type. Examples are processed in groups with batched GEMMs; each group's
// gradients are squared into the sums and dropped before the next group.
template <typename SquareAccumulate>
std::tuple<at::Tensor, at::Tensor> lora_fisher_diag_impl(const at::Tensor& x, const at::Tensor& grad_out,
                                                         const at::Tensor& A, const at::Tensor& B,
                                                         double scale, SquareAccumulate square_accumulate_) {
  check_lora_fisher_args(x, grad_out, A, B);
  const int64_t E = x.size(0), T = x.size(1), k = x.size(2), r = A.size(0), n = B.size(0);
  const auto acc = lalora_acc_type(A.scalar_type());
  const auto opts = A.options().dtype(acc);
  at::Tensor FA = at::zeros({r, k}, opts), FB = at::zeros({n, r}, opts);
  if (E == 0 || T == 0 || r == 0) return {FA, FB};
  const at::Tensor Af = A.to(acc), Bf = B.to(acc);
  const int64_t per_example = std::max<int64_t>(1, n * r + r * k);
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(E, kFisherGroupElements / per_example));
  const double c = scale * scale;
  for (int64_t e0 = 0; e0 < E; e0 += group) {
    const int64_t e1 = std::min(E, e0 + group), g = e1 - e0;
    const at::Tensor X = x.slice(0, e0, e1).to(acc);         // [g, T, k] (a view for float32)
    const at::Tensor G = grad_out.slice(0, e0, e1).to(acc);  // [g, T, n]
    const at::Tensor H = at::matmul(X, Af.t());              // X_e A^T  [g, T, r]
    const at::Tensor P = at::matmul(G, Bf);                  // G_e B    [g, T, r]
    square_accumulate_(FB, at::bmm(G.transpose(1, 2), H).reshape({g, n * r}), c);  // G_e^T H_e
    square_accumulate_(FA, at::bmm(P.transpose(1, 2), X).reshape({g, r * k}), c);  // P_e^T X_e
  }
  return {FA, FB};
}

// ---------------------------------------------------------------------------------------------
// The multi-tensor diagonal penalty: checks shared by the devices.
inline void check_penalty_lists(const at::TensorList params, const at::TensorList anchors,
                                const at::TensorList precisions, const at::TensorList* grads) {
  TORCH_CHECK(!params.empty(), "fastcur: params must be a non-empty list of tensors");
  TORCH_CHECK(anchors.size() == params.size(), "fastcur: anchors must have ", params.size(),
              " tensors (one per param), got ", anchors.size());
  TORCH_CHECK(precisions.size() == params.size(), "fastcur: precisions must have ", params.size(),
              " tensors (one per param), got ", precisions.size());
  if (grads) {
    TORCH_CHECK(grads->size() == params.size(), "fastcur: grads must have ", params.size(),
                " tensors (one per param), got ", grads->size());
  }
  const at::Tensor& p0 = params[0];
  check_floating(p0, "params[0]");
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == p0.scalar_type() && p.device() == p0.device(), "fastcur: params[", i,
                "] must have the dtype and device of params[0] (", p0.scalar_type(), ", ", p0.device(),
                "), got ", p.scalar_type(), ", ", p.device());
    const at::Tensor* others[3] = {&anchors[i], &precisions[i], grads ? &(*grads)[i] : nullptr};
    const char* names[3] = {"anchors", "precisions", "grads"};
    for (int j = 0; j < 3; ++j) {
      if (!others[j]) continue;
      const at::Tensor& t = *others[j];
      TORCH_CHECK(t.sizes() == p.sizes(), "fastcur: ", names[j], "[", i, "] must have the shape of params[",
                  i, "] ", shape_str(p), ", got ", shape_str(t));
      TORCH_CHECK(t.scalar_type() == p.scalar_type() && t.device() == p.device(), "fastcur: ", names[j], "[",
                  i, "] must have the dtype and device of params[", i, "] (", p.scalar_type(), ", ",
                  p.device(), "), got ", t.scalar_type(), ", ", t.device());
    }
    if (grads) {
      TORCH_CHECK((*grads)[i].is_contiguous(), "fastcur: grads[", i, "] must be contiguous (it is written in place)");
    }
  }
}

// ---------------------------------------------------------------------------------------------
// K-FAC (docs/methods.md, LaLoRA): factor accumulation and the Kronecker quadratic form.

// out[d, d] (+)= xc^T xc as a symmetric rank-k update: only the block rows' lower-triangle
// parts [i : i + b, 0 : i + b] go through the GEMM (about (1 + b/d)/2 of the flops); the upper
// triangle is mirrored once by `mirror_lower`. Block of 512 columns: at d = 4096, M = 4096 on 2
// threads this measured 1.48 s against 2.00 s for the full GEMM (256: 1.54 s, 128: 2.42 s);
// at d = 1024 it gains nothing (136 ms both), hence `kSyrkMinDim`.
constexpr int64_t kSyrkBlock = 512;
constexpr int64_t kSyrkMinDim = 2048;

inline void syrk_lower_(at::Tensor& out, const at::Tensor& xc, bool accumulate) {
  const int64_t d = xc.size(1);
  for (int64_t i = 0; i < d; i += kSyrkBlock) {
    const int64_t e = std::min(d, i + kSyrkBlock);
    at::Tensor block = out.slice(0, i, e).slice(1, 0, e);
    const at::Tensor xi = xc.slice(1, i, e).t(), prefix = xc.slice(1, 0, e);
    if (accumulate) {
      block.addmm_(xi, prefix);
    } else {
      at::mm_out(block, xi, prefix);
    }
  }
}

inline void mirror_lower_(at::Tensor& out) {
  const int64_t d = out.size(0);
  for (int64_t i = kSyrkBlock; i < d; i += kSyrkBlock) {
    const int64_t e = std::min(d, i + kSyrkBlock);
    out.slice(0, 0, i).slice(1, i, e).copy_(out.slice(0, i, e).slice(1, 0, i).t());
  }
}

// x [M, d] -> x^T x [d, d] (or the diagonal sum_m x_m^2 [d] when `diagonal`), accumulated in the
// accumulation type from row chunks, so a bfloat16 x is never copied whole to float32.
inline at::Tensor kfac_factor_impl(const at::Tensor& x, bool diagonal) {
  check_floating(x, "x");
  check_matrix(x, "x", -1, -1);
  const int64_t M = x.size(0), d = x.size(1);
  const auto acc = lalora_acc_type(x.scalar_type());
  const bool syrk = !diagonal && d >= kSyrkMinDim && M > 0;
  if (x.scalar_type() == acc && M > 0) {  // nothing to upcast: one pass, no zero-filled output
    if (diagonal) return x.square().sum(0);
    if (!syrk) return at::mm(x.t(), x);
    at::Tensor out = at::empty({d, d}, x.options());
    syrk_lower_(out, x, /*accumulate=*/false);
    mirror_lower_(out);
    return out;
  }
  at::Tensor out = diagonal ? at::zeros({d}, x.options().dtype(acc)) : at::zeros({d, d}, x.options().dtype(acc));
  if (M == 0 || d == 0) return out;
  const int64_t chunk = std::max<int64_t>(256, (int64_t(1) << 20) / std::max<int64_t>(d, 1));
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const at::Tensor xc = x.slice(0, m0, std::min(M, m0 + chunk)).to(acc);
    if (diagonal) {
      out.add_(xc.square().sum(0));
    } else if (syrk) {
      syrk_lower_(out, xc, /*accumulate=*/true);
    } else {
      out.addmm_(xc.t(), xc);
    }
  }
  if (syrk) mirror_lower_(out);
  return out;
}

inline void check_kfac_args(const at::Tensor& delta, const at::Tensor& S, const at::Tensor& G) {
  check_floating(delta, "delta");
  check_matrix(delta, "delta", -1, -1);
  const int64_t a = delta.size(0), b = delta.size(1);
  if (S.dim() == 1) {
    check_vector(S, "S (diagonal factor)", b);
  } else {
    check_matrix(S, "S", b, b);
  }
  if (G.dim() == 1) {
    check_vector(G, "G (diagonal factor)", a);
  } else {
    check_matrix(G, "G", a, a);
  }
  TORCH_CHECK(at::isFloatingType(S.scalar_type()) && at::isFloatingType(G.scalar_type()),
              "fastcur: S and G must be floating tensors, got ", S.scalar_type(), " and ", G.scalar_type());
  TORCH_CHECK(S.device() == delta.device() && G.device() == delta.device(), "fastcur: S and G must be on ",
              delta.device(), ", got ", S.device(), " and ", G.device());
}

// G D (G [a, a] or its diagonal [a]), D S (S [b, b] or its diagonal [b]).
inline at::Tensor kfac_left(const at::Tensor& G, const at::Tensor& D) {
  return G.dim() == 1 ? D * G.unsqueeze(1) : at::mm(G, D);
}
inline at::Tensor kfac_right(const at::Tensor& D, const at::Tensor& S) {
  return S.dim() == 1 ? D * S.unsqueeze(0) : at::mm(D, S);
}

// tr(G Δ S Δ^T) = sum((G Δ S) ⊙ Δ): two GEMMs and a dot, never a Kronecker product.
// Returned as a 0-dim tensor of delta's dtype (accumulated in float32 / float64).
inline at::Tensor kfac_penalty_impl(const at::Tensor& delta, const at::Tensor& S, const at::Tensor& G) {
  check_kfac_args(delta, S, G);
  const auto acc = lalora_acc_type(delta.scalar_type());
  const at::Tensor D = delta.to(acc);
  const at::Tensor GDS = kfac_right(kfac_left(G.to(acc), D), S.to(acc));
  return (GDS * D).sum().to(delta.scalar_type());
}

// d/dΔ of grad * tr(G Δ S Δ^T) = grad * (G Δ S + G^T Δ S^T), in delta's dtype.
inline at::Tensor kfac_penalty_bwd_impl(const at::Tensor& grad, const at::Tensor& delta, const at::Tensor& S,
                                        const at::Tensor& G) {
  check_kfac_args(delta, S, G);
  const auto acc = lalora_acc_type(delta.scalar_type());
  const at::Tensor D = delta.to(acc), Sf = S.to(acc), Gf = G.to(acc);
  at::Tensor out = kfac_right(kfac_left(Gf, D), Sf);
  const at::Tensor Gt = Gf.dim() == 1 ? Gf : Gf.t();
  const at::Tensor St = Sf.dim() == 1 ? Sf : Sf.t();
  out.add_(kfac_right(kfac_left(Gt, D), St));
  out.mul_(grad.to(acc));
  return out.to(delta.scalar_type());
}

}  // namespace fastcur
