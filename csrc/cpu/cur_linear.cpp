// cur_linear on the CPU: ATen GEMMs (MKL / oneDNN) plus the gather of the tied fast path;
// the rank update is csrc/rank_update.h's single addmm.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cur_linear.h"
#include "rank_update.h"

namespace fastcur {
namespace {

// out[m, q] = src[m, idx[q]]: the tied fast path's gather of r columns from a GEMM output.
at::Tensor gather_columns_cpu(const at::Tensor& src_in, const at::Tensor& idx_in) {
  const at::Tensor src = src_in.contiguous();
  const at::Tensor idx = idx_in.contiguous();
  const int64_t M = src.size(0), N = src.size(1), r = idx.size(0);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t q = 0; q < r; ++q) {
    TORCH_CHECK(ip[q] >= 0 && ip[q] < N, "fastcur: index ", ip[q], " at position ", q,
                " is out of range for a dimension of size ", N);
  }
  at::Tensor out = at::empty({M, r}, src.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "gather_columns", [&] {
    const scalar_t* sp = src.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, 256, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t* row = sp + m * N;
        for (int64_t q = 0; q < r; ++q) op[m * r + q] = row[ip[q]];
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cur_linear_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& C, const at::Tensor& U, const at::Tensor& R, double scale,
    const c10::optional<at::Tensor>& rows, const c10::optional<at::Tensor>& cols) {
  return cur_linear_forward(x, weight, bias, C, U, R, scale, rows, cols, gather_columns_cpu,
                            rank_update_addmm);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cur_linear_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& C,
    const at::Tensor& U, const at::Tensor& R, const at::Tensor& h, double scale,
    const c10::optional<at::Tensor>& cols, bool need_dx) {
  return cur_linear_backward(grad_y, x, weight, C, U, R, h, scale, cols, need_dx,
                             gather_columns_cpu, rank_update_addmm);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CPU, m) {
  m.impl("cur_linear", &cur_linear_cpu);
  m.impl("cur_linear_bwd", &cur_linear_bwd_cpu);
}

}  // namespace fastcur
