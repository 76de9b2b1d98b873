// secura_linear on the CPU: ATen GEMMs (csrc/secura_linear.h) plus the SigNorm epilogue of
// csrc/cpu/signorm_cpu.h, in which Δ = s z C^T + lora_bias is formed one row at a time and
// never as an M x n tensor. float32 runs the fused, vectorized epilogue (Δ's row by the rank-r
// product on the fly, ratios, row max, sigmoid, S and the output in two passes over L1-resident
// row buffers); the other dtypes the generic block epilogue.
//
// The tied indices are checked here, not trusted: `rows` is used only while R == W[rows] holds
// exactly, `cols` only while C == W[:, cols] (r (n + k) comparisons, no copies), else the
// explicit C, R path runs. So a module may pass them while W's storage and version are
// unchanged, even after a write through `weight.data` that the version counter misses.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <string>

#include "secura_linear.h"
#include "signorm_cpu.h"

namespace fastcur {
namespace {

// Index `idx` [r] (int64, already checked by check_index) as rows (dim 0) or columns (dim 1)
// of W; an index outside W raises.
void check_range(const at::Tensor& idx, const char* name, int64_t size) {
  const at::Tensor c = idx.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  for (int64_t t = 0; t < c.numel(); ++t)
    TORCH_CHECK(p[t] >= 0 && p[t] < size, "fastcur: ", name, " index ", p[t],
                " is out of range for a weight dimension of size ", size);
}

// True when S == W's slice along `dim` at `idx` exactly (torch.equal's test): dim 0, S = R
// [r, k] against W[idx]; dim 1, S = C [n, r] against W[:, idx].
bool slice_exact(const at::Tensor& W, const at::Tensor& S, const at::Tensor& idx, int dim) {
  const at::Tensor ic = idx.contiguous();
  const int64_t* p = ic.data_ptr<int64_t>();
  const int64_t r = ic.numel(), other = W.size(1 - dim);
  const int64_t ws_i = W.stride(dim), ws_o = W.stride(1 - dim);
  // S's stride along the index dimension and along the other one.
  const int64_t ss_i = S.stride(dim), ss_o = S.stride(1 - dim);
  bool exact = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), "secura_slice_exact", [&] {
    const scalar_t* w = W.data_ptr<scalar_t>();
    const scalar_t* s = S.data_ptr<scalar_t>();
    for (int64_t t = 0; t < r && exact; ++t) {
      const scalar_t* wr = w + p[t] * ws_i;
      const scalar_t* sr = s + t * ss_i;
      for (int64_t j = 0; j < other; ++j) {
        if (!(wr[j * ws_o] == sr[j * ss_o])) {
          exact = false;
          break;
        }
      }
    }
  });
  return exact;
}

// The index kept only where the slice it promises is exact.
c10::optional<at::Tensor> verified(const c10::optional<at::Tensor>& idx, const char* name,
                                   const at::Tensor& W, const at::Tensor& S, int dim, int64_t r) {
  if (!idx.has_value()) return idx;
  check_index(idx, name, r, W);
  check_range(*idx, name, W.size(dim));
  return slice_exact(W, S, *idx, dim) ? idx : c10::optional<at::Tensor>();
}

