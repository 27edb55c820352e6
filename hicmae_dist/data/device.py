"""The batch on the training device: the one place where the pretraining loader's uint8 video
(or, with data.decode_on cuda, its JPEG bytes) becomes the model's float input.

    x = to_device(batch, engine.device, dtype)   # right after the loader, in the trainer
    engine(x["video"], x["audio"], batch["video_mask"], batch["audio_mask"])

uint8 (B, 16, S, S, 3) / (B, S, S, 3) -> float (B, 3, 16, S, S) / (B, 3, S, S), ImageNet-
normalised with video.normalise_ (the arithmetic the workers used before: the same bits).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hicmae_dist.config import ConfigError, DataConfig
from hicmae_dist.data import video

log = logging.getLogger(__name__)

# what the model reads on the device; the masks stay on the host (the model reads their counts there)
INPUTS = ("video", "audio")
_logged: set[tuple[str, str]] = set()


def check_decode_on(data_cfg: DataConfig) -> None:
    """data.decode_on=cuda needs a GPU here: a ConfigError at start-up, never a silent CPU decode."""
    if data_cfg.decode_on == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "data.decode_on=cuda decodes the JPEGs on the training GPU, but no CUDA device is "
            "available here (torch.cuda.is_available() is False): set data.decode_on=cpu"
        )


def normalise_video(u8: torch.Tensor) -> torch.Tensor:
    """(B, T, S, S, 3) or (B, S, S, 3) uint8 -> (B, 3, T, S, S) / (B, 3, S, S) float32, contiguous,
    ImageNet-normalised on u8's device."""
    order = (0, u8.dim() - 1, *range(1, u8.dim() - 1))  # channels to dim 1
    x = torch.empty([u8.shape[i] for i in order], dtype=torch.float32, device=u8.device)
    x.copy_(u8.permute(order))  # uint8 -> float32 grey levels
    return video.normalise_(x, channel_dim=1)


def to_device(
    batch: dict,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    non_blocking: bool = True,
    keys: tuple[str, ...] = INPUTS,
) -> dict:
    """The batch with `keys` on `device` (cast to dtype when given) and video as the model's float
    input; the other entries as they were. Video arrives as uint8 (normalised here), JPEG bytes
    (decoded here: decode_video) or float (video_out="float": moved as is)."""
    device = torch.device(device)
    out = dict(batch)
    if "jpeg" in batch:
        v = decode_video(batch, device)
        _log_once(device, "jpeg bytes: decoded on the device (torchcodec), cropped, resized, normalised")
    else:
        v = batch["video"].to(device, non_blocking=non_blocking)
        _log_once(device, "uint8: normalised on the device" if v.dtype == torch.uint8 else "float from the workers")
    if v.dtype == torch.uint8:
        v = normalise_video(v)
    out["video"] = v if dtype is None else v.to(dtype)
    for k in keys:
        if k != "video":
            t = batch[k].to(device, non_blocking=non_blocking)
            out[k] = t if dtype is None or not t.is_floating_point() else t.to(dtype)
    return out


def decode_jpegs(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes (1-D uint8 host tensors) -> (3, H, W) uint8 on `device`: nvJPEG on a GPU (one
    batched call), libjpeg-turbo on the CPU."""
    from torchcodec.decoders import decode_jpeg

    return decode_jpeg(list(jpegs), mode="RGB", device=device)


def decode_video(
    batch: dict,
    device: torch.device,
    decode: Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """A jpeg batch (loader module docstring) -> uint8 (B, T, S, S, 3) / (B, S, S, 3) on `device`:
    decode every frame, cut each clip's face crop and crop box, resize to S. `decode` is
    decode_jpegs unless a check passes another decoder."""
    decode = decode or decode_jpegs
    offsets, sizes = batch["jpeg_offsets"], batch["jpeg_sizes"]
    B = offsets.shape[0]
    flat = batch["jpeg"]
    jpegs = [flat[o : o + n] for o, n in zip(offsets.reshape(-1).tolist(), sizes.reshape(-1).tolist())]
    frames = decode(jpegs, device)  # B * T of (3, H, W) uint8
    T = len(frames) // B
    S = int(batch["face"][0, 2])  # the face crop is S x S
    out = torch.empty((B, T, S, S, 3), dtype=torch.uint8, device=device)
    for b, (face, box) in enumerate(zip(batch["face"].tolist(), batch["crop"].tolist())):
        out[b] = crop_resize_float(torch.stack(frames[b * T : (b + 1) * T]), face, box, S).permute(0, 2, 3, 1)
    return out if offsets.dim() == 2 else out[:, 0]


def crop_resize_float(frames: torch.Tensor, face: list[int], box: list[int], size: int) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> (T, 3, S, S) uint8: the face crop, then the box in it, resized bilinear
    (antialias off) in float32 and rounded: the workers' uint8 resize (video.crop_resize) within
    one grey level. One code path for every device, so the CPU tests cover all but the decoder."""
    top, left, h, w = face
    x = frames[..., top : top + h, left : left + w]
    top, left, h, w = box
    x = x[..., top : top + h, left : left + w]
    if (h, w) == (size, size):
        return x
    x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _log_once(device: torch.device, what: str) -> None:
    if (str(device), what) not in _logged:
        _logged.add((str(device), what))
        log.info("batch video on %s: %s", device, what)
