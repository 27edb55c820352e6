"""CAV-MAE (Gong et al., ICLR 2023), docs/models.md#cav-mae.

    audio (B, 1, 1024, 128) -> (B, 1, 128, 1024) -> audio_encoder: 11 blocks on the visible patches -+
    video (B, 3, 224, 224)  -> video_encoder: 11 blocks on the visible patches ----------------------+
       shared block, run three ways (attention and MLP weights shared, LayerNorms not):
         [audio, video] with the unified norms -> joint decoder (8 blocks over all 708 tokens,
                                                  unshuffled) -> audio / visual patches
         audio alone with the audio norms  \\  mean-pooled -> contrastive loss
         video alone with the video norms  /
       (execution.pack_fusion: the three passes share one packed varlen attention launch per shared
        block in pretraining, see block_streams_packed)

CAVMAEPretrain is the pretraining model, CAVMAEFinetune the classifier (multimodal, audio-only or
video-only). Both have exactly the parameter tensors of the authors' release under our names
(hicmae_dist.models.convert maps them), including two quirks kept for the exact counts:
  - the 2-D sin-cos position tables are Parameters, frozen (requires_grad False) in pretraining
    and trainable in fine-tuning, as in the release;
  - every block carries the three sets of LayerNorms (unified, audio, video), though only the
    shared blocks use more than the unified set: the others are dead weight (see
    `unused_parameters`), 4 LayerNorms per modality-specific and decoder block.
LayerNorm eps 1e-5, qkv Linear with bias, head_dim 64 (the decoder: 512 / 16 = 32).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hicmae_dist.config import ExecutionConfig, ModelConfig
from hicmae_dist.masking import audio_structured_mask, mae_random_mask, split_indices_to
from hicmae_dist.models.blocks import (
    DropPath,
    Mlp,
    _cu_seqlens,
    _merge_heads,
    _split_heads,
    drop_path_rates,
    init_weights,
    maybe_checkpoint,
)
from hicmae_dist.ops import attention, gather_visible, info_nce

LN_EPS = 1e-5  # torch's default, as the release (nn.LayerNorm)
PATCH_NORM_EPS = 1e-6
STREAMS = ("unified", "audio", "video")
_NORM_PREFIX = {"unified": "", "audio": "audio_", "video": "video_"}


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, dim) fixed 2-D position code over a row-major grid (token r * cols + c).

    The first half of the channels encodes the column, the second half the row (the release's
    meshgrid puts the width coordinate first); each half is [sin(p * w), cos(p * w)] with
    w_j = 10000^(-j / (dim / 4)), j < dim / 4, concatenated, not interleaved. Computed in
    float64 and rounded once to float32, as the release does with numpy.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d: dim {dim} must be a multiple of 4")
    quarter = dim // 4
    omega = 1.0 / torch.pow(10000.0, torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    r, c = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )

    def one_axis(pos: torch.Tensor) -> torch.Tensor:  # (rows, cols) -> (rows * cols, D/2)
        angle = pos.reshape(-1, 1) * omega
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)

    return torch.cat([one_axis(c), one_axis(r)], dim=1).float()


def audio_grid(cfg: ModelConfig) -> tuple[int, int]:
    """(frequency, time) audio tokens, frequency-major: 8 x 64 for a 1024 x 128 fbank."""
    return cfg.mel_bins // cfg.patch, cfg.audio_frames // cfg.patch


def video_grid(cfg: ModelConfig) -> tuple[int, int]:
    """(rows, columns) image tokens: 14 x 14 for 224 px."""
    side = cfg.image_size // cfg.patch
    return side, side


class Attention(nn.Module):
    """Multi-head self-attention with one qkv Linear with bias (timm's, qkv_bias=True)."""

    def __init__(self, dim: int, heads: int, backend: str = "auto"):
        super().__init__()
        self.heads = heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, N, C), heads contiguous in C
        out = attention(
            _split_heads(q, self.heads), _split_heads(k, self.heads), _split_heads(v, self.heads), backend=self.backend
        )  # (B, H, N, D)
        return self.proj(_merge_heads(out))


