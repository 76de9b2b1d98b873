// jump_linear on the CPU (docs/methods.md, JumpLoRA): the row-block schedule of csrc/jump_linear.h with ATen
// GEMMs (MKL / oneDNN) and the elementwise tile primitives below (at::parallel_for).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <vector>

#include "jump_linear.h"

namespace fastcur {
namespace {

// Tile of Z / dy^T x per block: 256 Ki elements (1 MB in float32). Each thread's dy^T x
// tile is a single-threaded GEMM [rows, M] x [M, k] that packs x once per block, so taller
// tiles amortize the packing; the tile is still in L2/L3 when the elementwise pass and the
// rank-r contractions read it. Measured (M = n = k = 2048, r = 8, fwd+bwd, 2 threads, on a
// machine at load 3-8, so only coarse): 64 Ki elements 1268 ms, 256 Ki 1164 ms, 1 Mi 1364 ms.
constexpr int64_t kDefaultTileElems = int64_t{1} << 18;
constexpr int64_t kGrain = 4096;

// FASTCUR_JUMP_TILE_ELEMS overrides the tile size (a tuning knob for benchmarks; read once).
int64_t tile_elems() {
  static const int64_t value = [] {
    const char* env = std::getenv("FASTCUR_JUMP_TILE_ELEMS");
    const int64_t v = env != nullptr ? std::atoll(env) : 0;
    return v > 0 ? v : kDefaultTileElems;
  }();
  return value;
}

double theta_of(const at::Tensor& log_theta) { return std::exp(log_theta.item<double>()); }

// out = W + s (f J(Z) + (1 - f) Z); with ELLA's W_past tile `Wp` (else undefined) the same
// pass returns the tile's Σ (s Z e Wp)², e = fe 1[|Z| > θ] + 1 - fe (0 without it).
double build_weff_cpu(at::Tensor& out, const at::Tensor& W, const at::Tensor& Z,
                      const at::Tensor& log_theta, double s, double f, const at::Tensor& Wp = {},
                      double fe = 1.0) {
  const double th = theta_of(log_theta);
  const int64_t N = out.numel();
  const bool ella = Wp.defined();
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "jump_build_weff", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* wp = W.data_ptr<scalar_t>();
    const scalar_t* pp = ella ? Wp.data_ptr<scalar_t>() : nullptr;
    const acc_t* zp = Z.data_ptr<acc_t>();
    const acc_t ths = static_cast<acc_t>(th), sa = static_cast<acc_t>(s);
    const acc_t keep = sa, soft = static_cast<acc_t>(s * (1.0 - f));
    const acc_t ella_soft = static_cast<acc_t>(s * (1.0 - fe));
    total = at::parallel_reduce(0, N, kGrain, 0.0, [&](int64_t b, int64_t e, double part) {
      acc_t local = 0;
      for (int64_t i = b; i < e; ++i) {
        const acc_t z = zp[i];
        const bool on = std::abs(z) > ths;
        op[i] = static_cast<scalar_t>(static_cast<acc_t>(wp[i]) + (on ? keep : soft) * z);
        if (ella) {
          const acc_t v = (on ? sa : ella_soft) * z * static_cast<acc_t>(pp[i]);
          local += v * v;
        }
      }
      return part + static_cast<double>(local);
    }, std::plus<double>());
  });
  return total;
}

