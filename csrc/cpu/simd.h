// Wide loops in an extension built for the baseline x86-64 ISA. Each row kernel is compiled
// three times, for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline (SSE2), by
// FASTCUR_CPU_DISPATCH below (GCC target attributes), and a call runs the level active_isa()
// names: the highest the CPU runs, or the one the environment variable FASTCUR_CPU_ISA
// (avx512 | avx2 | baseline, read at first use) or set_active_isa() asks for, capped at what
// the CPU runs. So every level's code can be run and measured on an AVX-512 machine (GCC's
// target_clones, used before, picks its clone once at load time and cannot be forced).
// With FASTCUR_NO_CPU_CLONES, or off GCC / x86-64, one version is built for the compiler's
// -march (tests/cpp/row_kernels_check.cpp builds each level that way).
// Vec<T>::type is a 64-byte GCC vector (one AVX-512 register, two AVX2 ones, four SSE ones),
// so accumulators declared with it stay in registers; load/store are unaligned moves.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTCUR_NO_CPU_CLONES)
#define FASTCUR_HAS_CPU_CLONES 1
#else
#define FASTCUR_HAS_CPU_CLONES 0
#endif
#define FASTCUR_INLINE inline __attribute__((always_inline))

namespace fastcur {
namespace cpu {

// A GCC vector of VB bytes of T: 64 (one AVX-512 register), 32 (AVX2), 16 (SSE2). Each
// level's build uses its native width: a 64-byte vector in an AVX2 or SSE2 build is lowered
// by GCC into pieces that go through the stack, and the row kernels ran 20-150x slower
// there than at AVX-512 (one Fisher example at r = 16: 18 ms against 0.76 ms; measured with
// tests/cpp/row_kernels_check.cpp's build flags per level).
template <typename T, int VB> struct VecN {
  typedef T type __attribute__((vector_size(VB)));
};
template <typename T, int VB> constexpr int64_t lanes = VB / int64_t(sizeof(T));

// The 64-byte vector: its lane count is the row kernels' channel-group size in their
// interfaces (narrow_rows etc. take r a multiple of vector_lanes<T>: 16 floats, 8 doubles),
// whatever width a level's build computes with.
template <typename T> struct Vec { typedef typename VecN<T, 64>::type type; };
template <typename T> constexpr int64_t vector_lanes = lanes<T, 64>;

// The x86-64 levels the row kernels are built for.
enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };

inline const char* isa_name(Isa isa) {
  return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "baseline";
}

// The highest level this CPU runs (with one build, the level it was compiled for).
inline Isa cpu_max_isa() {
#if FASTCUR_HAS_CPU_CLONES
  // The features GCC's x86-64-v4 / -v3 code may use.
  static const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("movbe");
  static const bool v4 = v3 && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512cd") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  static const Isa best = v4 ? Isa::avx512 : v3 ? Isa::avx2 : Isa::baseline;
  return best;
#elif defined(__AVX512F__)
  return Isa::avx512;
#elif defined(__AVX2__) && defined(__FMA__)
  return Isa::avx2;
#else
  return Isa::baseline;
#endif
}

// "avx512" / "avx2" / "baseline" (also "x86-64-v4" / "x86-64-v3" / "x86-64"); -1 otherwise.
inline int parse_isa(const char* name) {
  if (name == nullptr) return -1;
  if (!std::strcmp(name, "avx512") || !std::strcmp(name, "x86-64-v4")) return int(Isa::avx512);
  if (!std::strcmp(name, "avx2") || !std::strcmp(name, "x86-64-v3")) return int(Isa::avx2);
  if (!std::strcmp(name, "baseline") || !std::strcmp(name, "x86-64") || !std::strcmp(name, "sse2"))
    return int(Isa::baseline);
  return -1;
}

inline std::atomic<int>& isa_state() {
  static std::atomic<int> state{-1};   // -1: not read yet
  return state;
}

// The level the row kernels run at: FASTCUR_CPU_ISA at first use (an unknown name or a level
// above the CPU's gives the CPU's), until set_active_isa changes it.
inline Isa active_isa() {
  int v = isa_state().load(std::memory_order_relaxed);
  if (v < 0) {
    const int want = parse_isa(std::getenv("FASTCUR_CPU_ISA"));
    const int best = int(cpu_max_isa());
    v = want < 0 || want > best ? best : want;
    isa_state().store(v, std::memory_order_relaxed);
  }
  return Isa(v);
}

// Runs the row kernels at `isa` from now on; false (and no change) when the CPU does not run it
// or only one level was built and it is not that one.
inline bool set_active_isa(Isa isa) {
#if FASTCUR_HAS_CPU_CLONES
  if (int(isa) > int(cpu_max_isa())) return false;
#else
  if (isa != cpu_max_isa()) return false;
#endif
  isa_state().store(int(isa), std::memory_order_relaxed);
  return true;
}

// One kernel, three builds. IMPL is a function template whose first template argument is
// `int VB`, the level's vector width in bytes: 64 for AVX-512 (whose 32 vector registers
// also fit bigger register tiles), 32 for AVX2, 16 for SSE2 (16 registers each).
// FASTCUR_CPU_DISPATCH(ret, name, (params), (args), impl) defines `ret name(params)` calling
// the build active_isa() names.
#define FASTCUR_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#define FASTCUR_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#if FASTCUR_HAS_CPU_CLONES
#define FASTCUR_CPU_DISPATCH(RET, NAME, PARAMS, ARGS, IMPL)                        \
  FASTCUR_TARGET_V4 static RET NAME##_avx512 PARAMS { return IMPL<64> ARGS; }     \
  FASTCUR_TARGET_V3 static RET NAME##_avx2 PARAMS { return IMPL<32> ARGS; }       \
  static RET NAME##_baseline PARAMS { return IMPL<16> ARGS; }                    \
  RET NAME PARAMS {                                                              \
    switch (::fastcur::cpu::active_isa()) {                                      \
      case ::fastcur::cpu::Isa::avx512: return NAME##_avx512 ARGS;               \
      case ::fastcur::cpu::Isa::avx2: return NAME##_avx2 ARGS;                   \
      default: return NAME##_baseline ARGS;                                      \
    }                                                                            \
  }
#else
#if defined(__AVX512F__)
#define FASTCUR_VECTOR_BYTES 64
#elif defined(__AVX2__)
#define FASTCUR_VECTOR_BYTES 32
#else
#define FASTCUR_VECTOR_BYTES 16
#endif
#define FASTCUR_CPU_DISPATCH(RET, NAME, PARAMS, ARGS, IMPL) \
  RET NAME PARAMS { return IMPL<FASTCUR_VECTOR_BYTES> ARGS; }
#endif

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
template <typename T> struct LaneInt;
template <> struct LaneInt<float> { typedef int32_t type; };
template <> struct LaneInt<double> { typedef int64_t type; };
template <typename T, int VB> struct LaneIndex {
  typedef typename LaneInt<T>::type type __attribute__((vector_size(VB)));
};

template <typename T, int VB, int64_t b>
FASTCUR_INLINE typename VecN<T, VB>::type fold(typename VecN<T, VB>::type u,
                                               typename VecN<T, VB>::type v) {
  using I = typename LaneIndex<T, VB>::type;
  constexpr int64_t L = lanes<T, VB>, h = b / 2;
  I lo, hi;
  for (int64_t t = 0; t < L; ++t) {
    lo[t] = (t / h) * b + t % h;
    hi[t] = lo[t] + h;
  }
  return __builtin_shuffle(u, v, lo) + __builtin_shuffle(u, v, hi);
}

// `count` vectors with blocks of b lanes per accumulator -> one vector with blocks of 1.
template <typename T, int VB, int count, int64_t b>
FASTCUR_INLINE typename VecN<T, VB>::type fold_all(typename VecN<T, VB>::type* v) {
  if constexpr (count > 1) {
    for (int j = 0; j < count / 2; ++j) v[j] = fold<T, VB, b>(v[2 * j], v[2 * j + 1]);
    return fold_all<T, VB, count / 2, b / 2>(v);
  } else if constexpr (b > 1) {
    v[0] = fold<T, VB, b>(v[0], v[0]);
    return fold_all<T, VB, 1, b / 2>(v);
  } else {
    return v[0];
  }
}

template <int J, int VB, typename T>
FASTCUR_INLINE typename VecN<T, VB>::type lane_sums(const typename VecN<T, VB>::type* acc) {
  constexpr int64_t L = lanes<T, VB>;
  static_assert((J & (J - 1)) == 0 && J <= L, "J: a power of two, at most the lane count");
  typename VecN<T, VB>::type v[J];
  for (int j = 0; j < J; ++j) v[j] = acc[j];
  return fold_all<T, VB, J, L>(v);
}

}  // namespace cpu
}  // namespace fastcur
