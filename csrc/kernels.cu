// CUDA kernels of the hicmae_dist ops (CUDA impls registered with TORCH_LIBRARY_IMPL):
//   gather_visible(x, idx)                       out[b, j] = x[b, idx[b, j]]
//   gather_visible_backward(grad, idx, N)        grad_x[b, idx[b, j]] += grad[b, j]
//   assemble_decoder_tokens(vis, mask, pos, vi, mi)
//        out[b, j]      = vis[b, j] + pos[vi[b, j]]      j < Nv
//        out[b, Nv + j] = mask      + pos[mi[b, j]]      j < Nm
//   patch_norm(x, frame_diff)  x (R, F, S, C): per (r, c) standardise over (F, S) with the unbiased
//        std, (x - mean) / (std + 1e-6); with frame_diff, frames f >= 1 minus frame 0.
// The CPU impls are in gather.cpp and tokens.cpp; the schemas are defined in gather.cpp.
// Index range: the CPU impls raise; here a device-side assert (CUDA_KERNEL_ASSERT, like torch's
// own index kernels) instead of a host sync per call.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace hicmae_dist {
namespace {

constexpr int kThreads = 256;

// ---------------------------------------------------------------------------------------------
// gather_visible: one thread block per output row (b, j); rows copied as words of type Word
// (16, 8, 4, 2 or 1 bytes, the widest the row size and alignment allow): one kernel, any dtype.
// ---------------------------------------------------------------------------------------------
template <typename Word>
__global__ void __launch_bounds__(kThreads) gather_rows_kernel(
    Word* __restrict__ dst, const Word* __restrict__ src, const int64_t* __restrict__ idx,
    int64_t Nv, int64_t N, int64_t row_words) {
  const int64_t r = blockIdx.x;  // b * Nv + j
  const int64_t b = r / Nv;
  const int64_t n = idx[r];
  CUDA_KERNEL_ASSERT(n >= 0 && n < N && "gather_visible: idx out of range");
  const Word* s = src + (b * N + n) * row_words;
  Word* d = dst + r * row_words;
  for (int64_t c = threadIdx.x; c < row_words; c += blockDim.x) d[c] = s[c];
}

// Scatter-add of the gathered rows' gradients; repeated indices accumulate atomically.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gather_backward_kernel(
    scalar_t* __restrict__ grad_x, const scalar_t* __restrict__ grad, const int64_t* __restrict__ idx,
    int64_t Nv, int64_t N, int64_t C) {
  const int64_t r = blockIdx.x;
  const int64_t b = r / Nv;
  const int64_t n = idx[r];
  CUDA_KERNEL_ASSERT(n >= 0 && n < N && "gather_visible_backward: idx out of range");
  const scalar_t* g = grad + r * C;
  scalar_t* gx = grad_x + (b * N + n) * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) gpuAtomicAdd(gx + c, g[c]);
}

// ---------------------------------------------------------------------------------------------
// assemble_decoder_tokens: one block per output row; the add rounds like torch's (opmath, then
// one rounding to scalar_t), so the result is bit-identical to `torch.cat([vis + pos[vi],
// mask + pos[mi]], 1)`.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) assemble_kernel(
    scalar_t* __restrict__ out, const scalar_t* __restrict__ vis, const scalar_t* __restrict__ mask,
    const scalar_t* __restrict__ pos, const int64_t* __restrict__ vis_idx,
    const int64_t* __restrict__ mask_idx, int64_t Nv, int64_t Nm, int64_t N, int64_t C) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x;  // b * (Nv + Nm) + j
  const int64_t b = r / (Nv + Nm);
  const int64_t j = r - b * (Nv + Nm);
  const bool visible = j < Nv;
  const scalar_t* base = visible ? vis + (b * Nv + j) * C : mask;
  const int64_t n = visible ? vis_idx[b * Nv + j] : mask_idx[b * Nm + (j - Nv)];
  CUDA_KERNEL_ASSERT(n >= 0 && n < N && "assemble_decoder_tokens: idx out of range");
  const scalar_t* p = pos + n * C;
  scalar_t* o = out + r * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    o[c] = static_cast<scalar_t>(static_cast<opmath_t>(base[c]) + static_cast<opmath_t>(p[c]));
}

