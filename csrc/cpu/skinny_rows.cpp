// small_k_rows of skinny_rows.h, written with GCC vector types so the accumulators live in
// registers.
#include "skinny_rows.h"

#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTCUR_NO_CPU_CLONES)
#define FASTCUR_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTCUR_CPU_CLONES
#endif
#define FASTCUR_INLINE inline __attribute__((always_inline))

namespace fastcur {
namespace cpu {
namespace {

constexpr int64_t kChunk = 512;   // columns per chunk: the rows of it a kernel reuses stay in L1

// 64-byte GCC vectors: one AVX-512 register in the x86-64-v4 clone, two AVX2 registers in the
// v3 clone, four SSE registers in the baseline one. Loads and stores go through memcpy
// (unaligned moves).
template <typename T> struct Vec;
template <> struct Vec<float> { typedef float type __attribute__((vector_size(64))); };
template <> struct Vec<double> { typedef double type __attribute__((vector_size(64))); };

template <typename V, typename T>
FASTCUR_INLINE V load(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
FASTCUR_INLINE void store(T* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
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
