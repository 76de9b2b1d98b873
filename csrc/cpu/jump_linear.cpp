// jump_linear on the CPU (docs/methods.md, JumpLoRA): the row-block schedule of csrc/jump_linear.h with ATen
// GEMMs (MKL / oneDNN) and the elementwise tile primitives below (at::parallel_for).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"
#include "cpu/skinny_rows.h"
#if FASTCUR_HAS_CPU_CLONES
#include <immintrin.h>
#endif
#include "jump_linear.h"

namespace fastcur {
namespace {
using cpu::lanes;
using cpu::lane_sums;
using cpu::load;
using cpu::VecN;

// Tile of Z / dy^T x per block: 256 Ki elements (1 MB in float32). Each thread's dy^T x
// tile is a single-threaded GEMM [rows, M] x [M, k] that packs x once per block, so taller
// tiles amortize the packing; the tile is still in L2/L3 when the elementwise pass and the
// rank-r contractions read it. Measured (M = n = k = 2048, r = 8, fwd+bwd, 2 threads, on a
// machine at load 3-8, so only coarse): 64 Ki elements 1268 ms, 256 Ki 1164 ms, 1 Mi 1364 ms.
constexpr int64_t kDefaultTileElems = int64_t{1} << 18;
constexpr int64_t kGrain = 4096;
// The largest fraction of a block's entries (kept or in the θ kernel's band) for which the
// backward runs the sampled product instead of the dense G tile (see jump_linear_bwd_sampled).
// Measured (the adapter backward without dx, M = n = k = 256, r = 8, one AVX-512 thread, f =
// 0.5, ms, sampled / dense): about 7 % of entries 0.36 / 0.66, 13 % 0.44 / 0.69, 26 % 0.60 /
// 0.65, 36 % 0.75 / 0.66: the sampled product is about 3x a GEMM's cost per product, so the
// two cross near a quarter.
constexpr double kSparseFraction = 0.25;

// FASTCUR_JUMP_TILE_ELEMS overrides the tile size (a tuning knob for benchmarks; read once).
int64_t tile_elems() {
  static const int64_t value = [] {
    const char* env = std::getenv("FASTCUR_JUMP_TILE_ELEMS");
    const int64_t v = env != nullptr ? std::atoll(env) : 0;
    return v > 0 ? v : kDefaultTileElems;
  }();
  return value;
}

double theta_of(const at::Tensor& log_theta) { return std::exp(log_theta.item<double>()); }

// ---------------------------------------------------------------------------------------------
// The sampled backward (jump_linear without ELLA; docs/methods.md, JumpLoRA). With
// G = s dy^T x, dL/dZ = G ⊙ (f m + 1 - f), m = 1[|Z| > θ], splits into
//   (a) (1 - f) G: contracted the LoRA way, never formed: B^T G = s (dy B)^T x [r, k] and
//       G A^T = s dy^T (x A^T) [n, r] (four rank-r GEMMs, LoRA's own backward cost);
//   (b) f G ⊙ m: G is needed only where m = 1, and (c) the θ gradient needs G only where the
//       straight-through kernel is nonzero (the band | ±Z - θ | < ε/2). After the threshold
//       reset (θ := an order statistic of |Z| that keeps about r (n + k) of the n k entries,
//       which the schedule does before f leaves 0) that set is sparse, so G is computed only
//       there, as a sampled product g_ij = s dy[:, i] · x[:, j] over the M rows (dy^T and x^T
//       copied once so both operands are contiguous), and scattered: dB[i] += f g_ij A[:, j]^T,
//       dA[:, j] += f g_ij B[i]^T, θ sum += g_ij term_ij.
// Each block of W's rows decides on its own (after its Z tile): when its sampled set holds more
// than a fraction `sparse_fraction()` of its entries, the block runs the dense tile (G tile by
// one GEMM, both parts of dL/dZ elementwise, contracted with A and B) instead, as before. f = 0
// needs no mask at all: every block is (a) alone. FASTCUR_JUMP_BWD = auto | sparse | dense (read
// per call; tests force each side) and FASTCUR_JUMP_SPARSE_FRAC (the fraction) are knobs.

#if FASTCUR_HAS_CPU_CLONES
// The column indices j with |z[j]| > lo, in order, into out (which has room for 16 more than
// the count): AVX-512 compares and compresses 16 at a time (compress into a register, then one
// store: the compressing store to memory is microcoded on some AMD cores).
FASTCUR_TARGET_V4 int64_t candidates_avx512(const float* z, int64_t k, float lo, int32_t* out) {
  int64_t cnt = 0, j = 0;
  const __m512 vlo = _mm512_set1_ps(lo);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  for (; j + 16 <= k; j += 16) {
    const __m512 v = _mm512_abs_ps(_mm512_loadu_ps(z + j));
    const __mmask16 m = _mm512_cmp_ps_mask(v, vlo, _CMP_GT_OQ);
    if (m) {
      _mm512_storeu_si512(out + cnt, _mm512_maskz_compress_epi32(m, idx));
      cnt += __builtin_popcount(unsigned(m));
    }
    idx = _mm512_add_epi32(idx, step);
  }
  for (; j < k; ++j) {
    out[cnt] = int32_t(j);
    cnt += std::abs(z[j]) > lo;
  }
  return cnt;
}
#endif

// Codes of a sampled entry: bit 0 = |Z| > θ; bits 1-2 = the kernel term + 1 (term = K(-Z) - K(Z)).
// Per row: a branchless pass keeps the candidates |Z| > lo (lo = θ - ε, below the kernel's band
// whatever the rounding), then their exact codes (as grad_tile_cpu computes them) decide.
// Returns the count, or -1 once it passes `cap` (the buffers hold cap + k entries).
template <int VB, typename T>
FASTCUR_INLINE int64_t scan_block_impl(const T* z, int64_t b, int64_t k, T th, T inv_eps, T lo,
                                       int64_t cap, int64_t* rowptr, int32_t* cols,
                                       int8_t* codes) {
  int64_t cnt = 0;
  rowptr[0] = 0;
  for (int64_t i = 0; i < b; ++i) {
    const T* zr = z + i * k;
    const int64_t start = cnt;
#if FASTCUR_HAS_CPU_CLONES
    if constexpr (VB == 64 && std::is_same_v<T, float>) {
      cnt += candidates_avx512(zr, k, lo, cols + cnt);
    } else
#endif
    {
      for (int64_t j = 0; j < k; ++j) {
        cols[cnt] = int32_t(j);
        cnt += std::abs(zr[j]) > lo;
      }
    }
    int64_t out = start;
    for (int64_t c = start; c < cnt; ++c) {
      const int32_t j = cols[c];
      const T v = zr[j];
      const int on = std::abs(v) > th;
      const T u1 = (v - th) * inv_eps, u2 = (-v - th) * inv_eps;
      const int term = int(std::abs(u2) < T(0.5)) - int(std::abs(u1) < T(0.5));
      cols[out] = j;
      codes[out] = int8_t(on | ((term + 1) << 1));
      out += (on | (term != 0));
    }
    cnt = out;
    rowptr[i + 1] = cnt;
    if (cnt > cap) return -1;
  }
  return cnt;
}

// Σ_m d[m] p[m] over [0, mc) for J columns p[0..J) at once (one load of d per J products).
template <int VB, typename T, int J>
FASTCUR_INLINE void dots(const T* d, const T* const* p, int64_t mc, T* out) {
  using V = typename VecN<T, VB>::type;
  constexpr int64_t L = lanes<T, VB>;
  V acc[J];
  for (int q = 0; q < J; ++q) acc[q] = V{};
  int64_t m = 0;
  for (; m + L <= mc; m += L) {
    const V dv = load<V>(d + m);
    for (int q = 0; q < J; ++q) acc[q] += dv * load<V>(p[q] + m);
  }
  const V sums = lane_sums<J, VB, T>(acc);
  for (int q = 0; q < J; ++q) {
    T v = sums[q];
    for (int64_t t = m; t < mc; ++t) v += d[t] * p[q][t];
    out[q] = v;
  }
}

// The sampled product and its scatter for one block of b rows: g = dy[:, i] · x[:, j] at each
// listed (i, j) (dyT [b, M], xT [k, M]: contiguous rows), then dB[i] += sf g A[:, j]^T,
// dAT[j] += sf g B[i] at kept entries (At [k, r], Bb [b, r], dAT [k, r]). Returns Σ g term
// (unscaled). Tiled for the caches: M in chunks of kMc, and within one the columns in groups
// whose x^T chunk fits in L1 (32 KB), all rows' entries of a group before the next group, so
// each x^T row is read from L1 (each row's list is in column order); J entries of a row share
// one load of its dy^T chunk.
template <int VB, typename T>
FASTCUR_INLINE double sampled_block_impl(const T* dyT, const T* xT, int64_t M, int64_t k,
                                         const int64_t* rowptr, const int32_t* cols,
                                         const int8_t* codes, int64_t b, const T* At, const T* Bb,
                                         int64_t r, T sf, T* dB, T* dAT, T* g, int64_t* cur) {
  constexpr int64_t L = lanes<T, VB>;
  constexpr int J = L >= 8 ? 8 : int(L), J4 = L >= 4 ? 4 : int(L);
  constexpr int64_t kMc = 256, kBudget = 262144;
  for (int64_t m0 = 0; m0 < M; m0 += kMc) {
    const int64_t mc = std::min(kMc, M - m0);
    const bool first = m0 == 0;
    // x^T chunk of a column group: 256 KB (in L2), read by every row's entries in it
    const int64_t cg = std::max<int64_t>(8, int64_t(kBudget / sizeof(T)) / std::max<int64_t>(mc, 1));
    for (int64_t i = 0; i < b; ++i) cur[i] = rowptr[i];
    for (int64_t j0 = 0; j0 < k; j0 += cg) {
      const int32_t j1 = int32_t(std::min(k, j0 + cg));
      for (int64_t i = 0; i < b; ++i) {
        const int64_t c = cur[i], c1 = rowptr[i + 1];
        int64_t e = c;
        while (e < c1 && cols[e] < j1) ++e;
        cur[i] = e;
        // (a lambda here would not inherit the level's target attribute: no lambdas)
        const T* d = dyT + i * M + m0;
        T vals[J];
        const T* p[J];
        for (int64_t cc = c; cc < e; cc += J) {
          // 4 or fewer left: J4 columns, else J, padded by repeating the last column (its
          // loads hit L1 and its chains run beside the others)
          const int64_t valid = std::min<int64_t>(J, e - cc);
          if (valid <= J4) {
            for (int q = 0; q < J4; ++q)
              p[q] = xT + int64_t(cols[cc + std::min<int64_t>(q, valid - 1)]) * M + m0;
            dots<VB, T, J4>(d, p, mc, vals);
          } else {
            for (int q = 0; q < J; ++q)
              p[q] = xT + int64_t(cols[cc + std::min<int64_t>(q, valid - 1)]) * M + m0;
            dots<VB, T, J>(d, p, mc, vals);
          }
          for (int64_t q = 0; q < valid; ++q) g[cc + q] = first ? vals[q] : g[cc + q] + vals[q];
        }
      }
    }
  }
  double th_sum = 0.0;
  for (int64_t i = 0; i < b; ++i) {
    T* dBi = dB + i * r;
    const T* Bi = Bb + i * r;
    T row_th = T(0);
    for (int64_t c = rowptr[i]; c < rowptr[i + 1]; ++c) {
      const T gv = g[c];
      const int code = codes[c];
      row_th += gv * T((code >> 1) - 1);
      if (code & 1) {
        const T dz = sf * gv;
        const T* a = At + int64_t(cols[c]) * r;
        T* o = dAT + int64_t(cols[c]) * r;
        for (int64_t q = 0; q < r; ++q) {
          dBi[q] += dz * a[q];
          o[q] += dz * Bi[q];
        }
      }
    }
    th_sum += double(row_th);
  }
  return th_sum;
}

// out = W + (|Z| > θ ? keep : soft) Z (W, Z and out of one dtype; keep = s, soft = s (1 - f)).
template <int VB, typename T>
FASTCUR_INLINE void weff_rows_impl(T* out, const T* w, const T* z, int64_t count, T th, T keep,
                                   T soft) {
  for (int64_t i = 0; i < count; ++i) {
    const T v = z[i];
    out[i] = w[i] + (std::abs(v) > th ? keep : soft) * v;
  }
}

#define FASTCUR_JUMP_SAMPLED(T)                                                                  \
  FASTCUR_CPU_DISPATCH(int64_t, scan_block,                                                      \
                       (const T* z, int64_t b, int64_t k, T th, T inv_eps, T lo, int64_t cap,    \
                        int64_t* rowptr, int32_t* cols, int8_t* codes),                          \
                       (z, b, k, th, inv_eps, lo, cap, rowptr, cols, codes), scan_block_impl)    \
  FASTCUR_CPU_DISPATCH(double, sampled_block,                                                    \
                       (const T* dyT, const T* xT, int64_t M, int64_t k, const int64_t* rowptr,  \
                        const int32_t* cols, const int8_t* codes, int64_t b, const T* At,        \
                        const T* Bb, int64_t r, T sf, T* dB, T* dAT, T* g, int64_t* cur),        \
                       (dyT, xT, M, k, rowptr, cols, codes, b, At, Bb, r, sf, dB, dAT, g, cur),  \
                       sampled_block_impl)                                                       \
  FASTCUR_CPU_DISPATCH(void, weff_rows,                                                          \
                       (T * out, const T* w, const T* z, int64_t count, T th, T keep, T soft),   \
                       (out, w, z, count, th, keep, soft), weff_rows_impl)
FASTCUR_JUMP_SAMPLED(float)
FASTCUR_JUMP_SAMPLED(double)
#undef FASTCUR_JUMP_SAMPLED

// dst [cols, rows] (row stride ldd) = src^T, src [rows, cols] (row stride lds), float32: the
// sampled backward's copies dy^T and x^T. ATen's transposing copy (scalar, 60 x 60 blocks) took
// 40 us for 256 x 256 and 102 us for 256 x 682 here (a plain copy of the same 6 and 18 us).
#if FASTCUR_HAS_CPU_CLONES
// 8 rows of src, columns [0, c8) (c8 a multiple of 8): 8 x 8 blocks transposed in registers.
FASTCUR_TARGET_V3 void transpose_rows8_avx2(float* dst, int64_t ldd, const float* src, int64_t lds,
                                            int64_t c8) {
  for (int64_t c = 0; c < c8; c += 8) {
    __m256 r[8], t[8];
    for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(src + q * lds + c);
    for (int q = 0; q < 8; q += 2) {
      t[q] = _mm256_unpacklo_ps(r[q], r[q + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
      t[q + 1] = _mm256_unpackhi_ps(r[q], r[q + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
    }
    for (int q = 0; q < 8; q += 4) {
      r[q] = _mm256_shuffle_ps(t[q], t[q + 2], _MM_SHUFFLE(1, 0, 1, 0));      // col 0 | 4
      r[q + 1] = _mm256_shuffle_ps(t[q], t[q + 2], _MM_SHUFFLE(3, 2, 3, 2));  // col 1 | 5
      r[q + 2] = _mm256_shuffle_ps(t[q + 1], t[q + 3], _MM_SHUFFLE(1, 0, 1, 0));  // col 2 | 6
      r[q + 3] = _mm256_shuffle_ps(t[q + 1], t[q + 3], _MM_SHUFFLE(3, 2, 3, 2));  // col 3 | 7
    }
    for (int q = 0; q < 4; ++q) {
      _mm256_storeu_ps(dst + (c + q) * ldd, _mm256_permute2f128_ps(r[q], r[q + 4], 0x20));
      _mm256_storeu_ps(dst + (c + q + 4) * ldd, _mm256_permute2f128_ps(r[q], r[q + 4], 0x31));
    }
  }
}
#endif

template <int VB>
FASTCUR_INLINE void transpose_impl(float* dst, int64_t ldd, const float* src, int64_t lds,
                                   int64_t rows, int64_t cols) {
  int64_t r0 = 0;
#if FASTCUR_HAS_CPU_CLONES
  if constexpr (VB >= 32) {
    const int64_t c8 = cols / 8 * 8;
    for (; r0 + 8 <= rows; r0 += 8) {
      transpose_rows8_avx2(dst + r0, ldd, src + r0 * lds, lds, c8);
      for (int64_t i = r0; i < r0 + 8; ++i)
        for (int64_t c = c8; c < cols; ++c) dst[c * ldd + i] = src[i * lds + c];
    }
  }
#endif
  for (; r0 < rows; r0 += 8) {   // what is left (all of it at the baseline level): 8 x 8 blocks
    const int64_t r1 = std::min(rows, r0 + 8);
    for (int64_t c0 = 0; c0 < cols; c0 += 8) {
      const int64_t c1 = std::min(cols, c0 + 8);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t i = r0; i < r1; ++i) dst[c * ldd + i] = src[i * lds + c];
    }
  }
}

FASTCUR_CPU_DISPATCH(void, transpose_f32,
                     (float* dst, int64_t ldd, const float* src, int64_t lds, int64_t rows,
                      int64_t cols),
                     (dst, ldd, src, lds, rows, cols), transpose_impl)

// dst [cols, rows] = src^T for a contiguous src [rows, cols] (float64: ATen's copy). Strips of 8
// rows over the threads only past 256 Ki elements per thread (a parallel region costs more than
// a smaller transpose).
void transpose_into(const at::Tensor& dst, const at::Tensor& src) {
  if (src.scalar_type() != at::kFloat) {
    dst.copy_(src.t());
    return;
  }
  const int64_t rows = src.size(0), cols = src.size(1);
  float* d = dst.data_ptr<float>();
  const float* s = src.data_ptr<float>();
  const int64_t strips = (rows + 7) / 8;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(8 * cols, 1));
  at::parallel_for(0, strips, grain, [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * 8, r1 = std::min(rows, b1 * 8);
    transpose_f32(d + r0, rows, s + r0 * cols, cols, r1 - r0, cols);
  });
}

template <typename S, typename A>
bool weff_vec(S*, const S*, const A*, int64_t, A, A, A) {
  return false;   // half W: the generic loop below
}
bool weff_vec(float* o, const float* w, const float* z, int64_t n, float th, float k, float s) {
  weff_rows(o, w, z, n, th, k, s);
  return true;
}
bool weff_vec(double* o, const double* w, const double* z, int64_t n, double th, double k,
              double s) {
  weff_rows(o, w, z, n, th, k, s);
  return true;
}

// out = W + s (f J(Z) + (1 - f) Z); with ELLA's W_past tile `Wp` (else undefined) the same
// pass returns the tile's Σ (s Z e Wp)², e = fe 1[|Z| > θ] + 1 - fe (0 without it).
double build_weff_cpu(at::Tensor& out, const at::Tensor& W, const at::Tensor& Z,
                      const at::Tensor& log_theta, double s, double f, const at::Tensor& Wp = {},
                      double fe = 1.0) {
  const double th = theta_of(log_theta);
  const int64_t N = out.numel();
  const bool ella = Wp.defined();
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "jump_build_weff", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* wp = W.data_ptr<scalar_t>();
    const scalar_t* pp = ella ? Wp.data_ptr<scalar_t>() : nullptr;
    const acc_t* zp = Z.data_ptr<acc_t>();
    const acc_t ths = static_cast<acc_t>(th), sa = static_cast<acc_t>(s);
    const acc_t keep = sa, soft = static_cast<acc_t>(s * (1.0 - f));
    const acc_t ella_soft = static_cast<acc_t>(s * (1.0 - fe));
    // float32 / float64: the vector build of the active x86-64 level (one thread: the callers
    // own blocks of rows inside their parallel region).
    if (!ella && weff_vec(op, wp, zp, N, ths, keep, soft)) return;
    total = at::parallel_reduce(0, N, kGrain, 0.0, [&](int64_t b, int64_t e, double part) {
      acc_t local = 0;
      for (int64_t i = b; i < e; ++i) {
        const acc_t z = zp[i];
        const bool on = std::abs(z) > ths;
        op[i] = static_cast<scalar_t>(static_cast<acc_t>(wp[i]) + (on ? keep : soft) * z);
        if (ella) {
          const acc_t v = (on ? sa : ella_soft) * z * static_cast<acc_t>(pp[i]);
          local += v * v;
        }
      }
      return part + static_cast<double>(local);
    }, std::plus<double>());
  });
  return total;
}

// dZ = s T (f m + 1 - f) (+ c 2 s² e² Z Wp² with ELLA's W_past tile `Wp`, c = the gradient of
// the ELLA output, e = fe m + 1 - fe); returns the tile's straight-through θ sum
// f (θ/ε) Σ G term (0 at f = 0).
// With `split` the (1 - f) G part is left out (dZ = f G m; the caller contracts it the LoRA
// way, see jump_linear_bwd_sampled).
double grad_tile_cpu(at::Tensor& dZ, const at::Tensor& T, const at::Tensor& Z,
                     const at::Tensor& log_theta, double s, double f, double eps,
                     const at::Tensor& Wp = {}, double ella_coef = 0.0, double fe = 1.0,
                     bool split = false) {
  const double th = theta_of(log_theta);
  const bool ella = Wp.defined() && ella_coef != 0.0;
  const int64_t N = Z.numel();
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, T.scalar_type(), "jump_grad_tile", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* tp = T.data_ptr<scalar_t>();
    const acc_t* zp = Z.data_ptr<acc_t>();
    acc_t* dp = dZ.data_ptr<acc_t>();
    const scalar_t* pp = ella ? Wp.data_ptr<scalar_t>() : nullptr;
    const acc_t ths = static_cast<acc_t>(th), sa = static_cast<acc_t>(s);
    const acc_t soft = static_cast<acc_t>(split ? 0.0 : 1.0 - f);
    const acc_t keep = static_cast<acc_t>(split ? f : 1.0), inv_eps = static_cast<acc_t>(1.0 / eps);
    const acc_t ella_c = static_cast<acc_t>(2.0 * s * s * ella_coef);
    const acc_t ella_soft2 = static_cast<acc_t>((1.0 - fe) * (1.0 - fe));
    const bool want_theta = f != 0.0;
    total = at::parallel_reduce(0, N, kGrain, 0.0, [&](int64_t b, int64_t e, double part) {
      acc_t local = 0;
      for (int64_t i = b; i < e; ++i) {
        const acc_t z = zp[i];
        const acc_t g = sa * static_cast<acc_t>(tp[i]);
        const bool on = std::abs(z) > ths;
        acc_t d = on ? g * keep : g * soft;          // G (f 1[|Z|>θ] + 1 - f)
        if (ella) {
          const acc_t w = static_cast<acc_t>(pp[i]);
          d += (on ? ella_c : ella_c * ella_soft2) * z * w * w;
        }
        dp[i] = d;
        if (want_theta) {
          const acc_t u1 = (z - ths) * inv_eps, u2 = (-z - ths) * inv_eps;
          const acc_t term = acc_t(std::abs(u2) < acc_t(0.5)) - acc_t(std::abs(u1) < acc_t(0.5));
          local += g * term;
        }
      }
      return part + static_cast<double>(local);
    }, std::plus<double>());
  });
  return f != 0.0 ? total * f * th / eps : 0.0;
}

