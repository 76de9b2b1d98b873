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

}  // namespace cpu
}  // namespace fastcur