// dZ = s T (f m + 1 - f) (+ c 2 s² e² Z Wp² with ELLA's W_past tile `Wp`, c = the gradient of
// the ELLA output, e = fe m + 1 - fe), and the tile's straight-through θ sum into th_acc.
void grad_tile_cpu(at::Tensor& dZ, const at::Tensor& T, const at::Tensor& Z,
                   const at::Tensor& log_theta, double s, double f, double eps,
                   at::Tensor& th_acc, const at::Tensor& Wp = {}, double ella_coef = 0.0,
                   double fe = 1.0) {
  const double th = theta_of(log_theta);
  const bool ella = Wp.defined() && ella_coef != 0.0;
  const int64_t N = Z.numel();
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, T.scalar_type(), "jump_grad_tile", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* tp = T.data_ptr<scalar_t>();
    const acc_t* zp = Z.data_ptr<acc_t>();
    acc_t* dp = dZ.data_ptr<acc_t>();
    const scalar_t* pp = ella ? Wp.data_ptr<scalar_t>() : nullptr;
    const acc_t ths = static_cast<acc_t>(th), sa = static_cast<acc_t>(s);
    const acc_t soft = static_cast<acc_t>(1.0 - f), inv_eps = static_cast<acc_t>(1.0 / eps);
    const acc_t ella_c = static_cast<acc_t>(2.0 * s * s * ella_coef);
    const acc_t ella_soft2 = static_cast<acc_t>((1.0 - fe) * (1.0 - fe));
    const bool want_theta = f != 0.0;
    total = at::parallel_reduce(0, N, kGrain, 0.0, [&](int64_t b, int64_t e, double part) {
      acc_t local = 0;
      for (int64_t i = b; i < e; ++i) {
        const acc_t z = zp[i];
        const acc_t g = sa * static_cast<acc_t>(tp[i]);
        const bool on = std::abs(z) > ths;
        acc_t d = on ? g : g * soft;                 // G (f 1[|Z|>θ] + 1 - f)
        if (ella) {
          const acc_t w = static_cast<acc_t>(pp[i]);
          d += (on ? ella_c : ella_c * ella_soft2) * z * w * w;
        }
        dp[i] = d;
        if (want_theta) {
          const acc_t u1 = (z - ths) * inv_eps, u2 = (-z - ths) * inv_eps;
          const acc_t term = acc_t(std::abs(u2) < acc_t(0.5)) - acc_t(std::abs(u1) < acc_t(0.5));
          local += g * term;
        }
      }
      return part + static_cast<double>(local);
    }, std::plus<double>());
  });
  if (f != 0.0) th_acc.add_(total * f * th / eps);
}

at::Tensor finish_theta(const at::Tensor& th_acc, const at::Tensor& log_theta, double denom) {
  return (th_acc * log_theta.to(th_acc.scalar_type()).reshape({}).exp() / denom)
      .to(log_theta.scalar_type())
      .reshape(log_theta.sizes());
}

// The CPU schedule. One at::parallel_for over blocks of W's rows: each thread owns whole
// blocks, computes its Z tile and dy^T x tile with single-threaded ATen GEMMs into its own
// small buffers (MKL runs sequentially inside a parallel region), applies the elementwise
// terms while the tile is hot, and contracts it with A and B right away (dB rows are
// disjoint per block; dA and the θ sum are per-thread partials, reduced at the end). One
// parallel region per call: measured here, the generic schedule of csrc/jump_linear.h
// (a serial block loop whose GEMMs and epilogues each open their own parallel region) lost
// seconds to OpenMP barriers on this shared 2-core machine. Only the dense x Weff^T and
// dy Weff GEMMs run multi-threaded.
struct BlockPlan {
  int64_t rows, blocks;
};

BlockPlan plan(int64_t n, int64_t k) {
  const int64_t rows = jump_block_rows(n, k, tile_elems());
  return {rows, (n + rows - 1) / rows};
}

