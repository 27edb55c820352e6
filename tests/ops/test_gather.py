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
