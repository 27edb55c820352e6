"""CAV-MAE against docs/models.md#cav-mae and the authors' state-dict layout (tests/models/upstream_keys).

The real-size model (191 M parameters) is built once for this module; everything else runs on a
tiny CAV-MAE. The module runs torch on one thread: on a shared 2-core machine OpenMP's second
thread costs far more than it gives.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from hicmae_dist.config import ConfigError, ExecutionConfig, ModelConfig, load_config
from hicmae_dist.masking import audio_structured_mask, mae_random_mask, num_visible_mae
from hicmae_dist.models import build_finetune_model, build_model
from hicmae_dist.models.cavmae.config import CAVMAEConfig
from hicmae_dist.models.cavmae.model import CAVMAEFinetune, CAVMAEPretrain, masked_mse, patch_target, sincos_2d
from hicmae_dist.models.convert import to_upstream
from tests.models.upstream import read_key_file

# The release's top-level modules -> ours.
UPSTREAM_COMPONENT = {
    "modality_a": "audio_encoder",
    "pos_embed_a": "audio_encoder",
    "patch_embed_a": "audio_encoder",
    "blocks_a": "audio_encoder",
    "modality_v": "video_encoder",
    "pos_embed_v": "video_encoder",
    "patch_embed_v": "video_encoder",
    "blocks_v": "video_encoder",
    "blocks_u": "shared",
    "norm_a": "shared",
    "norm_v": "shared",
    "norm": "shared",
    "mask_token": "decoder",
    "decoder_modality_a": "decoder",
    "decoder_modality_v": "decoder",
    "decoder_pos_embed_a": "decoder",
    "decoder_pos_embed_v": "decoder",
    "decoder_embed": "decoder",
    "decoder_blocks": "decoder",
    "decoder_norm": "decoder",
    "decoder_pred_a": "decoder",
    "decoder_pred_v": "decoder",
    "mlp_head": "head",
}
TINY = dict(
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
)  # 2 x 4 audio tokens, 3 x 3 image tokens


pytestmark = pytest.mark.usefixtures("one_thread")


def base_config(**overrides) -> ModelConfig:
    return dataclasses.replace(load_config("cavmae-base-vox2").model, **overrides)


def tiny_config(**overrides) -> CAVMAEConfig:
    cfg = CAVMAEConfig(**{**TINY, **overrides})
    cfg.validate()
    return cfg


def count(model, trainable=False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


# --- layout: parameter counts and shapes ------------------------------------------------------


@pytest.mark.parametrize(
    "kind, num_classes, total, trainable, key_file",
    [
        ("pretrain", None, 191_036_160, 190_129_920, "cavmae_pretrain"),
        ("finetune", 527, 164_907_023, 164_907_023, "cavmae_finetune_527"),
        ("finetune", 309, 164_739_381, 164_739_381, "cavmae_finetune_309"),
    ],
)
def test_layout_matches_release(kind, num_classes, total, trainable, key_file):
    with torch.device("meta"):
        cfg = base_config()
        model = build_model(cfg) if kind == "pretrain" else build_finetune_model(cfg, num_classes)
    assert count(model) == total and count(model, trainable=True) == trainable
    # per component and as a multiset of shapes, the same as the release (so a 1:1 mapping exists)
    keys = read_key_file(key_file)
    upstream, per_module, frozen = keys.shapes, keys.per_module, keys.frozen
    ours = Counter()
    for name, p in model.named_parameters():
        ours[name.split(".")[0].replace("head_norm", "head")] += p.numel()  # mlp_head = [LayerNorm, Linear]
    theirs = Counter()
    for top, n in per_module.items():
        theirs[UPSTREAM_COMPONENT[top]] += n
    assert ours == theirs

    def shapes(items):
        return Counter((k.split(".")[0].replace("head_norm", "head"), s) for k, s in items)

    assert shapes((k, tuple(v.shape)) for k, v in model.state_dict().items()) == shapes(
        (UPSTREAM_COMPONENT[k.split(".")[0]], s) for k, s in upstream.items()
    )
    # the frozen tensors are the release's: the position tables, in pretraining only
    assert sorted(n for n, p in model.named_parameters() if not p.requires_grad) == sorted(
        {
            "pos_embed_a": "audio_encoder.pos_embed",
            "pos_embed_v": "video_encoder.pos_embed",
            "decoder_pos_embed_a": "decoder.audio_pos_embed",
            "decoder_pos_embed_v": "decoder.video_pos_embed",
        }[k]
        for k in frozen
    )
    assert (kind == "pretrain") == bool(frozen)


def test_config_and_presets():
    cfg = load_config("cavmae-base-vox2").model
    assert (cfg.arch, cfg.width, cfg.heads, cfg.modality_depth, cfg.shared_depth) == ("cavmae", 768, 12, 11, 1)
    assert (cfg.decoder_width, cfg.decoder_heads, cfg.decoder_depth) == (512, 16, 8)
    assert (cfg.temperature, cfg.contrastive_weight, cfg.symmetric_contrastive) == (0.05, 0.01, False)
    assert isinstance(build_model(tiny_config()), CAVMAEPretrain)
    assert isinstance(build_finetune_model(tiny_config(), 3), CAVMAEFinetune)
    for override, message in [
        ("model.num_frames=16", "model.num_frames: expected 1 for arch cavmae"),
        ("model.audio_mask_mode=diagonal", "model.audio_mask_mode: expected one of"),
        ("model.width=770", "model.width: expected a multiple of model.heads"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("cavmae-base-vox2", [override])
    with pytest.raises(ConfigError, match="model.audio_mask_mode: expected 'random' for arch hicmae"):
        load_config("tiny-cpu", ["model.audio_mask_mode=time"])
    with pytest.raises(ValueError, match="needs model.arch 'cavmae'"):
        CAVMAEPretrain(ModelConfig())


# --- positions ------------------------------------------------------------------------------------


def test_sincos_2d():
    rows, cols, dim = 3, 5, 8
    table = sincos_2d(dim, rows, cols)
    assert table.shape == (15, 8) and table.dtype == torch.float32
    for r in range(rows):
        for c in range(cols):
            w = [1.0, 1.0 / 100.0]  # 10000^(-j / 2), j = 0, 1
            expected = (
                [math.sin(c * x) for x in w]
                + [math.cos(c * x) for x in w]
                + [math.sin(r * x) for x in w]
                + [math.cos(r * x) for x in w]
            )
            torch.testing.assert_close(table[r * cols + c], torch.tensor(expected), atol=1e-6, rtol=0)


def test_position_tables_and_token_grids():
    model = CAVMAEPretrain(tiny_config())
    assert model.audio_encoder.pos_embed.shape == (1, 8, 64) and model.video_encoder.pos_embed.shape == (1, 9, 64)
    torch.testing.assert_close(model.audio_encoder.pos_embed[0], sincos_2d(64, 2, 4))  # 2 freq rows x 4 time
    torch.testing.assert_close(model.decoder.video_pos_embed[0], sincos_2d(32, 3, 3))
    assert not model.audio_encoder.pos_embed.requires_grad
    assert all(p.requires_grad for p in CAVMAEFinetune(tiny_config(), 3).parameters())
    # audio tokens are frequency-major: token f * 4 + t covers fbank frames 16t.. and bins 16f..
    audio = torch.zeros(1, 1, 64, 32)
    audio[0, 0, 16:32, 16:32] = 1.0  # frames 16-31 (t = 1), bins 16-31 (f = 1) -> token 5
    tokens = model.audio_encoder.patch_embed(audio.transpose(2, 3)).flatten(2).transpose(1, 2)
    bias = model.audio_encoder.patch_embed.bias
    changed = [i for i in range(8) if not torch.allclose(tokens[0, i], bias)]
    assert changed == [5]


# --- masks ------------------------------------------------------------------------------------


def test_random_masks_follow_spec():
    assert num_visible_mae(512, 0.75) == 128 and num_visible_mae(196, 0.75) == 49
    mask = mae_random_mask(196, 0.75, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and int((~mask).sum()) == 49
    cfg = tiny_config(image_size=224, audio_frames=1024, mel_bins=128)  # the real token grids
    model = CAVMAEPretrain(cfg)
    video, audio = model.make_masks(3, torch.Generator().manual_seed(0))
    assert video.shape == (3, 196) and audio.shape == (3, 512)
    assert ((~video).sum(1) == 49).all() and ((~audio).sum(1) == 128).all()
    assert not torch.equal(audio[0], audio[1])  # per sample
    again = model.make_masks(3, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], video) and torch.equal(again[1], audio)
    other = model.make_masks(3, torch.Generator().manual_seed(1))
    assert not torch.equal(other[1], audio)


@pytest.mark.parametrize("mode", ["random", "time", "freq", "tf"])
def test_audio_mask_modes(mode):
    masks = [audio_structured_mask(8, 64, 0.75, mode, torch.Generator().manual_seed(seed)) for seed in range(4)]
    again = audio_structured_mask(8, 64, 0.75, mode, torch.Generator().manual_seed(0))
    assert torch.equal(again, masks[0]) and not torch.equal(masks[0], masks[1])
    for mask in masks:
        assert mask.shape == (512,) and int((~mask).sum()) == 128
        grid = mask.view(8, 64)  # (frequency, time)
        whole_columns = int(grid.all(dim=0).sum())
        whole_rows = int(grid.all(dim=1).sum())
        visible_per_row = (~grid).sum(dim=1).sort(descending=True).values
        if mode == "time":  # int(64 * 0.75) = 48 whole frames masked, 16 whole frames visible
            assert whole_columns == 48 and int((~grid).all(dim=0).sum()) == 16
        elif mode == "freq":  # int(8 * 0.75) = 6 whole bands masked, 2 visible
            assert whole_rows == 6 and int((~grid).all(dim=1).sum()) == 2
        elif mode == "tf":  # 33 frames and 4 bands forced: the other 31 x 4 tokens visible, plus 4 forced ones
            assert (visible_per_row[:4] >= 31).all() and int(visible_per_row[4:].sum()) <= 4
            free_rows = (~grid).sum(dim=1).argsort(descending=True)[:4]
            assert int((~grid[free_rows]).all(dim=0).sum()) >= 31  # the 31 frames not forced
        else:  # unstructured: almost surely no whole band
            assert whole_rows == 0


def test_tf_mode_through_the_model():
    model = CAVMAEPretrain(tiny_config(image_size=32, audio_frames=1024, mel_bins=128, audio_mask_mode="tf"))
    _, audio = model.make_masks(2, torch.Generator().manual_seed(0))
    assert ((~audio).sum(1) == 128).all()


# --- losses from hand-built inputs ------------------------------------------------------------------------


def test_patch_target_and_masked_mse_hand_built():
    # audio (B=1, T=16 frames, F=32 bins) -> 2 frequency patches x 1 time patch.
    # patch 0 (bins 0-15): value = bin index; patch 1 (bins 16-31): 5 everywhere but 1 pixel at 6
    t, f = torch.meshgrid(torch.arange(16.0), torch.arange(32.0), indexing="ij")
    audio = torch.where(f < 16, f, torch.full_like(f, 5.0))
    audio[3, 20] = 6.0
    target = patch_target(audio[None, None].transpose(2, 3), 16)  # (1, 2, 256), rows (freq, time)
    n = 256
    var0 = 16 * sum((i - 7.5) ** 2 for i in range(16)) / (n - 1)  # each bin value repeats 16 times
    expected0 = ((torch.arange(16.0) - 7.5)[:, None].expand(16, 16) / math.sqrt(var0 + 1e-6)).flatten()
    torch.testing.assert_close(target[0, 0], expected0)
    mean1 = 5 + 1 / n
    var1 = ((n - 1) * (1 / n) ** 2 + (1 - 1 / n) ** 2) / (n - 1)
    assert target[0, 1, (20 - 16) * 16 + 3].item() == pytest.approx((6 - mean1) / math.sqrt(var1 + 1e-6), rel=1e-5)
    # prediction c everywhere, only token 1 masked: c^2 + mean(z^2) = c^2 + (n-1)/n * var/(var + eps)
    pred = torch.full((1, 2, n), 0.5)
    mask = torch.tensor([[False, True]])
    expected = 0.25 + (n - 1) / n * var1 / (var1 + 1e-6)
    assert masked_mse(pred, target, mask).item() == pytest.approx(expected, rel=1e-5)
    both = torch.tensor([[True, True]])
    assert masked_mse(pred, target, both).item() == pytest.approx(
        0.25 + (n - 1) / n * (var1 / (var1 + 1e-6) + var0 / (var0 + 1e-6)) / 2, rel=1e-5
    )


def test_image_target_is_channel_last():
    img = torch.zeros(1, 3, 16, 16)
    img[0, 0] = 1.0  # red only: every 3rd value of the patch row is the red channel
    img[0, 0, 0, 0] = 2.0
    target = patch_target(img, 16)[0, 0].view(16, 16, 3)
    assert target[0, 0, 0] > target[0, 1, 0] > target[0, 0, 1]  # the bright pixel, red, then green / blue
    assert torch.equal(target[..., 1], target[..., 2])


@pytest.mark.parametrize("symmetric", [False, True])
def test_contrastive_hand_built(symmetric):
    model = CAVMAEPretrain(tiny_config(symmetric_contrastive=symmetric))
    # mean-pooled features a = [(1, 0), (0, 1)], v = [(1, 0), (0.6, 0.8)]: S = a v^T / 0.05
    pad = torch.zeros(2, 1, 62)
    a = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    v = torch.tensor([[[1.0, 0.0]], [[0.6, 0.8]]])
    d = torch.tensor([[[0.3, -0.2]]])  # pooled away: two tokens each, +d and -d
    audio = torch.cat([torch.cat([a + d, pad], -1), torch.cat([a - d, pad], -1)], dim=1)  # (2, 2, 64)
    video = torch.cat([torch.cat([v + d, pad], -1), torch.cat([v - d, pad], -1)], dim=1)
    # S = [[20, 12], [0, 16]]; one direction: log_softmax over each column (the audios), diagonal
    col = -((20 - math.log(math.exp(20) + math.exp(0))) + (16 - math.log(math.exp(12) + math.exp(16)))) / 2
    row = -((20 - math.log(math.exp(20) + math.exp(12))) + (16 - math.log(math.exp(0) + math.exp(16)))) / 2
    expected = (col + row) / 2 if symmetric else col
    # fp32 logits of size 20 carry ~2e-6 absolute rounding, relative 1e-4 of this small loss
    assert model.contrastive_loss(audio, video).item() == pytest.approx(expected, rel=1e-4)


# --- the release's algorithm, written out on the release's key names, on a tiny model -------------------


def _ln(sd, name, x):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def _ref_block(sd, prefix, x, heads, norm=""):
    """timm Block with qkv bias: x += proj(attn(norm1(x))); x += fc2(gelu(fc1(norm2(x))))."""
    B, N, C = x.shape
    h = _ln(sd, f"{prefix}.norm1{norm}", x)
    qkv = h @ sd[f"{prefix}.attn.qkv.weight"].T + sd[f"{prefix}.attn.qkv.bias"]
    q, k, v = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    w = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
    o = (w @ v).transpose(1, 2).reshape(B, N, C)
    x = x + o @ sd[f"{prefix}.attn.proj.weight"].T + sd[f"{prefix}.attn.proj.bias"]
    h = _ln(sd, f"{prefix}.norm2{norm}", x)
    h = F.gelu(h @ sd[f"{prefix}.mlp.fc1.weight"].T + sd[f"{prefix}.mlp.fc1.bias"])
    return x + h @ sd[f"{prefix}.mlp.fc2.weight"].T + sd[f"{prefix}.mlp.fc2.bias"]


def _ref_embed(sd, audio, image):
    a = audio.transpose(1, 2).unsqueeze(1)  # (B, T, F) -> (B, 1, F, T)
    a = F.conv2d(a, sd["patch_embed_a.proj.weight"], sd["patch_embed_a.proj.bias"], stride=16)
    a = a.flatten(2).transpose(1, 2) + sd["pos_embed_a"] + sd["modality_a"]
    v = F.conv2d(image, sd["patch_embed_v.proj.weight"], sd["patch_embed_v.proj.bias"], stride=16)
    v = v.flatten(2).transpose(1, 2) + sd["pos_embed_v"] + sd["modality_v"]
    return a, v


def _ref_stack(sd, name, x, heads, norm=""):
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith(name + "."))
    for i in range(depth):
        x = _ref_block(sd, f"{name}.{i}", x, heads, norm)
    return x


def _ref_patchify(x, c):
    n, _, H, W = x.shape
    x = x.reshape(n, c, H // 16, 16, W // 16, 16)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (H // 16) * (W // 16), 256 * c)


def _ref_mae_loss(x, pred, mask, c):
    target = _ref_patchify(x, c)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def reference_pretrain(sd, cfg, audio, image, mask_a, mask_v, shuffle_seed=0):
    """The release's CAV-MAE forward, with the given masks turned into its shuffle indices: the
    visible tokens enter the encoder in a random order (as the release's argsort of noise)."""
    g = torch.Generator().manual_seed(shuffle_seed)
    a, v = _ref_embed(sd, audio, image)

    def masking(x, mask):
        noise = mask.float() + 0.5 * torch.rand(mask.shape, generator=g)  # visible first, random order
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        keep = int((~mask[0]).sum())
        return torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, x.shape[2])), ids_restore

    a, restore_a = masking(a, mask_a)
    v, restore_v = masking(v, mask_v)
    a = _ref_stack(sd, "blocks_a", a, cfg.heads)
    v = _ref_stack(sd, "blocks_v", v, cfg.heads)
    x = _ln(sd, "norm", _ref_stack(sd, "blocks_u", torch.cat([a, v], 1), cfg.heads))
    ca = _ln(sd, "norm_a", _ref_stack(sd, "blocks_u", a, cfg.heads, "_a"))
    cv = _ln(sd, "norm_v", _ref_stack(sd, "blocks_u", v, cfg.heads, "_v"))
    # decoder
    x = x @ sd["decoder_embed.weight"].T + sd["decoder_embed.bias"]
    na, nav = mask_a.shape[1], a.shape[1]
    B, _, D = x.shape
    a_ = torch.cat([x[:, :nav], sd["mask_token"].repeat(B, na - nav, 1)], 1)
    a_ = torch.gather(a_, 1, restore_a[..., None].repeat(1, 1, D))
    v_ = torch.cat([x[:, nav:], sd["mask_token"].repeat(B, mask_v.shape[1] - v.shape[1], 1)], 1)
    v_ = torch.gather(v_, 1, restore_v[..., None].repeat(1, 1, D))
    x = torch.cat([a_, v_], 1) + torch.cat([sd["decoder_pos_embed_a"], sd["decoder_pos_embed_v"]], 1)
    x = torch.cat([x[:, :na] + sd["decoder_modality_a"], x[:, na:] + sd["decoder_modality_v"]], 1)
    x = _ln(sd, "decoder_norm", _ref_stack(sd, "decoder_blocks", x, cfg.decoder_heads))
    pred_a = x[:, :na] @ sd["decoder_pred_a.weight"].T + sd["decoder_pred_a.bias"]
    pred_v = x[:, na:] @ sd["decoder_pred_v.weight"].T + sd["decoder_pred_v.bias"]
    loss_a = _ref_mae_loss(audio.transpose(1, 2).unsqueeze(1), pred_a, mask_a.float(), 1)
    loss_v = _ref_mae_loss(image, pred_v, mask_v.float(), 3)
    total = F.normalize(ca.mean(1), dim=-1) @ F.normalize(cv.mean(1), dim=-1).T / 0.05
    nce = -torch.mean(torch.diag(F.log_softmax(total, dim=0)))
    return {"loss_audio": loss_a, "loss_video": loss_v, "loss_contrastive": nce, "loss": loss_a + loss_v + 0.01 * nce}


