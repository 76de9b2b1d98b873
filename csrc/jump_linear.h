// jump_linear and ella_penalty (docs/methods.md, JumpLoRA): the device-generic, row-block schedule. The CUDA
// kernels use it for both ops and the CPU for ella_penalty; the CPU jump_linear runs the same
// steps with the same primitives inside one parallel region (csrc/cpu/jump_linear.cpp, where
// the reason is measured).
//
// Z = B A (n x k) is never stored whole: W is walked in blocks of `rows` output rows, and for
// each block the Z tile B[blk] A is recomputed by a rank-r GEMM into a tile buffer (acc dtype:
// float32 for half inputs). The dense parts go through ATen GEMMs (MKL/oneDNN, cuBLAS); each
// device supplies the elementwise tile primitives:
//
//   build_weff(out [b, k], W [b, k], Z [b, k], log_theta, s, f, Wp [b, k]?, ella [] acc?, fe)
//       out = W + s (f J(Z) + (1 - f) Z), J(Z) = Z 1[|Z| > θ];
//       with ELLA's W_past tile Wp (else undefined): ella += Σ (s Z e Wp)²
//   grad_tile(dZ [b, k] acc, T [b, k], Z [b, k], log_theta, s, f, eps, th_acc [] acc,
//             Wp [b, k]?, c [] acc?, fe)
//       G = s T (T = the dy^T x tile), dZ = G (f 1[|Z| > θ] + 1 - f) (+ c 2 s² e² Z Wp²),
//       th_acc += f (θ/ε) Σ G (−K((Z−θ)/ε) + K((−Z−θ)/ε))
//   ella_tile(Z [b, k], Wp [b, k], log_theta, s, fe, val_acc [] acc, dZ [b, k] acc or undefined)
//       val_acc += Σ (s Z e Wp)², dZ = 2 s² e² Z Wp²
// ELLA's delta is s (fe J(Z) + (1 - fe) Z) = s Z e with e = fe 1[|Z| > θ] + 1 - fe (the mask
// is hard: nothing reaches θ): fe = f is the released "interpolated" delta, fe = 1 the hard-masked
// s J(Z) ("masked").
//   finish_theta(th_acc [], log_theta, denom) -> dlog_theta shaped like log_theta:
//       θ th_acc / denom
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <functional>
#include <tuple>

#include "checks.h"

namespace fastcur {

inline at::ScalarType jump_acc_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// log_theta is kept in the acc dtype (float32 for a float32/bfloat16/float16 weight, float64 for
// float64): in bfloat16, log θ ≈ -4.7 has spacing 2^-5, a 3 % step in θ that flips gates.
inline void check_log_theta(const at::Tensor& log_theta, const at::Tensor& weight_like,
                            const char* ref_name) {
  const auto want = jump_acc_type(weight_like.scalar_type());
  TORCH_CHECK(log_theta.scalar_type() == want, "fastcur: log_theta must be ", want, " for a ",
              weight_like.scalar_type(), " ", ref_name, " (the gate compares in ", want, "), got ",
              log_theta.scalar_type());
  TORCH_CHECK(log_theta.device() == weight_like.device(), "fastcur: log_theta must be on the device of ",
              ref_name, " (", weight_like.device(), "), got ", log_theta.device());
}

inline void check_jump_factors(const at::Tensor& weight_like, int64_t n, int64_t k,
                               const at::Tensor& A, const at::Tensor& B,
                               const at::Tensor& log_theta, int64_t theta_len,
                               const char* ref_name = "weight") {
  check_matrix(A, "A", -1, k);
  const int64_t r = A.size(0);
  check_matrix(B, "B", n, r);
  check_like(A, "A", weight_like, ref_name);
  check_like(B, "B", weight_like, ref_name);
  check_log_theta(log_theta, weight_like, ref_name);
  if (theta_len < 0) {
    TORCH_CHECK(log_theta.numel() == 1 && log_theta.dim() <= 1,
                "fastcur: log_theta must be a scalar (shape [] or [1]), got ", shape_str(log_theta));
  } else {
    check_vector(log_theta, "log_theta", theta_len);
  }
}

inline void check_jump_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                                   const at::Tensor& B, const at::Tensor& log_theta) {
  check_linear_input(x, weight);
  check_jump_factors(weight, weight.size(0), weight.size(1), A, B, log_theta, -1);
  check_bias(bias, "bias", weight.size(0), weight);
}

