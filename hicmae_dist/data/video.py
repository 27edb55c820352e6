"""Video frames: the stored face crop, JPEG packing, frame sampling and the pretraining
augmentation (docs/models.md, HiCMAE inputs, video).

Frames are (T, 3, H, W) uint8 tensors until to_model_input makes the (3, T, S, S) float32 input.
The loader's fast path (decode_frames_hwc + crop_resize) keeps them channels-last, (T, H, W, 3)
as the JPEG decoder produces them: bilinear resizing of channels-last uint8 has a vectorised
kernel in torch (4x faster than NCHW here). The batch carries them as uint8 (frames_u8_into);
normalise_ turns them to float on the training device (data/device.py), or in the worker on the
float path (frames_into).
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchcodec.decoders import decode_jpeg

FPS = 25  # VoxCeleb2
FRAME_STRIDE = 4  # the model sees one frame in 4
MIN_SOURCE_FRAMES = 16 * FRAME_STRIDE  # the span of the model's 16 frames: 64 frames, 2.56 s
SOURCE_SIZE = 224  # VoxCeleb2 face tracks
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (x / 255 - mean) / std as one multiply-add: x * _NORM_SCALE + _NORM_SHIFT, per channel
_NORM_SCALE = 1 / (255 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
_NORM_SHIFT = -torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
_NORM_ON: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # (scale, shift) on each device used
MULTISCALE_SCALES = (1.0, 0.875, 0.75, 0.66)
# The 13 fixed crop positions of VideoMAE's GroupMultiScaleCrop, as (x, y) in quarter steps of
# the free room: 4 corners, centre, 4 edge centres, 4 quarter points.
MULTISCALE_OFFSETS = (
    (0, 0),
    (4, 0),
    (0, 4),
    (4, 4),
    (2, 2),
    (0, 2),
    (4, 2),
    (2, 4),
    (2, 0),
    (1, 1),
    (3, 1),
    (1, 3),
    (3, 3),
)


def face_crop(frames: torch.Tensor, size: int = 160) -> torch.Tensor:
    """(T, 3, 224, 224) -> (T, 3, size, size): rows 0:size, centred columns (32:192 for 160,
    16:208 for 192), the crop of the spec."""
    if tuple(frames.shape[-2:]) != (SOURCE_SIZE, SOURCE_SIZE):
        raise ValueError(
            f"face_crop expects {SOURCE_SIZE}x{SOURCE_SIZE} frames, got {frames.shape[-1]}x{frames.shape[-2]}"
        )
    left = (SOURCE_SIZE - size) // 2
    return frames[..., :size, left : left + size]


def encode_jpegs(frames: torch.Tensor, quality: int = 90) -> tuple[bytes, list[int]]:
    """(T, 3, H, W) uint8 -> (concatenated JPEG bytes, byte size of each frame)."""
    parts = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
        parts.append(buf.getvalue())
    return b"".join(parts), [len(p) for p in parts]


def decode_jpegs(blob: bytes, sizes: list[int], indices: range) -> torch.Tensor:
    """The frames at `indices` of a blob made by encode_jpegs -> (len(indices), 3, H, W) uint8."""
    ends = np.cumsum(sizes)
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    chosen = [data[ends[i] - sizes[i] : ends[i]] for i in indices]
    return torch.stack(decode_jpeg(chosen, mode="RGB"))


def jpeg_slices(blob: bytes, sizes: list[int], indices) -> list[torch.Tensor]:
    """The JPEGs at `indices` of a blob made by encode_jpegs, as uint8 tensors (no copy)."""
    ends = np.cumsum(sizes)
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return [data[ends[i] - sizes[i] : ends[i]] for i in indices]


def decode_frames_hwc(blob: bytes, sizes: list[int], indices) -> torch.Tensor:
    """The frames at `indices` -> (len(indices), H, W, 3) uint8, contiguous (channels-last)."""
    frames = decode_jpeg(jpeg_slices(blob, sizes, indices), mode="RGB")  # (3, H, W) views of HWC data
    return torch.stack([f.permute(1, 2, 0) for f in frames])


def face_box(stored_size: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the spec's size x size face crop inside a stored frame of
    stored_size: the whole frame when they match, else rows 0:size and centred columns (the
    crop face_crop makes from a 224 frame)."""
    if stored_size == size:
        return 0, 0, size, size
    if stored_size != SOURCE_SIZE or size > SOURCE_SIZE:
        raise ValueError(f"cannot take a {size}px face crop from {stored_size}px stored frames")
    return 0, (SOURCE_SIZE - size) // 2, size, size


