// small_k_rows of skinny_rows.h, written with GCC vector types so the accumulators live in
// registers.
#include "skinny_rows.h"
#include "simd.h"

#include <algorithm>

namespace fastcur {
namespace cpu {
namespace {

constexpr int64_t kChunk = 512;   // columns per chunk: the K rows of rhs it reads stay in L1

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
