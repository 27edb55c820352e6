"""Checkpoint converters: state dicts with exactly the authors' keys and shapes (tests/models/upstream_keys),
random values, converted, strictly loaded, run, and round-tripped bit for bit.

Real sizes throughout (up to 191 M parameters, one model at a time), batch 1, one thread.
"""

from __future__ import annotations

import pytest
import torch

from hicmae_dist.cli import main
from hicmae_dist.models.cavmae.model import CAVMAEFinetune
from hicmae_dist.models.convert import (
    ConversionError,
    load_ours,
    rename_key,
    to_ours,
    to_upstream,
    torch_load_weights,
    unwrap,
)
from hicmae_dist.models.hicmae.upstream import RENAMES as HICMAE_RENAMES
from hicmae_dist.models.info import example_inputs
from tests.models.upstream import read_key_file

pytestmark = pytest.mark.usefixtures("one_thread")


def random_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The authors' keys and shapes in the file's order, random values (small, so runs stay finite)."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.02 * torch.randn(s, generator=g) for k, s in read_key_file(name).shapes.items()}


# name, wrapper, expected (arch, kind, num_classes, width, heads, decoder width / heads / depth)
CASES = [
    ("hicmae_pretrain_small", "model", ("hicmae", "pretrain", None, 384, 6, (192, 3, 4))),
    ("hicmae_pretrain_base", "module", ("hicmae", "pretrain", None, 512, 8, (384, 6, 4))),
    ("hicmae_finetune_tiny", "model", ("hicmae", "finetune", 6, 256, 4, None)),
    ("hicmae_finetune_small", "module", ("hicmae", "finetune", 6, 384, 6, None)),
    ("hicmae_finetune_base", "model", ("hicmae", "finetune", 6, 512, 8, None)),
    ("cavmae_pretrain", "module.", ("cavmae", "pretrain", None, 768, 12, (512, 16, 8))),
    ("cavmae_finetune_527", "module.", ("cavmae", "finetune", 527, 768, 12, None)),
    ("cavmae_finetune_309", None, ("cavmae", "finetune", 309, 768, 12, None)),
]


def wrap(state: dict, wrapper: str | None):
    if wrapper == "module.":  # DataParallel, as the released CAV-MAE files
        return {f"module.{k}": v for k, v in state.items()}
    if wrapper:  # HiCMAE: {"model": ...} or {"module": ...}, beside other training state
        return {wrapper: state, "epoch": 99}
    return state


def _forward(model, arch: str, kind: str):
    """One sample through the model: real inputs, the spec's masks."""
    cfg = model.cfg
    video, audio = example_inputs(cfg, 1)
    with torch.no_grad():
        if kind == "pretrain":
            out = model(video, audio, *model.make_masks(1, torch.Generator().manual_seed(0)))
            return out["loss"]
        if isinstance(model, CAVMAEFinetune):
            return model(video, audio, mode="video")  # the cheapest mode (the tiny parity tests cover all)
        return model(video, audio)


@pytest.mark.parametrize("name, wrapper, expected", CASES, ids=[c[0] for c in CASES])
def test_release_layout_converts_loads_runs_and_round_trips(name, wrapper, expected):
    arch, kind, num_classes, width, heads, decoder = expected
    theirs = random_state(name)
    converted = to_ours(wrap(theirs, wrapper), arch=arch)
    cfg = converted.cfg
    assert (converted.arch, converted.kind, converted.num_classes, cfg.width, cfg.heads) == expected[:5]
    if decoder:
        assert (cfg.decoder_width, cfg.decoder_heads, cfg.decoder_depth) == decoder
    if arch == "cavmae":
        assert (cfg.modality_depth, cfg.shared_depth, cfg.image_size, cfg.audio_frames) == (11, 1, 224, 1024)
    else:
        assert (cfg.encoder_depth, cfg.fusion_depth, cfg.tubelet, cfg.patch) == (10, 2, 2, 16)

    # every tensor is the file's own, renamed (no copy); the model loads them strictly
    assert len(converted.state_dict) == len(theirs)
    upstream_of = {ours: rename_key(ours, arch, "upstream") for ours in converted.state_dict}
    assert set(upstream_of.values()) == set(theirs)
    assert all(converted.state_dict[ours] is theirs[up] for ours, up in upstream_of.items())
    model = converted.build()
    model.load_state_dict(converted.state_dict, strict=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in converted.state_dict.items())
    out = _forward(model.eval() if kind == "finetune" else model, arch, kind)
    assert torch.isfinite(out).all()
    del model, loaded

    # ours -> theirs -> ours: the identity, bit for bit and key for key
    back = to_upstream(converted.state_dict, arch)
    assert set(back.state_dict) == set(theirs)
    assert all(torch.equal(back.state_dict[k], v) for k, v in theirs.items())
    again = to_ours(back.state_dict, arch)
    assert set(again.state_dict) == set(converted.state_dict)
    assert all(torch.equal(again.state_dict[k], v) for k, v in converted.state_dict.items())
    assert (again.kind, again.num_classes, again.cfg) == (converted.kind, converted.num_classes, converted.cfg)