// d/d log θ = θ d/dθ from the kernels' d/dθ sum, in double on the host and one tensor op (the
// several small ATen ops of a tensor formula were a visible share of a small layer's backward).
at::Tensor finish_theta(double total, const at::Tensor& log_theta, double denom) {
  return at::full(log_theta.sizes(), total * theta_of(log_theta) / denom, log_theta.options());
}


// Per-thread scratch buffers that grow and are kept: W + ΔW, the Z / G tiles and the transposed
// copies are as big as W or x; freshly allocated, such a buffer comes back from the allocator as
// new pages that fault in on first touch (measured here, at n = 682, k = 256, M = 256: the
// transposing copy into a new [n, M] buffer took 0.37-0.42 ms and MKL's Z = B A into a new tile
// 0.23-0.35 ms, several times their cost into warm memory). Slots: one tensor per slot per
// call on one thread; a tensor over a slot must not outlive the call.
enum Scratch : int { kWeff = 0, kZTile, kGTile, kDyT, kXT, kScratchSlots };

at::Tensor scratch(Scratch slot, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  struct Buf {
    void* ptr = nullptr;
    size_t bytes = 0;
    ~Buf() { std::free(ptr); }
  };
  thread_local Buf bufs[kScratchSlots];
  int64_t numel = 1;
  for (int64_t v : sizes) numel *= v;
  const size_t need = size_t(std::max<int64_t>(numel, 1)) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  Buf& b = bufs[slot];
  if (b.bytes < need) {
    std::free(b.ptr);
    const size_t bytes = (need + 63) / 64 * 64;
    b.ptr = std::aligned_alloc(64, bytes);
    TORCH_CHECK(b.ptr != nullptr, "fastcur: out of memory for a ", bytes, "-byte scratch buffer");
    b.bytes = bytes;
  }
  return at::from_blob(b.ptr, sizes, opts);
}

