"""HiCMAE's key table for hicmae_dist.models.convert: our state-dict names <-> the authors'.

RENAMES rows are (ours, theirs) prefixes; "$" = the whole key. Order matters: specific rows
first. COMPONENTS rename parts inside a block's keys.
"""
from __future__ import annotations

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
