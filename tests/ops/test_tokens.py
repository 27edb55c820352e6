"""The native decoder re-assembly and target normalisation equal the PyTorch maths they replace
(values and gradients, several dtypes), pass opcheck, and leave HiCMAE's losses bit-identical."""

import shutil

import pytest
import torch

from hicmae_dist.config import ExecutionConfig
from hicmae_dist.masking import split_indices, tube_mask
from hicmae_dist.models import targets
from hicmae_dist.models.hicmae import model as hicmae_module
from hicmae_dist.models.hicmae.config import HiCMAEConfig
from hicmae_dist.models.hicmae.model import HiCMAEPretrain
from hicmae_dist.ops import gather, tokens
from tests.support import require

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
OPS = ["gather_visible", "gather_visible_backward", "assemble_decoder_tokens", "patch_norm"]


@pytest.fixture(autouse=True)
def _native():
    require("native extension hicmae_dist._C", gather.native_available(), "run `make setup` to build it")


def _assemble_inputs(dtype, B=3, N=50, C=12, Nv=9, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.stack([tube_mask(2, N // 2, 0.8, g) for _ in range(B)])  # (B, N)
    visible_idx, masked_idx = split_indices(masks)
    Nv = visible_idx.shape[1]
    visible = torch.randn(B, Nv, C, generator=g).to(dtype).requires_grad_(requires_grad)
    mask_token = torch.randn(1, 1, C, generator=g).to(dtype).requires_grad_(requires_grad)
    pos = torch.randn(N, C, generator=g).to(dtype)
    return visible, mask_token, pos, visible_idx, masked_idx


# ------------------------------------------------------------------------------------------------
# assemble_decoder_tokens
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_assemble_equals_torch_bit_for_bit(dtype):
    args = _assemble_inputs(dtype)
    out = tokens.assemble_decoder_tokens(*args)
    ref = tokens.assemble_decoder_tokens_reference(*args)
    assert out.dtype == dtype and out.shape == ref.shape == (3, 50, 12)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_assemble_gradients_equal_torch(dtype):
    visible, mask_token, pos, vi, mi = _assemble_inputs(dtype, requires_grad=True)
    pos.requires_grad_(True)
    upstream = torch.randn(3, 50, 12, generator=torch.Generator().manual_seed(5)).to(dtype)
    ours = torch.autograd.grad(
        (tokens.assemble_decoder_tokens(visible, mask_token, pos, vi, mi) * upstream).sum(), (visible, mask_token, pos)
    )
    ref = torch.autograd.grad(
        (tokens.assemble_decoder_tokens_reference(visible, mask_token, pos, vi, mi) * upstream).sum(),
        (visible, mask_token, pos),
    )
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def test_assemble_gradcheck_and_repeated_indices():
    visible, mask_token, pos, _, _ = _assemble_inputs(torch.float64, N=6, C=3, requires_grad=True)
    pos = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    visible = visible[:, :2].detach().requires_grad_(True)
    vi = torch.tensor([[0, 0], [5, 1], [2, 2]])
    mi = torch.tensor([[1, 1, 1], [0, 3, 3], [4, 5, 0]])
    assert torch.autograd.gradcheck(tokens.assemble_decoder_tokens, (visible, mask_token, pos, vi, mi))


def test_assemble_mixed_dtypes_use_torch_promotion():
    visible, mask_token, pos, vi, mi = _assemble_inputs(torch.bfloat16)
    mask_token = mask_token.float()  # a float32 parameter next to bf16 activations (autocast)
    out = tokens.assemble_decoder_tokens(visible, mask_token, pos, vi, mi)
    assert out.dtype == torch.float32
    assert torch.equal(out, tokens.assemble_decoder_tokens_reference(visible, mask_token, pos, vi, mi))


def test_assemble_errors():
    visible, mask_token, pos, vi, mi = _assemble_inputs(torch.float32)
    with pytest.raises(RuntimeError, match=r"idx values must lie in \[0, 50\)"):
        tokens.assemble_decoder_tokens(visible, mask_token, pos, vi, mi + 50)
    with pytest.raises(ValueError, match="mask_token"):
        tokens.assemble_decoder_tokens(visible, mask_token[..., :5], pos, vi, mi)


def test_assemble_opcheck():
    visible, mask_token, pos, vi, mi = _assemble_inputs(torch.float32, B=2, N=10, C=4, requires_grad=True)
    torch.library.opcheck(
        torch.ops.hicmae_dist.assemble_decoder_tokens.default, (visible, mask_token.reshape(-1), pos, vi, mi)
    )
    torch.library.opcheck(
        torch.ops.hicmae_dist.assemble_decoder_tokens.default,
        (visible.detach(), mask_token.detach().reshape(-1), pos, vi, mi),
    )


# ------------------------------------------------------------------------------------------------
# patch_norm
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frame_diff", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_patch_norm_equals_torch_bit_for_bit(dtype, frame_diff):
    x = (torch.randn(20, 2, 16, 3, generator=torch.Generator().manual_seed(2)) * 3 + 1).to(dtype)
    out = tokens.patch_norm(x, frame_diff)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, tokens.patch_norm_reference(x, frame_diff))


def test_patch_norm_non_contiguous_and_gradients():
    x = torch.randn(3, 16, 2, 5, dtype=torch.float64).permute(0, 2, 1, 3)  # (3, 2, 16, 5), strided
    assert torch.equal(tokens.patch_norm(x, True), tokens.patch_norm_reference(x, True))
    x = torch.randn(4, 3, 5, 2, dtype=torch.float64, requires_grad=True)
    for frame_diff in (False, True):
        assert torch.autograd.gradcheck(lambda t: tokens.patch_norm(t, frame_diff), (x,))


@pytest.mark.parametrize("frame_diff", [False, True])
def test_patch_norm_opcheck(frame_diff):
    x = torch.randn(6, 2, 8, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.hicmae_dist.patch_norm.default, (x, frame_diff))


# ------------------------------------------------------------------------------------------------
# The models: targets and losses bit-identical to the PyTorch maths the ops replaced
# ------------------------------------------------------------------------------------------------
def _old_standardise(x, dim):  # models/targets.py before the op, verbatim
    mean = x.mean(dim=dim, keepdim=True)
    std = x.var(dim=dim, unbiased=True, keepdim=True).sqrt()
    return (x - mean) / (std + targets.PATCH_NORM_EPS)


@torch.no_grad()
def old_video_target(video, tubelet, patch, frame_diff=True):
    B, C, T, H, W = video.shape
    mean = torch.tensor(targets.IMAGENET_MEAN, device=video.device).view(1, C, 1, 1, 1)
    std = torch.tensor(targets.IMAGENET_STD, device=video.device).view(1, C, 1, 1, 1)
    pixels = video.float() * std + mean
    t, h, w = T // tubelet, H // patch, W // patch
    x = pixels.view(B, C, t, tubelet, h, patch, w, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    x = x.reshape(B, t * h * w, tubelet, patch * patch, C)
    x = _old_standardise(x, dim=(2, 3))
    if frame_diff:
        x = torch.cat([x[:, :, :1], x[:, :, 1:] - x[:, :, :1]], dim=2)
    return x.reshape(B, t * h * w, -1)


@torch.no_grad()
def old_audio_target(audio, patch):
    B, C, T, F = audio.shape
    t, f = T // patch, F // patch
    x = audio.float().view(B, C, t, patch, f, patch)
    x = x.permute(0, 2, 4, 3, 5, 1).reshape(B, t * f, patch * patch, C)
    return _old_standardise(x, dim=(2,)).reshape(B, t * f, -1)


@pytest.mark.parametrize("frame_diff", [False, True])
def test_targets_bit_identical_to_the_torch_maths(frame_diff):
    g = torch.Generator().manual_seed(3)
    video, audio = torch.randn(2, 3, 4, 32, 48, generator=g), torch.randn(2, 1, 64, 32, generator=g)
    assert torch.equal(targets.video_target(video, 2, 16, frame_diff), old_video_target(video, 2, 16, frame_diff))
    assert torch.equal(targets.audio_target(audio, 16), old_audio_target(audio, 16))


TINY = dict(
    width=64,
    heads=2,
    encoder_depth=4,
    intermediate_layers=[1, 2, 3],
    decoder_width=64,
    decoder_heads=2,
    decoder_depth=4,
)


def _losses_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(*batch)
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_hicmae_losses_bit_identical_with_the_native_ops(monkeypatch):
    torch.manual_seed(0)
    model = HiCMAEPretrain(HiCMAEConfig(**TINY), ExecutionConfig(attention_backend="sdpa"))
    g = torch.Generator().manual_seed(0)
    video, audio = torch.randn(2, 3, 16, 160, 160, generator=g), torch.randn(2, 1, 256, 128, generator=g)
    batch = (video, audio, *model.make_masks(2, torch.Generator().manual_seed(1)))
    ours, ours_grads = _losses_and_grads(model, batch)

    # the PyTorch maths the ops replaced
    monkeypatch.setattr(hicmae_module, "assemble_decoder_tokens", tokens.assemble_decoder_tokens_reference)
    monkeypatch.setattr(hicmae_module, "gather_visible", gather.gather_visible_reference)
    monkeypatch.setattr(targets, "video_target", old_video_target)
    monkeypatch.setattr(targets, "audio_target", old_audio_target)
    ref, ref_grads = _losses_and_grads(model, batch)
    assert ours.keys() == ref.keys()
    for key in ours:
        assert torch.equal(ours[key], ref[key]), key
    assert ours_grads.keys() == ref_grads.keys()
    for name in ours_grads:
        assert torch.equal(ours_grads[name], ref_grads[name]), name


# ------------------------------------------------------------------------------------------------
# The build: CUDA kernels compiled in and registered when nvcc is here
# ------------------------------------------------------------------------------------------------
def _nvcc_present() -> bool:
    from pathlib import Path

    return shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()


def test_cpu_kernels_registered():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hicmae_dist::{op}", "CPU"), op


def test_extension_built_with_cuda_kernels_when_nvcc_is_present():
    require("nvcc", _nvcc_present(), "the CUDA toolkit is not installed")
    require("a CUDA build of torch", torch.version.cuda is not None)
    assert gather.native_built_with_cuda(), (
        "hicmae_dist._C was built without its CUDA sources although nvcc is here: rebuild with "
        "`pip install --no-build-isolation --no-deps -e .` and read setup.py's 'building' line"
    )
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hicmae_dist::{op}", "CUDA"), op
