// The row kernels of skinny_rows.h, written with GCC vector types (cpu/simd.h) so the
// accumulators live in registers.
#include "skinny_rows.h"
#include "simd.h"

#include <algorithm>

namespace fastcur {
namespace cpu {
namespace {

constexpr int64_t kChunk = 512;   // columns per chunk: the K rows of rhs it reads stay in L1

// out[j] (+)= x[c0:c1] . V[j, c0:c1] for j < rj <= 8: eight register accumulators, x loaded
// once per step.
template <typename T>
FASTCUR_INLINE void dot_channels(T* out, const T* x, const T* V, int64_t rj, int64_t n,
                                 int64_t c0, int64_t c1) {
  using W = typename Vec<T>::type;
  constexpr int64_t L = sizeof(W) / sizeof(T);
  W acc[8] = {};
  int64_t c = c0;
  if (rj == 8) {
    for (; c + L <= c1; c += L) {
      const W xv = load<W>(x + c);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) acc[j] += xv * load<W>(V + j * n + c);
    }
  }
  for (int64_t j = 0; j < rj; ++j) {
    T s = T(0);
    for (int64_t cc = c; cc < c1; ++cc) s += x[cc] * V[j * n + cc];
    for (int64_t l = 0; l < L; ++l) s += acc[j][l];
    out[j] = c0 == 0 ? s : out[j] + s;
  }
}

// Rows outermost (X streams through once, in order), V [r, n] from L1/L2.
template <typename T>
FASTCUR_INLINE void rows_dot_impl(T* out, const T* X, int64_t ldx, const T* V, int64_t mb,
                                  int64_t r, int64_t n) {
  if (n == 0) {
    for (int64_t i = 0; i < mb * r; ++i) out[i] = T(0);
    return;
  }
  for (int64_t m = 0; m < mb; ++m)
    for (int64_t j0 = 0; j0 < r; j0 += 8)
      dot_channels(out + m * r + j0, X + m * ldx, V + j0 * n, std::min<int64_t>(8, r - j0), n,
                   0, n);
}

// acc[j, :] += Σ_m coef[m, j] X[m, :], four rows of X per accumulator load/store, the rows
// read in order; channels whose four coefficients are all 0 are skipped.
template <typename T>
FASTCUR_INLINE void outer_acc_impl(T* acc, const T* coef, const T* X, int64_t ldx, int64_t mb,
                                   int64_t r, int64_t n) {
  using W = typename Vec<T>::type;
  constexpr int64_t L = sizeof(W) / sizeof(T);
  int64_t m = 0;
  for (; m + 4 <= mb; m += 4) {
    const T *x0 = X + m * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
    for (int64_t j = 0; j < r; ++j) {
      const T a0 = coef[m * r + j], a1 = coef[(m + 1) * r + j];
      const T a2 = coef[(m + 2) * r + j], a3 = coef[(m + 3) * r + j];
      if (a0 == T(0) && a1 == T(0) && a2 == T(0) && a3 == T(0)) continue;
      T* row = acc + j * n;
      int64_t c = 0;
      for (; c + L <= n; c += L)
        store(row + c, load<W>(row + c) + a0 * load<W>(x0 + c) + a1 * load<W>(x1 + c) +
                           a2 * load<W>(x2 + c) + a3 * load<W>(x3 + c));
      for (; c < n; ++c) row[c] += a0 * x0[c] + a1 * x1[c] + a2 * x2[c] + a3 * x3[c];
    }
  }
  for (; m < mb; ++m) {
    const T* x = X + m * ldx;
    for (int64_t j = 0; j < r; ++j) {
      const T a = coef[m * r + j];
      if (a == T(0)) continue;
      T* row = acc + j * n;
      int64_t c = 0;
      for (; c + L <= n; c += L) store(row + c, load<W>(row + c) + a * load<W>(x + c));
      for (; c < n; ++c) row[c] += a * x[c];
    }
  }
}

// Four output vectors accumulated over the K rows of rhs in registers, stored once.
template <typename T>
FASTCUR_INLINE void small_k_rows_impl(T* out, int64_t ldo, const T* lhs, const T* rhs, int64_t mb,
                                      int64_t K, int64_t n) {
  using W = typename Vec<T>::type;
  constexpr int64_t L = sizeof(W) / sizeof(T);
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    for (int64_t m = 0; m < mb; ++m) {
      T* o = out + m * ldo;
      const T* a = lhs + m * K;
      int64_t c = c0;
      for (; c + 4 * L <= c1; c += 4 * L) {
        W v0 = {}, v1 = {}, v2 = {}, v3 = {};
        for (int64_t j = 0; j < K; ++j) {
          if (a[j] == T(0)) continue;
          const T* p = rhs + j * n + c;
          const T aj = a[j];
          v0 += aj * load<W>(p);
          v1 += aj * load<W>(p + L);
          v2 += aj * load<W>(p + 2 * L);
          v3 += aj * load<W>(p + 3 * L);
        }
        store(o + c, v0);
        store(o + c + L, v1);
        store(o + c + 2 * L, v2);
        store(o + c + 3 * L, v3);
      }
      for (; c < c1; ++c) {
        T v = T(0);
        for (int64_t j = 0; j < K; ++j)
          if (a[j] != T(0)) v += a[j] * rhs[j * n + c];
        o[c] = v;
      }
    }
  }
}

}  // namespace

FASTCUR_CPU_CLONES void outer_acc(float* acc, const float* coef, const float* X, int64_t ldx,
                                  int64_t mb, int64_t r, int64_t n) {
  outer_acc_impl(acc, coef, X, ldx, mb, r, n);
}
FASTCUR_CPU_CLONES void outer_acc(double* acc, const double* coef, const double* X, int64_t ldx,
                                  int64_t mb, int64_t r, int64_t n) {
  outer_acc_impl(acc, coef, X, ldx, mb, r, n);
}

FASTCUR_CPU_CLONES void rows_dot(float* out, const float* X, int64_t ldx, const float* V,
                                 int64_t mb, int64_t r, int64_t n) {
  rows_dot_impl(out, X, ldx, V, mb, r, n);
}
FASTCUR_CPU_CLONES void rows_dot(double* out, const double* X, int64_t ldx, const double* V,
                                 int64_t mb, int64_t r, int64_t n) {
  rows_dot_impl(out, X, ldx, V, mb, r, n);
}

FASTCUR_CPU_CLONES void small_k_rows(float* out, int64_t ldo, const float* lhs, const float* rhs,
                                     int64_t mb, int64_t K, int64_t n) {
  small_k_rows_impl(out, ldo, lhs, rhs, mb, K, n);
}
FASTCUR_CPU_CLONES void small_k_rows(double* out, int64_t ldo, const double* lhs,
                                     const double* rhs, int64_t mb, int64_t K, int64_t n) {
  small_k_rows_impl(out, ldo, lhs, rhs, mb, K, n);
}

}  // namespace cpu
}  // namespace fastcur
