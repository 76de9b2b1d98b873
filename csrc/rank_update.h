// out += s z E^T (+ bias) through ATen, shared by the CPU kernels of cur_linear and
// jump_rank_linear and by the CUDA kernel of jump_rank_linear (the `rank_update_` primitive
// of csrc/cur_linear.h and csrc/jump_rank_linear.h).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace fastcur {

// out [M, N] += s * z [M, r] E^T (E [N, r]) (+ bias [N]) as ONE BLAS call with beta = 1: the
// bias rides along as an extra rank-1 term ([z | 1] @ [s E^T ; b]), so the epilogue reads and
// writes `out` exactly once. On the CPU a hand-written rank-r loop measured slower than MKL's
// rank-17 GEMM (AVX-512 BLAS vs baseline-ISA compiler output), and BLAS accumulates bfloat16
// in float32 as well.
inline void rank_update_addmm(at::Tensor& out, const at::Tensor& z, const at::Tensor& E,
                              const c10::optional<at::Tensor>& bias, double scale) {
  at::Tensor lhs = z, rhs = E.t().mul(scale);
  if (bias.has_value()) {
    lhs = at::cat({z, at::ones({z.size(0), 1}, z.options())}, 1);
    rhs = at::cat({rhs, bias->unsqueeze(0)}, 0);
  }
  out.addmm_(lhs, rhs);
}

}  // namespace fastcur
