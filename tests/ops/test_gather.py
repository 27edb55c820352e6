"""The native visible-token gather equals the PyTorch indexing it replaces, values and gradients."""

import pytest
import torch

from hicmae_dist.masking import split_indices, tube_mask
from hicmae_dist.ops import gather
from tests.support import require


@pytest.fixture(autouse=True)
def _native():
    require("native extension hicmae_dist._C", gather.native_available(), "run `make setup` to build it")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_forward_equals_torch_gather(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 800, 24, generator=g).to(dtype)
    masks = torch.stack([tube_mask(8, 100, 0.9, g) for _ in range(3)])
    keep, _ = split_indices(masks)
    out = gather.gather_visible(x, keep)
    assert out.shape == (3, 80, 24) and out.dtype == dtype
    assert torch.equal(out, gather.gather_visible_reference(x, keep))


def test_backward_equals_torch_gather_with_repeated_indices():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 5, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.tensor([[0, 3, 3, 9], [1, 1, 1, 2]])  # repeats must accumulate
    upstream = torch.randn(2, 4, 5, dtype=torch.float64, generator=g)
    (gather.gather_visible(x, idx) * upstream).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    (gather.gather_visible_reference(x, idx) * upstream).sum().backward()
    assert torch.equal(ours, x.grad)
    assert torch.autograd.gradcheck(gather.gather_visible, (x, idx))


def test_non_contiguous_input():
    x = torch.randn(4, 6, 10).transpose(0, 1)[:, :, ::2]  # (6, 4, 5), strided
    idx = torch.tensor([[3, 0]] * 6)
    assert torch.equal(gather.gather_visible(x, idx), gather.gather_visible_reference(x, idx))


def test_out_of_range_index_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"idx values must lie in \[0, 5\)"):
        gather.gather_visible(torch.randn(1, 5, 2), torch.tensor([[5]]))


def test_opcheck():
    x = torch.randn(2, 7, 3, requires_grad=True)
    idx = torch.tensor([[0, 6, 2], [5, 1, 3]])
    torch.library.opcheck(torch.ops.hicmae_dist.gather_visible.default, (x, idx))


def test_backward_opcheck():
    grad = torch.randn(2, 3, 4)
    idx = torch.tensor([[0, 6, 6], [5, 1, 3]])
    torch.library.opcheck(torch.ops.hicmae_dist.gather_visible_backward.default, (grad, idx, 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_backward_equals_torch_several_dtypes(dtype):
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 9, (3, 6), generator=g)  # repeats likely
    grad = torch.randn(3, 6, 5, generator=g).to(dtype)
    ref = torch.zeros(3, 9, 5, dtype=dtype).scatter_add_(1, idx[..., None].expand(-1, -1, 5), grad)
    ours = torch.ops.hicmae_dist.gather_visible_backward(grad, idx, 9)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0 if dtype in (torch.float32, torch.float64) else 1e-2)


def test_cuda_kernels_registered_when_built_with_cuda():
    require(
        "hicmae_dist._C with CUDA kernels",
        gather.native_built_with_cuda(),
        "built without nvcc; tests/ops/test_tokens.py checks the build found it when present",
    )
    for op in ("gather_visible", "gather_visible_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hicmae_dist::{op}", "CUDA"), op
