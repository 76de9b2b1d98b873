// IMSM's memory gate on the CPU (docs/methods.md, IMSM): one pass over each token's row.
//
// The query terms c = q A1 + q' A4 [B, r] are per-sequence constants computed once (a tiny
// GEMM); per token only z = c + h A2 + h' A3 (two d x r products), a = z W_B, g = σ(a) and the
// mix h' + g (h - h') remain, done while the row is in cache. The forward keeps z [M, r]
// (after the dropout mask) for the backward, which recomputes g from it instead of saving an
// M x d gate. The d x r weight gradients accumulate per chunk of rows (fixed chunking, so the
// result does not depend on the thread schedule) and are summed at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "imsm_gate.h"

namespace fastcur {
namespace {

constexpr int64_t kRowsPerChunk = 64;

template <typename acc_t>
inline acc_t sigmoid(acc_t a) {
  return acc_t(1) / (acc_t(1) + std::exp(-a));
}

// z[j] = c[j] + Σ_k h[k] A2[k, j] + t[k] A3[k, j], then z *= mask (if any).
template <typename scalar_t, typename acc_t>
inline void hidden_row(const scalar_t* hp, const scalar_t* tp, const acc_t* c, const acc_t* A2,
                       const acc_t* A3, const scalar_t* mp, int64_t d, int64_t r, acc_t* z) {
  for (int64_t j = 0; j < r; ++j) z[j] = c[j];
  for (int64_t k = 0; k < d; ++k) {
    const acc_t hk = static_cast<acc_t>(hp[k]), tk = static_cast<acc_t>(tp[k]);
    const acc_t* a2 = A2 + k * r;
    const acc_t* a3 = A3 + k * r;
    for (int64_t j = 0; j < r; ++j) z[j] += hk * a2[j] + tk * a3[j];
  }
  if (mp != nullptr)
    for (int64_t j = 0; j < r; ++j) z[j] *= static_cast<acc_t>(mp[j]);
}

// a[i] = Σ_j z[j] W_B[j, i]
template <typename acc_t>
inline void preact_row(const acc_t* z, const acc_t* Wb, int64_t d, int64_t r, acc_t* a) {
  std::fill(a, a + d, acc_t(0));
  for (int64_t j = 0; j < r; ++j) {
    const acc_t zj = z[j];
    const acc_t* w = Wb + j * d;
    for (int64_t i = 0; i < d; ++i) a[i] += zj * w[i];
  }
}

// out = h' + σ((c + h A2 + h' A3) W_B) (h - h') row by row; z kept for the backward.
void fwd_rows_cpu(const at::Tensor& h, const at::Tensor& ht, const at::Tensor& mask, const at::Tensor& c,
                  const at::Tensor& A2, const at::Tensor& A3, const at::Tensor& Wb, const ImsmDims& s,
                  at::Tensor& out, at::Tensor& z) {
  const int64_t M = s.B * s.T, d = s.d, r = s.r, T = s.T;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "imsm_gate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *hp = h.data_ptr<scalar_t>(), *tp = ht.data_ptr<scalar_t>();
    const scalar_t* mp = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
    const acc_t *cp = c.data_ptr<acc_t>(), *a2 = A2.data_ptr<acc_t>(), *a3 = A3.data_ptr<acc_t>(),
                *wb = Wb.data_ptr<acc_t>();
    acc_t* zp = z.data_ptr<acc_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, kRowsPerChunk, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> a(d);
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t *hr = hp + m * d, *tr = tp + m * d;
        acc_t* zr = zp + m * r;
        hidden_row<scalar_t, acc_t>(hr, tr, cp + (m / T) * r, a2, a3, mp ? mp + m * r : nullptr, d, r, zr);
        preact_row<acc_t>(zr, wb, d, r, a.data());
        scalar_t* o = op + m * d;
        for (int64_t i = 0; i < d; ++i) {
          const acc_t g = sigmoid(a[i]);
          const acc_t hv = static_cast<acc_t>(hr[i]), tv = static_cast<acc_t>(tr[i]);
          o[i] = static_cast<scalar_t>(tv + g * (hv - tv));
        }
      }
    });
  });
}