// The Z tile z [b, k] = B_blk [b, r] A [r, k] (acc dtype, contiguous): the row kernel for a
// small inner dimension (cpu/skinny_rows.h). MKL's GEMM with K = r = 8 measured 95 us for a
// 256 x 682 tile into warm memory, about 4x the row kernel; one routine for the forward and
// both backwards, so every pass sees the same Z (the same gate).
void z_tile(at::Tensor& z, const at::Tensor& B_blk, const at::Tensor& A) {
  const int64_t b = z.size(0), k = z.size(1), r = A.size(0);
  if (z.scalar_type() == at::kFloat) {
    cpu::small_k_rows(z.data_ptr<float>(), k, B_blk.data_ptr<float>(), A.data_ptr<float>(), b, r, k);
  } else if (z.scalar_type() == at::kDouble) {
    cpu::small_k_rows(z.data_ptr<double>(), k, B_blk.data_ptr<double>(), A.data_ptr<double>(), b, r, k);
  } else {
    at::mm_out(z, B_blk, A);
  }
}

// The CPU schedule. One at::parallel_for over blocks of W's rows: each thread owns whole
// blocks, computes its Z tile and dy^T x tile with single-threaded ATen GEMMs into its own
// small buffers (MKL runs sequentially inside a parallel region), applies the elementwise
// terms while the tile is hot, and contracts it with A and B right away (dB rows are
// disjoint per block; dA and the θ sum are per-thread partials, reduced at the end). One
// parallel region per call: measured here, the generic schedule of csrc/jump_linear.h
// (a serial block loop whose GEMMs and epilogues each open their own parallel region) lost
// seconds to OpenMP barriers on this shared 2-core machine. Only the dense x Weff^T and
// dy Weff GEMMs run multi-threaded.
struct BlockPlan {
  int64_t rows, blocks;
};

