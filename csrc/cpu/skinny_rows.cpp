// The row kernels of skinny_rows.h, written with GCC vector types (cpu/simd.h) so the
// accumulators live in registers.
#include "skinny_rows.h"
#include "simd.h"

#include <algorithm>

namespace fastcur {
namespace cpu {
namespace {

constexpr int64_t kChunk = 512;   // columns per chunk: the K rows of rhs it reads stay in L1

// The vectors at column c of R rows of X.
template <int R, typename W, typename T>
FASTCUR_INLINE void load_rows(W* xv, const T* X, int64_t ldx, int64_t c) {
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) xv[i] = load<W>(X + i * ldx + c);
}

// out[i, j] = X[i, :] . V[j, :] for i < R rows and j < J channels: R x J register
// accumulators, each V load feeding R rows (with one row per step, V's 8 loads per x load made
// the loop bound by L2 reads of V: 1.07 ms against 0.42 ms for R = 4, J = 8 on 1024 x 2048
// rows).
template <int VB, int R, int J, typename T>
FASTCUR_INLINE void dot_tile(T* out, int64_t ldo, const T* X, int64_t ldx, const T* V,
                             int64_t n) {
  using W = typename VecN<T, VB>::type;
  constexpr int64_t L = lanes<T, VB>;
  W acc[R][J] = {};
  int64_t c = 0;
  for (; c + L <= n; c += L) {
    W xv[R];
    load_rows<R>(xv, X, ldx, c);
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) {
      const W v = load<W>(V + j * n + c);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) acc[i][j] += xv[i] * v;
    }
  }
  for (int i = 0; i < R; ++i) {
    const W sums = lane_sums<J, VB, T>(acc[i]);
    for (int j = 0; j < J; ++j) {
      T s = sums[j];
      for (int64_t cc = c; cc < n; ++cc) s += X[i * ldx + cc] * V[j * n + cc];
      out[i * ldo + j] = s;
    }
  }
}

// R rows of out [*, r], the channels eight (AVX-512: R x 8 accumulators fit its 32
// registers), then four (at most the lane count), then one at a time.
template <int VB, int R, typename T>
FASTCUR_INLINE void dot_rows(T* out, const T* X, int64_t ldx, const T* V, int64_t r, int64_t n) {
  int64_t j = 0;
  if constexpr (VB == 64)
    for (; j + 8 <= r; j += 8) dot_tile<VB, R, 8>(out + j, r, X, ldx, V + j * n, n);
  constexpr int J = lanes<T, VB> < 4 ? int(lanes<T, VB>) : 4;   // SSE2 doubles: 2
  for (; j + J <= r; j += J) dot_tile<VB, R, J>(out + j, r, X, ldx, V + j * n, n);
  for (; j < r; ++j) dot_tile<VB, R, 1>(out + j, r, X, ldx, V + j * n, n);
}

// Rows outermost (X streams through once, in order), V [r, n] from L1/L2; four rows per step
// where the CPU has 32 vector registers (AVX-512), two otherwise.
template <int VB, typename T>
FASTCUR_INLINE void rows_dot_impl(T* out, const T* X, int64_t ldx, const T* V, int64_t mb,
                                  int64_t r, int64_t n) {
  int64_t m = 0;
  if constexpr (VB == 64)
    for (; m + 4 <= mb; m += 4) dot_rows<VB, 4>(out + m * r, X + m * ldx, ldx, V, r, n);
  for (; m + 2 <= mb; m += 2) dot_rows<VB, 2>(out + m * r, X + m * ldx, ldx, V, r, n);
  for (; m < mb; ++m) dot_rows<VB, 1>(out + m * r, X + m * ldx, ldx, V, r, n);
}

// out[i, :] = Σ_c X[i, c] Vt[c, :] for R rows and G vectors of channels: R x G accumulators,
// each Vt load feeding R rows, each X element broadcast once for G vectors. No lane sums,
// against rows_dot's; one example's X A^T at r = 16 (128 x 1024 rows, in L2): 27 us against
// 43-52.
template <int VB, int R, int G, typename T>
FASTCUR_INLINE void narrow_tile(T* out, int64_t ldo, const T* X, int64_t ldx, const T* Vt,
                                int64_t ldv, int64_t n) {
  using W = typename VecN<T, VB>::type;
  constexpr int64_t L = lanes<T, VB>;
  W acc[R][G] = {};
  for (int64_t c = 0; c < n; ++c) {
    W v[G];
    for (int g = 0; g < G; ++g) v[g] = load<W>(Vt + c * ldv + g * L);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const T xs = X[i * ldx + c];
      for (int g = 0; g < G; ++g) acc[i][g] += xs * v[g];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < G; ++g) store(out + i * ldo + g * L, acc[i][g]);
}