// dzp, dh, dh' row by row; the d x r weight gradients accumulate per fixed chunk of rows and
// are summed at the end. Returns (dA2, dA3, dW_B).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_rows_cpu(
    const at::Tensor& g_out, const at::Tensor& h, const at::Tensor& ht, const at::Tensor& mask,
    const at::Tensor& z, const at::Tensor& A2, const at::Tensor& A3, const at::Tensor& Wb,
    const ImsmDims& s, const at::Tensor& dh, const at::Tensor& dht, at::Tensor& dzp) {
  const int64_t M = s.B * s.T, d = s.d, r = s.r;
  const at::Tensor WbT = Wb.t().contiguous();
  const int64_t chunks = std::max<int64_t>(1, (M + kRowsPerChunk - 1) / kRowsPerChunk);
  // Per chunk: dW_B [r, d], dA2 [d, r], dA3 [d, r].
  at::Tensor parts = at::zeros({chunks, 3, d * r}, dzp.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "imsm_gate_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *hp = h.data_ptr<scalar_t>(), *tp = ht.data_ptr<scalar_t>(),
                   *gp = g_out.data_ptr<scalar_t>();
    const scalar_t* mp = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
    const acc_t *zp = z.data_ptr<acc_t>(), *a2 = A2.data_ptr<acc_t>(), *a3 = A3.data_ptr<acc_t>(),
                *wb = Wb.data_ptr<acc_t>(), *wbt = WbT.data_ptr<acc_t>();
    scalar_t* dhp = dh.defined() ? dh.data_ptr<scalar_t>() : nullptr;
    scalar_t* dtp = dht.defined() ? dht.data_ptr<scalar_t>() : nullptr;
    acc_t* dzpp = dzp.data_ptr<acc_t>();
    acc_t* pp = parts.data_ptr<acc_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      std::vector<acc_t> a(d), da(d), dz(r);
      for (int64_t ch = cb; ch < ce; ++ch) {
        acc_t* dWb = pp + ch * 3 * d * r;
        acc_t* dA2 = dWb + d * r;
        acc_t* dA3 = dA2 + d * r;
        const int64_t m_end = std::min(M, (ch + 1) * kRowsPerChunk);
        for (int64_t m = ch * kRowsPerChunk; m < m_end; ++m) {
          const scalar_t *hr = hp + m * d, *tr = tp + m * d, *gr = gp + m * d;
          const acc_t* zr = zp + m * r;
          preact_row<acc_t>(zr, wb, d, r, a.data());
          std::fill(dz.begin(), dz.end(), acc_t(0));
          for (int64_t i = 0; i < d; ++i) {
            const acc_t g = sigmoid(a[i]);
            const acc_t go = static_cast<acc_t>(gr[i]);
            const acc_t hv = static_cast<acc_t>(hr[i]), tv = static_cast<acc_t>(tr[i]);
            da[i] = go * (hv - tv) * g * (acc_t(1) - g);
            a[i] = g;  // keep g for the dh terms below
            const acc_t* w = wbt + i * r;
            for (int64_t j = 0; j < r; ++j) dz[j] += da[i] * w[j];
          }
          for (int64_t j = 0; j < r; ++j) {
            const acc_t zj = zr[j];
            acc_t* dw = dWb + j * d;
            for (int64_t i = 0; i < d; ++i) dw[i] += zj * da[i];
          }
          if (mp != nullptr)
            for (int64_t j = 0; j < r; ++j) dz[j] *= static_cast<acc_t>(mp[m * r + j]);
          for (int64_t j = 0; j < r; ++j) dzpp[m * r + j] = dz[j];
          for (int64_t i = 0; i < d; ++i) {
            const acc_t hv = static_cast<acc_t>(hr[i]), tv = static_cast<acc_t>(tr[i]);
            const acc_t* w2 = a2 + i * r;
            const acc_t* w3 = a3 + i * r;
            acc_t* g2 = dA2 + i * r;
            acc_t* g3 = dA3 + i * r;
            acc_t s2 = 0, s3 = 0;
            for (int64_t j = 0; j < r; ++j) {
              s2 += w2[j] * dz[j];
              s3 += w3[j] * dz[j];
              g2[j] += hv * dz[j];
              g3[j] += tv * dz[j];
            }
            const acc_t go = static_cast<acc_t>(gr[i]);
            if (dhp) dhp[m * d + i] = static_cast<scalar_t>(go * a[i] + s2);
            if (dtp) dtp[m * d + i] = static_cast<scalar_t>(go * (acc_t(1) - a[i]) + s3);
          }
        }
      }
    });
  });
  const at::Tensor sums = parts.sum(0);  // [3, d r]
  return {sums[1].view({d, r}), sums[2].view({d, r}), sums[0].view({r, d})};
}

std::tuple<at::Tensor, at::Tensor> imsm_gate_cpu(const at::Tensor& h, const at::Tensor& ht,
                                                 const at::Tensor& q, const at::Tensor& qt,
                                                 const at::Tensor& W_A, const at::Tensor& W_B,
                                                 const c10::optional<at::Tensor>& mask) {
  return imsm_gate_forward(h, ht, q, qt, W_A, W_B, mask, fwd_rows_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> imsm_gate_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& ht, const at::Tensor& q,
    const at::Tensor& qt, const at::Tensor& W_A, const at::Tensor& W_B,
    const c10::optional<at::Tensor>& mask, const at::Tensor& z, bool need_h, bool need_ht) {
  return imsm_gate_backward(grad, h, ht, q, qt, W_A, W_B, mask, z, need_h, need_ht, bwd_rows_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CPU, m) {
  m.impl("imsm_gate", &imsm_gate_cpu);
  m.impl("imsm_gate_bwd", &imsm_gate_bwd_cpu);
}

}  // namespace fastcur
