"""HiCMAE (Sun et al., Information Fusion 2024), docs/models.md#hicmae.

    video (B, 3, 16, 160, 160) -> video_encoder (visible tubelets) -+-> fusion -> video_decoder -> masked
    audio (B, 1, 256, 128)     -> audio_encoder (visible patches)  -+-> fusion -> audio_decoder -> masked
    intermediate encoder layers -> contrastive loss between the modalities, and skip connections
                                   into the decoders (deepest layer into the first cross block)

HiCMAEPretrain is the masked-autoencoder pretraining model, HiCMAEFinetune the classifier with
hierarchical feature fusion. Both have exactly the parameter tensors of the authors' release
(same shapes, same counts) under our names; the sinusoid position tables are non-persistent
buffers, as they are not in the release's state dict either.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hicmae_dist.config import ExecutionConfig, ModelConfig
from hicmae_dist.masking import random_mask, split_indices_to, tube_mask
from hicmae_dist.models import targets
from hicmae_dist.models.blocks import (
    LN_EPS,
    Block,
    CSBlock,
    cs_block_pair_packed,
    drop_path_rates,
    init_weights,
    maybe_checkpoint,
    sinusoid_table,
)
from hicmae_dist.ops import assemble_decoder_tokens, gather_visible, info_nce


def video_grid(cfg: ModelConfig) -> tuple[int, int, int]:
    """(t, h, w) video tokens: 8 x 10 x 10 for 16 frames of 160 px in 2 x 16 x 16 tubelets."""
    side = cfg.image_size // cfg.patch
    return cfg.num_frames // cfg.tubelet, side, side


def audio_grid(cfg: ModelConfig) -> tuple[int, int]:
    """(t, f) audio tokens: 16 x 8 for a 256 x 128 fbank in 16 x 16 patches."""
    return cfg.audio_frames // cfg.patch, cfg.mel_bins // cfg.patch


class Encoder(nn.Module):
    """One modality's encoder: patch embedding plus fixed sinusoid positions, Blocks, final norm."""

    def __init__(self, cfg: ModelConfig, execution: ExecutionConfig, patch_embed: nn.Module, num_tokens: int):
        super().__init__()
        self.patch_embed = patch_embed
        self.register_buffer("pos_embed", sinusoid_table(num_tokens, cfg.width), persistent=False)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, p, execution.attention_backend)
            for p in drop_path_rates(cfg.drop_path, cfg.encoder_depth)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.checkpointing = execution.activation_checkpointing

    def forward(self, x: torch.Tensor, visible_idx: torch.Tensor | None = None) -> list[torch.Tensor]:
        """x: the modality's input; visible_idx: (B, Nv) tokens to keep, None for all of them.

        Returns every block's output after the final LayerNorm, depth x (B, Nv, C): the last is
        the encoder output, the others are the hierarchical features.
        """
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, C), flat token order
        if tokens.shape[1] != self.pos_embed.shape[0]:
            raise ValueError(
                f"input {tuple(x.shape)} gives {tokens.shape[1]} tokens; "
                f"the model is built for {self.pos_embed.shape[0]}"
            )
        tokens = tokens + self.pos_embed.to(tokens.dtype)
        if visible_idx is not None:
            tokens = gather_visible(tokens, visible_idx)  # (B, Nv, C), original order kept
        layers = []
        for block in self.blocks:
            tokens = maybe_checkpoint(self.checkpointing, block, block, tokens)
            layers.append(self.norm(tokens))
        return layers


def make_video_encoder(cfg: ModelConfig, execution: ExecutionConfig) -> Encoder:
    kernel = (cfg.tubelet, cfg.patch, cfg.patch)
    patch_embed = nn.Conv3d(3, cfg.width, kernel_size=kernel, stride=kernel)
    return Encoder(cfg, execution, patch_embed, math.prod(video_grid(cfg)))


def make_audio_encoder(cfg: ModelConfig, execution: ExecutionConfig) -> Encoder:
    patch_embed = nn.Conv2d(1, cfg.width, kernel_size=cfg.patch, stride=cfg.patch)
    return Encoder(cfg, execution, patch_embed, math.prod(audio_grid(cfg)))


