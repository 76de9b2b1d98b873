// Schemas of every fastcur op, and the Python module init of `fastcur._C`.
//
// Kernels register per device in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; fake (meta)
// kernels and autograd are registered once, in Python (python/fastcur/ops/_registry.py).
// The Python module exposes build facts only, never ops: ops go through torch.ops.fastcur.
#include <torch/extension.h>

#include <string>

#include "cpu/cpu_choice.h"
#include "cpu/simd.h"

TORCH_LIBRARY(fastcur, m) {
  // y = x W^T + b + scale * ((x R^T) U^T) C^T, and h = x R^T (saved for the backward).
  // x [M, k], weight [n, k], bias [n]?, C [n, r], U [r, r], R [r, k].
  // rows/cols [r] int64: when given, the caller promises R == weight[rows] and
  // C == weight[:, cols] (the tied fast path of docs/methods.md, CURLoRA): x R^T is gathered from x W^T.
  m.def(
      "cur_linear(Tensor x, Tensor weight, Tensor? bias, Tensor C, Tensor U, Tensor R, "
      "float scale, Tensor? rows, Tensor? cols) -> (Tensor, Tensor)");
  // Returns (dx [M, k] or an empty tensor when need_dx is false, dU [r, r], g = dy C [M, r]).
  // cols: tied fast path, dy C is gathered from dy W (only when need_dx).
  m.def(
      "cur_linear_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor C, Tensor U, Tensor R, "
      "Tensor h, float scale, Tensor? cols, bool need_dx) -> (Tensor, Tensor, Tensor)");

  // SECURA (docs/methods.md, SECURA). signorm: y = (2 y0 + delta) / S; returns (y [M, n], rowmax [M]), the row
  // maxima of L = |delta| / (|y0| + eps) (float32; float64 for float64), which the backward
  // uses to recompute S. norm: "max" | "raw"; scope: "token" | "tensor".
  m.def("signorm(Tensor y0, Tensor delta, float k, float eps, str norm, str scope) -> (Tensor, Tensor)");
  // (dy0, ddelta) = (2 dy / S, dy / S).
  m.def(
      "signorm_bwd(Tensor grad_y, Tensor y0, Tensor delta, Tensor rowmax, float k, float eps, "
      "str norm, str scope) -> (Tensor, Tensor)");
  // y = signorm(x W^T + b, scale (((x R^T) B_c) A_c) C^T + lora_bias); returns (y [M, n],
  // S [M, n] float32/float64, h = x R^T [M, r]). x [M, k], weight [n, k], C [n, r],
  // A_c [a, r], B_c [r, a], R [r, k]. rows, cols: the tied fast path (R == weight[rows],
  // C == weight[:, cols]); the forward uses rows, cols only travels to the backward.
  m.def(
      "secura_linear(Tensor x, Tensor weight, Tensor? bias, Tensor C, Tensor A_c, Tensor B_c, "
      "Tensor R, Tensor? lora_bias, float scale, float k, float eps, str norm, str scope, "
      "Tensor? rows, Tensor? cols) -> (Tensor, Tensor, Tensor)");
  // Returns (dx [M, k] or empty, dDelta = dy / S [M, n], z [M, r], dA_c [a, r], dB_c [r, a],
  // dh [M, r]). cols: tied fast path (C == weight[:, cols]), used when need_dx.
  m.def(
      "secura_linear_bwd(Tensor grad_y, Tensor S, Tensor x, Tensor weight, Tensor C, Tensor A_c, "
      "Tensor B_c, Tensor R, Tensor h, float scale, Tensor? cols, bool need_dx) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // (2 W + ΔW) / S_w with ΔW = scale C U R, never materialized; scope: "row" | "tensor".
  m.def(
      "signorm_merge(Tensor weight, Tensor C, Tensor U, Tensor R, float scale, float k, "
      "float eps, str scope) -> Tensor");
  // LaLoRA (docs/methods.md, LaLoRA). x [E, T, k], grad_out [E, T, n], A [r, k], B [n, r] ->
  // (F_A [r, k], F_B [n, r]): sums over examples of squared per-example gradients, float32
  // (float64 for float64 inputs).
  m.def("lora_fisher_diag(Tensor x, Tensor grad_out, Tensor A, Tensor B, float scale) -> (Tensor, Tensor)");
  // (lam/2) sum_i sum precisions[i] * (params[i] - anchors[i])^2, a 0-dim tensor of params' dtype.
  m.def("laplace_diag_penalty(Tensor[] params, Tensor[] anchors, Tensor[] precisions, float lam) -> Tensor");
  // The same value; also grads[i] += lam * precisions[i] * (params[i] - anchors[i]), one launch.
  m.def(
      "laplace_diag_penalty_grad_(Tensor(a!)[] grads, Tensor[] params, Tensor[] anchors, "
      "Tensor[] precisions, float lam) -> Tensor");
  // x [M, d] -> x^T x [d, d] (diagonal: [d]), float32 (float64 for float64 x).
  m.def("kfac_factor(Tensor x, bool diagonal) -> Tensor");
  // tr(G delta S delta^T); delta [a, b], S [b, b] or [b] (diagonal), G [a, a] or [a].
  m.def("kfac_penalty(Tensor delta, Tensor S, Tensor G) -> Tensor");
  // grad * (G delta S + G^T delta S^T) [a, b].
  m.def("kfac_penalty_bwd(Tensor grad, Tensor delta, Tensor S, Tensor G) -> Tensor");
  // JumpLoRA (docs/methods.md, JumpLoRA). x [M, k], weight [n, k], bias [n]?, A [r, k], B [n, r].
  // Weight-gated: y = x (W + ΔW)^T + b, ΔW = scale (f J(B A) + (1 - f) B A), log_theta [].
  m.def(
      "jump_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor log_theta, "
      "float scale, float f, float bandwidth, bool mean) -> Tensor");
  // Returns (dx [M, k] or empty when need_dx is false, dA [r, k], dB [n, r], dlog_theta);
  // mean: the straight-through θ term is averaged over the n k entries (else summed);
  // bandwidth and mean ride along in the forward's schema only for autograd to see them.
  // need_adapter false: only dx is computed (dA, dB, dlog_theta come back as zeros).
  m.def(
      "jump_linear_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor A, Tensor B, "
      "Tensor log_theta, float scale, float f, float bandwidth, bool mean, bool need_dx, "
      "bool need_adapter) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // jump_linear with its autograd formula as a C++ node (csrc/jump_linear_eager.cpp): what eager
  // calls that need a grad run; torch.compile and torch.func keep jump_linear's registered one.
  m.def(
      "jump_linear_eager(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, "
      "Tensor log_theta, float scale, float f, float bandwidth, bool mean) -> Tensor");
  // Weight-gated with ELLA fused: (y, ‖D ⊙ W_past‖²) from the same Z tiles, ELLA's delta
  // D = scale (ella_f J(Z) + (1 - ella_f) Z) (ella_f = f: "interpolated", 1: "masked"); the
  // backward adds grad_ella times ELLA's dL/dZ (hard mask: nothing to θ) into each tile's dL/dZ
  // before the one contraction with A and B. grad_ella [].
  m.def(
      "jump_linear_ella(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor log_theta, "
      "float scale, Tensor W_past, float f, float bandwidth, bool mean, float ella_f) -> (Tensor, Tensor)");
  m.def(
      "jump_linear_ella_bwd(Tensor grad_y, Tensor grad_ella, Tensor x, Tensor weight, Tensor A, "
      "Tensor B, Tensor log_theta, float scale, Tensor W_past, float f, float bandwidth, bool mean, "
      "bool need_dx, bool need_adapter, float ella_f) -> (Tensor, Tensor, Tensor, Tensor)");
  // Rank-gated: y = x W^T + b + scale g B^T, g = h 1[h > θ_j], h = x A^T; log_theta [r].
  // Returns (y, h) (h saved for the backward).
  m.def(
      "jump_rank_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, "
      "Tensor log_theta, float scale, float bandwidth) -> (Tensor, Tensor)");
  // Returns (dx or empty, dA, dB, dlog_theta [r]).
  m.def(
      "jump_rank_linear_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor A, Tensor B, "
      "Tensor log_theta, Tensor h, float scale, float bandwidth, bool need_dx) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // ELLA: ‖scale (f J(Z) + (1 - f) Z) ⊙ W_past‖², Z = B A, W_past [n, k], hard mask (f = 1:
  // the masked delta); bwd returns (dA, dB) times grad.
  m.def("ella_penalty(Tensor A, Tensor B, Tensor log_theta, Tensor W_past, float scale, float f) -> Tensor");
  m.def(
      "ella_penalty_bwd(Tensor grad, Tensor A, Tensor B, Tensor log_theta, Tensor W_past, "
      "float scale, float f) -> (Tensor, Tensor)");
  // IMSM (docs/methods.md, IMSM). h, h_tuned [B, T, d], q, q_tuned [B, d], W_A [4d, r], W_B [r, d],
  // hidden_mask [B, T, r]? (gate dropout on the r-wide hidden, pre-scaled). Returns
  // (h' + g (h - h') [B, T, d], z [B, T, r]: the masked hidden, float32/float64, for the backward).
  m.def(
      "imsm_gate(Tensor h, Tensor h_tuned, Tensor q, Tensor q_tuned, Tensor W_A, Tensor W_B, "
      "Tensor? hidden_mask) -> (Tensor, Tensor)");
  // Returns (dh or empty when need_h is false, dh_tuned or empty, dq, dq_tuned, dW_A, dW_B).
  m.def(
      "imsm_gate_bwd(Tensor grad, Tensor h, Tensor h_tuned, Tensor q, Tensor q_tuned, Tensor W_A, "
      "Tensor W_B, Tensor? hidden_mask, Tensor z, bool need_h, bool need_h_tuned) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef FASTCUR_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(FASTCUR_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
  return info;
}

// The x86-64 level the CPU row kernels run at (cpu/simd.h): active, the CPU's highest, and
// whether each level was built.
pybind11::dict cpu_isa() {
  namespace c = fastcur::cpu;
  pybind11::dict info;
  info["active"] = std::string(c::isa_name(c::active_isa()));
  info["cpu_max"] = std::string(c::isa_name(c::cpu_max_isa()));
  info["clones"] = bool(FASTCUR_HAS_CPU_CLONES);
  const char* env = std::getenv("FASTCUR_CPU_ISA");
  info["env"] = env ? pybind11::object(pybind11::str(env)) : pybind11::none();
  return info;
}

bool set_cpu_isa(const std::string& name) {
  const int v = fastcur::cpu::parse_isa(name.c_str());
  TORCH_CHECK(v >= 0, "fastcur: unknown x86-64 level '", name, "' (avx512, avx2 or baseline)");
  return fastcur::cpu::set_active_isa(fastcur::cpu::Isa(v));
}

// Per-shape kernel / ATen choices of the CPU ops (cpu/cpu_choice.h).
pybind11::dict cpu_schedule() {
  namespace c = fastcur::cpu;
  pybind11::dict info;
  info["mode"] = std::string(c::schedule_name(c::schedule_mode()));
  pybind11::list entries;
  for (const auto& ch : c::choices()) {
    pybind11::dict e;
    e["op"] = ch.op;
    e["key"] = ch.key;
    e["isa"] = ch.isa;
    e["threads"] = ch.threads;
    e["choice"] = std::string(ch.kernel ? "kernel" : "aten");
    e["kernel_ms"] = ch.kernel_ms;
    e["aten_ms"] = ch.aten_ms;
    e["how"] = ch.how;
    entries.append(e);
  }
  info["choices"] = entries;
  return info;
}

void set_cpu_schedule(const std::string& mode) {
  const int v = fastcur::cpu::parse_schedule(mode.c_str());
  TORCH_CHECK(v >= 0, "fastcur: unknown CPU schedule mode '", mode, "' (auto, kernel or aten)");
  fastcur::cpu::set_schedule_mode(fastcur::cpu::Schedule(v));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcur C++/CUDA kernels; ops are registered under torch.ops.fastcur";
  m.def("build_info", &build_info, "What this extension was built with");
  m.def("cpu_isa", &cpu_isa, "The x86-64 level the CPU row kernels run at");
  m.def("set_cpu_isa", &set_cpu_isa, "Run the CPU row kernels at a level (False: not here)");
  m.def("cpu_schedule", &cpu_schedule, "The CPU ops' per-shape kernel / ATen choices");
  m.def("set_cpu_schedule", &set_cpu_schedule, "auto, kernel or aten; forgets the choices");
}