BlockPlan plan(int64_t n, int64_t k) {
  // At least one block per thread: a W smaller than one tile (n k <= 256 Ki, as in a d = 256
  // model) otherwise runs its whole pass on one thread.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows = std::max<int64_t>(
      1, std::min(jump_block_rows(n, k, tile_elems()), (n + threads - 1) / threads));
  return {rows, (n + rows - 1) / rows};
}

// The opening of one block of W's rows in both backwards: rows [i0, i0 + b) of block `blk`, their
// Z tile (into z_buf) and, when dx is needed (`weff` defined), their rows of W + ΔW.
struct BlockTile {
  int64_t i0, b;
  at::Tensor z, B_blk;   // Z tile [b, k] (a view of z_buf), B's rows [b, r]
};

BlockTile open_block(const BlockPlan& p, int64_t blk, const at::Tensor& z_buf,
                     const at::Tensor& A_acc, const at::Tensor& B_acc, const at::Tensor& W,
                     const at::Tensor& weff, const at::Tensor& log_theta, double scale, double f) {
  const int64_t i0 = blk * p.rows, b = std::min(p.rows, W.size(0) - i0);
  BlockTile t{i0, b, z_buf.narrow(0, 0, b), B_acc.narrow(0, i0, b)};
  z_tile(t.z, t.B_blk, A_acc);
  if (weff.defined()) {
    at::Tensor out = weff.narrow(0, i0, b);
    build_weff_cpu(out, W.narrow(0, i0, b), t.z, log_theta, scale, f);
  }
  return t;
}

