// IMSM's memory gate on CUDA (SPEC §6): one thread block per token row.
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
  for (int64_t j0 = 0; j0 < r; j0 += kCols) {
    acc_t part[kCols];
    for (int jj = 0; jj < kCols; ++jj) part[jj] = 0;
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
      const acc_t hk = static_cast<acc_t>(hr[k]), tk = static_cast<acc_t>(tr[k]);
      for (int jj = 0; jj < kCols; ++jj)
        if (j0 + jj < r) part[jj] += hk * A2[k * r + j0 + jj] + tk * A3[k * r + j0 + jj];
    }
    for (int jj = 0; jj < kCols && j0 + jj < r; ++jj) {
      const acc_t s = block_sum(part[jj], scratch);
      if (threadIdx.x == 0) {
        const int64_t j = j0 + jj;
        acc_t zj = c[(m / T) * r + j] + s;
        if (mask != nullptr) zj *= static_cast<acc_t>(mask[m * r + j]);
        zs[j] = zj;
        z_out[m * r + j] = zj;
      }
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    acc_t a = 0;
    for (int64_t j = 0; j < r; ++j) a += zs[j] * Wb[j * d + i];
    const acc_t g = sigmoid(a);
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
  for (int64_t j0 = 0; j0 < r; j0 += kCols) {
    acc_t part[kCols];
    for (int jj = 0; jj < kCols; ++jj) part[jj] = 0;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      acc_t a = 0;
      for (int64_t j = 0; j < r; ++j) a += zs[j] * Wb[j * d + i];
      const acc_t g = sigmoid(a);
      const acc_t da = static_cast<acc_t>(gr[i]) * (static_cast<acc_t>(hr[i]) - static_cast<acc_t>(tr[i])) *
                       g * (acc_t(1) - g);
      for (int jj = 0; jj < kCols; ++jj)
        if (j0 + jj < r) part[jj] += da * Wb[(j0 + jj) * d + i];
    }
    for (int jj = 0; jj < kCols && j0 + jj < r; ++jj) {
      const acc_t s = block_sum(part[jj], scratch);
      if (threadIdx.x == 0) {
        const int64_t j = j0 + jj;
        const acc_t v = mask != nullptr ? s * static_cast<acc_t>(mask[m * r + j]) : s;
        dzs[j] = v;
        dz_out[m * r + j] = v;
      }
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    acc_t a = 0;
    for (int64_t j = 0; j < r; ++j) a += zs[j] * Wb[j * d + i];
    const acc_t g = sigmoid(a);
    const acc_t go = static_cast<acc_t>(gr[i]);
    const acc_t da = go * (static_cast<acc_t>(hr[i]) - static_cast<acc_t>(tr[i])) * g * (acc_t(1) - g);
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

std::tuple<at::Tensor, at::Tensor> imsm_gate_cuda(const at::Tensor& h_in, const at::Tensor& ht_in,
                                                  const at::Tensor& q, const at::Tensor& qt,
                                                  const at::Tensor& W_A, const at::Tensor& W_B,
                                                  const c10::optional<at::Tensor>& mask_in) {
  const ImsmDims s = check_imsm_inputs(h_in, ht_in, q, qt, W_A, W_B, mask_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const int64_t M = s.B * s.T, d = s.d, r = s.r;
  const at::Tensor h = h_in.contiguous(), ht = ht_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(h);
  at::Tensor z = at::zeros({s.B, s.T, r}, h.options().dtype(imsm_acc_type(h.scalar_type())));
  if (M == 0 || d == 0) return {out, z};
  at::Tensor c, A2, A3, Wb;
  std::tie(c, A2, A3, Wb) = imsm_prepare(q, qt, W_A, W_B, d);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "imsm_gate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    imsm_fwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(M), kThreads, r * sizeof(acc_t), stream>>>(
        h.data_ptr<scalar_t>(), ht.data_ptr<scalar_t>(), c.data_ptr<acc_t>(), A2.data_ptr<acc_t>(),
        A3.data_ptr<acc_t>(), Wb.data_ptr<acc_t>(), mask.defined() ? mask.data_ptr<scalar_t>() : nullptr,
        out.data_ptr<scalar_t>(), z.data_ptr<acc_t>(), s.T, d, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> imsm_gate_bwd_cuda(
    const at::Tensor& grad_in, const at::Tensor& h_in, const at::Tensor& ht_in, const at::Tensor& q,
    const at::Tensor& qt, const at::Tensor& W_A, const at::Tensor& W_B,
    const c10::optional<at::Tensor>& mask_in, const at::Tensor& z_in, bool need_h, bool need_ht) {
  const ImsmDims s = check_imsm_inputs(h_in, ht_in, q, qt, W_A, W_B, mask_in);
  TORCH_CHECK(grad_in.sizes() == h_in.sizes(), "fastcur: grad must have the shape of h ",
              shape_str(h_in), ", got ", shape_str(grad_in));
  check_like(grad_in, "grad", h_in, "h");
  const auto acc = imsm_acc_type(h_in.scalar_type());
  TORCH_CHECK(z_in.dim() == 3 && z_in.size(0) == s.B && z_in.size(1) == s.T && z_in.size(2) == s.r &&
                  z_in.scalar_type() == acc,
              "fastcur: z must be ", acc, " of shape [", s.B, ", ", s.T, ", ", s.r, "], got ",
              z_in.scalar_type(), " ", shape_str(z_in));
  const c10::cuda::CUDAGuard guard(h_in.device());
  const int64_t M = s.B * s.T, d = s.d, r = s.r;
  const at::Tensor h = h_in.contiguous(), ht = ht_in.contiguous(), g_out = grad_in.contiguous(),
                   z = z_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  at::Tensor dh = need_h ? at::empty_like(h) : at::empty({0}, h.options());
  at::Tensor dht = need_ht ? at::empty_like(h) : at::empty({0}, h.options());
  at::Tensor dzp = at::zeros({M, r}, h.options().dtype(acc));
  at::Tensor dWb = at::zeros({r, d}, h.options().dtype(acc));
  const at::Tensor A = W_A.to(acc).contiguous();
  const at::Tensor A2 = A.narrow(0, d, d), A3 = A.narrow(0, 2 * d, d);
  const at::Tensor Wb = W_B.to(acc).contiguous();
  if (M > 0 && d > 0) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "imsm_gate_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      imsm_bwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(M), kThreads, 2 * r * sizeof(acc_t), stream>>>(
          g_out.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), ht.data_ptr<scalar_t>(),
          A2.data_ptr<acc_t>(), A3.data_ptr<acc_t>(), Wb.data_ptr<acc_t>(),
          mask.defined() ? mask.data_ptr<scalar_t>() : nullptr, z.data_ptr<acc_t>(),
          need_h ? dh.data_ptr<scalar_t>() : nullptr, need_ht ? dht.data_ptr<scalar_t>() : nullptr,
          dzp.data_ptr<acc_t>(), dWb.data_ptr<acc_t>(), d, r);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const at::Tensor dA2 = at::matmul(h.view({M, d}).to(acc).t(), dzp);
  const at::Tensor dA3 = at::matmul(ht.view({M, d}).to(acc).t(), dzp);
  at::Tensor dq, dqt, dA1, dA4;
  std::tie(dq, dqt, dA1, dA4) = imsm_query_grads(dzp, q, qt, W_A, s);
  const at::Tensor dWA = at::cat({dA1, dA2, dA3, dA4}, 0);
  const auto dt = h.scalar_type();
  return {dh, dht, dq.to(dt), dqt.to(dt), dWA.to(dt), dWb.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcur, CUDA, m) {
  m.impl("imsm_gate", &imsm_gate_cuda);
  m.impl("imsm_gate_bwd", &imsm_gate_bwd_cuda);
}

}  // namespace fastcur
