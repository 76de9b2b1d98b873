// Wide loops in an extension built for the baseline x86-64 ISA: FASTCUR_CPU_CLONES compiles a
// function for x86-64-v4 (AVX-512) and x86-64-v3 (AVX2 + FMA) besides the baseline and picks
// one at load time (GCC target_clones; a no-op elsewhere). Vec<T>::type is a 64-byte GCC
// vector (one AVX-512 register, two AVX2 ones, four SSE ones), so accumulators declared with
// it stay in registers; load/store are unaligned moves.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTCUR_NO_CPU_CLONES)
#define FASTCUR_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTCUR_CPU_CLONES
#endif
#define FASTCUR_INLINE inline __attribute__((always_inline))

namespace fastcur {
namespace cpu {

template <typename T> struct Vec;
template <> struct Vec<float> { typedef float type __attribute__((vector_size(64))); };
template <> struct Vec<double> { typedef double type __attribute__((vector_size(64))); };
template <typename T> constexpr int64_t vector_lanes = sizeof(typename Vec<T>::type) / sizeof(T);

// AVX-512's 32 vector registers hold tiles of 32 accumulators (AVX2 has 16).
inline bool has_32_vector_registers() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512;
#else
  return false;
#endif
}

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

// Lane sums of J accumulators (J a power of two, at most the lane count): lane j of the result
// holds the sum of acc[j]'s lanes. A shuffle tree: each fold pairs two vectors that hold
// blocks of b lanes per accumulator into one with blocks of b / 2 (the first halves plus the
// second halves), keeping the accumulators in order; a lone vector folds with itself. About
// 3 vector operations per accumulator, against a scalar sum of every lane.
template <typename T> struct LaneIndex;
template <> struct LaneIndex<float> { typedef int32_t type __attribute__((vector_size(64))); };
template <> struct LaneIndex<double> { typedef int64_t type __attribute__((vector_size(64))); };

template <typename T, int64_t b>
FASTCUR_INLINE typename Vec<T>::type fold(typename Vec<T>::type u, typename Vec<T>::type v) {
  using I = typename LaneIndex<T>::type;
  constexpr int64_t L = vector_lanes<T>, h = b / 2;
  I lo, hi;
  for (int64_t t = 0; t < L; ++t) {
    lo[t] = (t / h) * b + t % h;
    hi[t] = lo[t] + h;
  }
  return __builtin_shuffle(u, v, lo) + __builtin_shuffle(u, v, hi);
}

// `count` vectors with blocks of b lanes per accumulator -> one vector with blocks of 1.
template <typename T, int count, int64_t b>
FASTCUR_INLINE typename Vec<T>::type fold_all(typename Vec<T>::type* v) {
  if constexpr (count > 1) {
    for (int j = 0; j < count / 2; ++j) v[j] = fold<T, b>(v[2 * j], v[2 * j + 1]);
    return fold_all<T, count / 2, b / 2>(v);
  } else if constexpr (b > 1) {
    v[0] = fold<T, b>(v[0], v[0]);
    return fold_all<T, 1, b / 2>(v);
  } else {
    return v[0];
  }
}

template <int J, typename T>
FASTCUR_INLINE typename Vec<T>::type lane_sums(const typename Vec<T>::type* acc) {
  constexpr int64_t L = vector_lanes<T>;
  static_assert((J & (J - 1)) == 0 && J <= L, "J: a power of two, at most the lane count");
  typename Vec<T>::type v[J];
  for (int j = 0; j < J; ++j) v[j] = acc[j];
  return fold_all<T, J, L>(v);
}

}  // namespace cpu
}  // namespace fastcur
