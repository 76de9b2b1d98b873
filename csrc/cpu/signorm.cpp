// signorm on the CPU (docs/methods.md, SECURA): y = (2 y0 + Δ) / S, one pass per block of rows.
// Also home of the float32 fast path of the SigNorm epilogue (cpu::signorm_epilogue_f32,
// cpu::signorm_grads_f32, declared in signorm_cpu.h), which secura_linear and signorm_merge
// call too: one translation unit builds its three x86-64 levels (simd.h).
//
// Forward returns (y [M, n], rowmax [M]); rowmax holds the row maxima of L (float32, float64
// for float64 inputs) and is all the backward needs besides y0 and Δ, which the caller keeps
// alive anyway (they are this op's inputs): the backward recomputes S per row block instead
// of saving an M x n tensor of scales.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "signorm_cpu.h"
// The fast path's vector helpers (and simd.h's load / store) are inlined (FASTCUR_INLINE) into
// each level's build; GCC's note that their ABI would differ between levels does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#include "simd.h"

namespace fastcur {

// ---- float32 fast path of the epilogue (declared in signorm_cpu.h) ----------------------------
namespace cpu {
namespace {

template <int VB> using VF = typename VecN<float, VB>::type;
template <int VB> using VI = typename LaneIndex<float, VB>::type;

template <int VB>
FASTCUR_INLINE VF<VB> splat(float s) {
  return VF<VB>{} + s;
}

// A vector at p: whole (kTail false) or its first cnt lanes, the others 0 (kTail true).
template <int VB, bool kTail>
FASTCUR_INLINE VF<VB> ld(const float* p, int64_t cnt) {
  if constexpr (kTail) {
    VF<VB> v = VF<VB>{};
    __builtin_memcpy(&v, p, cnt * sizeof(float));
    return v;
  } else {
    return load<VF<VB>>(p);
  }
}

template <int VB, bool kTail>
FASTCUR_INLINE void st(float* p, VF<VB> v, int64_t cnt) {
  if constexpr (kTail) {
    __builtin_memcpy(p, &v, cnt * sizeof(float));
  } else {
    store(p, v);
  }
}

template <int VB>
FASTCUR_INLINE VF<VB> vabs(VF<VB> v) {
  return (VF<VB>)((VI<VB>)v & 0x7fffffff);
}

// exp(x) in float: Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial in r,
// about 1 ulp), x clamped to [-87, 88] (normal results only; for the sigmoid below that moves
// σ only where it rounds to 0 or 1 anyway... or to within float's subnormals). NaN stays NaN.
template <int VB>
FASTCUR_INLINE VF<VB> vexp(VF<VB> x) {
  using V = VF<VB>;
  using I = VI<VB>;
  const V lo = splat<VB>(-87.0f), hi = splat<VB>(88.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V magic = splat<VB>(12582912.0f);   // 1.5 * 2^23: adding it rounds to an integer
  const V nf = (x * 1.44269504088896341f + magic) - magic;
  V r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  V p = splat<VB>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const I e = (__builtin_convertvector(nf, I) + 127) << 23;
  return p * (V)e;
}

// S = 2 - σ(N) from the ratios l (the scope's max is > 0 here); inv = 1 / (mx + eps).
template <int VB>
FASTCUR_INLINE VF<VB> scales(VF<VB> l, float k, float inv, bool raw) {
  using V = VF<VB>;
  const V N = raw ? l * k : (l * inv - 0.5f) * k;
  const V sig = splat<VB>(1.0f) / (splat<VB>(1.0f) + vexp<VB>(-N));
  return splat<VB>(2.0f) - sig;
}

// Row i's operands.
struct RowIn {
  const float* y0;      // [n]
  const float* b;       // [n] or null
  const float* D;       // Δ's row [n] (kPre), or
  const float* z;       // s z's row [r], times
  const float* Ct;      // C^T [r, n], plus
  const float* lb;      // lora_bias [n] or null
  int64_t r, n;
};

// One vector of ratios at column j (cnt lanes): Δ and L stored where asked, max folded in.
template <int VB, bool kPre, bool kTail>
FASTCUR_INLINE void ratio_step(const RowIn& in, int64_t j, int64_t cnt, VF<VB> veps, float* Dout,
                               float* Lout, VF<VB>& vmax) {
  using V = VF<VB>;
  V d;
  if constexpr (kPre) {
    d = ld<VB, kTail>(in.D + j, cnt);
  } else {
    d = V{};
    for (int64_t t = 0; t < in.r; ++t) d += in.z[t] * ld<VB, kTail>(in.Ct + t * in.n + j, cnt);
    if (in.lb) d += ld<VB, kTail>(in.lb + j, cnt);
  }
  V y = ld<VB, kTail>(in.y0 + j, cnt);
  if (in.b) y += ld<VB, kTail>(in.b + j, cnt);
  const V l = vabs<VB>(d) / (vabs<VB>(y) + veps);
  if (Dout) st<VB, kTail>(Dout + j, d, cnt);
  if (Lout) st<VB, kTail>(Lout + j, l, cnt);
  vmax = l > vmax ? l : vmax;   // a NaN ratio is skipped (as the generic path's max)
}

// The row's ratios L = |Δ| / (|y0 + b| + eps) (into Lout, Δ into Dout, each if non-null);
// returns the row's max L.
template <int VB, bool kPre>
FASTCUR_INLINE float ratios_row(const RowIn& in, float eps, float* Dout, float* Lout) {
  using V = VF<VB>;
  constexpr int64_t W = lanes<float, VB>;
  const V veps = splat<VB>(eps);
  V vmax = V{};
  int64_t j = 0;
  for (; j + W <= in.n; j += W) ratio_step<VB, kPre, false>(in, j, W, veps, Dout, Lout, vmax);
  // The tail: the row's last whole vector again (overlapping; same values), or, in a row
  // shorter than a vector, a partial one.
  if (j < in.n && in.n >= W) ratio_step<VB, kPre, false>(in, in.n - W, W, veps, Dout, Lout, vmax);
  else if (j < in.n) ratio_step<VB, kPre, true>(in, j, in.n - j, veps, Dout, Lout, vmax);
  float m = 0.0f;
  for (int64_t t = 0; t < W; ++t) m = vmax[t] > m ? vmax[t] : m;
  return m;
}

// out = (2 (y0 + b) + Δ) / S at column j (cnt lanes) of one row, from the stored Δ and L.
template <int VB, bool kTail>
FASTCUR_INLINE void apply_step(const RowIn& in, const float* D, const float* L, int64_t j,
                               int64_t cnt, float k, float inv, bool raw, bool zero, VF<VB>& o,
                               VF<VB>& S) {
  VF<VB> y = ld<VB, kTail>(in.y0 + j, cnt);
  if (in.b) y += ld<VB, kTail>(in.b + j, cnt);
  const VF<VB> d = ld<VB, kTail>(D + j, cnt);
  S = zero ? splat<VB>(2.0f) : scales<VB>(ld<VB, kTail>(L + j, cnt), k, inv, raw);
  o = (y + y + d) / S;
}

// One row's output (and S where S_out). out may alias in.y0: the overlapping tail vector is
// computed before the main loop overwrites its first lanes and stored after it.
template <int VB>
FASTCUR_INLINE void apply_row(const RowIn& in, const float* D, const float* L, float mx, float k,
                              float eps, bool raw, float* out, float* S_out) {
  using V = VF<VB>;
  constexpr int64_t W = lanes<float, VB>;
  const int64_t n = in.n;
  const bool zero = mx == 0.0f;   // Δ = 0 over the whole scope: S = 2, y = y0 (+ b) exactly
  const float inv = 1.0f / (mx + eps);
  const bool overlap = n >= W && n % W != 0;
  V ot = V{}, St = V{};
  if (overlap) apply_step<VB, false>(in, D, L, n - W, W, k, inv, raw, zero, ot, St);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    V o, S;
    apply_step<VB, false>(in, D, L, j, W, k, inv, raw, zero, o, S);
    store(out + j, o);
    if (S_out) store(S_out + j, S);
  }
  if (overlap) {
    store(out + n - W, ot);
    if (S_out) store(S_out + n - W, St);
  } else if (j < n) {
    V o, S;
    apply_step<VB, true>(in, D, L, j, n - j, k, inv, raw, zero, o, S);
    st<VB, true>(out + j, o, n - j);
    if (S_out) st<VB, true>(S_out + j, S, n - j);
  }
}

// dy0 = 2 g / S, dΔ = g / S over one row, from the stored L.
template <int VB, bool kTail>
FASTCUR_INLINE void grad_step(const float* g, const float* L, int64_t j, int64_t cnt, float k,
                              float inv, bool raw, bool zero, float* dy0, float* dd) {
  const VF<VB> S = zero ? splat<VB>(2.0f) : scales<VB>(ld<VB, kTail>(L + j, cnt), k, inv, raw);
  const VF<VB> q = ld<VB, kTail>(g + j, cnt) / S;
  st<VB, kTail>(dy0 + j, q + q, cnt);
  st<VB, kTail>(dd + j, q, cnt);
}

// Rows [i0, i1) of one call. mode: 0 the row maxima only; 1 the forward (mx null: each row's
// own max, else *mx for every row); 2 signorm's gradients (mx [M] per row, or *mx with
// tensor_scope). Dbuf, Lbuf: n floats each. Dblk: Δ's rows i0.. when the caller formed them.
struct Rows {
  const float* y0;
  const float* b;
  int64_t n;
  float k, eps;
  bool raw, tensor_scope;
  F32Delta delta;
  float *out, *S, *rowmax;
  const float* g;
  float *dy0, *dd;
};

template <int VB, bool kPre>
FASTCUR_INLINE void rows_pass(const Rows& a, const float* Dblk, int64_t i0, int64_t i1, int mode,
                              const float* mx, float* Dbuf, float* Lbuf) {
  const int64_t n = a.n;
  for (int64_t i = i0; i < i1; ++i) {
    RowIn in{a.y0 + i * n, a.b, nullptr, nullptr, a.delta.Ct, a.delta.lb, a.delta.r, n};
    if constexpr (kPre) in.D = Dblk + (i - i0) * (a.delta.D ? a.delta.ldd : n);
    else in.z = a.delta.zs + i * a.delta.r;
    if (mode == 0) {
      a.rowmax[i] = ratios_row<VB, kPre>(in, a.eps, nullptr, nullptr);
    } else if (mode == 1) {
      const float m = ratios_row<VB, kPre>(in, a.eps, kPre ? nullptr : Dbuf, Lbuf);
      if (!mx) a.rowmax[i] = m;
      const float* D = kPre ? in.D : Dbuf;
      apply_row<VB>(in, D, Lbuf, mx ? *mx : m, a.k, a.eps, a.raw, a.out + i * n,
                    a.S ? a.S + i * n : nullptr);
    } else {
      ratios_row<VB, kPre>(in, a.eps, nullptr, Lbuf);
      const float m = a.tensor_scope ? *mx : mx[i];
      const bool zero = m == 0.0f;
      const float inv = 1.0f / (m + a.eps);
      const float* g = a.g + i * n;
      float *o0 = a.dy0 + i * n, *od = a.dd + i * n;
      constexpr int64_t W = lanes<float, VB>;
      int64_t j = 0;
      for (; j + W <= n; j += W) grad_step<VB, false>(g, Lbuf, j, W, a.k, inv, a.raw, zero, o0, od);
      if (j < n && n >= W) grad_step<VB, false>(g, Lbuf, n - W, W, a.k, inv, a.raw, zero, o0, od);
      else if (j < n) grad_step<VB, true>(g, Lbuf, j, n - j, a.k, inv, a.raw, zero, o0, od);
    }
  }
}

template <int VB>
FASTCUR_INLINE void rows_impl(const Rows& a, const float* Dblk, int64_t i0, int64_t i1, int mode,
                              const float* mx, float* Dbuf, float* Lbuf) {
  if (Dblk) rows_pass<VB, true>(a, Dblk, i0, i1, mode, mx, Dbuf, Lbuf);
  else rows_pass<VB, false>(a, Dblk, i0, i1, mode, mx, Dbuf, Lbuf);
}

FASTCUR_CPU_DISPATCH(void, signorm_rows_f32,
                     (const Rows& a, const float* Dblk, int64_t i0, int64_t i1, int mode,
                      const float* mx, float* Dbuf, float* Lbuf),
                     (a, Dblk, i0, i1, mode, mx, Dbuf, Lbuf), rows_impl)

// Runs `mode` over all M rows in parallel blocks; Δ's rows read (delta.D), formed on the fly
// (r <= kSignormInlineRank) or formed per block by one GEMM into a per-thread buffer.
void for_all_rows(const Rows& a, int64_t M, int mode, const float* mx) {
  const int64_t n = a.n;
  const int64_t mb_max = signorm_rows_per_block(n);
  const bool gemm_blocks = !a.delta.D && a.delta.r > kSignormInlineRank;
  at::parallel_for(0, M, mb_max, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch state (see signorm_epilogue).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::vector<float> Dbuf(n), Lbuf(n), blk(gemm_blocks ? mb_max * n : 0);
    for (int64_t m0 = begin; m0 < end; m0 += mb_max) {
      const int64_t mb = std::min(mb_max, end - m0);
      const float* Dblk = nullptr;
      if (a.delta.D) {
        Dblk = a.delta.D + m0 * a.delta.ldd;
      } else if (gemm_blocks) {
        const auto opts = at::TensorOptions().dtype(at::kFloat);
        at::Tensor out = at::from_blob(blk.data(), {mb, n}, opts);
        const at::Tensor zs = at::from_blob(const_cast<float*>(a.delta.zs) + m0 * a.delta.r,
                                            {mb, a.delta.r}, opts);
        const at::Tensor Ct = at::from_blob(const_cast<float*>(a.delta.Ct), {a.delta.r, n}, opts);
        at::mm_out(out, zs, Ct);
        if (a.delta.lb) out.add_(at::from_blob(const_cast<float*>(a.delta.lb), {n}, opts));
        Dblk = blk.data();
      }
      signorm_rows_f32(a, Dblk, m0, m0 + mb, mode, mx, Dbuf.data(), Lbuf.data());
    }
  });
}

}  // namespace

void signorm_epilogue_f32(const float* y0, const float* b, int64_t M, int64_t n, float k,
                          float eps, bool raw, bool tensor_scope, const F32Delta& delta,
                          float* out, float* S_out, float* rowmax) {
  if (M == 0 || n == 0) {
    std::fill(rowmax, rowmax + M, 0.0f);
    return;
  }
  Rows a{y0, b, n, k, eps, raw, tensor_scope, delta, out, S_out, rowmax, nullptr, nullptr, nullptr};
  if (!tensor_scope) {
    for_all_rows(a, M, 1, nullptr);
    return;
  }
  for_all_rows(a, M, 0, nullptr);   // two-phase: every row's max first, then their max
  const float gmax = *std::max_element(rowmax, rowmax + M);
  for_all_rows(a, M, 1, &gmax);
}

void signorm_grads_f32(const float* g, const float* y0, const float* delta, const float* mx,
                       int64_t M, int64_t n, float k, float eps, bool raw, bool tensor_scope,
                       float* dy0, float* dd) {
  if (M == 0 || n == 0) return;
  F32Delta d;
  d.D = delta;
  d.ldd = n;
  Rows a{y0, nullptr, n, k, eps, raw, tensor_scope, d, nullptr, nullptr, nullptr, g, dy0, dd};
  for_all_rows(a, M, 2, mx);
}

}  // namespace cpu

