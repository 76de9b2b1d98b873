// The CPU row kernels (csrc/cpu/skinny_rows.cpp) against a float64 loop, on sizes that reach
// every register tile and every tail. tests/test_cpu_row_kernels_isa.py compiles this file for
// each x86-64 level the machine runs (baseline SSE2, AVX2, AVX-512) with the run-time clone
// pick switched off, so each level's code is checked, not only the one this CPU would pick;
// and once as the extension builds it (all levels, picked at run time), forcing each level
// the CPU runs in turn (cpu/simd.h: set_active_isa).
// Exit status 0 when every result is within tolerance; the worst errors are printed.
#include "cpu/skinny_rows.cpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using fastcur::cpu::narrow_pass;
using fastcur::cpu::narrow_rows;
using fastcur::cpu::outer_acc;
using fastcur::cpu::outer_square_acc;
using fastcur::cpu::outer_strip_acc;
using fastcur::cpu::rows_dot;
using fastcur::cpu::small_k_rows;
using fastcur::cpu::vector_lanes;

double rel(double want, double got) { return std::abs(want - got) / (1.0 + std::abs(want)); }

// Max relative error over the kernels for mb rows, r channels, n columns (row strides
// past n, some coefficients exactly 0).
template <typename T>
double worst_error(int64_t mb, int64_t r, int64_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal;
  const int64_t ldx = n + 3, ldo = n + 5;
  std::vector<T> X(mb * ldx), V(r * n), out(mb * r), coef(mb * r), acc(r * n), lhs(mb * r),
      rows(mb * ldo);
  for (auto& v : X) v = static_cast<T>(normal(gen));
  for (auto& v : V) v = static_cast<T>(normal(gen));
  for (auto& v : acc) v = static_cast<T>(normal(gen));
  for (auto& v : coef) v = normal(gen) > 0.3 ? static_cast<T>(normal(gen)) : T(0);
  for (auto& v : lhs) v = normal(gen) > -0.5 ? static_cast<T>(normal(gen)) : T(0);
  const std::vector<T> acc0 = acc;
  double err = 0.0;

  rows_dot(out.data(), X.data(), ldx, V.data(), mb, r, n);
  for (int64_t m = 0; m < mb; ++m)
    for (int64_t j = 0; j < r; ++j) {
      double want = 0.0;
      for (int64_t c = 0; c < n; ++c) want += double(X[m * ldx + c]) * double(V[j * n + c]);
      err = std::max(err, rel(want, out[m * r + j]));
    }

  outer_acc(acc.data(), coef.data(), X.data(), ldx, mb, r, n);
  for (int64_t j = 0; j < r; ++j)
    for (int64_t c = 0; c < n; ++c) {
      double want = acc0[j * n + c];
      for (int64_t m = 0; m < mb; ++m) want += double(coef[m * r + j]) * double(X[m * ldx + c]);
      err = std::max(err, rel(want, acc[j * n + c]));
    }

  small_k_rows(rows.data(), ldo, lhs.data(), V.data(), mb, r, n);
  for (int64_t m = 0; m < mb; ++m)
    for (int64_t c = 0; c < n; ++c) {
      double want = 0.0;
      for (int64_t j = 0; j < r; ++j) want += double(lhs[m * r + j]) * double(V[j * n + c]);
      err = std::max(err, rel(want, rows[m * ldo + c]));
    }

  if (r % vector_lanes<T> == 0) {
    std::vector<T> Vt(n * r);
    for (int64_t j = 0; j < r; ++j)
      for (int64_t c = 0; c < n; ++c) Vt[c * r + j] = V[j * n + c];
    std::fill(out.begin(), out.end(), T(-7));
    narrow_rows(out.data(), X.data(), ldx, Vt.data(), mb, r, n);
    for (int64_t m = 0; m < mb; ++m)
      for (int64_t j = 0; j < r; ++j) {
        double want = 0.0;
        for (int64_t c = 0; c < n; ++c) want += double(X[m * ldx + c]) * double(V[j * n + c]);
        err = std::max(err, rel(want, out[m * r + j]));
      }
    for (const bool add : {false, true}) {   // D overwritten, then added to
      std::vector<T> D(n * r, T(-7));
      std::fill(out.begin(), out.end(), T(-7));
      narrow_pass(out.data(), D.data(), X.data(), ldx, Vt.data(), coef.data(), mb, r, n, add);
      for (int64_t m = 0; m < mb; ++m)
        for (int64_t j = 0; j < r; ++j) {
          double want = 0.0;
          for (int64_t c = 0; c < n; ++c) want += double(X[m * ldx + c]) * double(V[j * n + c]);
          err = std::max(err, rel(want, out[m * r + j]));
        }
      for (int64_t c = 0; c < n; ++c)
        for (int64_t j = 0; j < r; ++j) {
          double want = add ? -7.0 : 0.0;
          for (int64_t m = 0; m < mb; ++m) want += double(X[m * ldx + c]) * double(coef[m * r + j]);
          err = std::max(err, rel(want, D[c * r + j]));
        }
    }
  }

  const T s = T(0.7);
  std::vector<T> F = acc0;
  outer_square_acc(F.data(), coef.data(), X.data(), ldx, mb, r, n, s);
  for (int64_t j = 0; j < r; ++j)
    for (int64_t c = 0; c < n; ++c) {
      double g = 0.0;
      for (int64_t m = 0; m < mb; ++m) g += double(coef[m * r + j]) * double(X[m * ldx + c]);
      err = std::max(err, rel(double(acc0[j * n + c]) + double(s) * g * g, F[j * n + c]));
    }

  for (const bool add : {false, true}) {
    std::vector<T> S = acc0;
    outer_strip_acc(S.data(), coef.data(), X.data(), ldx, mb, r, n, add);
    for (int64_t j = 0; j < r; ++j)
      for (int64_t c = 0; c < n; ++c) {
        double want = add ? double(acc0[j * n + c]) : 0.0;
        for (int64_t m = 0; m < mb; ++m) want += double(coef[m * r + j]) * double(X[m * ldx + c]);
        err = std::max(err, rel(want, S[j * n + c]));
      }
  }
  return err;
}

}  // namespace