def test_release_and_our_tensors_agree_in_a_forward_pass():
    """CAV-MAE 309-class fine-tune, video-only: our model on converted weights against the release's
    algorithm run directly on the authors' key names (tests/models/test_cavmae.py's reference)."""
    try:
        from test_cavmae import reference_finetune  # the same directory, on sys.path under pytest
    except ImportError:
        from tests.models.test_cavmae import reference_finetune

    theirs = random_state("cavmae_finetune_309", seed=1)
    converted = to_ours(theirs)
    model = converted.build().eval()
    model.load_state_dict(converted.state_dict, strict=True)
    video, audio = example_inputs(converted.cfg, 1)
    with torch.no_grad():
        ours = model(video, audio[:, 0], mode="video")
        expected = reference_finetune(theirs, converted.cfg, audio[:, 0], video, "video")
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_missing_modality_modes_on_the_release_527_class_layout():
    """A model fine-tuned on both modalities, tested on one (the release's missingaudioonly /
    missingvideoonly): the 527-class release layout, converted, against the release's branch
    written out on its key names; the absent modality is None."""
    try:
        from test_cavmae import reference_finetune
    except ImportError:
        from tests.models.test_cavmae import reference_finetune

    theirs = random_state("cavmae_finetune_527", seed=2)
    converted = to_ours(wrap(theirs, "module."))
    model = converted.build().eval()
    model.load_state_dict(converted.state_dict, strict=True)
    video, audio = example_inputs(converted.cfg, 1)
    for mode, given in (("audio_missing_video", (None, audio[:, 0])), ("video_missing_audio", (video, None))):
        with torch.no_grad():
            ours = model(*given, mode=mode)
            expected = reference_finetune(theirs, converted.cfg, audio[:, 0], video, mode)
        assert ours.shape == (1, 527)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


# --- errors ---------------------------------------------------------------------------------------


def test_left_over_missing_and_wrong_shape_are_named():
    theirs = random_state("hicmae_finetune_tiny")
    theirs["encoder.blocks.0.attn.k_bias"] = torch.zeros(256)  # not in the model
    theirs["fc_norm.weight"] = torch.zeros(1000)  # wrong shape (4 x 256 = 1024)
    del theirs["encoder_fusion.blocks.1.cross_norm2.bias"]  # missing
    with pytest.raises(ConversionError) as err:
        to_ours({"model": theirs})
    message = str(err.value)
    assert "1 keys left over" in message and "encoder.blocks.0.attn.k_bias" in message
    assert "1 keys missing" in message and "fusion.video_blocks.1.cross_norm_kv.bias" in message
    assert "1 shape mismatches" in message
    assert "fc_norm.weight -> head_norm.weight: (1000,) in the file, (1024,) in the model" in message


def test_wrong_shape_message():
    theirs = random_state("cavmae_finetune_309")
    theirs["blocks_u.0.mlp.fc1.weight"] = torch.zeros(3072, 760)
    with pytest.raises(
        ConversionError,
        match=r"1 shape mismatches:\n  blocks_u.0.mlp.fc1.weight -> "
        r"shared.blocks.0.mlp.fc1.weight: \(3072, 760\) in the file, "
        r"\(3072, 768\) in the model",
    ):
        to_ours(theirs)


def test_our_side_errors_and_arch_checks():
    theirs = random_state("hicmae_finetune_tiny")
    ours = to_ours(theirs).state_dict
    ours["fusion.extra"] = torch.zeros(3)
    with pytest.raises(ConversionError, match="keys left over.*\n  fusion.extra"):
        to_upstream(ours, "hicmae")
    with pytest.raises(ConversionError, match="--from cavmae, but the keys are those of a hicmae checkpoint"):
        to_ours(theirs, arch="cavmae")
    with pytest.raises(ConversionError, match="asked for a pretrain model but the keys are those of a finetune"):
        to_ours(theirs, kind="pretrain")
    with pytest.raises(ConversionError, match="cannot tell the model"):
        to_ours({"foo.weight": torch.zeros(2)})
    with pytest.raises(ConversionError, match="expected a state dict"):
        unwrap([1, 2])


