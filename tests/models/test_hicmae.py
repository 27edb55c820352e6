"""HiCMAE against docs/models.md#hicmae and the authors' state-dict layout (tests/models/upstream_keys)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from hicmae_dist.config import ExecutionConfig
from hicmae_dist.models import build_model
from hicmae_dist.models.blocks import Attention, CrossAttention, DropPath, sinusoid_table
from hicmae_dist.models.hicmae.config import HiCMAEConfig
from hicmae_dist.models.hicmae.model import HiCMAEFinetune, HiCMAEPretrain
from hicmae_dist.models.targets import IMAGENET_MEAN, IMAGENET_STD, audio_target, video_target
from tests.models.upstream import read_key_file

SIZES = {  # width, heads (and decoder width / heads for pretraining), docs/models.md, sizes
    "tiny": dict(width=256, heads=4),
    "small": dict(width=384, heads=6, decoder_width=192, decoder_heads=3),
    "base": dict(width=512, heads=8, decoder_width=384, decoder_heads=6),
}
TINY = dict(
    width=64,
    heads=2,
    encoder_depth=4,
    intermediate_layers=[1, 2, 3],
    decoder_width=64,
    decoder_heads=2,
    decoder_depth=4,
)  # the tiny-cpu preset's model

# Counts from the key files' headers, per component of ours (the release's top modules in comments).
PRETRAIN_COUNTS = {
    "small": {
        "total": 50_584_576,
        "video_encoder": 18_331_776,  # encoder
        "audio_encoder": 17_840_256,  # encoder_audio
        "fusion": 9_467_904,  # encoder_fusion
        "video_decoder": 2_521_920 + 73_728 + 192,  # decoder + encoder_to_decoder + mask_token
        "audio_decoder": 2_274_880 + 73_728 + 192,
    },  # the same, _audio
    "base": {
        "total": 99_609_344,
        "video_encoder": 32_306_688,
        "audio_encoder": 31_651_328,
        "fusion": 16_818_176,
        "video_decoder": 9_465_984 + 196_608 + 384,
        "audio_decoder": 8_973_184 + 196_608 + 384,
    },
}
FINETUNE_COUNTS = {  # 6 classes
    "tiny": {
        "total": 20_473_370,
        "video_encoder": 8_289_024,
        "audio_encoder": 7_961_344,
        "fusion": 4_214_784,
        "head_norm": 2_048,
        "head": 6_150,
    },  # head_norm: fc_norm
    "small": {
        "total": 45_652_250,
        "video_encoder": 18_331_776,
        "audio_encoder": 17_840_256,
        "fusion": 9_467_904,
        "head_norm": 3_072,
        "head": 9_222,
    },
    "base": {
        "total": 80_792_602,
        "video_encoder": 32_306_688,
        "audio_encoder": 31_651_328,
        "fusion": 16_818_176,
        "head_norm": 4_096,
        "head": 12_294,
    },
}
# The release's top-level modules -> ours.
UPSTREAM_COMPONENT = {
    "encoder": "video_encoder",
    "encoder_audio": "audio_encoder",
    "encoder_fusion": "fusion",
    "decoder": "video_decoder",
    "encoder_to_decoder": "video_decoder",
    "mask_token": "video_decoder",
    "decoder_audio": "audio_decoder",
    "encoder_to_decoder_audio": "audio_decoder",
    "mask_token_audio": "audio_decoder",
    "video_layer_weights": "video_layer_weights",
    "audio_layer_weights": "audio_layer_weights",
    "fc_norm": "head_norm",
    "head": "head",
}


def model_config(**overrides) -> HiCMAEConfig:
    cfg = HiCMAEConfig(**overrides)
    cfg.validate()
    return cfg


def component_counts(model: torch.nn.Module) -> dict[str, int]:
    counts = Counter()
    for name, p in model.named_parameters():
        counts[name.split(".")[0]] += p.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    return dict(counts)


def component_shapes(shapes: dict[str, tuple[int, ...]], rename=lambda top: top) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for key, shape in shapes.items():
        out.setdefault(rename(key.split(".")[0]), Counter())[shape] += 1
    return out


def check_layout(model: torch.nn.Module, counts: dict[str, int], key_file: str) -> None:
    """Parameter counts per component, and the same multiset of tensor shapes per component as
    the release (so a 1:1 key mapping exists); position tables are not in the state dict."""
    ours = component_counts(model)
    assert {k: ours.get(k) for k in counts} == counts
    state = model.state_dict()
    assert not any("pos_embed" in key for key in state)
    assert sum(1 for name, _ in model.named_buffers() if name.endswith("pos_embed")) >= 2
    assert sum(t.numel() for t in state.values()) == counts["total"]
    keys = read_key_file(key_file)
    upstream, per_module = keys.shapes, keys.per_module
    upstream_counts = Counter()
    for top, n in per_module.items():
        upstream_counts[UPSTREAM_COMPONENT[top]] += n
    assert {k: v for k, v in ours.items() if k != "total"} == dict(upstream_counts)
    assert component_shapes({k: tuple(v.shape) for k, v in state.items()}) == component_shapes(
        upstream, UPSTREAM_COMPONENT.__getitem__
    )


# --- layout: parameter counts and shapes ------------------------------------------------------


@pytest.mark.parametrize("size", ["small", "base"])
def test_pretrain_layout_matches_release(size):
    with torch.device("meta"):
        model = HiCMAEPretrain(model_config(**SIZES[size]))
    check_layout(model, PRETRAIN_COUNTS[size], f"hicmae_pretrain_{size}")


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_finetune_layout_matches_release(size):
    with torch.device("meta"):
        model = HiCMAEFinetune(model_config(**SIZES[size]), num_classes=6)
    check_layout(model, FINETUNE_COUNTS[size], f"hicmae_finetune_{size}")


def test_build_model():
    assert isinstance(build_model(model_config(**TINY)), HiCMAEPretrain)


# --- blocks ---------------------------------------------------------------------------------


def test_sinusoid_table():
    table = sinusoid_table(7, 6)
    assert table.shape == (7, 6) and table.dtype == torch.float32
    for pos in range(7):
        for j in range(6):
            angle = pos / 10000 ** (2 * (j // 2) / 6)
            expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert table[pos, j].item() == pytest.approx(expected, abs=1e-7)


def _manual_attention(q, k, v, heads):
    """(B, N, C) projections -> softmax(q k^T / sqrt(D)) v, heads merged."""

    def split(t):
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, N, D)

    q, k, v = split(q), split(k), split(v)
    w = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    return (w @ v).transpose(1, 2).flatten(2)


def test_attention_biases_on_q_and_v_only():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, backend="reference")
    torch.nn.init.normal_(attn.q_bias)
    torch.nn.init.normal_(attn.v_bias)
    x = torch.randn(2, 5, 16)
    wq, wk, wv = attn.qkv.weight.chunk(3)
    expected = attn.proj(_manual_attention(x @ wq.T + attn.q_bias, x @ wk.T, x @ wv.T + attn.v_bias, 2))
    torch.testing.assert_close(attn(x), expected)


def test_cross_attention_keys_and_values_from_context():
    torch.manual_seed(0)
    attn = CrossAttention(16, heads=2, backend="reference")
    torch.nn.init.normal_(attn.q_bias)
    torch.nn.init.normal_(attn.v_bias)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    wk, wv = attn.kv.weight.chunk(2)
    q = x @ attn.q.weight.T + attn.q_bias
    expected = attn.proj(_manual_attention(q, ctx @ wk.T, ctx @ wv.T + attn.v_bias, 2))
    torch.testing.assert_close(attn(x, ctx), expected)


def test_drop_path():
    x = torch.ones(1000, 3, 4)
    drop = DropPath(0.25)
    assert torch.equal(drop.eval()(x), x)
    y = drop.train()(x)
    per_sample = y[:, 0, 0]
    assert (y == y[:, :1, :1]).all()  # whole samples are dropped
    kept = per_sample[per_sample != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.75))  # the rest rescaled
    assert 0.15 < 1 - len(kept) / 1000 < 0.35


# --- targets ---------------------------------------------------------------------------------


def _imagenet_normalise(pixels):  # (B, 3, T, H, W) in [0, 1]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    return (pixels - mean) / std


def _two_level_z(d):
    """A patch half at a, half at a + d, standardised with unbiased std + 1e-6: the +- value."""
    return (d / 2) / ((d / 2) * math.sqrt(512 / 511) + 1e-6)


@pytest.mark.parametrize("frame_diff", [False, True])
def test_video_target_hand_built(frame_diff):
    # one 2 x 16 x 16 tubelet; each channel takes two values, 256 pixels each:
    # red by column parity, green by row parity, blue by frame
    f, r, c = torch.meshgrid(torch.arange(2), torch.arange(16), torch.arange(16), indexing="ij")
    pixels = torch.stack([0.2 + 0.5 * (c % 2), 0.1 + 0.3 * (r % 2), 0.4 + 0.25 * f]).float()  # (3, 2, 16, 16)
    target = video_target(_imagenet_normalise(pixels[None]), tubelet=2, patch=16, frame_diff=frame_diff)
    assert target.shape == (1, 1, 2 * 16 * 16 * 3)

    def sign(bit):
        return 2.0 * bit - 1.0  # 0 -> -1, 1 -> +1

    expected = torch.stack(
        [sign(c % 2) * _two_level_z(0.5), sign(r % 2) * _two_level_z(0.3), sign(f) * _two_level_z(0.25)], dim=-1
    )  # (frame, row, col, channel)
    if frame_diff:  # frame 1 - frame 0: the red and green patterns cancel, blue doubles
        expected[1] = torch.stack(
            [torch.zeros(16, 16), torch.zeros(16, 16), torch.full((16, 16), 2 * _two_level_z(0.25))], dim=-1
        )
    torch.testing.assert_close(target[0, 0], expected.flatten().float(), atol=2e-5, rtol=0)


def reference_video_target(video, tubelet, patch, frame_diff):
    """Tubelet by tubelet, straight from the spec's words."""
    pixels = video * torch.tensor(IMAGENET_STD).view(3, 1, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    B, _, T, H, W = video.shape
    rows = []
    for b in range(B):
        for t in range(T // tubelet):
            for h in range(H // patch):
                for w in range(W // patch):
                    cube = pixels[
                        b, :, t * tubelet : (t + 1) * tubelet, h * patch : (h + 1) * patch, w * patch : (w + 1) * patch
                    ].permute(1, 2, 3, 0)  # (frame, row, col, channel)
                    values = cube.reshape(-1, 3)
                    cube = (cube - values.mean(0)) / (values.std(0) + 1e-6)
                    if frame_diff:
                        cube = torch.cat([cube[:1], cube[1:] - cube[:1]])
                    rows.append(cube.flatten())
    return torch.stack(rows).view(B, -1, rows[0].numel())


@pytest.mark.parametrize("frame_diff", [False, True])
def test_video_target_token_order(frame_diff):
    video = torch.randn(2, 3, 4, 32, 48, generator=torch.Generator().manual_seed(0))  # 2 x 2 x 3 tokens
    torch.testing.assert_close(video_target(video, 2, 16, frame_diff), reference_video_target(video, 2, 16, frame_diff))


def test_audio_target_hand_built():
    # two patches along time: the first varies by fbank frame (row), the second by mel bin (column)
    r, c = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    audio = torch.cat([r, 100 + 3 * c])[None, None]  # (1, 1, 32, 16)
    target = audio_target(audio, patch=16)
    std = math.sqrt(16 * sum((i - 7.5) ** 2 for i in range(16)) / 255)
    expected = torch.stack([((r - 7.5) / (std + 1e-6)).flatten(), (3 * (c - 7.5) / (3 * std + 1e-6)).flatten()])
    torch.testing.assert_close(target[0], expected, atol=1e-5, rtol=0)


def reference_audio_target(audio, patch):
    B, _, T, Fq = audio.shape
    rows = []
    for b in range(B):
        for t in range(T // patch):
            for f in range(Fq // patch):
                p = audio[b, 0, t * patch : (t + 1) * patch, f * patch : (f + 1) * patch].flatten()
                rows.append((p - p.mean()) / (p.std() + 1e-6))
    return torch.stack(rows).view(B, -1, patch * patch)


def test_audio_target_token_order():
    audio = torch.randn(2, 1, 48, 32, generator=torch.Generator().manual_seed(0))  # token t * 2 + f
    torch.testing.assert_close(audio_target(audio, 16), reference_audio_target(audio, 16))


# --- masks and optimiser groups ----------------------------------------------------------------


def test_make_masks_follow_spec():
    model = HiCMAEPretrain(model_config(**TINY))
    video, audio = model.make_masks(3, torch.Generator().manual_seed(0))
    assert video.shape == (3, 800) and audio.shape == (3, 128)
    assert video.dtype == audio.dtype == torch.bool
    assert (video.sum(1) == 720).all() and (audio.sum(1) == 102).all()  # 80 and 26 visible
    tubes = video.view(3, 8, 100)
    assert (tubes == tubes[:, :1]).all()  # one spatial mask repeated over the 8 temporal slices
    again = model.make_masks(3, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], video) and torch.equal(again[1], audio)


def test_param_groups():
    model = HiCMAEPretrain(model_config(**TINY))
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(not_decayed) and decayed | not_decayed == set(names.values())
    assert {
        "video_decoder.mask_token",
        "audio_decoder.mask_token",
        "video_encoder.blocks.0.attn.q_bias",
        "video_encoder.norm.weight",
        "fusion.video_blocks.0.mlp.fc1.bias",
    } <= not_decayed
    assert {
        "video_encoder.patch_embed.weight",
        "video_encoder.blocks.0.attn.qkv.weight",
        "video_decoder.encoder_to_decoder.weight",
        "audio_decoder.head.weight",
    } <= decayed
    assert all(names[id(p)].endswith("weight") for p in decay["params"])


def test_init():
    model = HiCMAEPretrain(model_config(**TINY))
    assert (model.video_decoder.mask_token.abs() <= 0.02).all() and model.video_decoder.mask_token.std() > 0
    assert torch.equal(model.fusion.audio_norm.weight, torch.ones(64))
    assert torch.equal(model.video_encoder.blocks[0].mlp.fc1.bias, torch.zeros(256))
    w = model.audio_decoder.encoder_to_decoder.weight  # xavier uniform: |w| <= sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= math.sqrt(6 / (64 + 64)) and w.std() > 0.5 * math.sqrt(2 / (64 + 64))


# --- the pretraining forward ----------------------------------------------------------------------


def inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 160, 160, generator=g), torch.randn(batch, 1, 256, 128, generator=g)


def test_small_forward_backward():
    torch.manual_seed(0)
    cfg = model_config(**SIZES["small"])
    model = HiCMAEPretrain(cfg)
    video, audio = inputs(2)
    video_mask, audio_mask = model.make_masks(2, torch.Generator().manual_seed(0))
    assert ((~video_mask).sum(1) == 80).all() and ((~audio_mask).sum(1) == 26).all()
    out = model(video, audio, video_mask, audio_mask)
    assert set(out) == {
        "loss",
        "loss_video",
        "loss_audio",
        "loss_contrastive",
        "loss_contrastive_l3",
        "loss_contrastive_l6",
        "loss_contrastive_l9",
    }
    assert all(v.shape == () and torch.isfinite(v) for v in out.values())
    parts = [out[f"loss_contrastive_l{i}"] for i in (3, 6, 9)]
    torch.testing.assert_close(out["loss_contrastive"], sum(parts))
    total = out["loss_video"] + out["loss_audio"] + 0.0025 * out["loss_contrastive"]
    torch.testing.assert_close(out["loss"], total)
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_tiny_forward_backward():
    torch.manual_seed(0)
    model = HiCMAEPretrain(model_config(**TINY, drop_path=0.1))
    video, audio = inputs(2)
    out = model(video, audio, *model.make_masks(2, torch.Generator().manual_seed(0)))
    assert {"loss_contrastive_l1", "loss_contrastive_l2", "loss_contrastive_l3"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_attention_backends_agree():
    torch.manual_seed(0)
    sdpa = HiCMAEPretrain(model_config(**TINY), ExecutionConfig(attention_backend="sdpa"))
    reference = HiCMAEPretrain(model_config(**TINY), ExecutionConfig(attention_backend="reference"))
    reference.load_state_dict(sdpa.state_dict())
    video, audio = inputs(2)
    masks = sdpa.make_masks(2, torch.Generator().manual_seed(0))
    a, b = sdpa(video, audio, *masks), reference(video, audio, *masks)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


def _capture(module, store, key, inputs_too=False):
    def hook(_module, args, output):
        store.setdefault(key, []).append(args if inputs_too else output)

    return module.register_forward_hook(hook)


def test_reconstruction_loss_is_over_masked_tokens_only():
    torch.manual_seed(0)
    cfg = model_config(**TINY)
    model = HiCMAEPretrain(cfg)
    video, audio = inputs(2)
    video_mask, audio_mask = model.make_masks(2, torch.Generator().manual_seed(1))
    seen = {}
    _capture(model.video_decoder, seen, "video")
    _capture(model.audio_decoder, seen, "audio")
    out = model(video, audio, video_mask, audio_mask)

    # independent: hand-built targets, masked rows picked with the boolean mask, plain MSE
    video_pred, audio_pred = seen["video"][0], seen["audio"][0]
    assert video_pred.shape == (2, 720, 1536) and audio_pred.shape == (2, 102, 256)
    video_rows = reference_video_target(video, 2, 16, frame_diff=True)[video_mask].view(2, 720, 1536)
    audio_rows = reference_audio_target(audio, 16)[audio_mask].view(2, 102, 256)
    torch.testing.assert_close(out["loss_video"], ((video_pred - video_rows) ** 2).mean())
    torch.testing.assert_close(out["loss_audio"], ((audio_pred - audio_rows) ** 2).mean())

    # changing masked content only moves the reconstruction loss: the encoders never see it
    hidden = video_mask.view(2, 8, 10, 10)  # (B, t, h, w) -> pixels (B, 16, 160, 160)
    hidden = hidden.repeat_interleave(2, 1).repeat_interleave(16, 2).repeat_interleave(16, 3)
    video2 = video + 3 * hidden[:, None].float() * torch.randn_like(video)  # (B, 3, 16, 160, 160)
    out2 = model(video2, audio, video_mask, audio_mask)
    assert not torch.isclose(out2["loss_video"], out["loss_video"])
    for key in ("loss_audio", "loss_contrastive"):
        torch.testing.assert_close(out2[key], out[key])
    # while changing one visible tubelet changes what the encoder sees
    b, token = 0, int((~video_mask[0]).nonzero()[0])
    ti, hi, wi = token // 100, (token % 100) // 10, token % 10
    video3 = video.clone()
    video3[b, :, 2 * ti : 2 * ti + 2, 16 * hi : 16 * hi + 16, 16 * wi : 16 * wi + 16] += 1.0
    out3 = model(video3, audio, video_mask, audio_mask)
    assert not torch.isclose(out3["loss_contrastive"], out["loss_contrastive"])


def test_decoder_skips_deepest_first_and_fusion_is_simultaneous():
    torch.manual_seed(0)
    cfg = model_config(**TINY)
    model = HiCMAEPretrain(cfg)
    seen = {}
    _capture(model.video_encoder, seen, "layers")
    _capture(model.fusion, seen, "fusion_in", inputs_too=True)
    _capture(model.fusion.video_blocks[1], seen, "video_block_1", inputs_too=True)
    _capture(model.fusion.audio_blocks[0], seen, "audio_block_0")
    _capture(model.fusion.audio_blocks[0], seen, "audio_block_0_in", inputs_too=True)
    for k, block in enumerate(model.video_decoder.blocks[1:], start=1):
        _capture(block, seen, f"decoder_{k}", inputs_too=True)
    video, audio = inputs(1)
    video_mask, audio_mask = model.make_masks(1, torch.Generator().manual_seed(0))
    model(video, audio, video_mask, audio_mask)

    layers = seen["layers"][0]  # 4 x (1, 80, 64)
    visible = (~video_mask[0]).nonzero().flatten()
    decoder = model.video_decoder
    for k in (1, 2, 3):  # decoder block k + 1 sees intermediate layer [1, 2, 3][-k]
        context = seen[f"decoder_{k}"][0][1]
        expected = decoder.encoder_to_decoder(layers[cfg.intermediate_layers[-k]]) + decoder.pos_embed[visible]
        torch.testing.assert_close(context, expected)
    # audio block 0 attends to the fusion's input video; video block 1 to audio block 0's output
    torch.testing.assert_close(seen["audio_block_0_in"][0][1], seen["fusion_in"][0][0])
    torch.testing.assert_close(seen["fusion_in"][0][0], layers[-1])
    torch.testing.assert_close(seen["video_block_1"][0][1], seen["audio_block_0"][0])


# --- fine-tuning ----------------------------------------------------------------------------------


def test_finetune_forward():
    torch.manual_seed(0)
    cfg = model_config(**TINY)
    model = HiCMAEFinetune(cfg, num_classes=6, head_activation="sigmoid")
    assert torch.equal(model.video_layer_weights, torch.full((4,), 0.25))
    video, audio = inputs(2)
    logits = model(video, audio)
    assert logits.shape == (2, 6) and ((logits > 0) & (logits < 1)).all()
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_finetune_feature_is_hierarchical_fusion():
    torch.manual_seed(0)
    model = HiCMAEFinetune(model_config(**TINY), num_classes=3).eval()
    with torch.no_grad():
        model.video_layer_weights.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))  # softmax ~ last layer
    seen = {}
    _capture(model.video_encoder, seen, "video")
    _capture(model.fusion, seen, "fused")
    _capture(model.head_norm, seen, "feature", inputs_too=True)
    model(*inputs(1))
    feature = seen["feature"][0][0]  # (1, 4C)
    video_layers = seen["video"][0]
    assert all(layer.shape == (1, 800, 64) for layer in video_layers)
    torch.testing.assert_close(feature[:, :64], video_layers[-1].mean(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(feature[:, 128:192], seen["fused"][0][0].mean(1))
    torch.testing.assert_close(feature[:, 192:], seen["fused"][0][1].mean(1))


def test_finetune_layer_ids():
    model = HiCMAEFinetune(model_config(**TINY), num_classes=3)
    ids = {name: model.layer_id(name) for name, _ in model.named_parameters()}
    assert ids["video_encoder.patch_embed.weight"] == ids["audio_encoder.patch_embed.bias"] == 0
    assert ids["video_encoder.blocks.0.attn.qkv.weight"] == ids["audio_encoder.blocks.0.norm1.bias"] == 1
    assert ids["audio_encoder.blocks.3.mlp.fc2.weight"] == 4
    assert ids["fusion.video_blocks.0.cross_attn.q.weight"] == ids["fusion.audio_blocks.0.norm2.bias"] == 5
    assert ids["fusion.audio_blocks.1.attn.proj.weight"] == 6
    assert ids["head.weight"] == ids["head_norm.bias"] == ids["video_layer_weights"] == 7