// Channel groups of one vector, rows eight at a time, then one. The R rows are read a column
// at a time, k elements apart: at k = 1024 (4 KB rows) they all fall in one set of the 8-way
// L1, so R > 8 rows evicted each other. Fisher case (E 32, T 128, n = k = 1024, r 16, 2
// threads), three alternating process pairs: AVX2 5.67-5.77 ms with 12 rows, 4.58-4.73 with 8;
// AVX-512 3.77-4.15 ms with 16 rows, 3.33-3.89 with 8 (8 accumulators still cover the FMA
// latency at two per cycle).
template <int VB, typename T>
FASTCUR_INLINE void narrow_rows_impl(T* out, const T* X, int64_t ldx, const T* Vt, int64_t mb,
                                     int64_t r, int64_t n) {
  // SSE2 (no broadcast load: each broadcast is a shuffle, on the ports the multiplies and adds
  // use): 4 rows x 2 vectors, each broadcast feeding two vectors (Fisher case at the baseline,
  // three alternating process pairs: 10.6-11.1 ms with 8 x 1 tiles, 9.7-10.7 ms)
  constexpr int R = VB == 16 ? 4 : 8, G = VB == 16 ? 2 : 1;
  constexpr int64_t L = lanes<T, VB>;
  static_assert(vector_lanes<T> % (G * L) == 0, "r (a multiple of vector_lanes) in whole groups");
  for (int64_t g = 0; g < r; g += G * L) {
    T* o = out + g;
    int64_t m = 0;
    for (; m + R <= mb; m += R) narrow_tile<VB, R, G>(o + m * r, r, X + m * ldx, ldx, Vt + g, r, n);
    for (; m < mb; ++m) narrow_tile<VB, 1, G>(o + m * r, r, X + m * ldx, ldx, Vt + g, r, n);
  }

}

// Columns c..c+U of one pass of dual_tile: U rows of D (G vectors each) through registers.
template <int R, int U, int G, int64_t L, typename T, typename W>
FASTCUR_INLINE void dual_step(W (*h)[G], const W (*p)[G], T* D, int64_t ldd, const T* X,
                              int64_t ldx, const T* Vt, int64_t ldv, int64_t c, bool first) {
  W v[U][G], d[U][G];
  for (int u = 0; u < U; ++u)
    for (int g = 0; g < G; ++g) {
      v[u][g] = load<W>(Vt + (c + u) * ldv + g * L);
      d[u][g] = first ? W{} : load<W>(D + (c + u) * ldd + g * L);
    }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const T xb = X[i * ldx + c + u];
      for (int g = 0; g < G; ++g) {
        h[i][g] += xb * v[u][g];
        d[u][g] += xb * p[i][g];
      }
    }
  for (int u = 0; u < U; ++u)
    for (int g = 0; g < G; ++g) store(D + (c + u) * ldd + g * L, d[u][g]);
}

// One pass over R rows of X for two products on G vectors of channels, each X element
// broadcast once and used 2 G times: H[i, :] = Σ_c X[i, c] Vt[c, :] (R x G register
// accumulators) and D[c, :] += Σ_i X[i, c] coef[i, :] (U rows of D through registers per step,
// from L1/L2; set, not added, when `first`). The Fisher's two products of one example's G_e at
// r = 16 (128 x 1024 rows, in L2): 48 us, against 58 us for narrow_rows + outer_square_acc.
template <int VB, int R, int U, int G, typename T>
FASTCUR_INLINE void dual_tile(T* H, int64_t ldh, T* D, int64_t ldd, const T* X, int64_t ldx,
                              const T* Vt, int64_t ldv, const T* coef, int64_t ldc, int64_t n,
                              bool first) {
  using W = typename VecN<T, VB>::type;
  constexpr int64_t L = lanes<T, VB>;
  W h[R][G] = {}, p[R][G];
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < G; ++g) p[i][g] = load<W>(coef + i * ldc + g * L);
  int64_t c = 0;
  for (; c + U <= n; c += U) dual_step<R, U, G, L>(h, p, D, ldd, X, ldx, Vt, ldv, c, first);
  for (; c < n; ++c) dual_step<R, 1, G, L>(h, p, D, ldd, X, ldx, Vt, ldv, c, first);
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < G; ++g) store(H + i * ldh + g * L, h[i][g]);
}

