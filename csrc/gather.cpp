// Visible-token gather for masked autoencoders: out[b, j] = x[b, idx[b, j]], and its backward.
// CPU kernels; registered as torch ops hicmae_dist::gather_visible(_backward). This file also
// holds the schemas of every hicmae_dist op (TORCH_LIBRARY) and the module's Python entry points;
// the other CPU impls are in tokens.cpp, the CUDA impls in kernels.cu.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>

namespace hicmae_dist {

static void check_inputs(const at::Tensor& x, const at::Tensor& idx, const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, N, C), got ", x.sizes());
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == x.size(0), op, ": idx must be (B, Nv) with B = ",
              x.size(0), ", got ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(x.device() == idx.device(), op, ": x and idx on different devices");
}

static void check_range(const at::Tensor& idx, int64_t n, const char* op) {
  if (idx.numel() == 0) return;
  const auto lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < n, op, ": idx values must lie in [0, ", n, "), got [", lo, ", ", hi, "]");
}

// Rows are copied as raw bytes: one kernel for every dtype.
at::Tensor gather_visible_cpu(const at::Tensor& x_in, const at::Tensor& idx_in) {
  check_inputs(x_in, idx_in, "gather_visible");
  const auto x = x_in.contiguous();
  const auto idx = idx_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), Nv = idx.size(1);
  check_range(idx, N, "gather_visible");
  auto out = at::empty({B, Nv, C}, x.options());
  const int64_t row_bytes = C * static_cast<int64_t>(x.element_size());
  const auto* src = static_cast<const char*>(x.const_data_ptr());
  auto* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* ids = idx.const_data_ptr<int64_t>();
  at::parallel_for(0, B * Nv, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / Nv;
      std::memcpy(dst + r * row_bytes, src + (b * N + ids[r]) * row_bytes, row_bytes);
    }
  });
  return out;
}

// grad_x[b, idx[b, j]] += grad_out[b, j]; one sample per task so repeated indices never race.
at::Tensor gather_visible_backward_cpu(const at::Tensor& grad_in, const at::Tensor& idx_in, int64_t N) {
  TORCH_CHECK(grad_in.dim() == 3, "gather_visible_backward: grad must be (B, Nv, C), got ", grad_in.sizes());
  check_inputs(grad_in, idx_in, "gather_visible_backward");
  TORCH_CHECK(idx_in.size(1) == grad_in.size(1), "gather_visible_backward: idx (B, Nv) must match grad ",
              grad_in.sizes());
  const auto grad = grad_in.contiguous();
  const auto idx = idx_in.contiguous();
  const int64_t B = grad.size(0), Nv = grad.size(1), C = grad.size(2);
  check_range(idx, N, "gather_visible_backward");
  auto grad_x = at::zeros({B, N, C}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gather_visible_backward", [&] {
    const auto* g = grad.const_data_ptr<scalar_t>();
    auto* gx = grad_x.mutable_data_ptr<scalar_t>();
    const int64_t* ids = idx.const_data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t j = 0; j < Nv; ++j) {
          const scalar_t* src = g + (b * Nv + j) * C;
          scalar_t* dst = gx + (b * N + ids[b * Nv + j]) * C;
          for (int64_t c = 0; c < C; ++c) dst[c] += src[c];
        }
      }
    });
  });
  return grad_x;
}

TORCH_LIBRARY(hicmae_dist, m) {
  m.def("gather_visible(Tensor x, Tensor idx) -> Tensor");
  m.def("gather_visible_backward(Tensor grad, Tensor idx, int N) -> Tensor");
  // decoder input: [visible + pos[visible_idx], mask_token + pos[masked_idx]] along dim 1
  m.def("assemble_decoder_tokens(Tensor visible, Tensor mask_token, Tensor pos, Tensor visible_idx, "
        "Tensor masked_idx) -> Tensor");
  // per-patch target normalisation of x (R, F, S, C) over (F, S), optional frame differences
  m.def("patch_norm(Tensor x, bool frame_diff) -> Tensor");
}

TORCH_LIBRARY_IMPL(hicmae_dist, CPU, m) {
  m.impl("gather_visible", &gather_visible_cpu);
  m.impl("gather_visible_backward", &gather_visible_backward_cpu);
}

}  // namespace hicmae_dist

// The module carries the op registrations above plus a build flag: setup.py defines
// HICMAE_WITH_CUDA when it compiled csrc/*.cu into the extension.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("built_with_cuda", [] {
#ifdef HICMAE_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the CUDA kernels (csrc/*.cu) were compiled into this extension.");
}
