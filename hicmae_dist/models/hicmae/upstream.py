"""HiCMAE's side of hicmae_dist.models.convert: our state-dict names <-> the authors', and
what the authors' files say about the model (kind, size, layout).

RENAMES rows are (ours, theirs) prefixes; "$" = the whole key. Order matters: specific rows
first. COMPONENTS rename parts inside a block's keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from hicmae_dist.config import Config, ModelConfig, load_config
from hicmae_dist.models.convert import key_depth, key_shape

RENAMES: list[tuple[str, str]] = [
    ("video_encoder.patch_embed.", "encoder.patch_embed.proj."),
    ("audio_encoder.patch_embed.", "encoder_audio.patch_embed.proj."),
    ("video_encoder.", "encoder."),
    ("audio_encoder.", "encoder_audio."),
    ("fusion.video_blocks.", "encoder_fusion.blocks."),
    ("fusion.audio_blocks.", "encoder_fusion.blocks_audio."),
    ("fusion.video_norm.", "encoder_fusion.norm."),
    ("fusion.audio_norm.", "encoder_fusion.norm_audio."),
    ("video_decoder.mask_token$", "mask_token$"),
    ("audio_decoder.mask_token$", "mask_token_audio$"),
    ("video_decoder.encoder_to_decoder.", "encoder_to_decoder."),
    ("audio_decoder.encoder_to_decoder.", "encoder_to_decoder_audio."),
    ("video_decoder.", "decoder."),
    ("audio_decoder.", "decoder_audio."),
    ("video_layer_weights$", "video_layer_weights$"),
    ("audio_layer_weights$", "audio_layer_weights$"),
    ("head_norm.", "fc_norm."),
    ("head.", "head."),
]
COMPONENTS: list[tuple[str, str]] = [("cross_norm_q", "cross_norm1"), ("cross_norm_kv", "cross_norm2")]

# --- reading the authors' files --------------------------------------------------------------------

MARKERS = ("encoder_fusion.", "fusion.")  # key prefixes (theirs, ours) no other family has
HEAD_KEY = "head.weight"  # the classifier of a fine-tuned file (their naming)
PRESETS_BY_WIDTH = {256: "hicmae-t-vox2", 384: "hicmae-s-vox2", 512: "hicmae-b-vox2"}


def upstream_kind(state: dict[str, torch.Tensor]) -> str:
    return "pretrain" if "mask_token" in state or "decoder.head.weight" in state else "finetune"


def infer_config(state: dict[str, torch.Tensor], kind: str) -> ModelConfig:
    """The model section of a file in the authors' naming (not validated)."""
    width, _, tubelet, patch, _ = key_shape(state, "encoder.patch_embed.proj.weight")
    fields = dict(
        width=width,
        heads=width // 64,
        patch=patch,
        tubelet=tubelet,
        encoder_depth=key_depth(state, "encoder.blocks."),
        fusion_depth=key_depth(state, "encoder_fusion.blocks."),
    )
    if kind == "pretrain":
        decoder_width = key_shape(state, "decoder.norm.weight")[0]
        fields.update(
            decoder_width=decoder_width,
            decoder_heads=decoder_width // 64,
            decoder_depth=key_depth(state, "decoder.blocks."),
        )
    # the sinusoid tables are not in the file: the spec's token grids; the decoder of a
    # fine-tune file is unknown: the preset of that width, if any
    base = load_config(PRESETS_BY_WIDTH[width]).model if width in PRESETS_BY_WIDTH else Config().model
    return dataclasses.replace(base, **fields)


def upstream_payload(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """{"model": state dict}, as the authors' training checkpoints."""
    return {"model": state}
