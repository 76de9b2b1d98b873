// IMSM's memory gate on CUDA (docs/methods.md, IMSM): one thread block per token row.
//
// The query terms c = q A1 + q' A4 [B, r] are computed once per sequence (a tiny cuBLAS GEMM in
// imsm_prepare); the row kernel then forms z = c + h A2 + h' A3 with block reductions over d
// (8 rank columns per sweep, so r = 8 reads each row once), and a = z W_B, σ and the mix in a
// second sweep while the row is in L1/L2. The backward recomputes g from the saved z, reduces
// dz = da W_B^T per row, writes dh, dh' and adds z^T da into dW_B (float32/float64 atomics);
// dA2 = h^T dz and dA3 = h'^T dz are cuBLAS GEMMs afterwards.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "imsm_gate.h"

namespace fastcur {
namespace {

constexpr int kThreads = 256;
constexpr int kCols = 8;  // rank columns reduced per sweep over d

// Sums v over the block; every thread gets the result. `scratch` holds kThreads / 32 values.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* scratch) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

template <typename acc_t>
__device__ inline acc_t sigmoid(acc_t a) {
  return acc_t(1) / (acc_t(1) + exp(-a));
}

// g_i = σ(Σ_j z[j] W_B[j, i]) for the row whose z is in shared memory.
template <typename acc_t>
__device__ __forceinline__ acc_t gate_at(const acc_t* zs, const acc_t* __restrict__ Wb, int64_t d,
                                         int64_t r, int64_t i) {
  acc_t a = 0;
  for (int64_t j = 0; j < r; ++j) a += zs[j] * Wb[j * d + i];
  return sigmoid(a);
}

// dL/da_i = dy_i (h_i - h'_i) g_i (1 - g_i).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t gate_slope(scalar_t go, scalar_t hv, scalar_t tv, acc_t g) {
  return static_cast<acc_t>(go) * (static_cast<acc_t>(hv) - static_cast<acc_t>(tv)) * g * (acc_t(1) - g);
}

// For every rank column j < r: s_j = Σ over the row's d entries, reduced over the block
// (kCols columns per sweep over d, so r = 8 reads the row once); `add_entry(i, j0, part)` adds
// entry i's terms of columns j0 .. j0 + kCols - 1 into part[kCols], and thread 0 calls
// `finish(j, s_j)`.
template <typename acc_t, typename AddEntry, typename Finish>
__device__ __forceinline__ void reduce_rank_columns(int64_t d, int64_t r, acc_t* scratch,
                                                    AddEntry add_entry, Finish finish) {
  for (int64_t j0 = 0; j0 < r; j0 += kCols) {
    acc_t part[kCols];
    for (int jj = 0; jj < kCols; ++jj) part[jj] = 0;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) add_entry(i, j0, part);
    for (int jj = 0; jj < kCols && j0 + jj < r; ++jj) {
      const acc_t s = block_sum(part[jj], scratch);
      if (threadIdx.x == 0) finish(j0 + jj, s);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void imsm_fwd_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ t,
                                const acc_t* __restrict__ c, const acc_t* __restrict__ A2,
                                const acc_t* __restrict__ A3, const acc_t* __restrict__ Wb,
                                const scalar_t* __restrict__ mask, scalar_t* __restrict__ out,
                                acc_t* __restrict__ z_out, int64_t T, int64_t d, int64_t r) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* zs = reinterpret_cast<acc_t*>(smem_raw);  // [r]
  __shared__ acc_t scratch[kThreads / 32];
  const int64_t m = blockIdx.x;
  const scalar_t* hr = h + m * d;
  const scalar_t* tr = t + m * d;
  reduce_rank_columns<acc_t>(
      d, r, scratch,
      [&](int64_t k, int64_t j0, acc_t* part) {
        const acc_t hk = static_cast<acc_t>(hr[k]), tk = static_cast<acc_t>(tr[k]);
        for (int jj = 0; jj < kCols; ++jj)
          if (j0 + jj < r) part[jj] += hk * A2[k * r + j0 + jj] + tk * A3[k * r + j0 + jj];
      },
      [&](int64_t j, acc_t s) {
        acc_t zj = c[(m / T) * r + j] + s;
        if (mask != nullptr) zj *= static_cast<acc_t>(mask[m * r + j]);
        zs[j] = zj;
        z_out[m * r + j] = zj;
      });
  __syncthreads();
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const acc_t g = gate_at(zs, Wb, d, r, i);
    const acc_t hv = static_cast<acc_t>(hr[i]), tv = static_cast<acc_t>(tr[i]);
    out[m * d + i] = static_cast<scalar_t>(tv + g * (hv - tv));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void imsm_bwd_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ h,
                                const scalar_t* __restrict__ t, const acc_t* __restrict__ A2,
                                const acc_t* __restrict__ A3, const acc_t* __restrict__ Wb,
                                const scalar_t* __restrict__ mask, const acc_t* __restrict__ z,
                                scalar_t* __restrict__ dh, scalar_t* __restrict__ dt,
                                acc_t* __restrict__ dz_out, acc_t* __restrict__ dWb, int64_t d,
                                int64_t r) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* zs = reinterpret_cast<acc_t*>(smem_raw);  // [r]
  acc_t* dzs = zs + r;                             // [r]
  __shared__ acc_t scratch[kThreads / 32];
  const int64_t m = blockIdx.x;
  const scalar_t *hr = h + m * d, *tr = t + m * d, *gr = grad + m * d;
  for (int64_t j = threadIdx.x; j < r; j += blockDim.x) zs[j] = z[m * r + j];
  __syncthreads();
  reduce_rank_columns<acc_t>(
      d, r, scratch,
      [&](int64_t i, int64_t j0, acc_t* part) {
        const acc_t da = gate_slope(gr[i], hr[i], tr[i], gate_at(zs, Wb, d, r, i));
        for (int jj = 0; jj < kCols; ++jj)
          if (j0 + jj < r) part[jj] += da * Wb[(j0 + jj) * d + i];
      },
      [&](int64_t j, acc_t s) {
        const acc_t v = mask != nullptr ? s * static_cast<acc_t>(mask[m * r + j]) : s;
        dzs[j] = v;
        dz_out[m * r + j] = v;
      });
  __syncthreads();
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const acc_t g = gate_at(zs, Wb, d, r, i);
    const acc_t go = static_cast<acc_t>(gr[i]);
    const acc_t da = gate_slope(gr[i], hr[i], tr[i], g);
    acc_t s2 = 0, s3 = 0;
    for (int64_t j = 0; j < r; ++j) {
      s2 += A2[i * r + j] * dzs[j];
      s3 += A3[i * r + j] * dzs[j];
      atomicAdd(dWb + j * d + i, zs[j] * da);
    }
    if (dh != nullptr) dh[m * d + i] = static_cast<scalar_t>(go * g + s2);
    if (dt != nullptr) dt[m * d + i] = static_cast<scalar_t>(go * (acc_t(1) - g) + s3);
  }
}