// Rows R at a time from row m on, while R fit; returns the next row.
template <int VB, int R, int U, int G, typename T>
FASTCUR_INLINE int64_t dual_rows(T* H, T* D, const T* X, int64_t ldx, const T* Vt,
                                 const T* coef, int64_t m, int64_t mb, int64_t r, int64_t n,
                                 bool add) {
  for (; m + R <= mb; m += R)
    dual_tile<VB, R, U, G>(H + m * r, r, D, r, X + m * ldx, ldx, Vt, r, coef + m * r, r, n,
                           m == 0 && !add);
  return m;
}

// Channel groups of G vectors; tiles of 8 rows x 4 columns of D with AVX-512's 32 registers
// (8 + 8 + 4 + 4 vectors), of 4 x 2 with AVX2's 16 (4 + 4 + 2 + 2), of 2 rows x 1 column x 2
// vectors with SSE2's 16 (no FMA, no broadcast load: each product needs a register of its
// own, 4 x 2 spilled to the stack, and a broadcast is a shuffle on the arithmetic ports, here
// shared by two vectors; Fisher case at the baseline, alternating process pairs: 4 x 2 tiles
// 11.3-13.3 ms, 4 x 1 11.1-11.6 ms, then 9.7-11.6 ms against 9.4-9.6 ms for 2 x 1 x 2 after
// narrow_rows' change); then single rows.
template <int VB, typename T>
FASTCUR_INLINE void narrow_pass_impl(T* H, T* D, const T* X, int64_t ldx, const T* Vt,
                                     const T* coef, int64_t mb, int64_t r, int64_t n, bool add) {
  using W = typename VecN<T, VB>::type;
  constexpr int R = VB == 64 ? 8 : VB == 32 ? 4 : 2, U = VB == 64 ? 4 : VB == 32 ? 2 : 1;
  constexpr int G = VB == 16 ? 2 : 1;
  constexpr int64_t L = lanes<T, VB>;
  static_assert(vector_lanes<T> % (G * L) == 0, "r (a multiple of vector_lanes) in whole groups");
  for (int64_t g = 0; g < r; g += G * L) {
    if (mb == 0 && !add)
      for (int64_t c = 0; c < n; ++c)
        for (int q = 0; q < G; ++q) store(D + c * r + g + q * L, W{});
    T *h = H + g, *d = D + g;
    const T *v = Vt + g, *p = coef + g;
    const int64_t m = dual_rows<VB, R, U, G>(h, d, X, ldx, v, p, 0, mb, r, n, add);
    dual_rows<VB, 1, U, G>(h, d, X, ldx, v, p, m, mb, r, n, add);
  }

}

// One strip's update of F from its sum g over the rows: F + s g^2 when SQUARE, else F + g when
// `add`, else g.
template <bool SQUARE, typename V, typename T>
FASTCUR_INLINE V strip_update(V f, V g, T s, bool add) {
  if constexpr (SQUARE) return f + s * g * g;
  else return add ? f + g : g;
}

