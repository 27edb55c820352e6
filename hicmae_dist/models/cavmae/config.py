"""CAV-MAE's model section (docs/models.md#cav-mae; the preset cavmae-base-vox2 holds its values:
num_frames 1, image_size 224, audio_frames 1024, decoder_* the joint decoder). Imports nothing
from hicmae_dist but hicmae_dist.config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hicmae_dist.config import ModelConfig, expect


@dataclass
class CAVMAEConfig(ModelConfig):
    arch: str = "cavmae"
    modality_depth: int = 11  # modality-specific blocks per modality
    shared_depth: int = 1  # shared blocks (unified, audio and video streams)
    # names in model sections saved before the family had its own config class
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"encoder_depth": "modality_depth", "fusion_depth": "shared_depth"}

    def validate_family(self) -> None:
        expect(self.num_frames == 1, "model.num_frames", "1 for arch cavmae (one RGB frame)", self.num_frames)
        expect(self.modality_depth >= 1, "model.modality_depth", ">= 1 modality-specific blocks", self.modality_depth)
        expect(self.shared_depth >= 1, "model.shared_depth", ">= 1 shared blocks", self.shared_depth)
        expect(self.decoder_depth >= 1, "model.decoder_depth", ">= 1", self.decoder_depth)
        # 2-D sin-cos positions: half the channels per axis, sin and cos halves of each
        for key in ("width", "decoder_width"):
            expect(
                getattr(self, key) % 4 == 0,
                f"model.{key}",
                "a multiple of 4 (2-D sin-cos positions)",
                getattr(self, key),
            )

    def depth_summary(self) -> str:
        return f"depth {self.modality_depth} + {self.shared_depth}"


MODEL_CONFIG = CAVMAEConfig