def reference_finetune(sd, cfg, audio, image, mode):
    """CAVMAEFT.forward's branches; ours "audio_missing_video" / "video_missing_audio" are the
    release's missingaudioonly / missingvideoonly."""
    a, v = _ref_embed(sd, audio, image)
    a, v = _ref_stack(sd, "blocks_a", a, cfg.heads), _ref_stack(sd, "blocks_v", v, cfg.heads)
    if mode == "multimodal":
        x = _ln(sd, "norm", _ref_stack(sd, "blocks_u", torch.cat([a, v], 1), cfg.heads)).mean(1)
    elif mode == "audio":
        x = _ln(sd, "norm_a", _ref_stack(sd, "blocks_u", a, cfg.heads, "_a")).mean(1)
    elif mode == "video":
        x = _ln(sd, "norm_v", _ref_stack(sd, "blocks_u", v, cfg.heads, "_v")).mean(1)
    elif mode in ("audio_missing_video", "video_missing_audio"):
        t, suffix = (a, "_a") if mode == "audio_missing_video" else (v, "_v")
        u = _ln(sd, "norm", _ref_stack(sd, "blocks_u", t, cfg.heads)).mean(1)  # unified norms
        m = _ln(sd, f"norm{suffix}", _ref_stack(sd, "blocks_u", t, cfg.heads, suffix)).mean(1)  # its own
        x = (u + m) / 2
    else:
        raise ValueError(mode)
    x = _ln(sd, "mlp_head.0", x)
    return x @ sd["mlp_head.1.weight"].T + sd["mlp_head.1.bias"]