// W + ΔW assembled block by block; with `Wp` (ELLA's W_past) also Σ (s J(Z) ⊙ Wp)² into `ella`
// (a [] tensor in the acc dtype), from the same Z tiles.
at::Tensor build_weff_blocks(const at::Tensor& W, const at::Tensor& A_acc, const at::Tensor& B_acc,
                             const at::Tensor& log_theta, double scale, double f,
                             const at::Tensor& Wp = {}, at::Tensor* ella = nullptr,
                             double fe = 1.0) {
  const int64_t n = W.size(0), k = W.size(1);
  at::Tensor weff = at::empty_like(W);
  const BlockPlan p = plan(n, k);
  std::vector<double> ella_parts(p.blocks, 0.0);
  at::parallel_for(0, p.blocks, 1, [&](int64_t b0, int64_t b1) {
    // Worker threads do not inherit the caller's dispatch state: skip autograd explicitly.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor z_buf = at::empty({p.rows, k}, A_acc.options());
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * p.rows, b = std::min(p.rows, n - i0);
      at::Tensor z = z_buf.narrow(0, 0, b), out = weff.narrow(0, i0, b);
      at::mm_out(z, B_acc.narrow(0, i0, b), A_acc);
      ella_parts[blk] = build_weff_cpu(out, W.narrow(0, i0, b), z, log_theta, scale, f,
                                       Wp.defined() ? Wp.narrow(0, i0, b) : at::Tensor(), fe);
    }
  });
  if (ella != nullptr) {
    double total = 0.0;
    for (double v : ella_parts) total += v;  // fixed order: deterministic
    *ella = at::scalar_tensor(total, A_acc.options());
  }
  return weff;
}

at::Tensor jump_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                           const at::Tensor& B, const at::Tensor& log_theta, double scale,
                           double f, double /*bandwidth*/, bool /*mean*/) {
  check_jump_linear_args(x, weight, bias, A, B, log_theta);
  const auto acc = jump_acc_type(weight.scalar_type());
  const at::Tensor weff = build_weff_blocks(weight.contiguous(), A.to(acc).contiguous(),
                                            B.to(acc).contiguous(), log_theta, scale, f);
  if (bias.has_value()) return at::addmm(*bias, x, weff.t());
  return at::mm(x, weff.t());
}

std::tuple<at::Tensor, at::Tensor> jump_linear_ella_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& log_theta, double scale,
    const at::Tensor& W_past, double f, double /*bandwidth*/, bool /*mean*/, double ella_f) {
  check_jump_linear_args(x, weight, bias, A, B, log_theta);
  check_w_past(W_past, weight);
  const auto acc = jump_acc_type(weight.scalar_type());
  at::Tensor ella;
  const at::Tensor weff = build_weff_blocks(weight.contiguous(), A.to(acc).contiguous(),
                                            B.to(acc).contiguous(), log_theta, scale, f,
                                            W_past.contiguous(), &ella, ella_f);
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weff.t()) : at::mm(x, weff.t());
  return {y, ella.to(weight.scalar_type())};
}