def test_rename_table_is_a_bijection_on_the_release_keys():
    for name in ("hicmae_pretrain_base", "hicmae_finetune_base"):
        keys = read_key_file(name).shapes
        ours = {rename_key(k, "hicmae", "ours") for k in keys}
        assert None not in ours and len(ours) == len(keys)
        assert {rename_key(k, "hicmae", "upstream") for k in ours} == set(keys)
    # the brief's mapping, spot checks
    assert rename_key("video_encoder.patch_embed.weight", "hicmae", "upstream") == "encoder.patch_embed.proj.weight"
    assert rename_key("audio_decoder.mask_token", "hicmae", "upstream") == "mask_token_audio"
    assert (
        rename_key("fusion.audio_blocks.1.cross_norm_q.bias", "hicmae", "upstream")
        == "encoder_fusion.blocks_audio.1.cross_norm1.bias"
    )
    assert (
        rename_key("video_decoder.blocks.2.cross_norm_kv.weight", "hicmae", "upstream")
        == "decoder.blocks.2.cross_norm2.weight"
    )
    assert rename_key("head_norm.bias", "hicmae", "upstream") == "fc_norm.bias"
    assert rename_key("shared.blocks.0.audio_norm2.weight", "cavmae", "upstream") == "blocks_u.0.norm2_a.weight"
    assert rename_key("head_norm.weight", "cavmae", "upstream") == "mlp_head.0.weight"
    assert rename_key("mask_token_audio_x", "hicmae", "ours") is None
    assert len(HICMAE_RENAMES) == len({row[0] for row in HICMAE_RENAMES})


# --- files and the CLI ------------------------------------------------------------------------------


def test_cli_convert_both_ways(tmp_path, capsys):
    theirs = random_state("hicmae_finetune_tiny")
    src = tmp_path / "hicmae_tiny.pth"
    torch.save({"model": theirs, "epoch": 3}, src)
    assert main(["convert", "--from", "hicmae", str(src), str(tmp_path / "ours.pth")]) == 0
    assert (
        "hicmae finetune (width 256, heads 4, depth 10 + 2, 6 classes): 370 tensors, 20473370 parameters"
        in capsys.readouterr().out
    )
    ours = load_ours(tmp_path / "ours.pth")
    assert ours.kind == "finetune" and ours.cfg.width == 256 and ours.num_classes == 6
    model = ours.load_model()
    assert sum(p.numel() for p in model.parameters()) == 20_473_370
    assert (
        main(
            [
                "convert",
                "--from",
                "hicmae",
                str(tmp_path / "ours.pth"),
                str(tmp_path / "theirs.pth"),
                "--to",
                "upstream",
            ]
        )
        == 0
    )
    written = torch_load_weights(tmp_path / "theirs.pth")
    assert set(written) == {"model"} and set(written["model"]) == set(theirs)
    assert all(torch.equal(written["model"][k], v) for k, v in theirs.items())
    # a broken file: exit 1 and the reason on stderr
    del theirs["head.bias"]
    torch.save(theirs, src)
    assert main(["convert", "--from", "hicmae", str(src), str(tmp_path / "x.pth")]) == 1
    assert "1 keys missing" in capsys.readouterr().err


def test_cli_convert_cavmae_module_prefix(tmp_path):
    from hicmae_dist.models.cavmae.config import CAVMAEConfig

    # a small CAV-MAE (its size is inferred from the file): 8 x 4 audio and 2 x 2 image tokens
    cfg = CAVMAEConfig(
        arch="cavmae",
        width=128,
        heads=2,
        modality_depth=2,
        shared_depth=1,
        num_frames=1,
        image_size=32,
        audio_frames=64,
        mel_bins=128,
    )
    theirs = to_upstream(CAVMAEFinetune(cfg, num_classes=7).state_dict(), "cavmae").state_dict
    torch.save({f"module.{k}": v for k, v in theirs.items()}, tmp_path / "as.pth")
    assert main(["convert", "--from", "cavmae", str(tmp_path / "as.pth"), str(tmp_path / "ours.pth")]) == 0
    assert (
        main(
            ["convert", "--from", "cavmae", str(tmp_path / "ours.pth"), str(tmp_path / "back.pth"), "--to", "upstream"]
        )
        == 0
    )
    back = torch_load_weights(tmp_path / "back.pth")
    assert all(k.startswith("module.") for k in back)  # as the released files
    assert all(torch.equal(back[f"module.{k}"], v) for k, v in theirs.items()) and len(back) == len(theirs)
    ours = load_ours(tmp_path / "ours.pth")
    assert (
        ours.cfg.width,
        ours.cfg.heads,
        ours.cfg.modality_depth,
        ours.cfg.image_size,
        ours.cfg.audio_frames,
        ours.num_classes,
    ) == (128, 2, 2, 32, 64, 7)


def test_hicmae_training_checkpoint_with_args_loads(tmp_path):
    """HiCMAE's checkpoints pickle the run's argparse.Namespace beside the weights."""
    import argparse

    theirs = random_state("hicmae_finetune_tiny")
    torch.save({"model": theirs, "args": argparse.Namespace(lr=1e-3, model="avit"), "epoch": 1}, tmp_path / "c.pth")
    converted = to_ours(torch_load_weights(tmp_path / "c.pth"))
    assert converted.num_classes == 6