class Block(nn.Module):
    """Pre-norm block with one attention and MLP and three pairs of LayerNorms, one per stream:
    x += Attn(LN1_s(x)); x += MLP(LN2_s(x)) for s in unified (norm1/2), audio (audio_norm1/2),
    video (video_norm1/2). `streams` says which the model runs it with (the others are unused)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        backend: str = "auto",
        streams: tuple[str, ...] = ("unified",),
    ):
        super().__init__()
        self.streams = streams
        for prefix in _NORM_PREFIX.values():
            setattr(self, f"{prefix}norm1", nn.LayerNorm(dim, eps=LN_EPS))
        self.attn = Attention(dim, heads, backend)
        for prefix in _NORM_PREFIX.values():
            setattr(self, f"{prefix}norm2", nn.LayerNorm(dim, eps=LN_EPS))
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, stream: str = "unified") -> torch.Tensor:
        prefix = _NORM_PREFIX[stream]
        x = x + self.drop_path(self.attn(getattr(self, f"{prefix}norm1")(x)))
        x = x + self.drop_path(self.mlp(getattr(self, f"{prefix}norm2")(x)))
        return x

    def unused_norms(self) -> list[str]:
        return [f"{_NORM_PREFIX[s]}norm{i}" for s in STREAMS if s not in self.streams for i in (1, 2)]


def block_streams_packed(block: Block, streams: tuple[str, ...], *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(block(x, stream) for each x, stream), with one qkv projection over all of them, one packed
    varlen attention launch and one proj, and one MLP over the concatenation.

    xs: (B, N_i, C) each, the same B and C; streams: the stream of each (its LayerNorms). The
    segments are stream-major: sample 0..B-1 of xs[0], then of xs[1], ..., each attending only to
    itself (the shared block's three passes: B x (Na + Nv), B x Na, B x Nv). Same maths as the
    separate calls; with drop path in training the random draws come in another order (same
    distribution)."""
    if len(streams) != len(xs) or not xs:
        raise ValueError(f"block_streams_packed: {len(streams)} streams for {len(xs)} inputs")
    B, C = xs[0].shape[0], xs[0].shape[2]
    if any(x.shape[0] != B or x.shape[2] != C for x in xs):
        raise ValueError(f"block_streams_packed: inputs must share batch and width, got {[tuple(x.shape) for x in xs]}")
    heads = block.attn.heads
    lengths = [x.shape[1] for x in xs]
    rows = [B * n for n in lengths]
    prefixes = [_NORM_PREFIX[s] for s in streams]

    normed = torch.cat([getattr(block, f"{p}norm1")(x).reshape(-1, C) for p, x in zip(prefixes, xs)])
    q, k, v = block.attn.qkv(normed).chunk(3, dim=-1)  # 3 x (total, C), heads contiguous in C
    cu = _cu_seqlens([(B, n) for n in lengths], normed.device)
    out = attention(
        q.reshape(-1, heads, C // heads),
        k.reshape(-1, heads, C // heads),
        v.reshape(-1, heads, C // heads),
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=max(lengths),
        max_seqlen_k=max(lengths),
        backend=block.attn.backend,
    )  # (total, H, D)
    attn_out = block.attn.proj(out.reshape(-1, C)).split(rows)
    ys = [x + block.drop_path(o.reshape(x.shape)) for x, o in zip(xs, attn_out)]

    normed = torch.cat([getattr(block, f"{p}norm2")(y).reshape(-1, C) for p, y in zip(prefixes, ys)])
    mlp_out = block.mlp(normed).split(rows)
    return tuple(y + block.drop_path(o.reshape(y.shape)) for y, o in zip(ys, mlp_out))


def _blocks(
    cfg: ModelConfig,
    backend: str,
    depth: int,
    dim: int,
    heads: int,
    streams: tuple[str, ...],
    drop_path: float | None = None,
) -> nn.ModuleList:
    rates = drop_path_rates(cfg.drop_path if drop_path is None else drop_path, depth)
    return nn.ModuleList(Block(dim, heads, cfg.mlp_ratio, p, backend, streams) for p in rates)


class ModalityEncoder(nn.Module):
    """One modality's stem and specific blocks: 16 x 16 patches (Conv2d), + 2-D sin-cos positions,
    + a learnable modality vector, then modality_depth Blocks (unified norms). No final norm: the
    shared blocks follow."""

    def __init__(
        self, cfg: ModelConfig, execution: ExecutionConfig, in_chans: int, grid: tuple[int, int], trainable_pos: bool
    ):
        super().__init__()
        self.grid = grid
        self.patch_embed = nn.Conv2d(in_chans, cfg.width, kernel_size=cfg.patch, stride=cfg.patch)
        self.pos_embed = nn.Parameter(sincos_2d(cfg.width, *grid)[None], requires_grad=trainable_pos)  # (1, N, C)
        self.modality = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.blocks = _blocks(cfg, execution.attention_backend, cfg.modality_depth, cfg.width, cfg.heads, ("unified",))
        self.checkpointing = execution.activation_checkpointing

    def forward(self, x: torch.Tensor, visible_idx: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, c, rows * p, cols * p); visible_idx (B, Nv) tokens kept, None for all -> (B, Nv, C)."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, C), row-major
        if tokens.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(
                f"input {tuple(x.shape)} gives {tokens.shape[1]} tokens; "
                f"the model is built for {self.pos_embed.shape[1]} ({self.grid[0]} x {self.grid[1]})"
            )
        tokens = tokens + self.pos_embed.to(tokens.dtype) + self.modality.to(tokens.dtype)
        if visible_idx is not None:
            tokens = gather_visible(tokens, visible_idx)  # (B, Nv, C), original order kept
        for block in self.blocks:
            tokens = maybe_checkpoint(self.checkpointing, block, block, tokens)
        return tokens


class SharedEncoder(nn.Module):
    """The shared blocks, run on one of three streams, each with its own LayerNorms and final norm."""

    def __init__(self, cfg: ModelConfig, execution: ExecutionConfig):
        super().__init__()
        self.blocks = _blocks(cfg, execution.attention_backend, cfg.shared_depth, cfg.width, cfg.heads, STREAMS)
        self.norm = nn.LayerNorm(cfg.width, eps=LN_EPS)  # unified
        self.audio_norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.video_norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.checkpointing = execution.activation_checkpointing

    def forward(self, x: torch.Tensor, stream: str) -> torch.Tensor:
        """(B, N, C) -> (B, N, C). (With more than one shared block, the release feeds every block
        the modality-specific output for the audio and video streams, so only its last one counts;
        here the blocks chain on every stream. With the release's one block the two agree.)"""
        for block in self.blocks:
            x = maybe_checkpoint(self.checkpointing, block, block, x, stream)
        return getattr(self, _NORM_PREFIX[stream] + "norm")(x)

    def forward_packed(self, xs: tuple[torch.Tensor, ...], streams: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        """(self(x, stream) for each x, stream), each shared block running all the streams in one
        packed varlen attention launch (block_streams_packed); the same results."""
        for block in self.blocks:
            xs = maybe_checkpoint(self.checkpointing, block, block_streams_packed, block, streams, *xs)
        return tuple(getattr(self, _NORM_PREFIX[s] + "norm")(x) for s, x in zip(streams, xs))


class JointDecoder(nn.Module):
    """One decoder over [audio tokens, visual tokens] in their original order: visible tokens
    projected 768 -> 512, mask tokens elsewhere, + decoder positions, + decoder modality vectors,
    decoder_depth Blocks, LayerNorm, then per-modality heads on every token."""

    def __init__(self, cfg: ModelConfig, execution: ExecutionConfig):
        super().__init__()
        width = cfg.decoder_width
        self.num_audio = math.prod(audio_grid(cfg))
        self.encoder_to_decoder = nn.Linear(cfg.width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.audio_modality = nn.Parameter(torch.zeros(1, 1, width))
        self.video_modality = nn.Parameter(torch.zeros(1, 1, width))
        self.audio_pos_embed = nn.Parameter(sincos_2d(width, *audio_grid(cfg))[None], requires_grad=False)
        self.video_pos_embed = nn.Parameter(sincos_2d(width, *video_grid(cfg))[None], requires_grad=False)
        self.blocks = _blocks(
            cfg, execution.attention_backend, cfg.decoder_depth, width, cfg.decoder_heads, ("unified",), drop_path=0.0
        )
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.checkpointing = execution.activation_checkpointing
        self.audio_head = nn.Linear(width, cfg.patch**2)
        self.video_head = nn.Linear(width, 3 * cfg.patch**2)

    def _unshuffle(self, visible: torch.Tensor, visible_idx: torch.Tensor, masked_idx: torch.Tensor) -> torch.Tensor:
        """visible (B, Nv, Cd) at token indices visible_idx; mask tokens at masked_idx -> (B, N, Cd)
        in token order."""
        B, _, Cd = visible.shape
        x = torch.cat([visible, self.mask_token.to(visible.dtype).expand(B, masked_idx.shape[1], Cd)], dim=1)
        restore = torch.argsort(torch.cat([visible_idx, masked_idx], dim=1), dim=1)  # inverse permutation
        return gather_visible(x, restore)

    def forward(
        self,
        latent: torch.Tensor,
        audio_visible: torch.Tensor,
        audio_masked: torch.Tensor,
        video_visible: torch.Tensor,
        video_masked: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """latent (B, Nav + Nvv, C): the unified stream's output, [visible audio, visible video].
        Returns (audio (B, Na, p*p), video (B, Nv, 3*p*p)) predictions for every token."""
        x = self.encoder_to_decoder(latent)  # (B, Nav + Nvv, Cd)
        n = audio_visible.shape[1]
        audio = self._unshuffle(x[:, :n], audio_visible, audio_masked)  # (B, Na, Cd)
        video = self._unshuffle(x[:, n:], video_visible, video_masked)  # (B, Nv, Cd)
        audio = audio + self.audio_pos_embed.to(x.dtype) + self.audio_modality.to(x.dtype)
        video = video + self.video_pos_embed.to(x.dtype) + self.video_modality.to(x.dtype)
        x = torch.cat([audio, video], dim=1)  # (B, Na + Nv, Cd)
        for block in self.blocks:
            x = maybe_checkpoint(self.checkpointing, block, block, x)
        x = self.norm(x)
        return self.audio_head(x[:, : self.num_audio]), self.video_head(x[:, self.num_audio :])


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, c, H, W) -> (B, (H/p) * (W/p), p * p * c): row-major patches, each flattened
    (row, column, channel), channel last (the release's patchify)."""
    B, c, H, W = x.shape
    h, w = H // patch, W // patch
    x = x.reshape(B, c, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, c)
    return x.reshape(B, h * w, patch * patch * c)


@torch.no_grad()
def patch_target(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-patch normalised reconstruction target in float32: each patch's values (all
    channels) minus their mean, over sqrt(unbiased variance + 1e-6)."""
    target = patchify(x.float(), patch)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, unbiased=True, keepdim=True)
    return (target - mean) / (var + PATCH_NORM_EPS).sqrt()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked tokens (mask (B, N) True) of the per-token mean squared error."""
    per_token = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, N)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum()


def _audio_input(audio: torch.Tensor) -> torch.Tensor:
    """(B, T, F) or (B, 1, T, F) fbank, time first -> (B, 1, F, T), frequency rows."""
    if audio.dim() == 3:
        audio = audio.unsqueeze(1)
    if audio.dim() != 4 or audio.shape[1] != 1:
        raise ValueError(f"audio: expected (B, T, F) or (B, 1, T, F), got {tuple(audio.shape)}")
    return audio.transpose(2, 3)


def _video_input(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W), or (B, 3, 1, H, W) (one frame of a clip tensor) -> (B, 3, H, W)."""
    if video.dim() == 5 and video.shape[2] == 1:
        video = video.squeeze(2)
    if video.dim() != 4 or video.shape[1] != 3:
        raise ValueError(f"video: expected (B, 3, H, W) or (B, 3, 1, H, W), got {tuple(video.shape)}")
    return video


def _no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms and other 1-D parameters, mask token, modality vectors and position tables."""
    return (
        param.ndim <= 1
        or name.endswith(".bias")
        or name.rsplit(".", 1)[-1]
        in (
            "mask_token",
            "modality",
            "audio_modality",
            "video_modality",
            "pos_embed",
            "audio_pos_embed",
            "video_pos_embed",
        )
    )


def param_groups(model: nn.Module, weight_decay: float, lr_scales: dict[str, float] | None = None) -> list[dict]:
    """Optimiser groups over the trainable parameters: weight decay on matrices and kernels only.
    (The release's Adam decays everything at 5e-7; the toolkit uses the same rule for both models.)
    lr_scales {top-level module name: factor} splits off groups with an "lr_scale" entry."""
    lr_scales = lr_scales or {}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = (_no_weight_decay(name, param), lr_scales.get(name.split(".")[0], 1.0))
            groups.setdefault(key, []).append(param)
    out = [
        {"params": groups.get((False, 1.0), []), "weight_decay": weight_decay},
        {"params": groups.get((True, 1.0), []), "weight_decay": 0.0},
    ]
    for (no_decay, scale), params in sorted(groups.items(), key=lambda kv: kv[0]):
        if scale != 1.0:
            out.append({"params": params, "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale})
    return out


def _unused_norm_parameters(model: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """The LayerNorm parameters of streams a Block is never run with, in named_parameters order."""
    unused = set()
    for module_name, module in model.named_modules():
        if isinstance(module, Block) and not module_name.startswith(skip):
            unused.update(f"{module_name}.{norm}.{p}" for norm in module.unused_norms() for p in ("weight", "bias"))
    return [n for n, _ in model.named_parameters() if n in unused]


class CAVMAEPretrain(nn.Module):
    """Contrastive audio-visual masked autoencoder: reconstruction of the masked audio and image
    patches from the unified stream, plus InfoNCE between the mean-pooled audio and video streams."""

    def __init__(self, cfg: ModelConfig, execution: ExecutionConfig | None = None):
        super().__init__()
        if cfg.arch != "cavmae":
            raise ValueError(f"CAVMAEPretrain needs model.arch 'cavmae', got {cfg.arch!r}")
        execution = execution or ExecutionConfig()  # how it runs; the maths are cfg's
        self.cfg = cfg
        self.pack_fusion = execution.pack_fusion
        self.num_audio_tokens = math.prod(audio_grid(cfg))
        self.num_video_tokens = math.prod(video_grid(cfg))
        self.audio_encoder = ModalityEncoder(cfg, execution, 1, audio_grid(cfg), trainable_pos=False)
        self.video_encoder = ModalityEncoder(cfg, execution, 3, video_grid(cfg), trainable_pos=False)
        self.shared = SharedEncoder(cfg, execution)
        self.decoder = JointDecoder(cfg, execution)
        _init(self)

    def make_masks(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(video_mask (B, Nv_all), audio_mask (B, Na_all)) bool, True = masked, one row per sample:
        unstructured masking of the image, cfg.audio_mask_mode masking of the audio."""
        freq, time = audio_grid(self.cfg)
        video = torch.stack(
            [mae_random_mask(self.num_video_tokens, self.cfg.video_mask_ratio, generator) for _ in range(batch_size)]
        )
        audio = torch.stack(
            [
                audio_structured_mask(freq, time, self.cfg.audio_mask_ratio, self.cfg.audio_mask_mode, generator)
                for _ in range(batch_size)
            ]
        )
        return video, audio

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self, weight_decay)

    def unused_parameters(self) -> list[str]:
        """Names of the parameters no forward touches: the audio/video LayerNorms of the
        modality-specific and decoder blocks (kept for the release's layout and counts)."""
        return _unused_norm_parameters(self)

    def contrastive_loss(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """audio (B, Na, C), video (B, Nv, C) stream outputs: InfoNCE between the mean-pooled,
        L2-normalised clip features with S = a @ v.T / tau. One direction (the release's default):
        -mean_i log_softmax(S, dim=0)[i, i], i.e. each video picks its audio among the batch's;
        symmetric_contrastive averages it with the other direction."""
        a = F.normalize(audio.float().mean(dim=1), dim=-1)  # (B, C)
        v = F.normalize(video.float().mean(dim=1), dim=-1)  # (B, C)
        # info_nce(x, y) takes cross-entropy over the rows of x @ y.T = S.T, i.e. over S's columns
        return info_nce(
            v, a, self.cfg.temperature, symmetric=bool(self.cfg.symmetric_contrastive), negatives=self.cfg.negatives
        )

    def retrieval_features(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unmasked inputs -> (video (B, C), audio (B, C)): mean-pooled single-modality shared-block
        outputs (the release's forward_feat, pooled); cosine similarity ranks them."""
        return _retrieval_features(self, video, audio)

    def forward(
        self, video: torch.Tensor, audio: torch.Tensor, video_mask: torch.Tensor, audio_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """video (B, 3, H, W) ImageNet-normalised frame; audio (B, 1, T, F) or (B, T, F) normalised
        fbank, time first; video_mask (B, Nv_all), audio_mask (B, Na_all) bool, True = masked, the
        same count per row. Returns the scalar losses."""
        cfg = self.cfg
        video, audio = _video_input(video), _audio_input(audio)  # (B, 3, H, W), (B, 1, F, T)
        for name, mask, num_tokens in (
            ("video_mask", video_mask, self.num_video_tokens),
            ("audio_mask", audio_mask, self.num_audio_tokens),
        ):
            if mask.shape != (video.shape[0], num_tokens):
                raise ValueError(f"{name}: expected ({video.shape[0]}, {num_tokens}), got {tuple(mask.shape)}")
        video_visible, video_masked = split_indices_to(video_mask, video.device)  # (B, Nvv), (B, Nvm)
        audio_visible, audio_masked = split_indices_to(audio_mask, audio.device)  # (B, Nav), (B, Nam)
        video_mask, audio_mask = video_mask.to(video.device), audio_mask.to(audio.device)

        audio_tokens = self.audio_encoder(audio, audio_visible)  # (B, Nav, C)
        video_tokens = self.video_encoder(video, video_visible)  # (B, Nvv, C)
        joint = torch.cat([audio_tokens, video_tokens], dim=1)  # (B, Nav + Nvv, C)
        if self.pack_fusion:  # the shared blocks' three passes in one varlen launch per block
            latent, audio_stream, video_stream = self.shared.forward_packed(
                (joint, audio_tokens, video_tokens), ("unified", "audio", "video")
            )
        else:
            latent = self.shared(joint, "unified")
        audio_pred, video_pred = self.decoder(latent, audio_visible, audio_masked, video_visible, video_masked)

        out = {
            "loss_audio": masked_mse(audio_pred, patch_target(audio, cfg.patch), audio_mask),
            "loss_video": masked_mse(video_pred, patch_target(video, cfg.patch), video_mask),
        }
        if not self.pack_fusion:  # after the decoder, as before: the same drop path draws
            audio_stream, video_stream = self.shared(audio_tokens, "audio"), self.shared(video_tokens, "video")
        out["loss_contrastive"] = self.contrastive_loss(audio_stream, video_stream)
        out["loss"] = out["loss_audio"] + out["loss_video"] + cfg.contrastive_weight * out["loss_contrastive"]
        return out


class CAVMAEFinetune(nn.Module):
    """Classifier on the CAV-MAE encoder, no masking: mean over the output tokens, LayerNorm, Linear.

    mode "multimodal": the shared block's unified stream over [audio, video] tokens; "audio" /
    "video": that modality alone through its own stream (the release's audioonly / videoonly).
    Test-time only, for a model fine-tuned multimodally and given one modality:
    "audio_missing_video" / "video_missing_audio" (the release's missingaudioonly /
    missingvideoonly): the modality alone through the shared blocks twice, once with the unified
    norms (and final `norm`), once with its own (and `audio_norm` / `video_norm`), the two
    mean-pooled features averaged.
    Position tables are trainable here, as in the release.
    """

    MODES = ("multimodal", "audio", "video", "audio_missing_video", "video_missing_audio")
    # the modality each mode reads (None: both) and the shared-block streams it runs
    _INPUT = {
        "multimodal": None,
        "audio": "audio",
        "video": "video",
        "audio_missing_video": "audio",
        "video_missing_audio": "video",
    }
    _STREAMS = {
        "multimodal": ("unified",),
        "audio": ("audio",),
        "video": ("video",),
        "audio_missing_video": ("unified", "audio"),
        "video_missing_audio": ("unified", "video"),
    }

    def __init__(
        self, cfg: ModelConfig, num_classes: int, mode: str = "multimodal", execution: ExecutionConfig | None = None
    ):
        super().__init__()
        if cfg.arch != "cavmae":
            raise ValueError(f"CAVMAEFinetune needs model.arch 'cavmae', got {cfg.arch!r}")
        execution = execution or ExecutionConfig()  # how it runs; the maths are cfg's
        self._check_mode(mode)
        self.cfg = cfg
        self.mode = mode
        self.audio_encoder = ModalityEncoder(cfg, execution, 1, audio_grid(cfg), trainable_pos=True)
        self.video_encoder = ModalityEncoder(cfg, execution, 3, video_grid(cfg), trainable_pos=True)
        self.shared = SharedEncoder(cfg, execution)
        self.head_norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.head = nn.Linear(cfg.width, num_classes)
        _init(self)

    @classmethod
    def _check_mode(cls, mode: str) -> None:
        if mode not in cls.MODES:
            raise ValueError(f"mode {mode!r}: expected one of {', '.join(cls.MODES)}")

    def param_groups(self, weight_decay: float, head_lr_scale: float = 1.0) -> list[dict]:
        """As the pretraining model's; head_lr_scale > 1 puts head_norm and head in their own
        groups with "lr_scale" (the release trains the head at 10-100x the backbone's LR)."""
        scales = {"head": head_lr_scale, "head_norm": head_lr_scale} if head_lr_scale != 1.0 else None
        return param_groups(self, weight_decay, scales)

    def unused_parameters(self, mode: str | None = None) -> list[str]:
        """Names of the parameters the given mode's forward never touches."""
        mode = mode or self.mode
        self._check_mode(mode)
        names = _unused_norm_parameters(self, skip=("shared.",))
        for stream in STREAMS:
            if stream not in self._STREAMS[mode]:
                prefix = _NORM_PREFIX[stream]
                names += [
                    n
                    for n, _ in self.shared.named_parameters(prefix="shared")
                    if n.split(".")[-2] in (f"{prefix}norm1", f"{prefix}norm2", f"{prefix}norm")
                ]
        unused_encoder = {"audio": "video_encoder.", "video": "audio_encoder.", None: None}[self._INPUT[mode]]
        unused = set(names)
        return [
            n for n, _ in self.named_parameters() if n in unused or (unused_encoder and n.startswith(unused_encoder))
        ]

    def features(self, video: torch.Tensor | None, audio: torch.Tensor | None, mode: str | None = None) -> torch.Tensor:
        """The pooled, normalised-stream feature (B, C) the head classifies."""
        mode = mode or self.mode
        self._check_mode(mode)
        modality = self._INPUT[mode]
        if modality is None:
            tokens = torch.cat(
                [self.audio_encoder(_audio_input(audio)), self.video_encoder(_video_input(video))], dim=1
            )  # (B, Na + Nv, C)
        elif modality == "audio":
            tokens = self.audio_encoder(_audio_input(audio))  # (B, Na, C)
        else:
            tokens = self.video_encoder(_video_input(video))  # (B, Nv, C)
        # one stream: its pooled output; two (a missing modality): the mean of both pooled outputs
        pooled = [self.shared(tokens, stream).mean(dim=1) for stream in self._STREAMS[mode]]  # each (B, C)
        return sum(pooled) / len(pooled)

    def forward(self, video: torch.Tensor | None, audio: torch.Tensor | None, mode: str | None = None) -> torch.Tensor:
        """video (B, 3, H, W), audio (B, 1, T, F) or (B, T, F); the unused one may be None in the
        single-modality modes (all but multimodal). Returns logits (B, num_classes)."""
        return self.head(self.head_norm(self.features(video, audio, mode)))

    def retrieval_features(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(video (B, C), audio (B, C)), as CAVMAEPretrain.retrieval_features."""
        return _retrieval_features(self, video, audio)


def _retrieval_features(
    model: nn.Module, video: torch.Tensor, audio: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    a = model.shared(model.audio_encoder(_audio_input(audio)), "audio").mean(dim=1)
    v = model.shared(model.video_encoder(_video_input(video)), "video").mean(dim=1)
    return v, a


@torch.no_grad()
def _init(model: nn.Module) -> None:
    """The release's init: xavier-uniform Linear weights and patch-embedding kernels (as a
    flattened Linear), zero biases, LayerNorm 1 / 0, modality vectors and mask token N(0, 0.02).
    Position tables were filled with sin-cos at construction."""
    model.apply(init_weights)
    for encoder in (model.audio_encoder, model.video_encoder):
        w = encoder.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(encoder.modality, std=0.02)
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        for p in (decoder.audio_modality, decoder.video_modality, decoder.mask_token):
            nn.init.normal_(p, std=0.02)
