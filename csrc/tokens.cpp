// CPU impls of the decoder's token re-assembly and of the per-patch target normalisation
// (schemas in gather.cpp, CUDA kernels in kernels.cu).
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

namespace hicmae_dist {

static void check_range(const at::Tensor& idx, int64_t n, const char* op) {
  if (idx.numel() == 0) return;
  const auto lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < n, op, ": idx values must lie in [0, ", n, "), got [", lo, ", ", hi, "]");
}

// out[b, j] = visible[b, j] + pos[visible_idx[b, j]] (j < Nv); out[b, Nv + j] = mask_token +
// pos[masked_idx[b, j]]. Each add rounds like torch's (opmath, one rounding to scalar_t), so the
// result is bit-identical to torch.cat([visible + pos[vi], mask_token + pos[mi]], 1).
at::Tensor assemble_decoder_tokens_cpu(const at::Tensor& vis_in, const at::Tensor& mask_in,
                                       const at::Tensor& pos_in, const at::Tensor& vis_idx_in,
                                       const at::Tensor& mask_idx_in) {
  const char* op = "assemble_decoder_tokens";
  TORCH_CHECK(vis_in.dim() == 3 && mask_in.dim() == 1 && pos_in.dim() == 2, op,
              ": expected visible (B, Nv, C), mask_token (C,), pos (N, C); got ", vis_in.sizes(), ", ",
              mask_in.sizes(), ", ", pos_in.sizes());
  const int64_t B = vis_in.size(0), Nv = vis_in.size(1), C = vis_in.size(2), N = pos_in.size(0);
  TORCH_CHECK(mask_in.size(0) == C && pos_in.size(1) == C, op, ": channel counts differ: visible ",
              vis_in.sizes(), ", mask_token ", mask_in.sizes(), ", pos ", pos_in.sizes());
  TORCH_CHECK(vis_in.scalar_type() == mask_in.scalar_type() && vis_in.scalar_type() == pos_in.scalar_type(),
              op, ": visible, mask_token and pos must share a dtype, got ", vis_in.scalar_type(), ", ",
              mask_in.scalar_type(), ", ", pos_in.scalar_type());
  TORCH_CHECK(vis_idx_in.dim() == 2 && vis_idx_in.size(0) == B && vis_idx_in.size(1) == Nv &&
              mask_idx_in.dim() == 2 && mask_idx_in.size(0) == B, op,
              ": visible_idx must be (B, Nv) = (", B, ", ", Nv, ") and masked_idx (B, Nm); got ",
              vis_idx_in.sizes(), ", ", mask_idx_in.sizes());
  TORCH_CHECK(vis_idx_in.scalar_type() == at::kLong && mask_idx_in.scalar_type() == at::kLong, op,
              ": indices must be int64");
  for (const auto* t : {&mask_in, &pos_in, &vis_idx_in, &mask_idx_in})
    TORCH_CHECK(t->device() == vis_in.device(), op, ": inputs on different devices");
  const auto vis = vis_in.contiguous(), mask = mask_in.contiguous(), pos = pos_in.contiguous();
  const auto vis_idx = vis_idx_in.contiguous(), mask_idx = mask_idx_in.contiguous();
  const int64_t Nm = mask_idx.size(1), T = Nv + Nm;
  check_range(vis_idx, N, op);
  check_range(mask_idx, N, op);
  auto out = at::empty({B, T, C}, vis.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vis.scalar_type(), "assemble_decoder_tokens", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* v = vis.const_data_ptr<scalar_t>();
    const scalar_t* mt = mask.const_data_ptr<scalar_t>();
    const scalar_t* p = pos.const_data_ptr<scalar_t>();
    const int64_t* vi = vis_idx.const_data_ptr<int64_t>();
    const int64_t* mi = mask_idx.const_data_ptr<int64_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / T, j = r - b * T;
        const bool visible = j < Nv;
        const scalar_t* base = visible ? v + (b * Nv + j) * C : mt;
        const scalar_t* pr = p + (visible ? vi[b * Nv + j] : mi[b * Nm + (j - Nv)]) * C;
        scalar_t* dst = o + r * C;
        for (int64_t c = 0; c < C; ++c)
          dst[c] = static_cast<scalar_t>(static_cast<opmath_t>(base[c]) + static_cast<opmath_t>(pr[c]));
      }
    });
  });
  return out;
}

// Per-patch standardisation of x (R, F, S, C) over (F, S) for each (r, c), unbiased std,
// (x - mean) / (std + 1e-6); with frame_diff, frames 1.. become their difference to frame 0.
// The CPU impl is the ATen maths of models/targets.py itself (so it is bit-identical to it);
// the fused kernel is the CUDA one (kernels.cu).
at::Tensor patch_norm_cpu(const at::Tensor& x, bool frame_diff) {
  TORCH_CHECK(x.dim() == 4, "patch_norm: x must be (R, F, S, C), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "patch_norm: x must be floating point, got ",
              x.scalar_type());
  const auto mean = x.mean({1, 2}, /*keepdim=*/true);
  const auto std = x.var({1, 2}, /*unbiased=*/true, /*keepdim=*/true).sqrt();
  auto y = (x - mean) / (std + 1e-6);
  if (frame_diff && y.size(1) > 1) {
    const auto first = y.narrow(1, 0, 1);
    y = at::cat({first, y.narrow(1, 1, y.size(1) - 1) - first}, 1);
  }
  return y.contiguous();
}

TORCH_LIBRARY_IMPL(hicmae_dist, CPU, m) {
  m.impl("assemble_decoder_tokens", &assemble_decoder_tokens_cpu);
  m.impl("patch_norm", &patch_norm_cpu);
}

}  // namespace hicmae_dist
