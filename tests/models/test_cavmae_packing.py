"""CAV-MAE with pack_fusion: the shared block's three passes (unified [audio, video], audio alone,
video alone; one attention / MLP, three sets of LayerNorms) run as one packed varlen attention
launch per shared block, with the results of the three separate passes."""

from __future__ import annotations

import pytest
import torch

from hicmae_dist.config import ExecutionConfig
from hicmae_dist.models.cavmae import model as cavmae
from hicmae_dist.models.cavmae.config import CAVMAEConfig
from hicmae_dist.models.cavmae.model import Block, CAVMAEFinetune, CAVMAEPretrain, block_streams_packed
from tests.models.test_cavmae import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 48, 48, generator=g), torch.randn(batch, 64, 32, generator=g)


def _count_attention_calls(monkeypatch) -> list[dict]:
    calls = []
    real = cavmae.attention

    def counting(q, k, v, **kw):
        calls.append(
            {
                "q": tuple(q.shape),
                "varlen": kw.get("cu_seqlens_q") is not None,
                "cu_q": kw.get("cu_seqlens_q"),
                "cu_k": kw.get("cu_seqlens_k"),
            }
        )
        return real(q, k, v, **kw)

    monkeypatch.setattr(cavmae, "attention", counting)
    return calls


def _perturb_shared_norms(model: torch.nn.Module) -> None:
    """Distinct LayerNorms per stream (at init they are all 1 / 0, which would hide a mix-up)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.shared.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_block_streams_packed_equals_separate(backend, monkeypatch):
    torch.manual_seed(0)
    block = Block(32, 4, backend=backend, streams=("unified", "audio", "video")).double()
    for p in block.parameters():  # non-trivial biases and distinct norms per stream
        torch.nn.init.normal_(p, std=0.2)
    a = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)  # audio: 5 tokens
    v = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)  # video: 7 tokens
    joint = torch.cat([a, v], dim=1)
    sep = block(joint, "unified"), block(a, "audio"), block(v, "video")
    calls = _count_attention_calls(monkeypatch)
    packed = block_streams_packed(block, ("unified", "audio", "video"), joint, a, v)
    assert len(calls) == 1 and calls[0]["varlen"]
    assert calls[0]["q"] == (3 * 12 + 3 * 5 + 3 * 7, 4, 8)
    assert calls[0]["cu_q"].tolist() == calls[0]["cu_k"].tolist() == [0, 12, 24, 36, 41, 46, 51, 58, 65, 72]
    for x, y in zip(packed, sep):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    grads_packed = torch.autograd.grad(sum((o * o).sum() for o in packed), (a, v))
    grads_sep = torch.autograd.grad(sum((o * o).sum() for o in sep), (a, v))
    for x, y in zip(grads_packed, grads_sep):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_pretrain_losses_and_gradients_equal_separate_passes(backend, monkeypatch):
    video, audio = _inputs(2)
    torch.manual_seed(0)
    reference = CAVMAEPretrain(CAVMAEConfig(**TINY), ExecutionConfig(attention_backend=backend))
    _perturb_shared_norms(reference)
    models = {
        False: reference,
        True: CAVMAEPretrain(CAVMAEConfig(**TINY), ExecutionConfig(attention_backend=backend, pack_fusion=True)),
    }
    models[True].load_state_dict(reference.state_dict())
    masks = reference.make_masks(2, torch.Generator().manual_seed(1))
    out, grads = {}, {}
    calls = _count_attention_calls(monkeypatch)
    for pack, model in models.items():
        calls.clear()
        out[pack] = model(video, audio, *masks)
        out[pack]["loss"].backward()
        grads[pack] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        # 2 x 2 modality-specific blocks + 2 decoder blocks, then the shared block: 3 passes or 1 packed
        assert len(calls) == (7 if pack else 9)
        assert sum(c["varlen"] for c in calls) == (1 if pack else 0)
    for key in out[False]:
        torch.testing.assert_close(out[True][key], out[False][key], rtol=1e-5, atol=1e-6)
    assert grads[True].keys() == grads[False].keys()
    assert any(n.startswith("shared.blocks.0.audio_norm1") for n in grads[False])
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-6)


def test_finetune_logits_equal_with_packing():
    """The fine-tune model runs the shared block on one stream per forward (nothing to pack):
    pack_fusion leaves its logits unchanged in every mode."""
    video, audio = _inputs(2, seed=3)
    torch.manual_seed(0)
    models = {
        pack: CAVMAEFinetune(
            CAVMAEConfig(**TINY), 5, execution=ExecutionConfig(attention_backend="sdpa", pack_fusion=pack)
        ).eval()
        for pack in (False, True)
    }
    _perturb_shared_norms(models[False])
    models[True].load_state_dict(models[False].state_dict())
    for mode in CAVMAEFinetune.MODES:
        logits = {pack: model(video, audio, mode) for pack, model in models.items()}
        torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-6)
