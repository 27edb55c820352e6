"""model.activation_checkpointing: every transformer block call runs under
torch.utils.checkpoint (non-reentrant) in training, with bit-identical losses and gradients."""

from __future__ import annotations

import pytest
import torch

from hicmae_dist.config import Config, ExecutionConfig
from hicmae_dist.models import blocks
from hicmae_dist.models.cavmae.config import CAVMAEConfig
from hicmae_dist.models.cavmae.model import CAVMAEPretrain
from hicmae_dist.models.hicmae.config import HiCMAEConfig
from hicmae_dist.models.hicmae.model import HiCMAEPretrain

HICMAE_TINY = dict(
    width=64,
    heads=2,
    encoder_depth=4,
    intermediate_layers=[1, 2, 3],
    decoder_width=64,
    decoder_heads=2,
    decoder_depth=4,
)
CAVMAE_TINY = dict(
    arch="cavmae",
    width=64,
    heads=2,
    modality_depth=2,
    shared_depth=1,
    decoder_width=32,
    decoder_heads=2,
    decoder_depth=2,
    num_frames=1,
    tubelet=1,
    image_size=48,
    audio_frames=64,
    mel_bins=32,
    video_mask_ratio=0.75,
    audio_mask_ratio=0.75,
    temperature=0.05,
    contrastive_weight=0.01,
)
# (model, config, inputs, block calls per forward: unpacked, packed)
ARCHS = {
    # 2 x 4 encoder blocks + 2 x 2 fusion blocks (2 packed layers) + 2 x 4 decoder blocks
    "hicmae": (
        HiCMAEPretrain,
        HICMAE_TINY,
        lambda g: (torch.randn(2, 3, 16, 160, 160, generator=g), torch.randn(2, 1, 256, 128, generator=g)),
        (20, 18),
    ),
    # 2 x 2 modality-specific blocks + 3 shared passes (1 packed) + 2 decoder blocks
    "cavmae": (
        CAVMAEPretrain,
        CAVMAE_TINY,
        lambda g: (torch.randn(2, 3, 48, 48, generator=g), torch.randn(2, 64, 32, generator=g)),
        (9, 7),
    ),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _count_checkpoints(monkeypatch) -> list[int]:
    calls = []
    real = blocks.checkpoint

    def counting(fn, *args, **kw):
        assert kw.get("use_reentrant") is False
        calls.append(1)
        return real(fn, *args, **kw)

    monkeypatch.setattr(blocks, "checkpoint", counting)
    return calls


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_losses_and_gradients_bit_identical(arch, pack, monkeypatch):
    cls, tiny, make_inputs, expected_calls = ARCHS[arch]
    inputs = make_inputs(torch.Generator().manual_seed(0))
    out, grads = {}, {}
    calls = _count_checkpoints(monkeypatch)
    for ckpt in (False, True):
        torch.manual_seed(0)
        config_cls = CAVMAEConfig if arch == "cavmae" else HiCMAEConfig
        model = cls(
            config_cls(**tiny, drop_path=0.0),
            ExecutionConfig(attention_backend="sdpa", pack_fusion=pack, activation_checkpointing=ckpt),
        )
        masks = model.make_masks(2, torch.Generator().manual_seed(1))
        calls.clear()
        out[ckpt] = model(*inputs, *masks)
        out[ckpt]["loss"].backward()
        assert len(calls) == (expected_calls[pack] if ckpt else 0)
        grads[ckpt] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        if ckpt:  # eval and no_grad: no checkpointing
            calls.clear()
            with torch.no_grad():
                model.eval()(*inputs, *masks)
                model.train()(*inputs, *masks)
            assert not calls
    assert out[True].keys() == out[False].keys()
    for key in out[False]:
        assert torch.equal(out[True][key], out[False][key]), key
    assert grads[True].keys() == grads[False].keys() and grads[False]
    for name in grads[False]:
        assert torch.equal(grads[True][name], grads[False][name]), name


def test_config_key_default_and_hash():
    assert ExecutionConfig().activation_checkpointing is False
    cfg = Config()
    explicit = Config()
    explicit.execution.activation_checkpointing = False
    assert cfg.hash() == explicit.hash()
    on = Config()
    on.execution.activation_checkpointing = True
    assert on.hash() == cfg.hash()  # the same maths: a resume may switch it on
