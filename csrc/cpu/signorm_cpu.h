// CPU building blocks of the SigNorm epilogue (docs/methods.md, SECURA), shared by signorm, secura_linear and
// signorm_merge. They work on a block of `mb` rows of an [*, n] output at a time, so the
// adapter term Δ and the ratios exist only for that block (a few hundred KiB per thread),
// never as a full M x n tensor.
//
// Generic path (bfloat16, float16, float64): the sigmoid runs through ATen's vectorized
// at::sigmoid_ on the block's buffer (this extension is built for the baseline ISA, where a
// plain exp loop does not vectorize, while ATen's kernels dispatch to AVX2/AVX-512 at run
// time); the other loops are plain arithmetic the compiler vectorizes. float32 takes the fused
// path declared at the end (signorm_epilogue_f32), built per x86-64 level with its own exp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "signorm.h"

namespace fastcur {
namespace cpu {

// Rows per block: about 32K accumulators (128 KiB in float32), at least 1, at most 64 rows.
inline int64_t signorm_rows_per_block(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(64, 32768 / std::max<int64_t>(n, 1)));
}

// Y(i, j) = y0[i, j] (+ b[j]); D(i, j) the adapter term of the block (acc_t, [mb, n]).
// Writes L(i, j) = |D| / (|Y| + eps) into `L` ([mb, n]) and the row maxima into rowmax[mb].
template <typename scalar_t, typename acc_t>
void signorm_ratios(const scalar_t* y0, const scalar_t* b, const acc_t* D, int64_t mb,
                    int64_t n, acc_t eps, acc_t* L, acc_t* rowmax) {
  for (int64_t i = 0; i < mb; ++i) {
    const scalar_t* yr = y0 + i * n;
    const acc_t* dr = D + i * n;
    acc_t* lr = L + i * n;
    acc_t mx = 0;
    for (int64_t j = 0; j < n; ++j) {
      const acc_t y = static_cast<acc_t>(yr[j]) + (b ? static_cast<acc_t>(b[j]) : acc_t(0));
      const acc_t l = std::abs(dr[j]) / (std::abs(y) + eps);
      lr[j] = l;
      mx = l > mx ? l : mx;
    }
    rowmax[i] = mx;
  }
}

// In place: L -> σ(N). `mx` holds one max per row (mx_stride 1) or one for the whole tensor
// (mx_stride 0). S = 2 - σ(N) (or 2 where the max is 0) is formed by signorm_apply.
template <typename acc_t>
void signorm_sigmoid_inplace(acc_t* L, int64_t mb, int64_t n, const acc_t* mx, int64_t mx_stride,
                             acc_t k, acc_t eps, bool raw) {
  for (int64_t i = 0; i < mb; ++i) {
    const acc_t m = mx[i * mx_stride];
    acc_t* lr = L + i * n;
    for (int64_t j = 0; j < n; ++j) lr[j] = signorm_logit(lr[j], m, k, eps, raw);
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::from_blob(L, {mb * n}, opts).sigmoid_();
}

// In place: L -> S = 2 - σ(N) (S = 2 where the scope's max is 0).
template <typename acc_t>
void signorm_scales_inplace(acc_t* L, int64_t mb, int64_t n, const acc_t* mx, int64_t mx_stride,
                            acc_t k, acc_t eps, bool raw) {
  signorm_sigmoid_inplace(L, mb, n, mx, mx_stride, k, eps, raw);
  for (int64_t i = 0; i < mb; ++i) {
    const acc_t m = mx[i * mx_stride];
    acc_t* lr = L + i * n;
    for (int64_t j = 0; j < n; ++j) lr[j] = signorm_scale_from_sigmoid(lr[j], m);
  }
}

// sig holds σ(N) on entry; S = 2 - σ(N) (2 where the max is 0) is written back over it, and
// out[i, j] = (2 Y + D) / S, rounded to scalar_t: one pass.
template <typename scalar_t, typename acc_t>
void signorm_apply(const scalar_t* y0, const scalar_t* b, const acc_t* D, acc_t* sig,
                   const acc_t* mx, int64_t mx_stride, int64_t mb, int64_t n, scalar_t* out) {
  for (int64_t i = 0; i < mb; ++i) {
    const scalar_t* yr = y0 + i * n;
    const acc_t* dr = D + i * n;
    acc_t* sr = sig + i * n;
    scalar_t* orow = out + i * n;
    const acc_t m = mx[i * mx_stride];
    if (m == acc_t(0)) {  // Δ = 0 over the whole scope: S = 2, y = y0 (+ b) exactly
      for (int64_t j = 0; j < n; ++j) {
        const acc_t y = static_cast<acc_t>(yr[j]) + (b ? static_cast<acc_t>(b[j]) : acc_t(0));
        sr[j] = acc_t(2);
        orow[j] = static_cast<scalar_t>((y + y + dr[j]) / acc_t(2));
      }
      continue;
    }
    for (int64_t j = 0; j < n; ++j) {
      const acc_t y = static_cast<acc_t>(yr[j]) + (b ? static_cast<acc_t>(b[j]) : acc_t(0));
      const acc_t S = acc_t(2) - sr[j];
      sr[j] = S;
      orow[j] = static_cast<scalar_t>((y + y + dr[j]) / S);
    }
  }
}

// The SigNorm epilogue over all M rows of an [M, n] output. `fill_delta(m0, mb, D)` writes the
// adapter term of rows [m0, m0 + mb) into D ([mb, n], acc_t). `y0` [M, n] (bias `b` [n] or
// null added on the fly), `out` [M, n] (may alias y0: each row is read before it is written),
// `S_out` [M, n] acc_t or null (the scales, saved for a backward), `rowmax` [M] acc_t: the
// row maxima of L. With tensor_scope the max is two-phase: all row maxima first, then their
// max (no tensor is ever M x n besides the output and S_out).
template <typename scalar_t, typename acc_t, typename FillDelta>
void signorm_epilogue(const scalar_t* y0, const scalar_t* b, int64_t M, int64_t n, acc_t k,
                      acc_t eps, bool raw, bool tensor_scope, FillDelta fill_delta, scalar_t* out,
                      acc_t* S_out, acc_t* rowmax) {
  if (M == 0 || n == 0) {
    std::fill(rowmax, rowmax + M, acc_t(0));
    return;
  }
  const int64_t mb_max = signorm_rows_per_block(n);
  const int64_t grain = mb_max;
  acc_t gmax = 0;
  if (tensor_scope) {
    at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // see the second pass
      std::vector<acc_t> D(mb_max * n), L(mb_max * n);
      for (int64_t m0 = begin; m0 < end; m0 += mb_max) {
        const int64_t mb = std::min(mb_max, end - m0);
        fill_delta(m0, mb, D.data());
        signorm_ratios(y0 + m0 * n, b, D.data(), mb, n, eps, L.data(), rowmax + m0);
      }
    });
    gmax = *std::max_element(rowmax, rowmax + M);
  }
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch state: without this guard the ATen
    // calls of `fill_delta` (an mm_out on operands that may require grad, e.g. a rank-1 C^T
    // that is a view of C) would go through autograd there and refuse the out= argument.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::vector<acc_t> D(mb_max * n), Lbuf(S_out ? 0 : mb_max * n);
    for (int64_t m0 = begin; m0 < end; m0 += mb_max) {
      const int64_t mb = std::min(mb_max, end - m0);
      acc_t* L = S_out ? S_out + m0 * n : Lbuf.data();
      fill_delta(m0, mb, D.data());
      const acc_t* mx = tensor_scope ? &gmax : rowmax + m0;
      const int64_t mx_stride = tensor_scope ? 0 : 1;
      if (tensor_scope) {
        std::vector<acc_t> unused(mb);
        signorm_ratios(y0 + m0 * n, b, D.data(), mb, n, eps, L, unused.data());
      } else {
        signorm_ratios(y0 + m0 * n, b, D.data(), mb, n, eps, L, rowmax + m0);
      }
      signorm_sigmoid_inplace(L, mb, n, mx, mx_stride, k, eps, raw);
      signorm_apply(y0 + m0 * n, b, D.data(), L, mx, mx_stride, mb, n, out + m0 * n);
    }
  });
}

