"""CAV-MAE's key table for hicmae_dist.models.convert: our state-dict names <-> the authors'.

RENAMES rows are (ours, theirs) prefixes; "$" = the whole key. Order matters: specific rows
first. COMPONENTS rename parts inside a block's keys.
"""
from __future__ import annotations

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
    ("audio_norm1", "norm1_a"), ("audio_norm2", "norm2_a"), ("video_norm1", "norm1_v"), ("video_norm2", "norm2_v"),
]