// W + ΔW assembled block by block; with `Wp` (ELLA's W_past) also Σ (s J(Z) ⊙ Wp)² into `ella`
// (a [] tensor in the acc dtype), from the same Z tiles.
at::Tensor build_weff_blocks(const at::Tensor& W, const at::Tensor& A_acc, const at::Tensor& B_acc,
                             const at::Tensor& log_theta, double scale, double f,
                             const at::Tensor& Wp = {}, at::Tensor* ella = nullptr,
                             double fe = 1.0) {
  const int64_t n = W.size(0), k = W.size(1);
  at::Tensor weff = scratch(kWeff, W.sizes(), W.options());
  const BlockPlan p = plan(n, k);
  std::vector<double> ella_parts(p.blocks, 0.0);
  at::parallel_for(0, p.blocks, 1, [&](int64_t b0, int64_t b1) {
    // Worker threads do not inherit the caller's dispatch state: skip autograd explicitly.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor z_buf = scratch(kZTile, {p.rows, k}, A_acc.options());
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * p.rows, b = std::min(p.rows, n - i0);
      at::Tensor z = z_buf.narrow(0, 0, b), out = weff.narrow(0, i0, b);
      z_tile(z, B_acc.narrow(0, i0, b), A_acc);
      ella_parts[blk] = build_weff_cpu(out, W.narrow(0, i0, b), z, log_theta, scale, f,
                                       Wp.defined() ? Wp.narrow(0, i0, b) : at::Tensor(), fe);
    }
  });
  if (ella != nullptr) {
    double total = 0.0;
    for (double v : ella_parts) total += v;  // fixed order: deterministic
    *ella = at::scalar_tensor(total, A_acc.options());
  }
  return weff;
}