// ---------------------------------------------------------------------------------------------
// patch_norm: one block per (r, c). Two passes over the F * S values (stride C in memory):
// the mean, then the sum of squared deviations (numerically safer than sum / sum of squares).
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ T block_sum(T v, T* smem) {  // smem: 32 slots; every thread gets the block's sum
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // smem reuse across calls
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = lane < warps ? smem[lane] : T(0);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) patch_norm_kernel(
    scalar_t* __restrict__ out, const scalar_t* __restrict__ x, int F, int S, int C,
    bool frame_diff, float eps) {
  // in-row offsets are 32-bit (the launcher checks F * S * C < 2^31): with 64-bit ones the
  // float instantiation spills around the IEEE division's slow-path call
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem[32];
  const int64_t r = blockIdx.x / C;
  const int c = static_cast<int>(blockIdx.x % C);
  const int L = F * S;
  const scalar_t* xr = x + r * L * C + c;
  scalar_t* orow = out + r * L * C + c;
  acc_t sum = 0;
  for (int i = threadIdx.x; i < L; i += blockDim.x) sum += static_cast<acc_t>(xr[i * C]);
  const acc_t mean = block_sum(sum, smem) / static_cast<acc_t>(L);
  acc_t sq = 0;
  for (int i = threadIdx.x; i < L; i += blockDim.x) {
    const acc_t d = static_cast<acc_t>(xr[i * C]) - mean;
    sq += d * d;
  }
  // unbiased variance; L == 1 gives nan, as torch.var does
  const acc_t var = block_sum(sq, smem) / static_cast<acc_t>(L - 1);
  const acc_t denom = sqrt(var) + static_cast<acc_t>(eps);
  for (int s = threadIdx.x; s < S; s += blockDim.x) {  // a thread owns column s of every frame
    const acc_t first = (static_cast<acc_t>(xr[s * C]) - mean) / denom;
    orow[s * C] = static_cast<scalar_t>(first);
    for (int f = 1; f < F; ++f) {
      const acc_t v = (static_cast<acc_t>(xr[(f * S + s) * C]) - mean) / denom;
      orow[(f * S + s) * C] = static_cast<scalar_t>(frame_diff ? v - first : v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host launchers (inputs checked and made contiguous by the shared checks below)
// ---------------------------------------------------------------------------------------------
void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
}

// Threads per row: the row's elements rounded up to whole warps, at most kThreads (short rows,
// e.g. C = 64 fp32 as 16 int4 words, do not leave 7 of 8 warps idle).
unsigned threads_for(int64_t elems) {
  const int64_t warps = (elems + 31) / 32;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(warps, 1) * 32, kThreads));
}

template <typename Word>
void launch_gather_rows(char* dst, const char* src, const int64_t* idx, int64_t rows, int64_t Nv,
                        int64_t N, int64_t row_bytes, cudaStream_t stream) {
  const int64_t row_words = row_bytes / static_cast<int64_t>(sizeof(Word));
  gather_rows_kernel<Word><<<rows, threads_for(row_words), 0, stream>>>(
      reinterpret_cast<Word*>(dst), reinterpret_cast<const Word*>(src), idx, Nv, N, row_words);
}

at::Tensor gather_visible_cuda(const at::Tensor& x_in, const at::Tensor& idx_in) {
  TORCH_CHECK(x_in.dim() == 3, "gather_visible: x must be (B, N, C), got ", x_in.sizes());
  TORCH_CHECK(idx_in.dim() == 2 && idx_in.size(0) == x_in.size(0),
              "gather_visible: idx must be (B, Nv) with B = ", x_in.size(0), ", got ", idx_in.sizes());
  TORCH_CHECK(idx_in.scalar_type() == at::kLong, "gather_visible: idx must be int64");
  check_cuda(x_in, "gather_visible", "x");
  check_cuda(idx_in, "gather_visible", "idx");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto idx = idx_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), Nv = idx.size(1);
  auto out = at::empty({B, Nv, C}, x.options());
  const int64_t rows = B * Nv, row_bytes = C * static_cast<int64_t>(x.element_size());
  if (rows == 0 || row_bytes == 0) return out;
  auto* dst = static_cast<char*>(out.mutable_data_ptr());
  const auto* src = static_cast<const char*>(x.const_data_ptr());
  const auto align = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                     static_cast<uintptr_t>(row_bytes);
  const int64_t* ids = idx.const_data_ptr<int64_t>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (align % 16 == 0) launch_gather_rows<int4>(dst, src, ids, rows, Nv, N, row_bytes, stream);
  else if (align % 8 == 0) launch_gather_rows<int2>(dst, src, ids, rows, Nv, N, row_bytes, stream);
  else if (align % 4 == 0) launch_gather_rows<int>(dst, src, ids, rows, Nv, N, row_bytes, stream);
  else if (align % 2 == 0) launch_gather_rows<short>(dst, src, ids, rows, Nv, N, row_bytes, stream);
  else launch_gather_rows<char>(dst, src, ids, rows, Nv, N, row_bytes, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor gather_visible_backward_cuda(const at::Tensor& grad_in, const at::Tensor& idx_in, int64_t N) {
  TORCH_CHECK(grad_in.dim() == 3, "gather_visible_backward: grad must be (B, Nv, C), got ", grad_in.sizes());
  TORCH_CHECK(idx_in.dim() == 2 && idx_in.size(0) == grad_in.size(0) && idx_in.size(1) == grad_in.size(1),
              "gather_visible_backward: idx (B, Nv) must match grad ", grad_in.sizes());
  TORCH_CHECK(idx_in.scalar_type() == at::kLong, "gather_visible_backward: idx must be int64");
  check_cuda(grad_in, "gather_visible_backward", "grad");
  check_cuda(idx_in, "gather_visible_backward", "idx");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto grad = grad_in.contiguous();
  const auto idx = idx_in.contiguous();
  const int64_t B = grad.size(0), Nv = grad.size(1), C = grad.size(2);
  auto grad_x = at::zeros({B, N, C}, grad.options());
  if (B * Nv == 0 || C == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gather_visible_backward_cuda", [&] {
    gather_backward_kernel<scalar_t><<<B * Nv, threads_for(C), 0, at::cuda::getCurrentCUDAStream()>>>(
        grad_x.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
        idx.const_data_ptr<int64_t>(), Nv, N, C);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_x;
}

at::Tensor assemble_decoder_tokens_cuda(const at::Tensor& vis_in, const at::Tensor& mask_in,
                                        const at::Tensor& pos_in, const at::Tensor& vis_idx_in,
                                        const at::Tensor& mask_idx_in) {
  const char* op = "assemble_decoder_tokens";
  TORCH_CHECK(vis_in.dim() == 3 && mask_in.dim() == 1 && pos_in.dim() == 2, op,
              ": expected visible (B, Nv, C), mask_token (C,), pos (N, C); got ", vis_in.sizes(), ", ",
              mask_in.sizes(), ", ", pos_in.sizes());
  const int64_t B = vis_in.size(0), Nv = vis_in.size(1), C = vis_in.size(2), N = pos_in.size(0);
  TORCH_CHECK(mask_in.size(0) == C && pos_in.size(1) == C, op, ": channel counts differ");
  TORCH_CHECK(vis_in.scalar_type() == mask_in.scalar_type() && vis_in.scalar_type() == pos_in.scalar_type(),
              op, ": visible, mask_token and pos must share a dtype");
  TORCH_CHECK(vis_idx_in.dim() == 2 && vis_idx_in.size(0) == B && vis_idx_in.size(1) == Nv &&
              mask_idx_in.dim() == 2 && mask_idx_in.size(0) == B, op,
              ": visible_idx must be (B, Nv) and masked_idx (B, Nm)");
  TORCH_CHECK(vis_idx_in.scalar_type() == at::kLong && mask_idx_in.scalar_type() == at::kLong, op,
              ": indices must be int64");
  for (const auto* t : {&vis_in, &mask_in, &pos_in, &vis_idx_in, &mask_idx_in}) check_cuda(*t, op, "every input");
  const c10::cuda::CUDAGuard guard(vis_in.device());
  const auto vis = vis_in.contiguous(), mask = mask_in.contiguous(), pos = pos_in.contiguous();
  const auto vis_idx = vis_idx_in.contiguous(), mask_idx = mask_idx_in.contiguous();
  const int64_t Nm = mask_idx.size(1);
  auto out = at::empty({B, Nv + Nm, C}, vis.options());
  if (B * (Nv + Nm) == 0 || C == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vis.scalar_type(), "assemble_decoder_tokens_cuda", [&] {
    assemble_kernel<scalar_t><<<B * (Nv + Nm), threads_for(C), 0, at::cuda::getCurrentCUDAStream()>>>(
        out.mutable_data_ptr<scalar_t>(), vis.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(),
        pos.const_data_ptr<scalar_t>(), vis_idx.const_data_ptr<int64_t>(),
        mask_idx.const_data_ptr<int64_t>(), Nv, Nm, N, C);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor patch_norm_cuda(const at::Tensor& x_in, bool frame_diff) {
  TORCH_CHECK(x_in.dim() == 4, "patch_norm: x must be (R, F, S, C), got ", x_in.sizes());
  check_cuda(x_in, "patch_norm", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const int64_t R = x.size(0), F = x.size(1), S = x.size(2), C = x.size(3);
  auto out = at::empty_like(x);
  if (R * C == 0 || F * S == 0) return out;
  TORCH_CHECK(F * S * C < (int64_t{1} << 31), "patch_norm: a row of F * S * C = ", F * S * C,
              " values is too long for the kernel's 32-bit offsets");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patch_norm_cuda", [&] {
    patch_norm_kernel<scalar_t><<<R * C, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        out.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), static_cast<int>(F),
        static_cast<int>(S), static_cast<int>(C), frame_diff, 1e-6f);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hicmae_dist, CUDA, m) {
  m.impl("gather_visible", &gather_visible_cuda);
  m.impl("gather_visible_backward", &gather_visible_backward_cuda);
  m.impl("assemble_decoder_tokens", &assemble_decoder_tokens_cuda);
  m.impl("patch_norm", &patch_norm_cuda);
}

}  // namespace hicmae_dist