void fwd_rows_cuda(const at::Tensor& h, const at::Tensor& ht, const at::Tensor& mask, const at::Tensor& c,
                   const at::Tensor& A2, const at::Tensor& A3, const at::Tensor& Wb, const ImsmDims& s,
                   at::Tensor& out, at::Tensor& z) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "imsm_gate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    imsm_fwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(s.B * s.T), kThreads, s.r * sizeof(acc_t), stream>>>(
        h.data_ptr<scalar_t>(), ht.data_ptr<scalar_t>(), c.data_ptr<acc_t>(), A2.data_ptr<acc_t>(),
        A3.data_ptr<acc_t>(), Wb.data_ptr<acc_t>(), mask.defined() ? mask.data_ptr<scalar_t>() : nullptr,
        out.data_ptr<scalar_t>(), z.data_ptr<acc_t>(), s.T, s.d, s.r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// dzp, dh, dh' and dW_B (atomics) in one kernel; dA2 = h^T dzp, dA3 = h'^T dzp as GEMMs.
// Returns (dA2, dA3, dW_B).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_rows_cuda(
    const at::Tensor& g_out, const at::Tensor& h, const at::Tensor& ht, const at::Tensor& mask,
    const at::Tensor& z, const at::Tensor& A2, const at::Tensor& A3, const at::Tensor& Wb,
    const ImsmDims& s, const at::Tensor& dh, const at::Tensor& dht, at::Tensor& dzp) {
  const int64_t M = s.B * s.T, d = s.d, r = s.r;
  at::Tensor dWb = at::zeros({r, d}, dzp.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "imsm_gate_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    imsm_bwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(M), kThreads, 2 * r * sizeof(acc_t), stream>>>(
        g_out.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), ht.data_ptr<scalar_t>(),
        A2.data_ptr<acc_t>(), A3.data_ptr<acc_t>(), Wb.data_ptr<acc_t>(),
        mask.defined() ? mask.data_ptr<scalar_t>() : nullptr, z.data_ptr<acc_t>(),
        dh.defined() ? dh.data_ptr<scalar_t>() : nullptr, dht.defined() ? dht.data_ptr<scalar_t>() : nullptr,
        dzp.data_ptr<acc_t>(), dWb.data_ptr<acc_t>(), d, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto acc = dzp.scalar_type();
  const at::Tensor dA2 = at::matmul(h.view({M, d}).to(acc).t(), dzp);
  const at::Tensor dA3 = at::matmul(ht.view({M, d}).to(acc).t(), dzp);
  return {dA2, dA3, dWb};
}

std::tuple<at::Tensor, at::Tensor> imsm_gate_cuda(const at::Tensor& h, const at::Tensor& ht,
                                                  const at::Tensor& q, const at::Tensor& qt,
                                                  const at::Tensor& W_A, const at::Tensor& W_B,
                                                  const c10::optional<at::Tensor>& mask) {
  const c10::cuda::CUDAGuard guard(h.device());
  return imsm_gate_forward(h, ht, q, qt, W_A, W_B, mask, fwd_rows_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> imsm_gate_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& ht, const at::Tensor& q,
    const at::Tensor& qt, const at::Tensor& W_A, const at::Tensor& W_B,
    const c10::optional<at::Tensor>& mask, const at::Tensor& z, bool need_h, bool need_ht) {
  const c10::cuda::CUDAGuard guard(h.device());
  return imsm_gate_backward(grad, h, ht, q, qt, W_A, W_B, mask, z, need_h, need_ht, bwd_rows_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CUDA, m) {
  m.impl("imsm_gate", &imsm_gate_cuda);
  m.impl("imsm_gate_bwd", &imsm_gate_bwd_cuda);
}

}  // namespace fastcur
