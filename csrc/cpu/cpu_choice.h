// Per-shape choice between a hand-written CPU schedule (the row kernels of cpu/skinny_rows.h at
// the active x86-64 level) and the ATen formulation of the same op (batched / whole-matrix
// GEMMs), as autotuners do: on the first call for a key (op, shapes and dtype, x86-64 level,
// threads) both run, alternately, a few times; the faster by median is cached and runs from
// then on. So an op is never slower than its ATen formulation by more than the measurement's
// noise, on any level, where the row kernels were tuned on AVX-512 and lose on some shapes
// elsewhere. FASTCUR_CPU_SCHEDULE (auto | kernel | aten, read at first use) or
// set_schedule_mode() forces one side (tests check both sides against the reference);
// choices() lists what was decided and how, for `fastcur info`.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace fastcur {
namespace cpu {

enum class Schedule : int { automatic = 0, kernel = 1, aten = 2 };

const char* schedule_name(Schedule s);
int parse_schedule(const char* name);   // -1 when unknown
Schedule schedule_mode();               // FASTCUR_CPU_SCHEDULE at first use, else automatic
void set_schedule_mode(Schedule s);     // also forgets the measured choices

struct Choice {
  std::string op, key, isa;
  int threads = 0;
  bool kernel = false;
  double kernel_ms = 0.0, aten_ms = 0.0;   // medians of the timed runs (0 when forced)
  std::string how;                          // "measured" or "forced (...)"
};

std::vector<Choice> choices();
// The cached decision for (op, key) at the active level and thread count: 1 kernel, 0 ATen,
// -1 not decided yet. Not consulted when a mode forces a side.
int cached_choice(const std::string& op, const std::string& key);
void record_choice(const std::string& op, const std::string& key, bool kernel, double kernel_ms,
                   double aten_ms);

// Timed calls per side on a miss, after one untimed call each.
constexpr int kChoiceRuns = 3;

// Runs op `op` at `key` on the kernel or the ATen side (see above) and returns its result.
template <typename R>
R choose(const std::string& op, const std::string& key, const std::function<R()>& kernel,
         const std::function<R()>& aten) {
  const Schedule mode = schedule_mode();
  if (mode == Schedule::kernel) return kernel();
  if (mode == Schedule::aten) return aten();
  const int cached = cached_choice(op, key);
  if (cached >= 0) return cached ? kernel() : aten();
  using clock = std::chrono::steady_clock;
  auto ms = [](clock::time_point a, clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
  };
  R kr = kernel();   // untimed: first-touch of buffers, caches, thread pool
  R ar = aten();
  std::vector<double> tk, ta;
  for (int i = 0; i < kChoiceRuns; ++i) {   // alternating: a load change hits both sides
    auto t0 = clock::now();
    kr = kernel();
    auto t1 = clock::now();
    ar = aten();
    auto t2 = clock::now();
    tk.push_back(ms(t0, t1));
    ta.push_back(ms(t1, t2));
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double mk = median(tk), ma = median(ta);
  const bool use_kernel = mk <= ma;
  record_choice(op, key, use_kernel, mk, ma);
  return use_kernel ? kr : ar;
}

}  // namespace cpu
}  // namespace fastcur
