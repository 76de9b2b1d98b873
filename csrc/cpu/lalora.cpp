// LaLoRA on the CPU: ATen GEMMs (csrc/lalora.h) plus two fused loops, the per-example
// square-accumulate of lora_fisher_diag and the multi-tensor Laplace penalty (+ gradient).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/cpu_choice.h"
#include "cpu/simd.h"
#include "cpu/skinny_rows.h"
#include "lalora.h"

namespace fastcur {
namespace {

// acc[i] += c * g[i]^2 over one example's gradient (contiguous, same dtype).
template <typename scalar_t>
void square_add(scalar_t* __restrict__ acc, const scalar_t* __restrict__ g, int64_t N, scalar_t c) {
  for (int64_t i = 0; i < N; ++i) acc[i] += c * g[i] * g[i];
}

// Rows of one example per block: a block's rows of x and grad_out within 512 KB, so they stay
// in the thread's L2 cache between the passes that read them. Measured, 2 threads, inputs
// evicted to memory first (E, T, n, k at r 16): (32, 512, 1024, 1024) 8.3 ms against 9.9 with
// 1 MB blocks and 13.8 with 2 MB; (4, 2048, 1024, 4096) 13.9 / 13.3 / 23.2 ms; 256 KB blocks
// no better.
constexpr int64_t kFisherBlockBytes = int64_t{1} << 19;

int64_t fisher_block_rows(int64_t T, int64_t row_bytes) {
  const int64_t rows = kFisherBlockBytes / std::max<int64_t>(row_bytes, 1);
  return rows >= T ? T : std::max<int64_t>(16, rows / 16 * 16);
}

// The CPU schedule: parallel over examples, one example at a time per thread, with per-thread
// accumulators (thread 0's are the outputs), on the row kernels of cpu/skinny_rows.h. When r
// is a multiple of the vector's lanes (16 floats, 8 doubles), per block of the example's rows:
//   H = X_e A^T                        narrow_rows: X_e's rows streamed from memory
//   P = G_e B, D (+)= G_e^T H          narrow_pass: one pass over G_e's rows for both
//   gA (+)= P^T X_e                    outer_strip_acc: X_e again, from L2, a strip of
//                                      columns at a time
// then F_B += c D^2 (D is B's per-example gradient over s, [n, r]) and F_A += c gA^2. When the
// whole example is one block, A's gradient strips are squared in registers as they are formed
// (outer_square_acc) and never stored. Off the narrow path: rows_dot for H and P, and B's
// gradient like A's (transposed, [r, n]). x and grad_out are read from memory once. Measured
// in the benchmark's case (E 32, T 128, n = k = 1024, r 16; 2 threads, inputs evicted to
// memory first): 2.65 ms; 3.4-3.7 ms with separate passes for the two products of G_e,
// 4.0-4.3 ms with rows_dot / outer_acc into gradients stored per example.
// Memory: (threads - 1) x (n r + r k) accumulators plus one example's gradients per thread,
// independent of E.
std::tuple<at::Tensor, at::Tensor> lora_fisher_diag_rows(const at::Tensor& x, const at::Tensor& grad_out,
                                                         const at::Tensor& A, const at::Tensor& B, double scale) {
  check_lora_fisher_args(x, grad_out, A, B);
  const int64_t E = x.size(0), T = x.size(1), k = x.size(2), r = A.size(0), n = B.size(0);
  const auto acc = lalora_acc_type(A.scalar_type());
  const auto opts = A.options().dtype(acc);
  at::Tensor FA = at::zeros({r, k}, opts), FB = at::zeros({n, r}, opts);
  if (E == 0 || T == 0 || r == 0) return {FA, FB};
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous();
  const int nthreads = at::get_num_threads();
  std::vector<at::Tensor> accA(nthreads), accB(nthreads);   // accB: [r, n] off the narrow path
  bool narrow = false;
  AT_DISPATCH_FLOATING_TYPES(acc, "fastcur_lora_fisher_diag_cpu", [&] {
    narrow = r % cpu::vector_lanes<scalar_t> == 0;
    // narrow_rows / narrow_pass take A^T [k, r] and B [n, r]; rows_dot A [r, k] and B^T [r, n].
    const at::Tensor Av = narrow ? A.to(acc).t().contiguous() : A.to(acc).contiguous();
    const at::Tensor Bv = narrow ? B.to(acc).contiguous() : B.to(acc).t().contiguous();
    const scalar_t* ap = Av.data_ptr<scalar_t>();
    const scalar_t* bp = Bv.data_ptr<scalar_t>();
    const scalar_t c = static_cast<scalar_t>(scale * scale);
    const int64_t Tb = fisher_block_rows(T, (n + k) * static_cast<int64_t>(sizeof(scalar_t)));
    const bool one_block = Tb == T;
    at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
      const int tid = at::get_thread_num();
      if (!accA[tid].defined()) {
        accA[tid] = tid == 0 ? FA : at::zeros({r, k}, opts);
        accB[tid] = narrow ? (tid == 0 ? FB : at::zeros({n, r}, opts)) : at::zeros({r, n}, opts);
      }
      scalar_t* fa = accA[tid].data_ptr<scalar_t>();
      scalar_t* fb = accB[tid].data_ptr<scalar_t>();
      // D: B's gradient on the narrow path; gA, gB: the gradients summed over blocks.
      std::vector<scalar_t> H(Tb * r), P(Tb * r), D(narrow ? n * r : 0),
          gA(one_block ? 0 : r * k), gB(one_block || narrow ? 0 : r * n);
      for (int64_t e = begin; e < end; ++e) {
        const at::Tensor Xe = xc[e].to(acc), Ge = gc[e].to(acc);  // views for float32 / float64
        for (int64_t t0 = 0; t0 < T; t0 += Tb) {
          const int64_t tb = std::min(Tb, T - t0);
          const bool add = t0 > 0;
          const scalar_t* xp = Xe.data_ptr<scalar_t>() + t0 * k;
          const scalar_t* gp = Ge.data_ptr<scalar_t>() + t0 * n;
          if (narrow) {
            cpu::narrow_rows(H.data(), xp, k, ap, tb, r, k);
            cpu::narrow_pass(P.data(), D.data(), gp, n, bp, H.data(), tb, r, n, add);
          } else {
            cpu::rows_dot(H.data(), xp, k, ap, tb, r, k);
            cpu::rows_dot(P.data(), gp, n, bp, tb, r, n);
            if (one_block) cpu::outer_square_acc(fb, H.data(), gp, n, tb, r, n, c);
            else cpu::outer_strip_acc(gB.data(), H.data(), gp, n, tb, r, n, add);
          }
          if (one_block) cpu::outer_square_acc(fa, P.data(), xp, k, tb, r, k, c);
          else cpu::outer_strip_acc(gA.data(), P.data(), xp, k, tb, r, k, add);
        }
        if (narrow) square_add(fb, D.data(), n * r, c);
        if (!one_block) {
          square_add(fa, gA.data(), r * k, c);
          if (!narrow) square_add(fb, gB.data(), r * n, c);
        }
      }
    });
  });
  for (int t = 0; t < nthreads; ++t) {
    if (!accA[t].defined()) continue;
    if (!accA[t].is_same(FA)) FA.add_(accA[t]);
    if (!accB[t].is_same(FB)) FB.add_(narrow ? accB[t] : accB[t].t());
  }
  return {FA, FB};
}