// Rows j0..j0+J of F updated from Σ_i coef[i, j0 + j] X[i, c:c+L] for one vector of columns at
// a time, all mb rows accumulated in registers (with SQUARE, the per-example gradient is
// squared where it is formed and never stored); then the columns past the last whole vector.
template <int VB, bool SQUARE, int J, typename T>
FASTCUR_INLINE void strips(T* F, const T* coef, int64_t r, int64_t j0, const T* X, int64_t ldx,
                           int64_t mb, int64_t n, T s, bool add) {
  using W = typename VecN<T, VB>::type;
  constexpr int64_t L = lanes<T, VB>;
  int64_t c = 0;
  for (; c + L <= n; c += L) {
    W acc[J] = {};
    for (int64_t i = 0; i < mb; ++i) {
      const W xv = load<W>(X + i * ldx + c);
      const T* a = coef + i * r + j0;
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j) acc[j] += a[j] * xv;
    }
    for (int j = 0; j < J; ++j) {
      T* row = F + (j0 + j) * n + c;
      store(row, strip_update<SQUARE>(load<W>(row), acc[j], s, add));
    }
  }
  for (; c < n; ++c)
    for (int j = 0; j < J; ++j) {
      T g = T(0);
      for (int64_t i = 0; i < mb; ++i) g += coef[i * r + j0 + j] * X[i * ldx + c];
      T& f = F[(j0 + j) * n + c];
      f = strip_update<SQUARE>(f, g, s, add);
    }
}

// Channels sixteen at a time with AVX-512's 32 registers; then eight, four, one.
template <int VB, bool SQUARE, typename T>
FASTCUR_INLINE void strips_impl(T* F, const T* coef, const T* X, int64_t ldx, int64_t mb,
                                int64_t r, int64_t n, T s, bool add) {
  int64_t j = 0;
  if constexpr (VB == 64)
    for (; j + 16 <= r; j += 16) strips<VB, SQUARE, 16>(F, coef, r, j, X, ldx, mb, n, s, add);
  for (; j + 8 <= r; j += 8) strips<VB, SQUARE, 8>(F, coef, r, j, X, ldx, mb, n, s, add);
  for (; j + 4 <= r; j += 4) strips<VB, SQUARE, 4>(F, coef, r, j, X, ldx, mb, n, s, add);
  for (; j < r; ++j) strips<VB, SQUARE, 1>(F, coef, r, j, X, ldx, mb, n, s, add);
}

// acc[j0 + j, :] += Σ_i coef[i, j0 + j] X[i, :] for i < R rows, j < J channels: the R rows'
// vectors loaded once per step feed J accumulator rows (R = 8, J = 4 measured 0.50 ms against
// 0.73 for four rows a channel at a time, on 1024 x 2048 rows). Skipped when every
// coefficient is 0 (gated-off channels).
template <int VB, int R, int J, typename T>
FASTCUR_INLINE void outer_tile(T* acc, const T* coef, int64_t r, int64_t j0, const T* X,
                               int64_t ldx, int64_t n) {
  using W = typename VecN<T, VB>::type;
  constexpr int64_t L = lanes<T, VB>;
  T a[R][J];
  bool any = false;
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < J; ++j) {
      a[i][j] = coef[i * r + j0 + j];
      any = any || a[i][j] != T(0);
    }
  if (!any) return;
  int64_t c = 0;
  for (; c + L <= n; c += L) {
    W xv[R];
    load_rows<R>(xv, X, ldx, c);
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) {
      T* row = acc + (j0 + j) * n + c;
      W s = load<W>(row);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) s += a[i][j] * xv[i];
      store(row, s);
    }
  }
  for (; c < n; ++c)
    for (int j = 0; j < J; ++j) {
      T s = acc[(j0 + j) * n + c];
      for (int i = 0; i < R; ++i) s += a[i][j] * X[i * ldx + c];
      acc[(j0 + j) * n + c] = s;
    }
}

// The rows read in order, eight at a time.
template <int VB, typename T>
FASTCUR_INLINE void outer_acc_impl(T* acc, const T* coef, const T* X, int64_t ldx, int64_t mb,
                                   int64_t r, int64_t n) {
  const int64_t full = r - r % 4;
  int64_t m = 0;
  for (; m + 8 <= mb; m += 8) {
    int64_t j = 0;
    for (; j < full; j += 4) outer_tile<VB, 8, 4>(acc, coef + m * r, r, j, X + m * ldx, ldx, n);
    for (; j < r; ++j) outer_tile<VB, 8, 1>(acc, coef + m * r, r, j, X + m * ldx, ldx, n);
  }
  for (; m < mb; ++m) {
    int64_t j = 0;
    for (; j < full; j += 4) outer_tile<VB, 1, 4>(acc, coef + m * r, r, j, X + m * ldx, ldx, n);
    for (; j < r; ++j) outer_tile<VB, 1, 1>(acc, coef + m * r, r, j, X + m * ldx, ldx, n);
  }
}

