// Row-block kernels for the low-rank products of the adapters on the CPU, a block of `mb` rows
// of an activation at a time (row strides ldx / ldo; the small operands contiguous):
//   rows_dot    (out [mb, r], X, V [r, n]):      out[m, j] = Σ_c X[m, c] V[j, c]     (X V^T)
//   outer_acc   (acc [r, n], coef [mb, r], X):   acc[j, :] += Σ_m coef[m, j] X[m, :] (coef^T X)
//   small_k_rows(out, lhs [mb, K], rhs [K, n]):  out[m, :] = Σ_j lhs[m, j] rhs[j, :]  (lhs rhs)
//   narrow_rows (out [mb, r], X, Vt [n, r]):     out[m, :] = Σ_c X[m, c] Vt[c, :]     (X Vt)
//                r a multiple of cpu::vector_lanes<T> (cpu/simd.h: 16 floats, 8 doubles;
//                a level with narrower vectors takes the group in two or four passes)
//   narrow_pass (H [mb, r], D [n, r], X, Vt [n, r], coef [mb, r], add):   one pass over X
//                for H = X Vt and D = X^T coef (added to D when `add`); r as for narrow_rows
//   outer_square_acc (F [r, n], coef [mb, r], X, s):
//                F[j, :] += s (Σ_m coef[m, j] X[m, :])^2      (s (coef^T X)^2, elementwise)
//   outer_strip_acc  (F [r, n], coef [mb, r], X, add):
//                F[j, :] = Σ_m coef[m, j] X[m, :]  (added to F when `add`)
//   The last two sum a strip of columns over all mb rows in registers: for X in cache (the
//   strips read X across rows), where outer_acc streams X's rows in order from memory.
// r and K are small (an adapter's rank; + 1 when a bias rides along as a column of ones).
// small_k_rows skips coefficients that are exactly 0, outer_acc tiles whose coefficients all are
// (gated-off channels).
//
// Why not ATen/MKL GEMMs per block: rows_dot and outer_acc stream X's rows in order, which
// the hardware prefetchers follow when X comes from memory (measured on 64 x 2048 blocks in
// a layer: 70 us against 91 us for MKL's X V^T, 56 us against 97 us for its coef^T X; with X
// already in L2, MKL's coef^T X is 2x faster, so it stays where that holds); MKL's small-K
// product writing into freshly allocated (not yet faulted-in) pages measured 200 us per
// block against 23 us into warm ones, small_k_rows 22-28 us into either. The narrow kernels
// keep a row's r channels in vectors and broadcast X's elements (no lane sums, unlike
// rows_dot), and the strip kernels keep a strip of the product in registers over all rows;
// on the Fisher's 128 x 1024 examples at r = 16 they run at about 150 GFLOP/s per thread,
// near MKL's big GEMMs (cpu/lalora.cpp). Each kernel is built for x86-64-v4 (AVX-512, 64-byte
// vectors), x86-64-v3 (AVX2 + FMA, 32-byte) and the baseline (SSE2, 16-byte), with register
// tiles sized for each level's register file, and the level is picked at run time
// (cpu/simd.h: the CPU's highest, or FASTCUR_CPU_ISA), although the extension is built for
// the baseline; every level is checked by tests/test_cpu_row_kernels_isa.py. The ops on these
// kernels choose per shape between them and their ATen formulation (cpu/cpu_choice.h).
#pragma once

#include <cstdint>

namespace fastcur {
namespace cpu {

void rows_dot(float* out, const float* X, int64_t ldx, const float* V, int64_t mb, int64_t r,
              int64_t n);
void rows_dot(double* out, const double* X, int64_t ldx, const double* V, int64_t mb, int64_t r,
              int64_t n);
void outer_acc(float* acc, const float* coef, const float* X, int64_t ldx, int64_t mb, int64_t r,
               int64_t n);
void outer_acc(double* acc, const double* coef, const double* X, int64_t ldx, int64_t mb,
               int64_t r, int64_t n);
void narrow_rows(float* out, const float* X, int64_t ldx, const float* Vt, int64_t mb, int64_t r,
                 int64_t n);
void narrow_rows(double* out, const double* X, int64_t ldx, const double* Vt, int64_t mb,
                 int64_t r, int64_t n);
void narrow_pass(float* H, float* D, const float* X, int64_t ldx, const float* Vt,
                 const float* coef, int64_t mb, int64_t r, int64_t n, bool add);
void narrow_pass(double* H, double* D, const double* X, int64_t ldx, const double* Vt,
                 const double* coef, int64_t mb, int64_t r, int64_t n, bool add);
void outer_square_acc(float* F, const float* coef, const float* X, int64_t ldx, int64_t mb,
                      int64_t r, int64_t n, float s);
void outer_square_acc(double* F, const double* coef, const double* X, int64_t ldx, int64_t mb,
                      int64_t r, int64_t n, double s);
void outer_strip_acc(float* F, const float* coef, const float* X, int64_t ldx, int64_t mb,
                     int64_t r, int64_t n, bool add);
void outer_strip_acc(double* F, const double* coef, const double* X, int64_t ldx, int64_t mb,
                     int64_t r, int64_t n, bool add);
void small_k_rows(float* out, int64_t ldo, const float* lhs, const float* rhs, int64_t mb,
                  int64_t K, int64_t n);
void small_k_rows(double* out, int64_t ldo, const double* lhs, const double* rhs, int64_t mb,
                  int64_t K, int64_t n);

}  // namespace cpu
}  // namespace fastcur