// The ATen formulation (csrc/lalora.h): groups of examples through batched GEMMs, each group's
// gradients squared and summed by ATen ops.
std::tuple<at::Tensor, at::Tensor> lora_fisher_diag_aten(const at::Tensor& x, const at::Tensor& grad_out,
                                                         const at::Tensor& A, const at::Tensor& B, double scale) {
  return lora_fisher_diag_impl(x, grad_out, A, B, scale, [](at::Tensor& acc, const at::Tensor& g, double c) {
    acc.view({-1}).add_(g.square().sum(0), c);
  });
}

// The row-kernel schedule or the ATen one, per shape (cpu/cpu_choice.h): the row kernels were
// tuned on AVX-512; where they lose at the active level, the batched GEMMs run.
std::tuple<at::Tensor, at::Tensor> lora_fisher_diag_cpu(const at::Tensor& x, const at::Tensor& grad_out,
                                                        const at::Tensor& A, const at::Tensor& B, double scale) {
  check_lora_fisher_args(x, grad_out, A, B);
  using Out = std::tuple<at::Tensor, at::Tensor>;
  const std::string key = std::to_string(x.size(0)) + "," + std::to_string(x.size(1)) + "," +
                          std::to_string(B.size(0)) + "," + std::to_string(x.size(2)) + "," +
                          std::to_string(A.size(0)) + "," + std::string(c10::toString(A.scalar_type()));
  return cpu::choose<Out>(
      "lora_fisher_diag", key, [&] { return lora_fisher_diag_rows(x, grad_out, A, B, scale); },
      [&] { return lora_fisher_diag_aten(x, grad_out, A, B, scale); });
}

// One work item: elements [begin, end) of tensor t.
struct Work {
  int64_t t, begin, end;
};

