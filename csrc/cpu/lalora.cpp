// LaLoRA on the CPU: ATen GEMMs (csrc/lalora.h) plus two fused loops, the per-example
// square-accumulate of lora_fisher_diag and the multi-tensor Laplace penalty (+ gradient).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "lalora.h"

namespace fastcur {
namespace {

// acc[i] += c * sum_e g[e, i]^2; one pass over g, parallel over i (each i has one writer).
void square_accumulate_cpu(at::Tensor& acc, const at::Tensor& g_in, double c) {
  const at::Tensor g = g_in.contiguous();
  const int64_t E = g.size(0), N = g.size(1);
  AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "fastcur_square_accumulate", [&] {
    scalar_t* ap = acc.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t cs = static_cast<scalar_t>(c);
    at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t e = 0; e < E; ++e) {
        const scalar_t* row = gp + e * N;
        for (int64_t i = begin; i < end; ++i) ap[i] += cs * row[i] * row[i];
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> lora_fisher_diag_cpu(const at::Tensor& x, const at::Tensor& grad_out,
                                                        const at::Tensor& A, const at::Tensor& B, double scale) {
  return lora_fisher_diag_impl(x, grad_out, A, B, scale, square_accumulate_cpu);
}

// One work item: elements [begin, end) of tensor t.
struct Work {
  int64_t t, begin, end;
};

constexpr int64_t kPenaltyChunk = 16384;
constexpr int kLanes = 16;

// sum_i prec_i (p_i - a_i)^2 over the chunk (float32 / float64 lanes, then double), and, when
// grad is given, grad_i += lam * prec_i * (p_i - a_i).
template <typename scalar_t>
double penalty_chunk(const scalar_t* p, const scalar_t* a, const scalar_t* q, scalar_t* grad, int64_t begin,
                     int64_t end, double lam) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t lanes[kLanes] = {};
  const acc_t l = static_cast<acc_t>(lam);
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t d = static_cast<acc_t>(p[i + j]) - static_cast<acc_t>(a[i + j]);
      const acc_t qd = static_cast<acc_t>(q[i + j]) * d;
      lanes[j] += qd * d;
      if (grad) grad[i + j] = static_cast<scalar_t>(static_cast<acc_t>(grad[i + j]) + l * qd);
    }
  }
  double total = 0.0;
  for (; i < end; ++i) {
    const acc_t d = static_cast<acc_t>(p[i]) - static_cast<acc_t>(a[i]);
    const acc_t qd = static_cast<acc_t>(q[i]) * d;
    total += static_cast<double>(qd * d);
    if (grad) grad[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) + l * qd);
  }
  for (int j = 0; j < kLanes; ++j) total += static_cast<double>(lanes[j]);
  return total;
}

// The whole list as ONE flattened work list and one at::parallel_for; partial sums per work
// item, added in order (the value does not depend on the thread count).
at::Tensor multi_tensor_penalty_cpu(const at::TensorList* grads, at::TensorList params, at::TensorList anchors,
                                    at::TensorList precisions, double lam) {
  check_penalty_lists(params, anchors, precisions, grads);
  const size_t L = params.size();
  std::vector<at::Tensor> p(L), a(L), q(L);
  std::vector<Work> work;
  for (size_t t = 0; t < L; ++t) {
    p[t] = params[t].contiguous();
    a[t] = anchors[t].contiguous();
    q[t] = precisions[t].contiguous();
    const int64_t N = p[t].numel();
    for (int64_t b = 0; b < N; b += kPenaltyChunk) work.push_back({int64_t(t), b, std::min(N, b + kPenaltyChunk)});
  }
  std::vector<double> partial(work.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "fastcur_laplace_penalty", [&] {
    at::parallel_for(0, int64_t(work.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const Work& it = work[w];
        scalar_t* g = grads ? (*grads)[it.t].data_ptr<scalar_t>() : nullptr;
        partial[w] = penalty_chunk<scalar_t>(p[it.t].data_ptr<scalar_t>(), a[it.t].data_ptr<scalar_t>(),
                                             q[it.t].data_ptr<scalar_t>(), g, it.begin, it.end, lam);
      }
    });
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return at::scalar_tensor(0.5 * lam * total, params[0].options());
}

at::Tensor laplace_diag_penalty_cpu(at::TensorList params, at::TensorList anchors, at::TensorList precisions,
                                   double lam) {
  return multi_tensor_penalty_cpu(nullptr, params, anchors, precisions, lam);
}

at::Tensor laplace_diag_penalty_grad_cpu(at::TensorList grads, at::TensorList params, at::TensorList anchors,
                                         at::TensorList precisions, double lam) {
  return multi_tensor_penalty_cpu(&grads, params, anchors, precisions, lam);
}

at::Tensor kfac_factor_cpu(const at::Tensor& x, bool diagonal) { return kfac_factor_impl(x, diagonal); }

at::Tensor kfac_penalty_cpu(const at::Tensor& delta, const at::Tensor& S, const at::Tensor& G) {
  return kfac_penalty_impl(delta, S, G);
}

at::Tensor kfac_penalty_bwd_cpu(const at::Tensor& grad, const at::Tensor& delta, const at::Tensor& S,
                                const at::Tensor& G) {
  return kfac_penalty_bwd_impl(grad, delta, S, G);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CPU, m) {
  m.impl("lora_fisher_diag", &lora_fisher_diag_cpu);
  m.impl("laplace_diag_penalty", &laplace_diag_penalty_cpu);
  m.impl("laplace_diag_penalty_grad_", &laplace_diag_penalty_grad_cpu);
  m.impl("kfac_factor", &kfac_factor_cpu);
  m.impl("kfac_penalty", &kfac_penalty_cpu);
  m.impl("kfac_penalty_bwd", &kfac_penalty_bwd_cpu);
}

}  // namespace fastcur
