"""HiCMAE's model section (docs/models.md#hicmae; defaults are HiCMAE-S). Imports nothing from
hicmae_dist but hicmae_dist.config."""

from __future__ import annotations

from dataclasses import dataclass, field

from hicmae_dist.config import ModelConfig, expect


@dataclass
class HiCMAEConfig(ModelConfig):
    arch: str = "hicmae"
    encoder_depth: int = 10  # blocks per modality encoder
    fusion_depth: int = 2  # bidirectional cross+self layers
    # decoder_depth: 1 plain block + one CSBlock per intermediate layer
    intermediate_layers: list[int] = field(default_factory=lambda: [3, 6, 9])  # 0-based blocks
    frame_diff_target: bool = True
    # video_mask_ratio: tube masking; audio_mask_ratio: random masking

    def validate_family(self) -> None:
        expect(self.fusion_depth >= 0, "model.fusion_depth", ">= 0", self.fusion_depth)
        expect(
            self.audio_mask_mode == "random", "model.audio_mask_mode", "'random' for arch hicmae", self.audio_mask_mode
        )
        expect(
            self.symmetric_contrastive in (None, True),
            "model.symmetric_contrastive",
            "null or true for arch hicmae (its contrastive loss is symmetric)",
            self.symmetric_contrastive,
        )
        layers = self.intermediate_layers
        expect(
            len(layers) > 0 and all(0 <= i < self.encoder_depth for i in layers) and layers == sorted(set(layers)),
            "model.intermediate_layers",
            f"increasing block indices in [0, {self.encoder_depth})",
            layers,
        )
        expect(
            layers[-1] == self.encoder_depth - 1,
            "model.intermediate_layers",
            "to end with the last encoder block",
            layers,
        )
        expect(
            self.decoder_depth == len(layers) + 1,
            "model.decoder_depth",
            f"len(model.intermediate_layers) + 1 = {len(layers) + 1}",
            self.decoder_depth,
        )
        expect(self.num_frames % self.tubelet == 0, "model.num_frames", "a multiple of model.tubelet", self.num_frames)

    def depth_summary(self) -> str:
        return f"depth {self.encoder_depth} + {self.fusion_depth}"


MODEL_CONFIG = HiCMAEConfig