// Both backwards; with `Wp` (ELLA's W_past) the ELLA gradient, times `ella_coef`, joins dL/dZ
// in each tile before the one contraction with A and B.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jump_linear_bwd_impl(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& log_theta, double scale, double f, double bandwidth,
    bool mean, bool need_dx, bool need_adapter, const at::Tensor& Wp, double ella_coef,
    double ella_f) {
  check_jump_linear_args(x, weight, c10::nullopt, A, B, log_theta);
  const int64_t M = x.size(0), n = weight.size(0), k = weight.size(1), r = A.size(0);
  check_matrix(grad_y, "grad_y", M, n);
  check_like(grad_y, "grad_y", weight, "weight");
  TORCH_CHECK(bandwidth > 0, "fastcur: bandwidth must be > 0, got ", bandwidth);
  const auto dtype = weight.scalar_type();
  const auto acc = jump_acc_type(dtype);
  const at::Tensor A_acc = A.to(acc).contiguous(), B_acc = B.to(acc).contiguous();
  const at::Tensor W = weight.contiguous(), dy = grad_y.contiguous(), xc = x.contiguous();
  const at::Tensor A_t = A_acc.t();
  const BlockPlan p = plan(n, k);
  at::Tensor weff = need_dx ? at::empty_like(W) : at::Tensor();
  at::Tensor dB = at::zeros({n, r}, A_acc.options());
  // Per-thread partials, indexed by the first block of the thread's range (parallel_for
  // hands each thread one contiguous range of blocks); [blocks, r, k] is small (r x k each).
  at::Tensor dA_parts = at::zeros({p.blocks, r, k}, A_acc.options());
  at::Tensor th_parts = at::zeros({p.blocks}, A_acc.options());
  if (need_dx || need_adapter) {
    at::parallel_for(0, p.blocks, 1, [&](int64_t b0, int64_t b1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::Tensor z_buf = at::empty({p.rows, k}, A_acc.options());
      at::Tensor t_buf = need_adapter ? at::empty({p.rows, k}, W.options()) : at::Tensor();
      at::Tensor dz_buf = (need_adapter && acc != dtype) ? at::empty({p.rows, k}, A_acc.options()) : t_buf;
      at::Tensor dA_local = dA_parts[b0];
      at::Tensor th_local = th_parts.select(0, b0);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t i0 = blk * p.rows, b = std::min(p.rows, n - i0);
        at::Tensor z = z_buf.narrow(0, 0, b);
        const at::Tensor B_blk = B_acc.narrow(0, i0, b);
        at::mm_out(z, B_blk, A_acc);                                 // Z tile      [b, k]
        if (need_dx) {
          at::Tensor out = weff.narrow(0, i0, b);
          build_weff_cpu(out, W.narrow(0, i0, b), z, log_theta, scale, f);
        }
        if (!need_adapter) continue;
        at::Tensor t = t_buf.narrow(0, 0, b), dz = dz_buf.narrow(0, 0, b);
        at::mm_out(t, dy.narrow(1, i0, b).t(), xc);                  // dy^T x tile [b, k]
        grad_tile_cpu(dz, t, z, log_theta, scale, f, bandwidth, th_local,
                      Wp.defined() ? Wp.narrow(0, i0, b) : at::Tensor(), ella_coef, ella_f);
        at::Tensor dB_blk = dB.narrow(0, i0, b);
        at::mm_out(dB_blk, dz, A_t);                                 // dB[blk] = dZ A^T
        dA_local.addmm_(B_blk.t(), dz);                              // dA += B[blk]^T dZ
      }
    });
  }
  at::Tensor dx = need_dx ? at::mm(grad_y, weff) : at::empty({0}, x.options());
  const double denom = mean ? static_cast<double>(n) * static_cast<double>(k) : 1.0;
  at::Tensor dlog = finish_theta(th_parts.sum(), log_theta, denom);
  return {dx, dA_parts.sum(0).to(dtype), dB.to(dtype), dlog};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jump_linear_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& log_theta, double scale, double f, double bandwidth,
    bool mean, bool need_dx, bool need_adapter) {
  return jump_linear_bwd_impl(grad_y, x, weight, A, B, log_theta, scale, f, bandwidth, mean, need_dx,
                              need_adapter, at::Tensor(), 0.0, 1.0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jump_linear_ella_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& grad_ella, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B, const at::Tensor& log_theta,
    double scale, const at::Tensor& W_past, double f, double bandwidth, bool mean, bool need_dx,
    bool need_adapter, double ella_f) {
  check_w_past(W_past, weight);
  check_vector(grad_ella.reshape({-1}), "grad_ella", 1);
  return jump_linear_bwd_impl(grad_y, x, weight, A, B, log_theta, scale, f, bandwidth, mean, need_dx,
                              need_adapter, W_past.contiguous(), grad_ella.item<double>(), ella_f);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CPU, m) {
  m.impl("jump_linear", &jump_linear_cpu);
  m.impl("jump_linear_bwd", &jump_linear_bwd_cpu);
  m.impl("jump_linear_ella", &jump_linear_ella_cpu);
  m.impl("jump_linear_ella_bwd", &jump_linear_ella_bwd_cpu);
}

}  // namespace fastcur
