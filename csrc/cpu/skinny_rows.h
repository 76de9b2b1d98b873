// out[m, :] = Σ_j lhs[m, j] rhs[j, :] for a block of `mb` rows, K small (an adapter's rank, + 1
// when a bias rides along as a column of ones): the writer of the low-rank term into a block
// of a layer's output or input gradient. Coefficients that are exactly 0 (gated-off channels)
// are skipped. `out` rows have stride `ldo`; lhs [mb, K] and rhs [K, n] are contiguous.
//
// Why not an ATen/MKL GEMM per block: MKL's small-K product writing into freshly allocated
// (not yet faulted-in) pages measured 200 us per 64 x 2048 block against 23 us into warm
// ones; this writer, 22 us into either. The loop is cloned for x86-64-v4 (AVX-512) and
// x86-64-v3 (AVX2 + FMA) with a run-time pick (GCC target_clones), so it vectorizes wide
// although the extension is built for the baseline ISA.
#pragma once

#include <cstdint>

namespace fastcur {
namespace cpu {

void small_k_rows(float* out, int64_t ldo, const float* lhs, const float* rhs, int64_t mb,
                  int64_t K, int64_t n);
void small_k_rows(double* out, int64_t ldo, const double* lhs, const double* rhs, int64_t mb,
                  int64_t K, int64_t n);

}  // namespace cpu
}  // namespace fastcur