constexpr int64_t kPenaltyChunk = 16384;
constexpr int kLanes = 16;

// sum_i prec_i (p_i - a_i)^2 over the chunk (lanes in the acc type, then double), and, when
// grad is given, grad_i += lam * prec_i * (p_i - a_i). The generic loop, for bfloat16/half.
template <typename scalar_t, bool HAS_GRAD>
double penalty_chunk(const scalar_t* __restrict__ p, const scalar_t* __restrict__ a, const scalar_t* __restrict__ q,
                     scalar_t* __restrict__ grad, int64_t begin, int64_t end, double lam) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t lanes[kLanes] = {};
  const acc_t l = static_cast<acc_t>(lam);
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t d = static_cast<acc_t>(p[i + j]) - static_cast<acc_t>(a[i + j]);
      const acc_t qd = static_cast<acc_t>(q[i + j]) * d;
      lanes[j] += qd * d;
      if (HAS_GRAD) grad[i + j] = static_cast<scalar_t>(static_cast<acc_t>(grad[i + j]) + l * qd);
    }
  }
  double total = 0.0;
  for (; i < end; ++i) {
    const acc_t d = static_cast<acc_t>(p[i]) - static_cast<acc_t>(a[i]);
    const acc_t qd = static_cast<acc_t>(q[i]) * d;
    total += static_cast<double>(qd * d);
    if (HAS_GRAD) grad[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) + l * qd);
  }
  for (int j = 0; j < kLanes; ++j) total += static_cast<double>(lanes[j]);
  return total;
}

// The same for float32/float64 with register accumulators (GCC vectors, cpu/simd.h), two
// vectors per step. Measured (200 tensors of 1024 x 16, 2 threads): 2.9 ms with the loop above.
template <int VB, typename T>
FASTCUR_INLINE double penalty_wide(const T* p, const T* a, const T* q, T* grad, int64_t begin,
                                   int64_t end, double lam) {
  using W = typename cpu::VecN<T, VB>::type;
  constexpr int64_t L = cpu::lanes<T, VB>;
  const T l = static_cast<T>(lam);
  W s0 = {}, s1 = {};
  int64_t i = begin;
  for (; i + 2 * L <= end; i += 2 * L) {
    const W d0 = cpu::load<W>(p + i) - cpu::load<W>(a + i);
    const W d1 = cpu::load<W>(p + i + L) - cpu::load<W>(a + i + L);
    const W qd0 = cpu::load<W>(q + i) * d0, qd1 = cpu::load<W>(q + i + L) * d1;
    s0 += qd0 * d0;
    s1 += qd1 * d1;
    if (grad != nullptr) {
      cpu::store(grad + i, cpu::load<W>(grad + i) + l * qd0);
      cpu::store(grad + i + L, cpu::load<W>(grad + i + L) + l * qd1);
    }
  }
  double total = 0.0;
  for (; i < end; ++i) {
    const T d = p[i] - a[i], qd = q[i] * d;
    total += static_cast<double>(qd * d);
    if (grad != nullptr) grad[i] += l * qd;
  }
  const W s = s0 + s1;
  for (int64_t j = 0; j < L; ++j) total += static_cast<double>(s[j]);
  return total;
}

FASTCUR_CPU_DISPATCH(double, penalty_chunk_wide,
                     (const float* p, const float* a, const float* q, float* grad, int64_t begin,
                      int64_t end, double lam),
                     (p, a, q, grad, begin, end, lam), penalty_wide)
FASTCUR_CPU_DISPATCH(double, penalty_chunk_wide,
                     (const double* p, const double* a, const double* q, double* grad,
                      int64_t begin, int64_t end, double lam),
                     (p, a, q, grad, begin, end, lam), penalty_wide)

template <typename scalar_t>
double penalty_any(const scalar_t* p, const scalar_t* a, const scalar_t* q, scalar_t* grad,
                   int64_t begin, int64_t end, double lam) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    return penalty_chunk_wide(p, a, q, grad, begin, end, lam);
  } else {
    return grad ? penalty_chunk<scalar_t, true>(p, a, q, grad, begin, end, lam)
                : penalty_chunk<scalar_t, false>(p, a, q, grad, begin, end, lam);
  }
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
    // Small lists run on one thread (waking a second costs more than the work).
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / kPenaltyChunk);
    at::parallel_for(0, int64_t(work.size()), grain, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const Work& it = work[w];
        scalar_t* g = grads ? (*grads)[it.t].data_ptr<scalar_t>() : nullptr;
        partial[w] = penalty_any<scalar_t>(p[it.t].data_ptr<scalar_t>(), a[it.t].data_ptr<scalar_t>(),
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