at::Tensor jump_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                           const at::Tensor& B, const at::Tensor& log_theta, double scale,
                           double f, double /*bandwidth*/, bool /*mean*/) {
  check_jump_linear_args(x, weight, bias, A, B, log_theta);
  const auto acc = jump_acc_type(weight.scalar_type());
  const at::Tensor weff = build_weff_blocks(weight.contiguous(), A.to(acc).contiguous(),
                                            B.to(acc).contiguous(), log_theta, scale, f);
  if (bias.has_value()) return at::addmm(*bias, x, weff.t());
  return at::mm(x, weff.t());
}

std::tuple<at::Tensor, at::Tensor> jump_linear_ella_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& log_theta, double scale,
    const at::Tensor& W_past, double f, double /*bandwidth*/, bool /*mean*/, double ella_f) {
  check_jump_linear_args(x, weight, bias, A, B, log_theta);
  check_w_past(W_past, weight);
  const auto acc = jump_acc_type(weight.scalar_type());
  at::Tensor ella;
  const at::Tensor weff = build_weff_blocks(weight.contiguous(), A.to(acc).contiguous(),
                                            B.to(acc).contiguous(), log_theta, scale, f,
                                            W_past.contiguous(), &ella, ella_f);
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weff.t()) : at::mm(x, weff.t());
  return {y, ella.to(weight.scalar_type())};
}

// Both backwards; with `Wp` (ELLA's W_past) the ELLA gradient, times `ella_coef`, joins dL/dZ
// in each tile before the one contraction with A and B.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jump_linear_bwd_impl(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& log_theta, double scale, double f, double bandwidth,
    bool mean, bool need_dx, bool need_adapter, const at::Tensor& Wp, double ella_coef,
    double ella_f) {
  check_jump_linear_args(x, weight, c10::nullopt, A, B, log_theta);
  const int64_t M = x.size(0), n = weight.size(0), k = weight.size(1), r = A.size(0);
  check_matrix(grad_y, "grad_y", M, n);
  check_like(grad_y, "grad_y", weight, "weight");
  TORCH_CHECK(bandwidth > 0, "fastcur: bandwidth must be > 0, got ", bandwidth);
  const auto dtype = weight.scalar_type();
  const auto acc = jump_acc_type(dtype);
  const at::Tensor A_acc = A.to(acc).contiguous(), B_acc = B.to(acc).contiguous();
  const at::Tensor W = weight.contiguous(), dy = grad_y.contiguous(), xc = x.contiguous();
  const at::Tensor A_t = A_acc.t();
  const BlockPlan p = plan(n, k);
  at::Tensor weff = need_dx ? at::empty_like(W) : at::Tensor();
  at::Tensor dB = at::zeros({n, r}, A_acc.options());
  // Per-thread partials, indexed by the first block of the thread's range (parallel_for
  // hands each thread one contiguous range of blocks); [blocks, r, k] is small (r x k each).
  at::Tensor dA_parts = at::zeros({p.blocks, r, k}, A_acc.options());
  at::Tensor th_parts = at::zeros({p.blocks}, A_acc.options());
  if (need_dx || need_adapter) {
    at::parallel_for(0, p.blocks, 1, [&](int64_t b0, int64_t b1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::Tensor z_buf = at::empty({p.rows, k}, A_acc.options());
      at::Tensor t_buf = need_adapter ? at::empty({p.rows, k}, W.options()) : at::Tensor();
      at::Tensor dz_buf = (need_adapter && acc != dtype) ? at::empty({p.rows, k}, A_acc.options()) : t_buf;
      at::Tensor dA_local = dA_parts[b0];
      at::Tensor th_local = th_parts.select(0, b0);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const BlockTile bt = open_block(p, blk, z_buf, A_acc, B_acc, W, weff, log_theta, scale, f);
        const int64_t i0 = bt.i0, b = bt.b;
        const at::Tensor &z = bt.z, &B_blk = bt.B_blk;
        if (!need_adapter) continue;
        at::Tensor t = t_buf.narrow(0, 0, b), dz = dz_buf.narrow(0, 0, b);
        at::mm_out(t, dy.narrow(1, i0, b).t(), xc);                  // dy^T x tile [b, k]
        th_local.add_(grad_tile_cpu(dz, t, z, log_theta, scale, f, bandwidth,
                                    Wp.defined() ? Wp.narrow(0, i0, b) : at::Tensor(), ella_coef,
                                    ella_f));
        at::Tensor dB_blk = dB.narrow(0, i0, b);
        at::mm_out(dB_blk, dz, A_t);                                 // dB[blk] = dZ A^T
        dA_local.addmm_(B_blk.t(), dz);                              // dA += B[blk]^T dZ
      }
    });
  }
  at::Tensor dx = need_dx ? at::mm(grad_y, weff) : at::empty({0}, x.options());
  const double denom = mean ? static_cast<double>(n) * static_cast<double>(k) : 1.0;
  at::Tensor dlog = finish_theta(th_parts.sum().item<double>(), log_theta, denom);
  return {dx, dA_parts.sum(0).to(dtype), dB.to(dtype), dlog};
}

// FASTCUR_JUMP_BWD: 0 auto, 1 sparse (every block sampled), 2 dense (every block a dense tile,
// also at f = 0: the schedule before the sampled path). Read per call (tests switch it).
int bwd_mode() {
  const char* env = std::getenv("FASTCUR_JUMP_BWD");
  if (env == nullptr || !std::strcmp(env, "auto")) return 0;
  if (!std::strcmp(env, "sparse")) return 1;
  if (!std::strcmp(env, "dense")) return 2;
  TORCH_CHECK(false, "fastcur: FASTCUR_JUMP_BWD must be auto, sparse or dense, got '", env, "'");
}

// The largest fraction of a block's entries that runs sampled: kSparseFraction (measured, see
// there), or FASTCUR_JUMP_SPARSE_FRAC (read per call).
double sparse_fraction() {
  const char* env = std::getenv("FASTCUR_JUMP_SPARSE_FRAC");
  if (env != nullptr && *env) return std::atof(env);
  return kSparseFraction;
}

