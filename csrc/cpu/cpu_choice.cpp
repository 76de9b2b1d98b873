// The cache of per-shape schedule choices (cpu/cpu_choice.h).
#include "cpu/cpu_choice.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "cpu/simd.h"

namespace fastcur {
namespace cpu {
namespace {

std::atomic<int>& mode_state() {
  static std::atomic<int> state{-1};   // -1: FASTCUR_CPU_SCHEDULE not read yet
  return state;
}

struct Cache {
  std::mutex mutex;
  // (op, key, isa, threads) -> choice
  std::map<std::tuple<std::string, std::string, int, int>, Choice> entries;
};

Cache& cache() {
  static Cache c;
  return c;
}

std::tuple<std::string, std::string, int, int> full_key(const std::string& op,
                                                         const std::string& key) {
  return {op, key, int(active_isa()), at::get_num_threads()};
}

}  // namespace

const char* schedule_name(Schedule s) {
  return s == Schedule::kernel ? "kernel" : s == Schedule::aten ? "aten" : "auto";
}

int parse_schedule(const char* name) {
  if (name == nullptr) return -1;
  if (!std::strcmp(name, "auto")) return int(Schedule::automatic);
  if (!std::strcmp(name, "kernel")) return int(Schedule::kernel);
  if (!std::strcmp(name, "aten")) return int(Schedule::aten);
  return -1;
}

Schedule schedule_mode() {
  int v = mode_state().load(std::memory_order_relaxed);
  if (v < 0) {
    v = std::max(0, parse_schedule(std::getenv("FASTCUR_CPU_SCHEDULE")));
    mode_state().store(v, std::memory_order_relaxed);
  }
  return Schedule(v);
}

void set_schedule_mode(Schedule s) {
  mode_state().store(int(s), std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(cache().mutex);
  cache().entries.clear();
}

std::vector<Choice> choices() {
  std::lock_guard<std::mutex> lock(cache().mutex);
  std::vector<Choice> out;
  for (const auto& kv : cache().entries) out.push_back(kv.second);
  return out;
}

int cached_choice(const std::string& op, const std::string& key) {
  const auto k = full_key(op, key);
  std::lock_guard<std::mutex> lock(cache().mutex);
  const auto it = cache().entries.find(k);
  return it == cache().entries.end() ? -1 : int(it->second.kernel);
}

void record_choice(const std::string& op, const std::string& key, bool kernel, double kernel_ms,
                   double aten_ms) {
  const auto k = full_key(op, key);
  Choice c;
  c.op = op;
  c.key = key;
  c.isa = isa_name(Isa(std::get<2>(k)));
  c.threads = std::get<3>(k);
  c.kernel = kernel;
  c.kernel_ms = kernel_ms;
  c.aten_ms = aten_ms;
  c.how = "measured";
  std::lock_guard<std::mutex> lock(cache().mutex);
  cache().entries[k] = c;
}

}  // namespace cpu
}  // namespace fastcur