// Four output vectors accumulated over the K rows of rhs in registers, stored once.
template <int VB, typename T>
FASTCUR_INLINE void small_k_rows_impl(T* out, int64_t ldo, const T* lhs, const T* rhs, int64_t mb,
                                      int64_t K, int64_t n) {
  using W = typename VecN<T, VB>::type;
  constexpr int64_t L = lanes<T, VB>;
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
      // The chunk's tail a vector at a time, then the last < L columns (682 = 42 x 16 + 10
      // columns: column by column from 640 on, the tail took as long as the vector part).
      for (; c + L <= c1; c += L) {
        W v0 = {};
        for (int64_t j = 0; j < K; ++j)
          if (a[j] != T(0)) v0 += a[j] * load<W>(rhs + j * n + c);
        store(o + c, v0);
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

// The square / strip kernels as IMPLs of FASTCUR_CPU_DISPATCH (first template argument VB).
template <int VB, typename T>
FASTCUR_INLINE void outer_square_acc_impl(T* F, const T* coef, const T* X, int64_t ldx, int64_t mb,
                                          int64_t r, int64_t n, T s) {
  strips_impl<VB, true>(F, coef, X, ldx, mb, r, n, s, true);
}
template <int VB, typename T>
FASTCUR_INLINE void outer_strip_acc_impl(T* F, const T* coef, const T* X, int64_t ldx, int64_t mb,
                                         int64_t r, int64_t n, bool add) {
  strips_impl<VB, false>(F, coef, X, ldx, mb, r, n, T(0), add);
}

}  // namespace

// Each kernel for float and double, built per x86-64 level (cpu/simd.h).
#define FASTCUR_ROW_KERNEL(T)                                                                  \
  FASTCUR_CPU_DISPATCH(void, outer_acc,                                                        \
                       (T * acc, const T* coef, const T* X, int64_t ldx, int64_t mb, int64_t r, \
                        int64_t n),                                                            \
                       (acc, coef, X, ldx, mb, r, n), outer_acc_impl)                          \
  FASTCUR_CPU_DISPATCH(void, rows_dot,                                                         \
                       (T * out, const T* X, int64_t ldx, const T* V, int64_t mb, int64_t r,   \
                        int64_t n),                                                            \
                       (out, X, ldx, V, mb, r, n), rows_dot_impl)                              \
  FASTCUR_CPU_DISPATCH(void, small_k_rows,                                                     \
                       (T * out, int64_t ldo, const T* lhs, const T* rhs, int64_t mb,          \
                        int64_t K, int64_t n),                                                 \
                       (out, ldo, lhs, rhs, mb, K, n), small_k_rows_impl)                      \
  FASTCUR_CPU_DISPATCH(void, narrow_rows,                                                      \
                       (T * out, const T* X, int64_t ldx, const T* Vt, int64_t mb, int64_t r,  \
                        int64_t n),                                                            \
                       (out, X, ldx, Vt, mb, r, n), narrow_rows_impl)                          \
  FASTCUR_CPU_DISPATCH(void, narrow_pass,                                                      \
                       (T * H, T * D, const T* X, int64_t ldx, const T* Vt, const T* coef,     \
                        int64_t mb, int64_t r, int64_t n, bool add),                           \
                       (H, D, X, ldx, Vt, coef, mb, r, n, add), narrow_pass_impl)              \
  FASTCUR_CPU_DISPATCH(void, outer_square_acc,                                                 \
                       (T * F, const T* coef, const T* X, int64_t ldx, int64_t mb, int64_t r,  \
                        int64_t n, T s),                                                       \
                       (F, coef, X, ldx, mb, r, n, s), outer_square_acc_impl)                  \
  FASTCUR_CPU_DISPATCH(void, outer_strip_acc,                                                  \
                       (T * F, const T* coef, const T* X, int64_t ldx, int64_t mb, int64_t r,  \
                        int64_t n, bool add),                                                  \
                       (F, coef, X, ldx, mb, r, n, add), outer_strip_acc_impl)

FASTCUR_ROW_KERNEL(float)
FASTCUR_ROW_KERNEL(double)
#undef FASTCUR_ROW_KERNEL

}  // namespace cpu
}  // namespace fastcur