inline void check_w_past(const at::Tensor& W_past, const at::Tensor& weight) {
  check_matrix(W_past, "W_past", weight.size(0), weight.size(1));
  check_like(W_past, "W_past", weight, "weight");
}

// Rows of W per block: a tile of about `tile_elems` elements, at least 1 row.
inline int64_t jump_block_rows(int64_t n, int64_t k, int64_t tile_elems) {
  return std::max<int64_t>(1, std::min<int64_t>(n, tile_elems / std::max<int64_t>(k, 1)));
}

// y = x (W + ΔW)^T + b: W + ΔW assembled block by block (Z tiles recomputed), one GEMM.
// With `Wp` (ELLA's W_past, else undefined) the ELLA value is summed into `*ella` ([] acc)
// from the same tiles.
template <typename BuildWeff>
at::Tensor jump_linear_forward(const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                               const at::Tensor& B, const at::Tensor& log_theta, double scale,
                               double f, int64_t tile_elems, BuildWeff build_weff,
                               const at::Tensor& Wp = {}, at::Tensor* ella = nullptr,
                               double ella_f = 1.0) {
  check_jump_linear_args(x, weight, bias, A, B, log_theta);
  const int64_t n = weight.size(0), k = weight.size(1);
  const auto acc = jump_acc_type(weight.scalar_type());
  const at::Tensor A_acc = A.to(acc).contiguous(), B_acc = B.to(acc);
  const at::Tensor W = weight.contiguous();
  at::Tensor weff = at::empty_like(W);
  const int64_t rows = jump_block_rows(n, k, tile_elems);
  at::Tensor z_buf = at::empty({rows, k}, A_acc.options());
  at::Tensor val = Wp.defined() ? at::zeros({}, A_acc.options()) : at::Tensor();
  for (int64_t i0 = 0; i0 < n; i0 += rows) {
    const int64_t b = std::min(rows, n - i0);
    at::Tensor z = z_buf.narrow(0, 0, b);
    at::mm_out(z, B_acc.narrow(0, i0, b), A_acc);
    at::Tensor out = weff.narrow(0, i0, b);
    build_weff(out, W.narrow(0, i0, b), z, log_theta, scale, f,
               Wp.defined() ? Wp.narrow(0, i0, b) : at::Tensor(), val, ella_f);
  }
  if (ella != nullptr) *ella = val;
  if (bias.has_value()) return at::addmm(*bias, x, weff.t());
  return at::mm(x, weff.t());
}

// Gradients of jump_linear w.r.t. x, A, B and log_theta (docs/methods.md, JumpLoRA). The dy^T x contraction
// runs one block of W's rows at a time: T = dy[:, blk]^T x, then the mask / interpolation /
// straight-through terms turn it into dL/dZ in place, and it is contracted with A and B into
// dB[blk] and dA before the next block; no n x k gradient exists beyond one tile. dx goes
// through W + ΔW, assembled in the same pass (only when need_dx).
template <typename BuildWeff, typename GradTile, typename FinishTheta>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jump_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& log_theta, double scale, double f, double bandwidth,
    bool mean, bool need_dx, bool need_adapter, int64_t tile_elems, BuildWeff build_weff,
    GradTile grad_tile, FinishTheta finish_theta, const at::Tensor& Wp = {},
    const at::Tensor& ella_coef = {}, double ella_f = 1.0) {
  check_jump_linear_args(x, weight, c10::nullopt, A, B, log_theta);
  const int64_t M = x.size(0), n = weight.size(0), k = weight.size(1), r = A.size(0);
  check_matrix(grad_y, "grad_y", M, n);
  check_like(grad_y, "grad_y", weight, "weight");
  TORCH_CHECK(bandwidth > 0, "fastcur: bandwidth must be > 0, got ", bandwidth);
  const auto dtype = weight.scalar_type();
  const auto acc = jump_acc_type(dtype);
  const at::Tensor A_acc = A.to(acc).contiguous(), B_acc = B.to(acc).contiguous();
  const at::Tensor W = weight.contiguous();
  const at::Tensor dy = grad_y.contiguous(), xc = x.contiguous();

  at::Tensor dA = at::zeros({r, k}, A_acc.options());
  at::Tensor dB = at::empty({n, r}, A_acc.options());
  at::Tensor th_acc = at::zeros({}, A_acc.options());
  at::Tensor weff = need_dx ? at::empty_like(W) : at::Tensor();
  const int64_t rows = jump_block_rows(n, k, tile_elems);
  at::Tensor z_buf = at::empty({rows, k}, A_acc.options());
  at::Tensor t_buf = at::empty({rows, k}, W.options());
  at::Tensor dz_buf = acc == dtype ? t_buf : at::empty({rows, k}, A_acc.options());
  for (int64_t i0 = 0; i0 < n && (need_adapter || need_dx); i0 += rows) {
    const int64_t b = std::min(rows, n - i0);
    at::Tensor z = z_buf.narrow(0, 0, b), t = t_buf.narrow(0, 0, b), dz = dz_buf.narrow(0, 0, b);
    const at::Tensor B_blk = B_acc.narrow(0, i0, b);
    at::mm_out(z, B_blk, A_acc);                            // Z tile      [b, k]
    if (need_dx) {
      at::Tensor out = weff.narrow(0, i0, b), no_val;
      build_weff(out, W.narrow(0, i0, b), z, log_theta, scale, f, at::Tensor(), no_val, ella_f);
    }
    if (!need_adapter) continue;
    at::mm_out(t, dy.narrow(1, i0, b).t(), xc);             // dy^T x tile [b, k]
    grad_tile(dz, t, z, log_theta, scale, f, bandwidth, th_acc,   // dL/dZ tile (may alias t)
              Wp.defined() ? Wp.narrow(0, i0, b) : at::Tensor(), ella_coef, ella_f);
    at::Tensor dB_blk = dB.narrow(0, i0, b);
    at::mm_out(dB_blk, dz, A_acc.t());                      // dB[blk] = dZ A^T
    dA.addmm_(B_blk.t(), dz);                               // dA += B[blk]^T dZ
  }
  at::Tensor dx = need_dx ? at::mm(grad_y, weff) : at::empty({0}, x.options());
  const double denom = mean ? static_cast<double>(n) * static_cast<double>(k) : 1.0;
  at::Tensor dlog = finish_theta(th_acc, log_theta, denom);
  return {dx, dA.to(dtype), dB.to(dtype), dlog};
}