def crop_resize(
    frames: torch.Tensor, box: tuple[int, int, int, int] | None, face: tuple[int, int, int, int] | None, size: int
) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, S, S) uint8, channels-last memory (a view when no resize).

    `face` (top, left, h, w) is cut first (see face_box); `box` is a crop inside it (multi-scale
    crop, in face-crop pixels) resized back to S, bilinear on uint8 as PIL does in the release
    (torch rounds the result to uint8: the batch's grey levels are integers).
    """
    if face is not None:
        top, left, h, w = face
        frames = frames[:, top : top + h, left : left + w]
    if box is not None:
        top, left, h, w = box
        frames = frames[:, top : top + h, left : left + w]
    x = frames.permute(0, 3, 1, 2)  # (T, 3, h, w) view, channels-last memory
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def normalise_(x: torch.Tensor, channel_dim: int = 0) -> torch.Tensor:
    """ImageNet normalisation of grey levels in place, float32: x * _NORM_SCALE + _NORM_SHIFT per
    channel (channels along channel_dim). The one copy of this arithmetic: the loader's float
    path and the device-side normalisation (data/device.py) give the same bits."""
    shape = [1] * x.dim()
    shape[channel_dim] = 3
    if x.device not in _NORM_ON:  # once per device: a host-to-GPU copy per batch would wait on the GPU
        _NORM_ON[x.device] = _NORM_SCALE.to(x.device).view(3), _NORM_SHIFT.to(x.device).view(3)
    scale, shift = _NORM_ON[x.device]
    return x.mul_(scale.view(shape)).add_(shift.view(shape))


def frames_u8_into(
    out: torch.Tensor,
    frames: torch.Tensor,
    box: tuple[int, int, int, int] | None,
    face: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> out (T, S, S, 3) uint8: crop_resize, channels-last as decoded."""
    return out.copy_(crop_resize(frames, box, face, out.shape[-2]).permute(0, 2, 3, 1))


def frames_into(
    out: torch.Tensor,
    frames: torch.Tensor,
    box: tuple[int, int, int, int] | None,
    face: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> out (3, T, S, S) float32, ImageNet-normalised, written in place:
    crop_resize, then normalise_. The same values as to_model_input up to the resize kernel's
    rounding (at most 1 grey level)."""
    out.copy_(crop_resize(frames, box, face, out.shape[-1]).permute(1, 0, 2, 3))  # uint8 -> float32
    return normalise_(out)


def _check_image_size(frame: torch.Tensor, size: tuple[int, ...]) -> None:
    if tuple(frame.shape[:2]) != tuple(size):
        raise ValueError(f"frame is {frame.shape[1]}x{frame.shape[0]}, expected {size[1]}x{size[0]}")


def image_u8_into(out: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 of the output size -> out (H, W, 3) uint8."""
    _check_image_size(frame, out.shape[:2])
    return out.copy_(frame)


def image_into(out: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 of the output size -> out (3, H, W) float32, ImageNet-normalised, in place."""
    _check_image_size(frame, out.shape[-2:])
    out.copy_(frame.permute(2, 0, 1))
    return normalise_(out)


def cavmae_frame_indices(total: int, fps: float = FPS, count: int = 10) -> list[int]:
    """CAV-MAE's frames of a clip: int(i * (n / count)) for i < count, n = the frames of the
    first 10 s (the audio's span), as the release's extract_video_frame.py. (The release then
    seeks to frame_idx - 1, one frame early; this takes the frame it names.)"""
    n = min(int(fps * 10), total)
    return [int(i * (n / count)) for i in range(count)]


def sample_start(num_stored: int, num_frames: int, rng: random.Random) -> int:
    """Random first stored frame of a window of num_frames consecutive stored frames (stored
    frames are every FRAME_STRIDE-th source frame, so this is the spec's stride-4 sampling)."""
    if num_stored < num_frames:
        raise ValueError(f"{num_stored} stored frames, need at least {num_frames}")
    return rng.randrange(num_stored - num_frames + 1)


def multiscale_crop_box(size: int, rng: random.Random) -> tuple[int, int, int, int]:
    """A random (top, left, height, width) multi-scale crop of a size x size frame.

    Sides are int(size * scale) for the MULTISCALE_SCALES; height and width are at most one
    scale step apart (10 pairs); the position is one of the 13 MULTISCALE_OFFSETS.
    """
    sides = [int(size * s) for s in MULTISCALE_SCALES]
    pairs = [(h, w) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= 1]
    height, width = rng.choice(pairs)
    x, y = rng.choice(MULTISCALE_OFFSETS)
    return y * ((size - height) // 4), x * ((size - width) // 4), height, width


def to_model_input(frames: torch.Tensor, box: tuple[int, int, int, int] | None, out_size: int) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> (3, T, out_size, out_size) float32, ImageNet-normalised.

    With a box, the frames are cropped to it and resized back to out_size, bilinear on uint8
    as PIL does in the release; without one they must already be out_size.
    """
    if box is not None:
        top, left, height, width = box
        frames = frames[..., top : top + height, left : left + width]
        if (height, width) != (out_size, out_size):
            frames = F.interpolate(frames, size=(out_size, out_size), mode="bilinear", align_corners=False)
    if tuple(frames.shape[-2:]) != (out_size, out_size):
        raise ValueError(f"frames are {frames.shape[-1]}x{frames.shape[-2]}, expected {out_size}x{out_size}")
    return torch.addcmul(_NORM_SHIFT, frames.float(), _NORM_SCALE).permute(1, 0, 2, 3)
