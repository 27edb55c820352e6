"""CAV-MAE's side of hicmae_dist.models.convert: our state-dict names <-> the authors', and
what the authors' files say about the model (kind, size, layout).

RENAMES rows are (ours, theirs) prefixes; "$" = the whole key. Order matters: specific rows
first. COMPONENTS rename parts inside a block's keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from hicmae_dist.config import ModelConfig, load_config
from hicmae_dist.models.convert import ConversionError, key_depth, key_shape

RENAMES: list[tuple[str, str]] = [
    ("audio_encoder.patch_embed.", "patch_embed_a.proj."),
    ("video_encoder.patch_embed.", "patch_embed_v.proj."),
    ("audio_encoder.pos_embed$", "pos_embed_a$"),
    ("video_encoder.pos_embed$", "pos_embed_v$"),
    ("audio_encoder.modality$", "modality_a$"),
    ("video_encoder.modality$", "modality_v$"),
    ("audio_encoder.blocks.", "blocks_a."),
    ("video_encoder.blocks.", "blocks_v."),
    ("shared.blocks.", "blocks_u."),
    ("shared.norm.", "norm."),
    ("shared.audio_norm.", "norm_a."),
    ("shared.video_norm.", "norm_v."),
    ("decoder.encoder_to_decoder.", "decoder_embed."),
    ("decoder.mask_token$", "mask_token$"),
    ("decoder.audio_modality$", "decoder_modality_a$"),
    ("decoder.video_modality$", "decoder_modality_v$"),
    ("decoder.audio_pos_embed$", "decoder_pos_embed_a$"),
    ("decoder.video_pos_embed$", "decoder_pos_embed_v$"),
    ("decoder.blocks.", "decoder_blocks."),
    ("decoder.norm.", "decoder_norm."),
    ("decoder.audio_head.", "decoder_pred_a."),
    ("decoder.video_head.", "decoder_pred_v."),
    ("head_norm.", "mlp_head.0."),
    ("head.", "mlp_head.1."),
]
COMPONENTS: list[tuple[str, str]] = [
    ("audio_norm1", "norm1_a"),
    ("audio_norm2", "norm2_a"),
    ("video_norm1", "norm1_v"),
    ("video_norm2", "norm2_v"),
]

# --- reading the authors' files --------------------------------------------------------------------

MARKERS = ("blocks_u.", "shared.blocks.")  # key prefixes (theirs, ours) no other family has
HEAD_KEY = "mlp_head.1.weight"  # the classifier of a fine-tuned file (their naming)
PRESET = "cavmae-base-vox2"


def upstream_kind(state: dict[str, torch.Tensor]) -> str:
    return "pretrain" if "decoder_embed.weight" in state else "finetune"


def infer_config(state: dict[str, torch.Tensor], kind: str) -> ModelConfig:
    """The model section of a file in the authors' naming (not validated)."""
    width, _, patch, _ = key_shape(state, "patch_embed_v.proj.weight")
    base = load_config(PRESET).model
    audio_tokens, video_tokens = key_shape(state, "pos_embed_a")[1], key_shape(state, "pos_embed_v")[1]
    freq_tokens = base.mel_bins // patch
    side = int(round(video_tokens**0.5))
    if audio_tokens % freq_tokens or side * side != video_tokens:
        raise ConversionError(
            f"token grids: {audio_tokens} audio tokens are not {freq_tokens} frequency rows, "
            f"or {video_tokens} image tokens not a square"
        )
    fields = dict(
        width=width,
        heads=width // 64,
        patch=patch,
        modality_depth=key_depth(state, "blocks_a."),
        shared_depth=key_depth(state, "blocks_u."),
        image_size=side * patch,
        audio_frames=audio_tokens // freq_tokens * patch,
    )
    if kind == "pretrain":
        decoder_width = key_shape(state, "decoder_embed.weight")[0]
        fields.update(
            decoder_width=decoder_width,
            decoder_heads=decoder_width // 32,
            decoder_depth=key_depth(state, "decoder_blocks."),
        )
    return dataclasses.replace(base, **fields)


def upstream_payload(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A DataParallel state dict (`module.` keys), as the released files."""
    return {f"module.{k}": v for k, v in state.items()}
