// secura_linear on the CPU: ATen GEMMs (csrc/secura_linear.h) plus the SigNorm epilogue of
// csrc/cpu/signorm_cpu.h, in which Δ = s z C^T + lora_bias is formed one row block at a time
// (a small GEMM into a per-thread buffer) and never as an M x n tensor.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "secura_linear.h"
#include "signorm_cpu.h"

namespace fastcur {
namespace {

void secura_epilogue_cpu(at::Tensor& y, const c10::optional<at::Tensor>& bias, const at::Tensor& z,
                         const at::Tensor& C, const c10::optional<at::Tensor>& lora_bias,
                         double scale, double k, double eps, bool raw, bool tensor_scope,
                         at::Tensor& S) {
  const int64_t M = y.size(0), n = y.size(1);
  const at::ScalarType acc = S.scalar_type();
  // Operands of the per-block up projection, in the accumulation dtype: zs = s z [M, r],
  // Ct = C^T [r, n]; lb [n].
  const at::Tensor zs = z.to(acc).mul_(scale).contiguous();
  const at::Tensor Ct = C.t().to(acc).contiguous();
  const at::Tensor lb = lora_bias.has_value() ? lora_bias->to(acc).contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor rowmax = at::empty({M}, S.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "secura_epilogue_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* lbp = lb.defined() ? lb.data_ptr<acc_t>() : nullptr;
    auto fill = [&](int64_t m0, int64_t mb, acc_t* D) {
      at::Tensor out = at::from_blob(D, {mb, n}, S.options());
      at::mm_out(out, zs.narrow(0, m0, mb), Ct);
      if (lbp) {
        for (int64_t i = 0; i < mb; ++i)
          for (int64_t j = 0; j < n; ++j) D[i * n + j] += lbp[j];
      }
    };
    scalar_t* yp = y.data_ptr<scalar_t>();
    cpu::signorm_epilogue<scalar_t, acc_t>(yp, b.defined() ? b.data_ptr<scalar_t>() : nullptr, M, n,
                                           acc_t(k), acc_t(eps), raw, tensor_scope, fill, yp,
                                           S.data_ptr<acc_t>(), rowmax.data_ptr<acc_t>());
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> secura_linear_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& C, const at::Tensor& A_c, const at::Tensor& B_c, const at::Tensor& R,
    const c10::optional<at::Tensor>& lora_bias, double scale, double k, double eps,
    c10::string_view norm, c10::string_view scope, const c10::optional<at::Tensor>& rows,
    const c10::optional<at::Tensor>& cols) {
  return secura_linear_forward(x, weight, bias, C, A_c, B_c, R, lora_bias, scale, k, eps, norm,
                               scope, rows, cols, secura_epilogue_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
secura_linear_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& S, const at::Tensor& x,
                      const at::Tensor& weight, const at::Tensor& C, const at::Tensor& A_c,
                      const at::Tensor& B_c, const at::Tensor& R, const at::Tensor& h,
                      double scale, const c10::optional<at::Tensor>& cols, bool need_dx) {
  return secura_linear_backward(grad_y, S, x, weight, C, A_c, B_c, R, h, scale, cols, need_dx);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CPU, m) {
  m.impl("secura_linear", &secura_linear_cpu);
  m.impl("secura_linear_bwd", &secura_linear_bwd_cpu);
}

}  // namespace fastcur