def _perturb(model, seed=0):
    """Random values everywhere (norms, biases, modality vectors included), so nothing hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def tiny_inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 48, 48, generator=g), torch.randn(batch, 64, 32, generator=g)


@pytest.mark.parametrize("audio_mode", ["random", "tf"])
def test_pretrain_matches_the_release_algorithm(audio_mode):
    torch.manual_seed(0)
    cfg = tiny_config(audio_mask_mode=audio_mode)
    model = CAVMAEPretrain(cfg, ExecutionConfig(attention_backend="reference"))
    _perturb(model)
    sd = to_upstream(model.state_dict(), "cavmae").state_dict
    image, audio = tiny_inputs(3)
    video_mask, audio_mask = model.make_masks(3, torch.Generator().manual_seed(2))
    ours = model(image, audio[:, None], video_mask, audio_mask)  # (B, 1, T, F) input
    theirs = reference_pretrain(sd, cfg, audio, image, audio_mask, video_mask)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, atol=2e-5, rtol=2e-5)
    assert set(ours) == set(theirs)
    torch.testing.assert_close(ours["loss"], ours["loss_audio"] + ours["loss_video"] + 0.01 * ours["loss_contrastive"])


@pytest.mark.parametrize("mode", CAVMAEFinetune.MODES)
def test_finetune_matches_the_release_algorithm(mode):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = CAVMAEFinetune(cfg, num_classes=5, mode=mode, execution=ExecutionConfig(attention_backend="reference"))
    _perturb(model)
    sd = to_upstream(model.state_dict(), "cavmae").state_dict
    image, audio = tiny_inputs(2)
    expected = reference_finetune(sd, cfg, audio, image, mode)
    torch.testing.assert_close(model(image, audio), expected, atol=2e-5, rtol=2e-5)
    only = {
        "audio": (None, audio),
        "video": (image, None),
        "audio_missing_video": (None, audio),
        "video_missing_audio": (image, None),
    }.get(mode)
    if only:  # the other modality is not needed
        torch.testing.assert_close(model(*only), expected, atol=2e-5, rtol=2e-5)
    # retrieval features: the pooled audio / video streams
    v, a = model.retrieval_features(image, audio)
    ra, rv = _ref_embed(sd, audio, image)
    ra = _ln(sd, "norm_a", _ref_stack(sd, "blocks_u", _ref_stack(sd, "blocks_a", ra, 2), 2, "_a")).mean(1)
    rv = _ln(sd, "norm_v", _ref_stack(sd, "blocks_u", _ref_stack(sd, "blocks_v", rv, 2), 2, "_v")).mean(1)
    torch.testing.assert_close(a, ra, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(v, rv, atol=2e-5, rtol=2e-5)


def test_shared_block_runs_three_ways_and_decoder_unshuffles():
    torch.manual_seed(0)
    model = CAVMAEPretrain(tiny_config())
    _perturb(model)
    calls = Counter()
    block = model.shared.blocks[0]
    for name in ("norm1", "audio_norm1", "video_norm1", "attn", "mlp"):
        getattr(block, name).register_forward_hook(lambda *_, n=name: calls.update([n]))
    seen = {}
    model.decoder.encoder_to_decoder.register_forward_hook(lambda m, i, o: seen.update(e2d=o))
    model.decoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    image, audio = tiny_inputs(2)
    video_mask, audio_mask = model.make_masks(2, torch.Generator().manual_seed(0))
    model(image, audio, video_mask, audio_mask)
    assert calls == {"norm1": 1, "audio_norm1": 1, "video_norm1": 1, "attn": 3, "mlp": 3}
    # decoder input: visible tokens at their own places, mask tokens elsewhere, + positions + modality
    d = model.decoder
    x, e2d = seen["x"], seen["e2d"]  # (2, 8 + 9, 32), (2, 2 + 3, 32)
    mask = torch.cat([audio_mask, video_mask], dim=1)
    pos = torch.cat([d.audio_pos_embed + d.audio_modality, d.video_pos_embed + d.video_modality], dim=1)[0]
    for b in range(2):
        torch.testing.assert_close(x[b, ~mask[b]], e2d[b] + pos[~mask[b]])
        torch.testing.assert_close(x[b, mask[b]], d.mask_token[0].expand(int(mask[b].sum()), -1) + pos[mask[b]])


def test_masked_content_only_moves_reconstruction():
    torch.manual_seed(0)
    model = CAVMAEPretrain(tiny_config())
    image, audio = tiny_inputs(2)
    video_mask, audio_mask = model.make_masks(2, torch.Generator().manual_seed(0))
    out = model(image, audio, video_mask, audio_mask)
    hidden = video_mask.view(2, 3, 3).repeat_interleave(16, 1).repeat_interleave(16, 2)  # (B, 48, 48)
    out2 = model(image + 3 * hidden[:, None] * torch.randn_like(image), audio, video_mask, audio_mask)
    assert not torch.isclose(out2["loss_video"], out["loss_video"])
    for key in ("loss_audio", "loss_contrastive"):
        torch.testing.assert_close(out2[key], out[key])


def test_attention_backends_agree():
    torch.manual_seed(0)
    sdpa = CAVMAEPretrain(tiny_config(), ExecutionConfig(attention_backend="sdpa"))
    reference = CAVMAEPretrain(tiny_config(), ExecutionConfig(attention_backend="reference"))
    reference.load_state_dict(sdpa.state_dict())
    masks = sdpa.make_masks(2, torch.Generator().manual_seed(0))
    a, b = sdpa(*tiny_inputs(2), *masks), reference(*tiny_inputs(2), *masks)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


def test_param_groups():
    model = CAVMAEPretrain(tiny_config())
    decay, no_decay = model.param_groups(5e-7)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed.isdisjoint(not_decayed) and decayed | not_decayed == trainable
    assert "audio_encoder.pos_embed" not in trainable  # frozen: in no group
    assert {
        "audio_encoder.modality",
        "decoder.mask_token",
        "decoder.video_modality",
        "shared.blocks.0.audio_norm1.weight",
        "decoder.audio_head.bias",
    } <= not_decayed
    assert {
        "audio_encoder.patch_embed.weight",
        "shared.blocks.0.attn.qkv.weight",
        "decoder.video_head.weight",
    } <= decayed
    groups = CAVMAEFinetune(tiny_config(), 4).param_groups(0.05, head_lr_scale=10.0)
    head = [g for g in groups if g.get("lr_scale") == 10.0]
    assert sum(len(g["params"]) for g in head) == 4  # head_norm and head, weights and biases
    assert sum(len(g["params"]) for g in groups) == len(list(CAVMAEFinetune(tiny_config(), 4).parameters()))


def test_init():
    model = CAVMAEPretrain(tiny_config())
    for p in (model.audio_encoder.modality, model.decoder.mask_token):
        assert 0.005 < p.std() < 0.05
    w = model.video_encoder.patch_embed.weight  # xavier on the flattened kernel
    assert w.abs().max() <= math.sqrt(6 / (64 + 768))
    assert torch.equal(model.shared.audio_norm.weight, torch.ones(64))
    assert torch.equal(model.decoder.blocks[0].attn.qkv.bias, torch.zeros(96))


# --- real size ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_model():
    torch.manual_seed(0)
    return CAVMAEPretrain(base_config())


def test_real_size_forward_backward(real_model):
    model = real_model
    g = torch.Generator().manual_seed(0)
    image, audio = torch.randn(2, 3, 224, 224, generator=g), torch.randn(2, 1, 1024, 128, generator=g)
    video_mask, audio_mask = model.make_masks(2, torch.Generator().manual_seed(0))
    assert ((~audio_mask).sum(1) == 128).all() and ((~video_mask).sum(1) == 49).all()
    out = model(image, audio, video_mask, audio_mask)
    assert set(out) == {"loss", "loss_audio", "loss_video", "loss_contrastive"}
    assert all(v.shape == () and torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], out["loss_audio"] + out["loss_video"] + 0.01 * out["loss_contrastive"])
    out["loss"].backward()
    unused = set(model.unused_parameters())
    assert len(unused) == 2 * 4 * (11 + 11 + 8)  # the audio / video norms of the non-shared blocks
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        "audio_encoder.pos_embed",
        "video_encoder.pos_embed",
        "decoder.audio_pos_embed",
        "decoder.video_pos_embed",
    }
    for name, p in model.named_parameters():
        if name in unused or name in frozen:
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mode", CAVMAEFinetune.MODES)
def test_finetune_unused_parameters_are_exactly_those_without_a_gradient(mode):
    model = CAVMAEFinetune(tiny_config(), num_classes=5, mode=mode)
    image, audio = tiny_inputs(2)
    model(image, audio).sum().backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad == set(model.unused_parameters(mode))