// jump_linear's backward without ELLA: the sampled schedule above, per block of W's rows inside
// one parallel region (like the dense schedule: each thread owns whole blocks; dB rows are
// disjoint per block; dA, its transposed sampled part, the (1 - f) part's dy B and the θ sum
// are per-thread partials, indexed by the thread's first block, reduced in a fixed order).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jump_linear_bwd_sampled(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& log_theta, double scale, double f, double bandwidth,
    bool mean, bool need_dx) {
  const int64_t M = x.size(0), n = weight.size(0), k = weight.size(1), r = A.size(0);
  const auto dtype = weight.scalar_type();
  const auto acc = jump_acc_type(dtype);
  const auto opts = weight.options().dtype(acc);
  const at::Tensor A_acc = A.to(acc).contiguous(), B_acc = B.to(acc).contiguous();
  const at::Tensor W = weight.contiguous();
  const int mode = bwd_mode();
  const bool lora = f != 1.0 && mode != 2;    // (a) the LoRA way (dense mode: inside the tiles)
  const bool masked = f != 0.0 || mode == 2;  // blocks that look at the mask
  const double th = theta_of(log_theta);
  const double frac = mode == 1 ? 1.0 : mode == 2 ? -1.0 : sparse_fraction();
  // Every product in the acc dtype (float32 for half inputs).
  const at::Tensor x_acc = x.to(acc).contiguous(), dy_acc = grad_y.to(acc).contiguous();
  const at::Tensor dyT = masked ? scratch(kDyT, {n, M}, opts) : at::Tensor();               // [n, M]
  const at::Tensor xT = f != 0.0 && mode != 2 ? scratch(kXT, {k, M}, opts) : at::Tensor();   // [k, M]
  if (dyT.defined()) transpose_into(dyT, dy_acc);
  if (xT.defined()) transpose_into(xT, x_acc);
  const at::Tensor At = masked ? A_acc.t().contiguous() : at::Tensor();                     // [k, r]
  const BlockPlan p = plan(n, k);
  at::Tensor weff = need_dx ? scratch(kWeff, W.sizes(), W.options()) : at::Tensor();
  at::Tensor dB = at::zeros({n, r}, opts);
  at::Tensor dA = at::zeros({r, k}, opts);
  at::Tensor dA_parts = at::empty({p.blocks, r, k}, opts);    // dense blocks' B^T dZ
  at::Tensor dAT_parts = at::empty({p.blocks, k, r}, opts);   // sampled blocks' (B^T dZ)^T
  std::vector<double> th_parts(p.blocks, 0.0);
  std::vector<uint8_t> used_dA(p.blocks, 0), used_dAT(p.blocks, 0);
  if (masked || need_dx) {
    at::parallel_for(0, p.blocks, 1, [&](int64_t b0, int64_t b1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::Tensor z_buf = scratch(kZTile, {p.rows, k}, opts);
      at::Tensor t_buf, dA_local, dAT_local;
      std::vector<int64_t> rowptr(p.rows + 1), cur(p.rows);
      std::vector<int32_t> cols;
      std::vector<int8_t> codes;
      double th_local = 0.0;
      AT_DISPATCH_FLOATING_TYPES(acc, "jump_bwd_sampled", [&] {
        std::vector<scalar_t> g;
        for (int64_t blk = b0; blk < b1; ++blk) {
          const BlockTile bt = open_block(p, blk, z_buf, A_acc, B_acc, W, weff, log_theta, scale, f);
          const int64_t i0 = bt.i0, b = bt.b;
          const at::Tensor &z = bt.z, &B_blk = bt.B_blk;
          if (!masked) continue;
          at::Tensor dB_blk = dB.narrow(0, i0, b);
          const at::Tensor dyT_blk = dyT.narrow(0, i0, b);
          int64_t cnt = -1;   // -1: a dense tile
          if (frac >= 0.0) {
            const int64_t cap = std::min<int64_t>(b * k, static_cast<int64_t>(frac * double(b * k)));
            if (int64_t(cols.size()) < cap + k + 16) {
              cols.resize(cap + k + 16);
              codes.resize(cap + k + 16);
              g.resize(cap + k + 16);
            }
            cnt = scan_block(z.data_ptr<scalar_t>(), b, k, static_cast<scalar_t>(th),
                             static_cast<scalar_t>(1.0 / bandwidth),
                             static_cast<scalar_t>(th - bandwidth), cap, rowptr.data(),
                             cols.data(), codes.data());
          }
          if (cnt < 0) {                                 // dense tile (f G m only when split)
            if (!t_buf.defined()) t_buf = scratch(kGTile, {p.rows, k}, opts);
            at::Tensor t = t_buf.narrow(0, 0, b);
            at::mm_out(t, dyT_blk, x_acc);                                  // dy^T x [b, k]
            th_local += grad_tile_cpu(t, t, z, log_theta, scale, f, bandwidth, at::Tensor(), 0.0,
                                      1.0, lora);                           // dL/dZ in place
            dB_blk.addmm_(t, A_acc.t());                                    // dB += dZ A^T
            if (!dA_local.defined()) {
              dA_local = dA_parts[b0].zero_();
              used_dA[b0] = 1;
            }
            dA_local.addmm_(B_blk.t(), t);                                  // dA += B^T dZ
          } else if (cnt > 0) {                          // (b), (c): sampled
            if (!dAT_local.defined()) {
              dAT_local = dAT_parts[b0].zero_();
              used_dAT[b0] = 1;
            }
            const double tsum = sampled_block(
                dyT_blk.data_ptr<scalar_t>(), xT.data_ptr<scalar_t>(), M, k, rowptr.data(),
                cols.data(), codes.data(), b, At.data_ptr<scalar_t>(), B_blk.data_ptr<scalar_t>(),
                r, static_cast<scalar_t>(scale * f), dB_blk.data_ptr<scalar_t>(),
                dAT_local.data_ptr<scalar_t>(), g.data(), cur.data());
            th_local += tsum * scale * f * th / bandwidth;
          }
        }
      });
      th_parts[b0] = th_local;
    });
  }
  double th_total = 0.0;
  for (int64_t blk = 0; blk < p.blocks; ++blk) th_total += th_parts[blk];   // fixed order
  AT_DISPATCH_FLOATING_TYPES(acc, "jump_bwd_reduce", [&] {
    scalar_t* da = dA.data_ptr<scalar_t>();
    const scalar_t* pa = dA_parts.data_ptr<scalar_t>();
    const scalar_t* pt = dAT_parts.data_ptr<scalar_t>();
    for (int64_t blk = 0; blk < p.blocks; ++blk) {   // fixed order: deterministic
      if (used_dA[blk])
        for (int64_t i = 0; i < r * k; ++i) da[i] += pa[blk * r * k + i];
      if (used_dAT[blk])
        for (int64_t j = 0; j < k; ++j)
          for (int64_t q = 0; q < r; ++q) da[q * k + j] += pt[(blk * k + j) * r + q];
    }
  });
  if (lora) {
    // (a): (1 - f) G contracted the LoRA way: Q = x A^T, P = dy B, dA += c s P^T x,
    // dB^T += c s Q^T dy, on the row kernels (cpu/skinny_rows.h; MKL took 26-155 us for each
    // of these rank-8 products at M = 256, n = 256, k = 682, several times a GEMM's rate per
    // product), M split over the threads, per-thread partials of P^T x and Q^T dy.
    const double cs = (1.0 - f) * scale;
    const at::Tensor Bt = B_acc.t().contiguous();                                   // [r, n]
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M / 64));
    const int64_t per = (M + chunks - 1) / chunks;
    at::Tensor dAa = at::zeros({chunks, r, k}, opts), dBa = at::zeros({chunks, r, n}, opts);
    // (raw offsets and the reduction below in loops: per-chunk selects and sums were a dozen
    // more ATen calls per backward)
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      AT_DISPATCH_FLOATING_TYPES(acc, "jump_bwd_lora", [&] {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t m0 = c * per, mb = std::min(per, M - m0);
          if (mb <= 0) continue;
          std::vector<scalar_t> q(mb * r), pp(mb * r);
          const scalar_t* xp = x_acc.data_ptr<scalar_t>() + m0 * k;
          const scalar_t* gp = dy_acc.data_ptr<scalar_t>() + m0 * n;
          cpu::rows_dot(q.data(), xp, k, A_acc.data_ptr<scalar_t>(), mb, r, k);     // x A^T
          cpu::rows_dot(pp.data(), gp, n, Bt.data_ptr<scalar_t>(), mb, r, n);       // dy B
          cpu::outer_acc(dAa.data_ptr<scalar_t>() + c * r * k, pp.data(), xp, k, mb, r, k);  // P^T x
          cpu::outer_acc(dBa.data_ptr<scalar_t>() + c * r * n, q.data(), gp, n, mb, r, n);   // Q^T dy
        }
      });
    });
    AT_DISPATCH_FLOATING_TYPES(acc, "jump_bwd_lora_reduce", [&] {
      const scalar_t c = static_cast<scalar_t>(cs);
      scalar_t* da = dA.data_ptr<scalar_t>();
      scalar_t* db = dB.data_ptr<scalar_t>();
      const scalar_t* pa = dAa.data_ptr<scalar_t>();
      const scalar_t* pb = dBa.data_ptr<scalar_t>();
      for (int64_t i = 0; i < r * k; ++i) {
        scalar_t v = 0;
        for (int64_t ch = 0; ch < chunks; ++ch) v += pa[ch * r * k + i];
        da[i] += c * v;
      }
      for (int64_t q = 0; q < r; ++q)
        for (int64_t j = 0; j < n; ++j) {
          scalar_t v = 0;
          for (int64_t ch = 0; ch < chunks; ++ch) v += pb[(ch * r + q) * n + j];
          db[j * r + q] += c * v;
        }
    });
  }
  at::Tensor dx = need_dx ? at::mm(grad_y, weff) : at::empty({0}, x.options());
  const double denom = mean ? static_cast<double>(n) * static_cast<double>(k) : 1.0;
  at::Tensor dlog = finish_theta(th_total, log_theta, denom);
  return {dx, dA.to(dtype), dB.to(dtype), dlog};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jump_linear_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& log_theta, double scale, double f, double bandwidth,
    bool mean, bool need_dx, bool need_adapter) {
  if (!need_adapter)
    return jump_linear_bwd_impl(grad_y, x, weight, A, B, log_theta, scale, f, bandwidth, mean,
                                need_dx, need_adapter, at::Tensor(), 0.0, 1.0);
  check_jump_linear_args(x, weight, c10::nullopt, A, B, log_theta);
  check_matrix(grad_y, "grad_y", x.size(0), weight.size(0));
  check_like(grad_y, "grad_y", weight, "weight");
  TORCH_CHECK(bandwidth > 0, "fastcur: bandwidth must be > 0, got ", bandwidth);
  return jump_linear_bwd_sampled(grad_y, x, weight, A, B, log_theta, scale, f, bandwidth, mean,
                                 need_dx);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jump_linear_ella_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& grad_ella, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B, const at::Tensor& log_theta,
    double scale, const at::Tensor& W_past, double f, double bandwidth, bool mean, bool need_dx,
    bool need_adapter, double ella_f) {
  check_w_past(W_past, weight);
  check_vector(grad_ella.reshape({-1}), "grad_ella", 1);
  return jump_linear_bwd_impl(grad_y, x, weight, A, B, log_theta, scale, f, bandwidth, mean, need_dx,
                              need_adapter, W_past.contiguous(), grad_ella.item<double>(), ella_f);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CPU, m) {
  m.impl("jump_linear", &jump_linear_cpu);
  m.impl("jump_linear_bwd", &jump_linear_bwd_cpu);
  m.impl("jump_linear_ella", &jump_linear_ella_cpu);
  m.impl("jump_linear_ella_bwd", &jump_linear_ella_bwd_cpu);
}

}  // namespace fastcur