void secura_epilogue_cpu(at::Tensor& y, const c10::optional<at::Tensor>& bias, const at::Tensor& z,
                         const at::Tensor& C, const c10::optional<at::Tensor>& lora_bias,
                         double scale, double k, double eps, bool raw, bool tensor_scope,
                         at::Tensor& S) {
  const int64_t M = y.size(0), n = y.size(1);
  const at::ScalarType acc = S.scalar_type();
  // Operands of the up projection, in the accumulation dtype: zs = s z [M, r], Ct = C^T [r, n];
  // lb [n].
  const at::Tensor zs = z.to(acc).mul(scale).contiguous();
  const at::Tensor Ct = C.t().to(acc).contiguous();
  const at::Tensor lb = lora_bias.has_value() ? lora_bias->to(acc).contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor rowmax = at::empty({M}, S.options());
  if (y.scalar_type() == at::kFloat) {
    cpu::F32Delta d;
    d.zs = zs.data_ptr<float>();
    d.Ct = Ct.data_ptr<float>();
    d.r = z.size(1);
    d.lb = lb.defined() ? lb.data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    cpu::signorm_epilogue_f32(yp, b.defined() ? b.data_ptr<float>() : nullptr, M, n, float(k),
                              float(eps), raw, tensor_scope, d, yp, S.data_ptr<float>(),
                              rowmax.data_ptr<float>());
    return;
  }
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

// float32: the schedule of csrc/secura_linear.h with the rank-r chain re-associated around the
// r x r matrix K = B_c A_c (a = 4 r by default, so K is 16x smaller than either factor times
// an M-row operand). Forward: Δ = h V + lora_bias with V = s K C^T [r, n], formed once, so the
// epilogue reads h [M, r] and V, and no [M, a] or [M, r] product is formed besides h. Backward
// with P = dΔ C [M, r] (gathered from dΔ W when tied) and G = h^T P [r, r]:
//   dA_c = s B_c^T G,  dB_c = s G A_c^T,  dh = s P K^T,  z = h K
// (two M-row products of r x r instead of six of r x a). The same functions as the header's
// chain: only the rounding of the small products differs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> secura_forward_f32(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& C, const at::Tensor& A_c, const at::Tensor& B_c, const at::Tensor& R,
    const c10::optional<at::Tensor>& lora_bias, double scale, double k, double eps, bool raw,
    bool tensor_scope, const c10::optional<at::Tensor>& rows) {
  const int64_t M = x.size(0), n = weight.size(0), r = C.size(1);
  at::Tensor y = at::mm(x, weight.t());   // x W^T; b is added in the epilogue
  at::Tensor h = rows.has_value() ? y.index_select(1, *rows) : at::mm(x, R.t());
  h = h.contiguous();
  const at::Tensor V = at::mm(at::mm(B_c, A_c).mul_(scale), C.t()).contiguous();   // [r, n]
  const at::Tensor lb = lora_bias.has_value() ? lora_bias->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor S = at::empty({M, n}, y.options());
  at::Tensor rowmax = at::empty({M}, y.options());
  cpu::F32Delta d;
  d.zs = h.data_ptr<float>();
  d.Ct = V.data_ptr<float>();
  d.r = r;
  d.lb = lb.defined() ? lb.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  cpu::signorm_epilogue_f32(yp, b.defined() ? b.data_ptr<float>() : nullptr, M, n, float(k),
                            float(eps), raw, tensor_scope, d, yp, S.data_ptr<float>(),
                            rowmax.data_ptr<float>());
  return {y, S, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
secura_backward_f32(const at::Tensor& grad_y, const at::Tensor& S, const at::Tensor& x,
                    const at::Tensor& weight, const at::Tensor& C, const at::Tensor& A_c,
                    const at::Tensor& B_c, const at::Tensor& R, const at::Tensor& h, double scale,
                    const c10::optional<at::Tensor>& cols, bool need_dx) {
  const int64_t M = x.size(0), n = weight.size(0), r = C.size(1);
  check_matrix(grad_y, "grad_y", M, n);
  check_like(grad_y, "grad_y", weight, "weight");
  check_matrix(S, "S", M, n);
  TORCH_CHECK(S.scalar_type() == at::kFloat, "fastcur: S must be Float, got ", S.scalar_type());
  check_matrix(h, "h", M, r);
  check_like(h, "h", weight, "weight");
  const at::Tensor dD = at::div(grad_y, S);          // dΔ = dy / S
  const at::Tensor K = at::mm(B_c, A_c);             // [r, r]
  at::Tensor dx, P;
  if (need_dx) {
    dx = at::mm(dD, weight);                         // dΔ W  [M, k]
    P = cols.has_value() ? dx.index_select(1, *cols) : at::mm(dD, C);
  } else {
    dx = at::empty({0}, x.options());
    P = at::mm(dD, C);
  }
  const at::Tensor G = at::mm(h.t(), P);                      // h^T dΔ C  [r, r]
  at::Tensor dA = at::mm(B_c.t(), G).mul_(scale);             // [a, r]
  at::Tensor dB = at::mm(G, A_c.t()).mul_(scale);             // [r, a]
  at::Tensor dh = at::mm(P, K.t().mul(scale));                // [M, r]
  at::Tensor z = at::mm(h, K);                                // [M, r]
  if (need_dx) dx.addmm_(dh, R, /*beta=*/2.0, /*alpha=*/1.0);  // 2 dΔ W + dh R
  return {dx, dD, z, dA, dB, dh};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> secura_linear_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& C, const at::Tensor& A_c, const at::Tensor& B_c, const at::Tensor& R,
    const c10::optional<at::Tensor>& lora_bias, double scale, double k, double eps,
    c10::string_view norm, c10::string_view scope, const c10::optional<at::Tensor>& rows,
    const c10::optional<at::Tensor>& cols) {
  check_secura_linear_args(x, weight, bias, C, A_c, B_c, R, lora_bias);
  const int64_t r = C.size(1);
  // The forward reads only `rows` (cols is checked as an index for the backward).
  const c10::optional<at::Tensor> rows_ok = verified(rows, "rows", weight, R, 0, r);
  if (cols.has_value()) {
    check_index(cols, "cols", r, weight);
    check_range(*cols, "cols", weight.size(1));
  }
  if (x.scalar_type() == at::kFloat) {
    const bool raw = parse_norm_raw(std::string(norm));
    const bool tensor_scope = parse_scope_tensor(std::string(scope), "token");
    return secura_forward_f32(x, weight, bias, C, A_c, B_c, R, lora_bias, scale, k, eps, raw,
                              tensor_scope, rows_ok);
  }
  return secura_linear_forward(x, weight, bias, C, A_c, B_c, R, lora_bias, scale, k, eps, norm,
                               scope, rows_ok, cols, secura_epilogue_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
secura_linear_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& S, const at::Tensor& x,
                      const at::Tensor& weight, const at::Tensor& C, const at::Tensor& A_c,
                      const at::Tensor& B_c, const at::Tensor& R, const at::Tensor& h,
                      double scale, const c10::optional<at::Tensor>& cols, bool need_dx) {
  check_secura_linear_args(x, weight, c10::nullopt, C, A_c, B_c, R, c10::nullopt);
  const c10::optional<at::Tensor> cols_ok = verified(cols, "cols", weight, C, 1, C.size(1));
  if (x.scalar_type() == at::kFloat)
    return secura_backward_f32(grad_y, S, x, weight, C, A_c, B_c, R, h, scale, cols_ok, need_dx);
  return secura_linear_backward(grad_y, S, x, weight, C, A_c, B_c, R, h, scale, cols_ok, need_dx);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CPU, m) {
  m.impl("secura_linear", &secura_linear_cpu);
  m.impl("secura_linear_bwd", &secura_linear_bwd_cpu);
}

}  // namespace fastcur
