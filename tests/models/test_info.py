"""Parameter and MAC accounting (`hicmae-dist info`) and the model benchmark (`bench model`)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hicmae_dist.bench.model import bench_model
from hicmae_dist.cli import main
from hicmae_dist.config import ExecutionConfig
from hicmae_dist.models import build_finetune_model, build_model
from hicmae_dist.models.cavmae.config import CAVMAEConfig
from hicmae_dist.models.hicmae.config import HiCMAEConfig
from hicmae_dist.models.info import MODELS, example_inputs, info_report, model_config
from hicmae_dist.models.macs import macs

pytestmark = pytest.mark.usefixtures("one_thread")


COUNTS = {  # (pretraining total, trainable), (fine-tune total with the default classes: 6 / 527)
    "hicmae-t": ((22_746_368, 22_746_368), 20_473_370),
    "hicmae-s": ((50_584_576, 50_584_576), 45_652_250),
    "hicmae-b": ((99_609_344, 99_609_344), 80_792_602),
    "cavmae-base": ((191_036_160, 190_129_920), 164_907_023),
}


def test_cli_info_hicmae_b(capsys):
    assert main(["info", "hicmae-b", "--finetune", "--num-classes", "6"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "total parameters: 80792602" in out and "trainable parameters: 80792602" in out
    assert any(line.split() == ["video_encoder", "32,306,688"] for line in out)
    assert any(line.strip().startswith("fine-tuning (one view): 46.11 G") and "about 46.1 G" in line for line in out)


@pytest.mark.parametrize("name", list(MODELS))
def test_info_every_model(name):
    (total, trainable), finetune_total = COUNTS[name]
    lines = info_report(name).splitlines()
    assert f"total parameters: {total}" in lines and f"trainable parameters: {trainable}" in lines
    assert any("pretraining (masked):" in line for line in lines)
    assert f"total parameters: {finetune_total}" in info_report(name, finetune=True).splitlines()
    if name == "cavmae-base":
        assert "total parameters: 164739381" in info_report(name, finetune=True, num_classes=309).splitlines()


def test_finetune_macs_match_the_spec():
    for name, spec in (("hicmae-t", 13.8), ("hicmae-s", 27.6), ("hicmae-b", 46.1)):
        got = sum(macs(model_config(name), "finetune", 6).values()) / 1e9
        assert got == pytest.approx(spec, abs=0.06), name


TINY_HICMAE = dict(
    width=64,
    heads=2,
    encoder_depth=4,
    intermediate_layers=[1, 2, 3],
    decoder_width=32,
    decoder_heads=2,
    decoder_depth=4,
    num_frames=4,
    image_size=48,
    audio_frames=64,
    mel_bins=32,
)
TINY_CAVMAE = dict(
    arch="cavmae",
    width=64,
    heads=2,
    modality_depth=2,
    shared_depth=2,
    decoder_width=32,
    decoder_heads=2,
    decoder_depth=2,
    num_frames=1,
    tubelet=1,
    image_size=48,
    audio_frames=64,
    mel_bins=32,
    video_mask_ratio=0.75,
    audio_mask_ratio=0.5,
)
REFERENCE = ExecutionConfig(attention_backend="reference")


def _counted_macs(model, cfg, kind, batch=2, mode=None) -> float:
    """Per-sample MACs as torch's FlopCounterMode counts them (FLOPs / 2) in one forward pass."""
    video, audio = example_inputs(cfg, batch)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if kind == "pretrain":
            model(video, audio, *model.make_masks(batch, torch.Generator().manual_seed(0)))
        elif mode:
            model(video, audio, mode=mode)
        else:
            model(video, audio)
    return counter.get_total_flops() / 2 / batch


@pytest.mark.parametrize("arch", ["hicmae", "cavmae"])
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_mac_formula_matches_flop_counter(arch, kind):
    cfg = HiCMAEConfig(**TINY_HICMAE) if arch == "hicmae" else CAVMAEConfig(**TINY_CAVMAE)
    cfg.validate()
    torch.manual_seed(0)
    model = build_model(cfg, REFERENCE) if kind == "pretrain" else build_finetune_model(cfg, 5, REFERENCE)
    batch = 2
    # the only matmuls the formula leaves out: the contrastive logits, B x B x C per layer and
    # direction (B per sample); ops.info_nce computes each direction's tiles (HiCMAE: symmetric)
    contrastive = (2 * len(cfg.intermediate_layers) if arch == "hicmae" else 1) * batch * cfg.width
    extra = contrastive if kind == "pretrain" else 0
    modes = ["multimodal", "audio", "video"] if (arch, kind) == ("cavmae", "finetune") else [None]
    for mode in modes:
        formula = sum(macs(cfg, kind, 5, **({"mode": mode} if mode else {})).values())
        assert _counted_macs(model, cfg, kind, batch, mode) == formula + extra, mode


def test_cli_bench_model_runs(capsys):
    assert main(["bench", "model", "hicmae-t", "--batch", "1", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "forward + backward:" in out and "peak memory:" in out and "parameters: 22746368" in out


def test_bench_model_result():
    cfg = CAVMAEConfig(**TINY_CAVMAE)
    result = bench_model(cfg, batch=2, steps=2, warmup=1)
    assert result["device"] == "cpu" and len(result["forward_backward_ms_all"]) == 2
    assert 0 < result["forward_ms"] < result["forward_backward_ms"]
    assert result["peak_memory_bytes"] >= 0 and result["samples_per_s"] > 0
    assert result["forward_macs_per_sample"] == sum(macs(cfg, "pretrain").values())
    with pytest.raises(ValueError, match="steps >= 1"):
        bench_model(cfg, steps=0)
