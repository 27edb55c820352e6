"""Audio features and augmentation (SPEC.md 1, 'Inputs', audio).

Waveforms are (1, S) float32 tensors at 16 kHz in [-1, 1]; shards store them as int16 PCM.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi

SAMPLE_RATE = 16000
FRAME_SAMPLES = 400  # one 25 ms fbank frame
FBANK_MEAN = -4.2677393  # the release's dataset statistics; the std is doubled on purpose
FBANK_STD = 4.5689974


def fbank(waveform: torch.Tensor, target_frames: int = 256, num_mel_bins: int = 128) -> torch.Tensor:
    """(1, S) float waveform at 16 kHz -> (target_frames, num_mel_bins) float32 normalised fbank.

    Kaldi fbank of the mean-subtracted waveform (25 ms Hanning frames every 10 ms, HTK-compatible
    mel bins, no energy, no dither), zero-padded at the end or cut to target_frames, then
    (x - FBANK_MEAN) / (2 * FBANK_STD).
    """
    if waveform.dim() != 2 or waveform.shape[0] != 1:
        raise ValueError(f"fbank expects a (1, S) mono waveform, got shape {tuple(waveform.shape)}")
    if waveform.shape[1] < FRAME_SAMPLES:
        raise ValueError(f"fbank needs at least {FRAME_SAMPLES} samples (one 25 ms frame), "
                         f"got {waveform.shape[1]}")
    waveform = waveform.float()
    feats = kaldi.fbank(waveform - waveform.mean(), htk_compat=True, sample_frequency=SAMPLE_RATE,
                        use_energy=False, window_type="hanning", num_mel_bins=num_mel_bins,
                        dither=0.0, frame_shift=10, frame_length=25)  # (frames, num_mel_bins)
    pad = target_frames - feats.shape[0]
    feats = F.pad(feats, (0, 0, 0, pad)) if pad > 0 else feats[:target_frames]
    return (feats - FBANK_MEAN) / (2 * FBANK_STD)


def random_gain(waveform: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Scale by m ~ Beta(10, 10) + 0.5 (the release's magnitude augmentation)."""
    return waveform * (rng.betavariate(10, 10) + 0.5)


def random_roll(waveform: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Circular shift in time by a uniform random number of samples.

    The release meant to do this but rolled a (1, S) array along its length-1 first axis, a
    no-op; this rolls along time.
    """
    return torch.roll(waveform, rng.randrange(waveform.shape[-1]), dims=-1)


def to_pcm16(waveform: torch.Tensor) -> bytes:
    """(1, S) float in [-1, 1] -> little-endian int16 bytes (the stored form; from_pcm16 inverts it)."""
    pcm = (waveform * 32768).round().clamp(-32768, 32767).to(torch.int16)
    return pcm.numpy().astype("<i2").tobytes()


def from_pcm16(data: bytes) -> torch.Tensor:
    """Little-endian int16 bytes -> (1, S) float32 in [-1, 1), scaled as torchaudio.load does."""
    pcm = np.frombuffer(data, dtype="<i2")
    return torch.from_numpy(pcm.astype(np.float32) / 32768.0).unsqueeze(0)