namespace {

template <typename scalar_t, typename acc_t>
void load_block(const scalar_t* src, int64_t mb, int64_t n, acc_t* dst) {
  for (int64_t i = 0; i < mb * n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

void signorm_rows_cpu(const at::Tensor& y0, const at::Tensor& delta, double k, double eps,
                      const SignormOptions& o, at::Tensor& y, at::Tensor& rowmax) {
  const int64_t M = y0.size(0), n = y0.size(1);
  if (y0.scalar_type() == at::kFloat) {
    cpu::F32Delta d;
    d.D = delta.data_ptr<float>();
    d.ldd = n;
    cpu::signorm_epilogue_f32(y0.data_ptr<float>(), nullptr, M, n, float(k), float(eps), o.raw,
                              o.tensor_scope, d, y.data_ptr<float>(), nullptr,
                              rowmax.data_ptr<float>());
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y0.scalar_type(), "signorm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dp = delta.data_ptr<scalar_t>();
    auto fill = [&](int64_t m0, int64_t mb, acc_t* D) { load_block(dp + m0 * n, mb, n, D); };
    cpu::signorm_epilogue<scalar_t, acc_t>(y0.data_ptr<scalar_t>(), nullptr, M, n, acc_t(k),
                                           acc_t(eps), o.raw, o.tensor_scope, fill,
                                           y.data_ptr<scalar_t>(), nullptr,
                                           rowmax.data_ptr<acc_t>());
  });
}

// Per block of rows: S recomputed into a buffer (ratios, then scales), then dy0 and dΔ.
void signorm_grads_cpu(const at::Tensor& g, const at::Tensor& y0, const at::Tensor& delta,
                       const at::Tensor& mxs, double k, double eps, const SignormOptions& o,
                       at::Tensor& dy0, at::Tensor& dd) {
  const int64_t M = y0.size(0), n = y0.size(1);
  if (y0.scalar_type() == at::kFloat) {
    cpu::signorm_grads_f32(g.data_ptr<float>(), y0.data_ptr<float>(), delta.data_ptr<float>(),
                           mxs.data_ptr<float>(), M, n, float(k), float(eps), o.raw,
                           o.tensor_scope, dy0.data_ptr<float>(), dd.data_ptr<float>());
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y0.scalar_type(), "signorm_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *yp = y0.data_ptr<scalar_t>(), *dp = delta.data_ptr<scalar_t>(),
                   *gp = g.data_ptr<scalar_t>();
    scalar_t *o0 = dy0.data_ptr<scalar_t>(), *od = dd.data_ptr<scalar_t>();
    const acc_t* mx = mxs.data_ptr<acc_t>();
    const int64_t mb_max = cpu::signorm_rows_per_block(n);
    at::parallel_for(0, M, mb_max, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> D(mb_max * n), L(mb_max * n), unused(mb_max);
      for (int64_t m0 = begin; m0 < end; m0 += mb_max) {
        const int64_t mb = std::min(mb_max, end - m0);
        load_block(dp + m0 * n, mb, n, D.data());
        cpu::signorm_ratios<scalar_t, acc_t>(yp + m0 * n, nullptr, D.data(), mb, n, acc_t(eps),
                                             L.data(), unused.data());
        cpu::signorm_scales_inplace<acc_t>(L.data(), mb, n, o.tensor_scope ? mx : mx + m0,
                                           o.tensor_scope ? 0 : 1, acc_t(k), acc_t(eps), o.raw);
        for (int64_t i = 0; i < mb * n; ++i) {
          const acc_t q = static_cast<acc_t>(gp[m0 * n + i]) / L[i];
          o0[m0 * n + i] = static_cast<scalar_t>(q + q);
          od[m0 * n + i] = static_cast<scalar_t>(q);
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> signorm_cpu(const at::Tensor& y0, const at::Tensor& delta,
                                               double k, double eps, c10::string_view norm,
                                               c10::string_view scope) {
  return signorm_forward(y0, delta, k, eps, std::string(norm), std::string(scope), signorm_rows_cpu);
}

std::tuple<at::Tensor, at::Tensor> signorm_bwd_cpu(const at::Tensor& grad, const at::Tensor& y0,
                                                   const at::Tensor& delta, const at::Tensor& rowmax,
                                                   double k, double eps, c10::string_view norm,
                                                   c10::string_view scope) {
  return signorm_backward(grad, y0, delta, rowmax, k, eps, std::string(norm), std::string(scope),
                          signorm_grads_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CPU, m) {
  m.impl("signorm", &signorm_cpu);
  m.impl("signorm_bwd", &signorm_bwd_cpu);
}

}  // namespace fastcur