inline void check_ella_args(const at::Tensor& A, const at::Tensor& B, const at::Tensor& log_theta,
                            const at::Tensor& W_past) {
  check_floating(W_past, "W_past");
  check_matrix(W_past, "W_past", -1, -1);
  check_jump_factors(W_past, W_past.size(0), W_past.size(1), A, B, log_theta, -1, "W_past");
}

// ‖s Z e ⊙ W_past‖² (e of ELLA's delta above, fe = ella_f), and (when want_grad) its gradients
// w.r.t. A and B, block by block like the backward above.
template <typename EllaTile>
std::tuple<at::Tensor, at::Tensor, at::Tensor> ella_schedule(
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& log_theta,
    const at::Tensor& W_past, double scale, double ella_f, bool want_grad, int64_t tile_elems,
    EllaTile ella_tile) {
  check_ella_args(A, B, log_theta, W_past);
  const int64_t n = W_past.size(0), k = W_past.size(1), r = A.size(0);
  const auto acc = jump_acc_type(W_past.scalar_type());
  const at::Tensor A_acc = A.to(acc).contiguous(), B_acc = B.to(acc).contiguous();
  const at::Tensor Wp = W_past.contiguous();
  at::Tensor val = at::zeros({}, A_acc.options());
  at::Tensor dA = want_grad ? at::zeros({r, k}, A_acc.options()) : at::Tensor();
  at::Tensor dB = want_grad ? at::empty({n, r}, A_acc.options()) : at::Tensor();
  const int64_t rows = jump_block_rows(n, k, tile_elems);
  at::Tensor z_buf = at::empty({rows, k}, A_acc.options());
  at::Tensor dz_buf = want_grad ? at::empty({rows, k}, A_acc.options()) : at::Tensor();
  for (int64_t i0 = 0; i0 < n; i0 += rows) {
    const int64_t b = std::min(rows, n - i0);
    at::Tensor z = z_buf.narrow(0, 0, b);
    const at::Tensor B_blk = B_acc.narrow(0, i0, b);
    at::mm_out(z, B_blk, A_acc);
    at::Tensor dz = want_grad ? dz_buf.narrow(0, 0, b) : at::Tensor();
    ella_tile(z, Wp.narrow(0, i0, b), log_theta, scale, ella_f, val, dz);
    if (want_grad) {
      at::Tensor dB_blk = dB.narrow(0, i0, b);
      at::mm_out(dB_blk, dz, A_acc.t());
      dA.addmm_(B_blk.t(), dz);
    }
  }
  return {val, dA, dB};
}

}  // namespace fastcur
