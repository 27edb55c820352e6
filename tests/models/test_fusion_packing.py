"""HiCMAE's fusion with pack_fusion: the two directions' cross-attentions (video queries on audio
keys, audio queries on video keys) and the two self-attentions each run as one packed varlen
attention launch, with the results of the separate launches."""

from __future__ import annotations

import pytest
import torch

from hicmae_dist.config import Config, ExecutionConfig
from hicmae_dist.models import blocks
from hicmae_dist.models.blocks import CSBlock, cs_block_pair_packed
from hicmae_dist.models.hicmae.config import HiCMAEConfig
from hicmae_dist.models.hicmae.model import HiCMAEFinetune, HiCMAEPretrain

TINY = dict(
    width=64,
    heads=2,
    encoder_depth=4,
    intermediate_layers=[1, 2, 3],
    decoder_width=64,
    decoder_heads=2,
    decoder_depth=4,
)


def _inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 160, 160, generator=g), torch.randn(batch, 1, 256, 128, generator=g)


def _count_attention_calls(monkeypatch) -> list[dict]:
    calls = []
    real = blocks.attention

    def counting(q, k, v, **kw):
        calls.append(
            {
                "q": tuple(q.shape),
                "k": tuple(k.shape),
                "varlen": kw.get("cu_seqlens_q") is not None,
                "cu_q": kw.get("cu_seqlens_q"),
                "cu_k": kw.get("cu_seqlens_k"),
            }
        )
        return real(q, k, v, **kw)

    monkeypatch.setattr(blocks, "attention", counting)
    return calls


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_cs_block_pair_packed_equals_separate(backend, monkeypatch):
    torch.manual_seed(0)
    first, second = CSBlock(32, 4, backend=backend), CSBlock(32, 4, backend=backend)
    for p in list(first.parameters()) + list(second.parameters()):  # non-trivial biases / norms
        torch.nn.init.normal_(p, std=0.2)
    x1 = torch.randn(3, 11, 32, dtype=torch.float64, requires_grad=True)  # video: 11 tokens
    x2 = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)  # audio: 5 tokens
    first.double(), second.double()
    sep = first(x1, x2), second(x2, x1)
    calls = _count_attention_calls(monkeypatch)
    packed = cs_block_pair_packed(first, second, x1, x2)
    assert len(calls) == 2 and all(c["varlen"] for c in calls)
    cross, self_ = calls
    assert cross["q"] == (3 * 11 + 3 * 5, 4, 8) and cross["k"] == (3 * 5 + 3 * 11, 4, 8)
    assert cross["cu_q"].tolist() == [0, 11, 22, 33, 38, 43, 48]
    assert cross["cu_k"].tolist() == [0, 5, 10, 15, 26, 37, 48]
    assert self_["cu_q"].tolist() == self_["cu_k"].tolist() == [0, 11, 22, 33, 38, 43, 48]
    for a, b in zip(packed, sep):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    grads_packed = torch.autograd.grad(sum((o * o).sum() for o in packed), (x1, x2))
    grads_sep = torch.autograd.grad(sum((o * o).sum() for o in sep), (x1, x2))
    for a, b in zip(grads_packed, grads_sep):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_pretrain_losses_and_gradients_equal_separate_launches(backend, monkeypatch):
    video, audio = _inputs(2)
    models = {}
    for pack in (False, True):
        torch.manual_seed(0)
        models[pack] = HiCMAEPretrain(
            HiCMAEConfig(**TINY), ExecutionConfig(attention_backend=backend, pack_fusion=pack)
        )
    masks = models[False].make_masks(2, torch.Generator().manual_seed(1))
    out, grads = {}, {}
    calls = _count_attention_calls(monkeypatch)
    for pack, model in models.items():
        calls.clear()
        out[pack] = model(video, audio, *masks)
        out[pack]["loss"].backward()
        grads[pack] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        fusion_varlen = sum(c["varlen"] for c in calls)
        assert fusion_varlen == (4 if pack else 0)  # 2 fusion layers x (cross + self), packed
    for key in out[False]:
        torch.testing.assert_close(out[True][key], out[False][key], rtol=1e-5, atol=1e-6)
    assert grads[True].keys() == grads[False].keys()
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-6)


def test_finetune_equal_with_packing():
    video, audio = _inputs(2, seed=3)
    logits = {}
    for pack in (False, True):
        torch.manual_seed(0)
        model = HiCMAEFinetune(
            HiCMAEConfig(**TINY), 5, execution=ExecutionConfig(attention_backend="sdpa", pack_fusion=pack)
        ).eval()
        logits[pack] = model(video, audio)
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-6)


def test_config_key_default_and_hash():
    assert ExecutionConfig().pack_fusion is False
    cfg = Config()
    packed = Config()
    packed.execution.pack_fusion = True
    assert cfg.hash() == packed.hash()  # one launch or two, the same maths: a resume may switch it