class FusionEncoder(nn.Module):
    """Bidirectional cross-modal fusion: in each layer video attends to audio and audio to video,
    both from the previous layer's outputs; separate final norms per modality. With
    execution.pack_fusion the two directions' cross-attentions run as one packed varlen attention
    launch (2B segments: video queries on audio keys, audio queries on video keys), and the two
    self-attentions likewise; the results equal the separate launches. With
    execution.activation_checkpointing each layer (both directions, packed or not) runs under
    torch.utils.checkpoint in training."""

    def __init__(self, cfg: ModelConfig, execution: ExecutionConfig):
        super().__init__()
        self.pack = execution.pack_fusion
        self.checkpointing = execution.activation_checkpointing
        rates = drop_path_rates(cfg.drop_path, cfg.fusion_depth)
        self.video_blocks = nn.ModuleList(
            CSBlock(cfg.width, cfg.heads, cfg.mlp_ratio, p, execution.attention_backend) for p in rates
        )
        self.video_norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.audio_blocks = nn.ModuleList(
            CSBlock(cfg.width, cfg.heads, cfg.mlp_ratio, p, execution.attention_backend) for p in rates
        )
        self.audio_norm = nn.LayerNorm(cfg.width, eps=LN_EPS)

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video: (B, Nv, C), audio: (B, Na, C) -> the same shapes."""
        for video_block, audio_block in zip(self.video_blocks, self.audio_blocks):
            if self.pack:
                video, audio = maybe_checkpoint(
                    self.checkpointing, self, cs_block_pair_packed, video_block, audio_block, video, audio
                )
            else:  # simultaneous update
                video, audio = (
                    maybe_checkpoint(self.checkpointing, video_block, video_block, video, audio),
                    maybe_checkpoint(self.checkpointing, audio_block, audio_block, audio, video),
                )
        return self.video_norm(video), self.audio_norm(audio)


class Decoder(nn.Module):
    """One modality's decoder with hierarchical skip connections (docs/models.md, HiCMAE
    pretraining forward, steps 5 to 7).

    Block 1 is plain; block k >= 2 is a CSBlock that cross-attends to the (k-1)-th deepest
    intermediate encoder feature. Predicts the masked tokens only.
    """

    def __init__(self, cfg: ModelConfig, execution: ExecutionConfig, num_tokens: int, patch_dim: int):
        super().__init__()
        width = cfg.decoder_width
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.encoder_to_decoder = nn.Linear(cfg.width, width, bias=False)
        self.register_buffer("pos_embed", sinusoid_table(num_tokens, width), persistent=False)
        rates = drop_path_rates(cfg.drop_path, cfg.decoder_depth)
        self.blocks = nn.ModuleList(
            [Block(width, cfg.decoder_heads, cfg.mlp_ratio, rates[0], execution.attention_backend)]
            + [CSBlock(width, cfg.decoder_heads, cfg.mlp_ratio, p, execution.attention_backend) for p in rates[1:]]
        )
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.head = nn.Linear(width, patch_dim)
        self.checkpointing = execution.activation_checkpointing
        # the release truncates at one standard deviation
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    def forward(
        self, fused: torch.Tensor, skips: list[torch.Tensor], visible_idx: torch.Tensor, masked_idx: torch.Tensor
    ) -> torch.Tensor:
        """fused: (B, Nv, C) fusion output; skips: intermediate encoder features, shallow to deep,
        each (B, Nv, C); visible_idx (B, Nv), masked_idx (B, Nm) flat token indices.
        Returns (B, Nm, patch_dim), rows in masked_idx order."""
        pos = self.pos_embed.to(fused.dtype)  # (N, Cd)
        pos_visible = pos[visible_idx]  # (B, Nv, Cd)
        # [visible + pos, mask_token + pos...], never unshuffled: the position code carries each
        # location (one native op, = torch.cat([e2d(fused) + pos[vis], mask + pos[masked]], 1))
        x = assemble_decoder_tokens(
            self.encoder_to_decoder(fused), self.mask_token, pos, visible_idx, masked_idx
        )  # (B, N, Cd)
        contexts = [self.encoder_to_decoder(f) + pos_visible for f in reversed(skips)]  # deepest first
        x = maybe_checkpoint(self.checkpointing, self.blocks[0], self.blocks[0], x)  # (B, N, Cd)
        for block, context in zip(self.blocks[1:], contexts, strict=True):
            x = maybe_checkpoint(self.checkpointing, block, block, x, context)
        return self.head(self.norm(x[:, fused.shape[1] :]))  # the masked tokens follow the visible ones


def _no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms and other 1-D parameters, and mask tokens (position tables are buffers)."""
    return param.ndim <= 1 or name.endswith(".bias") or name.endswith("mask_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """torch.optim.AdamW groups: weight decay on matrices and kernels only."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_weight_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def retrieval_features(model: nn.Module, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(video (B, C), audio (B, C)): mean over all tokens of each encoder's normalised output."""
    return model.video_encoder(video)[-1].mean(dim=1), model.audio_encoder(audio)[-1].mean(dim=1)


class HiCMAEPretrain(nn.Module):
    """Masked audio-visual pretraining: reconstruction of the masked video tubelets and audio
    patches plus the hierarchical cross-modal contrastive loss."""

    def __init__(self, cfg: ModelConfig, execution: ExecutionConfig | None = None):
        super().__init__()
        execution = execution or ExecutionConfig()  # how it runs; the maths are cfg's
        self.cfg = cfg
        self.num_video_tokens = math.prod(video_grid(cfg))
        self.num_audio_tokens = math.prod(audio_grid(cfg))
        self.video_encoder = make_video_encoder(cfg, execution)
        self.audio_encoder = make_audio_encoder(cfg, execution)
        self.fusion = FusionEncoder(cfg, execution)
        self.video_decoder = Decoder(cfg, execution, self.num_video_tokens, 3 * cfg.tubelet * cfg.patch**2)
        self.audio_decoder = Decoder(cfg, execution, self.num_audio_tokens, cfg.patch**2)
        self.apply(init_weights)

    def make_masks(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(video_mask (B, Nv_all), audio_mask (B, Na_all)) bool, True = masked: tube masking of
        the video (one spatial mask over all temporal slices), random masking of the audio."""
        t, h, w = video_grid(self.cfg)
        video = torch.stack([tube_mask(t, h * w, self.cfg.video_mask_ratio, generator) for _ in range(batch_size)])
        audio = torch.stack(
            [random_mask(self.num_audio_tokens, self.cfg.audio_mask_ratio, generator) for _ in range(batch_size)]
        )
        return video, audio

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self, weight_decay)

    def retrieval_features(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(video (B, C), audio (B, C)) of whole, unmasked inputs (see retrieval_features)."""
        return retrieval_features(self, video, audio)

    def contrastive_loss(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """video (B, Nv, C), audio (B, Na, C): InfoNCE between the mean-pooled, L2-normalised
        clip features (no projection head, fixed temperature)."""
        v = F.normalize(video.float().mean(dim=1), dim=-1)  # (B, C)
        a = F.normalize(audio.float().mean(dim=1), dim=-1)  # (B, C)
        return info_nce(v, a, self.cfg.temperature, symmetric=True, negatives=self.cfg.negatives)

    def forward(
        self, video: torch.Tensor, audio: torch.Tensor, video_mask: torch.Tensor, audio_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """video (B, 3, T, H, W) ImageNet-normalised; audio (B, 1, T_a, F) normalised fbank;
        video_mask (B, Nv_all), audio_mask (B, Na_all) bool, True = masked, the same count per row.
        Returns the scalar losses."""
        cfg = self.cfg
        for name, mask, num_tokens in (
            ("video_mask", video_mask, self.num_video_tokens),
            ("audio_mask", audio_mask, self.num_audio_tokens),
        ):
            if mask.shape != (video.shape[0], num_tokens):
                raise ValueError(f"{name}: expected ({video.shape[0]}, {num_tokens}), got {tuple(mask.shape)}")
        video_visible, video_masked = split_indices_to(video_mask, video.device)  # (B, Nv), (B, Nvm)
        audio_visible, audio_masked = split_indices_to(audio_mask, audio.device)  # (B, Na), (B, Nam)

        # modality encoders on the visible tokens only
        video_layers = self.video_encoder(video, video_visible)  # depth x (B, Nv, C)
        audio_layers = self.audio_encoder(audio, audio_visible)  # depth x (B, Na, C)
        video_skips = [video_layers[i] for i in cfg.intermediate_layers]
        audio_skips = [audio_layers[i] for i in cfg.intermediate_layers]

        # hierarchical cross-modal contrastive loss, one term per intermediate layer
        out = {
            f"loss_contrastive_l{i}": self.contrastive_loss(v, a)
            for i, v, a in zip(cfg.intermediate_layers, video_skips, audio_skips)
        }

        video_fused, audio_fused = self.fusion(video_layers[-1], audio_layers[-1])
        video_pred = self.video_decoder(video_fused, video_skips, video_visible, video_masked)  # (B, Nvm, 1536)
        audio_pred = self.audio_decoder(audio_fused, audio_skips, audio_visible, audio_masked)  # (B, Nam, 256)

        # reconstruction: mean squared error over the masked tokens only
        video_target = targets.video_target(video, cfg.tubelet, cfg.patch, cfg.frame_diff_target)  # (B, N, 1536)
        audio_target = targets.audio_target(audio, cfg.patch)  # (B, N, 256)
        out["loss_video"] = F.mse_loss(video_pred.float(), gather_visible(video_target, video_masked))
        out["loss_audio"] = F.mse_loss(audio_pred.float(), gather_visible(audio_target, audio_masked))
        out["loss_contrastive"] = sum(out[f"loss_contrastive_l{i}"] for i in cfg.intermediate_layers)
        out["loss"] = out["loss_video"] + out["loss_audio"] + cfg.contrastive_weight * out["loss_contrastive"]
        return out


class HiCMAEFinetune(nn.Module):
    """Classifier (or regressor) with hierarchical feature fusion, no masking.

    Feature = [softmax-weighted sum over the video encoder's layers of the mean-pooled normalised
    tokens, the same for audio, mean-pooled fusion video output, mean-pooled fusion audio output]
    (B, 4C) -> LayerNorm -> Linear -> optional activation (regression heads).
    """

    ACTIVATIONS = {None: nn.Identity, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}

    def __init__(
        self,
        cfg: ModelConfig,
        num_classes: int,
        head_activation: str | None = None,
        execution: ExecutionConfig | None = None,
    ):
        super().__init__()
        execution = execution or ExecutionConfig()  # how it runs; the maths are cfg's
        if head_activation not in self.ACTIVATIONS:
            raise ValueError(
                f"head_activation {head_activation!r}: expected one of {', '.join(map(str, self.ACTIVATIONS))}"
            )
        self.cfg = cfg
        self.video_layer_weights = nn.Parameter(torch.full((cfg.encoder_depth,), 1 / cfg.encoder_depth))
        self.audio_layer_weights = nn.Parameter(torch.full((cfg.encoder_depth,), 1 / cfg.encoder_depth))
        self.video_encoder = make_video_encoder(cfg, execution)
        self.audio_encoder = make_audio_encoder(cfg, execution)
        self.fusion = FusionEncoder(cfg, execution)
        self.head_norm = nn.LayerNorm(4 * cfg.width, eps=LN_EPS)
        self.head = nn.Linear(4 * cfg.width, num_classes)
        self.head_activation = self.ACTIVATIONS[head_activation]()
        self.apply(init_weights)

    def param_groups(self, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
        """AdamW groups (decay on matrices and kernels only), split by layer-decay depth when
        layer_decay < 1: each group's "lr_scale" = layer_decay ** (top - layer_id)."""
        if layer_decay == 1.0:
            return param_groups(self, weight_decay)
        top = self.cfg.encoder_depth + self.cfg.fusion_depth + 1
        groups: dict[tuple[int, bool], dict] = {}
        for name, param in self.named_parameters():
            if param.requires_grad:
                layer, no_decay = self.layer_id(name), _no_weight_decay(name, param)
                group = groups.setdefault(
                    (layer, no_decay),
                    {
                        "params": [],
                        "weight_decay": 0.0 if no_decay else weight_decay,
                        "lr_scale": layer_decay ** (top - layer),
                    },
                )
                group["params"].append(param)
        return [groups[k] for k in sorted(groups)]

    def layer_id(self, name: str) -> int:
        """Layer-decay depth of a parameter (docs/models.md, HiCMAE fine-tuning recipe): 0 for the patch
        embeddings, encoder block i -> i + 1 (the encoders share ids), fusion block j ->
        encoder_depth + j + 1, everything else on top."""
        parts = name.split(".")
        if parts[0] in ("video_encoder", "audio_encoder"):
            if parts[1] == "patch_embed":
                return 0
            if parts[1] == "blocks":
                return int(parts[2]) + 1
        if parts[0] == "fusion" and parts[1] in ("video_blocks", "audio_blocks"):
            return self.cfg.encoder_depth + int(parts[2]) + 1
        return self.cfg.encoder_depth + self.cfg.fusion_depth + 1

    @staticmethod
    def _weighted_layers(layers: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """depth x (B, N, C) -> (B, C): mean over tokens, softmax(weights)-weighted sum over layers."""
        pooled = torch.stack([layer.mean(dim=1) for layer in layers], dim=1)  # (B, depth, C)
        return (pooled * weights.softmax(dim=0).to(pooled.dtype)[None, :, None]).sum(dim=1)

    def features(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """video (B, 3, T, H, W), audio (B, 1, T_a, F) -> the head's input (B, 4C), before its
        LayerNorm."""
        video_layers = self.video_encoder(video)  # depth x (B, Nv, C)
        audio_layers = self.audio_encoder(audio)  # depth x (B, Na, C)
        video_fused, audio_fused = self.fusion(video_layers[-1], audio_layers[-1])
        return torch.cat(
            [
                self._weighted_layers(video_layers, self.video_layer_weights),
                self._weighted_layers(audio_layers, self.audio_layer_weights),
                video_fused.mean(dim=1),
                audio_fused.mean(dim=1),
            ],
            dim=-1,
        )  # (B, 4C)

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """video (B, 3, T, H, W), audio (B, 1, T_a, F) -> (B, num_classes)."""
        return self.head_activation(self.head(self.head_norm(self.features(video, audio))))

    def retrieval_features(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(video (B, C), audio (B, C)): each encoder's normalised last-layer tokens, mean-pooled
        (single-modality features, no fusion)."""
        return retrieval_features(self, video, audio)