// Every level's kernels over the grid; returns 0 when all are within tolerance.
int check_all(const char* level) {
  double worst_f = 0.0, worst_d = 0.0;
  unsigned seed = 1;
  // rows: tiles of 16, 12, 8, 4, 2 and single rows, and none; channels: tiles of 16, 8, 4, 2,
  // 1 and groups of one vector (r = 8 for double, 16 and 32 for both); columns: vector steps
  // and tails.
  for (int64_t mb : {0, 1, 2, 3, 5, 8, 11, 17, 35})
    for (int64_t r : {1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 17, 21, 32})
      for (int64_t n : {0, 1, 7, 15, 16, 17, 33, 100}) {
        worst_f = std::max(worst_f, worst_error<float>(mb, r, n, seed++));
        worst_d = std::max(worst_d, worst_error<double>(mb, r, n, seed++));
      }
  std::printf("%s: worst relative error: float %.3g, double %.3g\n", level, worst_f, worst_d);
  return worst_f < 1e-4 && worst_d < 1e-12 ? 0 : 1;
}

int main() {
#if FASTCUR_HAS_CPU_CLONES
  // Built with the run-time pick: each level's build the CPU runs, forced in turn.
  using fastcur::cpu::Isa;
  int rc = 0, ran = 0;
  for (Isa isa : {Isa::baseline, Isa::avx2, Isa::avx512}) {
    if (!fastcur::cpu::set_active_isa(isa)) continue;
    if (fastcur::cpu::active_isa() != isa) return 2;
    rc |= check_all(fastcur::cpu::isa_name(isa));
    ++ran;
  }
  return ran == 0 ? 3 : rc;
#else
  return check_all("this build's -march");
#endif
}
