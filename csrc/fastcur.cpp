// Schemas of every fastcur op, and the Python module init of `fastcur._C`.
//
// Kernels register per device in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; fake (meta)
// kernels and autograd are registered once, in Python (python/fastcur/ops/_registry.py).
// The Python module exposes build facts only, never ops: ops go through torch.ops.fastcur.
#include <torch/extension.h>

#include <string>

TORCH_LIBRARY(fastcur, m) {
  // y = x W^T + b + scale * ((x R^T) U^T) C^T, and h = x R^T (saved for the backward).
  // x [M, k], weight [n, k], bias [n]?, C [n, r], U [r, r], R [r, k].
  // rows/cols [r] int64: when given, the caller promises R == weight[rows] and
  // C == weight[:, cols] (the tied fast path of SPEC §2): x R^T is gathered from x W^T.
  m.def(
      "cur_linear(Tensor x, Tensor weight, Tensor? bias, Tensor C, Tensor U, Tensor R, "
      "float scale, Tensor? rows, Tensor? cols) -> (Tensor, Tensor)");
  // Returns (dx [M, k] or an empty tensor when need_dx is false, dU [r, r], g = dy C [M, r]).
  // cols: tied fast path, dy C is gathered from dy W (only when need_dx).
  m.def(
      "cur_linear_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor C, Tensor U, Tensor R, "
      "Tensor h, float scale, Tensor? cols, bool need_dx) -> (Tensor, Tensor, Tensor)");

  // JumpLoRA (SPEC §4). x [M, k], weight [n, k], bias [n]?, A [r, k], B [n, r].
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
  // ELLA: ‖scale J(B A) ⊙ W_past‖², W_past [n, k], hard mask; bwd returns (dA, dB) times grad.
  m.def("ella_penalty(Tensor A, Tensor B, Tensor log_theta, Tensor W_past, float scale) -> Tensor");
  m.def(
      "ella_penalty_bwd(Tensor grad, Tensor A, Tensor B, Tensor log_theta, Tensor W_past, "
      "float scale) -> (Tensor, Tensor)");
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcur C++/CUDA kernels; ops are registered under torch.ops.fastcur";
  m.def("build_info", &build_info, "What this extension was built with");
}