// ---- float32 fast path (csrc/cpu/signorm.cpp) ------------------------------------------------
// The same epilogue, fused per row and vectorized at the active x86-64 level (simd.h: 64 / 32 /
// 16-byte vectors), sigmoid included (a Cephes-style exp polynomial, about 1 ulp): one pass
// forms Δ's row (read, or the rank-r product zs[i] · Ct on the fly), the ratios and the row
// max into two row buffers of n floats (L1-resident), a second pass over those buffers forms
// S and the output. No ATen call per block unless r > kSignormInlineRank (then Δ's block is
// one GEMM into a per-thread buffer, as the generic path).
constexpr int64_t kSignormInlineRank = 32;

// Where row i's adapter term Δ comes from: D + i * ldd (precomputed rows), or
// s z C^T + lora_bias as zs [M, r] (s z) times Ct [r, n] (C^T), plus lb [n] (or null).
struct F32Delta {
  const float* D = nullptr;
  int64_t ldd = 0;
  const float* zs = nullptr;
  const float* Ct = nullptr;
  int64_t r = 0;
  const float* lb = nullptr;
};

// signorm_epilogue for float32: same contract (y0 [M, n] plus bias b [n] or null; out may
// alias y0; S_out [M, n] or null; rowmax [M] the row maxima of L).
void signorm_epilogue_f32(const float* y0, const float* b, int64_t M, int64_t n, float k,
                          float eps, bool raw, bool tensor_scope, const F32Delta& delta,
                          float* out, float* S_out, float* rowmax);

// signorm's backward for float32: S recomputed per row from y0, Δ and mx (one max per row, or
// one for the whole tensor with tensor_scope); dy0 = 2 g / S, dΔ = g / S.
void signorm_grads_f32(const float* g, const float* y0, const float* delta, const float* mx,
                       int64_t M, int64_t n, float k, float eps, bool raw, bool tensor_scope,
                       float* dy0, float* dd);

}  // namespace cpu
}  // namespace fastcur
